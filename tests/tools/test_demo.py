"""The embedded demo: its data set, and a short run of the whole pipeline (`dpo-fast demo --quick`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_fast_tools import demo

ROOT = Path(__file__).resolve().parents[2]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _number(prompt: str) -> int:
    digits = re.search(r"((?:\d )*\d) \?\nAnswer:$", prompt)
    assert digits, prompt
    return int(digits.group(1).replace(" ", ""))


def test_embedded_data_is_a_learnable_held_out_task():
    train, held_out = _rows(demo.TRAIN_FILE), _rows(demo.EVAL_FILE)
    assert len(train) >= 500 and len(held_out) >= 100
    for row in train + held_out:
        n = _number(row["prompt"])
        right, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
        assert (row["chosen"], row["rejected"]) == (f" {right}", f" {wrong}")
    # Held-out numbers never occur in training, and both answers are preferred about equally often.
    assert not {_number(r["prompt"]) for r in train} & {_number(r["prompt"]) for r in held_out}
    for rows in (train, held_out):
        share = sum(r["chosen"] == " even" for r in rows) / len(rows)
        assert 0.4 < share < 0.6


def test_embedded_data_is_what_the_script_generates(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for name in ("parity_train.jsonl", "parity_eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (demo.DATA_DIR / name).read_bytes(), name


def test_tokenizer_gives_one_token_per_digit(tmp_path):
    _, tok = demo.build_demo_model(tmp_path / "m", vocab_size=128, seed=0, hidden_size=16, layers=1, heads=2)
    assert tok.tokenize("Even or odd: 4 8 1 7 ?\nAnswer:")[-6:] == ["8", "1", "7", "?", "Answer", ":"]
    assert tok.unk_token_id not in tok(" ".join(r["prompt"] + r["chosen"] for r in _rows(demo.EVAL_FILE)))["input_ids"]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = demo.run_demo(out, quick=True, progress=False, threads=1)
    return out, summary


def test_quick_demo_runs_the_pipeline(quick_demo):
    out, summary = quick_demo
    assert (out / "model_init" / "model.safetensors").exists()
    assert json.loads((out / "ref_cache" / "manifest.json").read_text())["complete"]
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["pairs"] == after["pairs"] == 160
    assert abs(before["rewards/margins"]) < 1e-4  # the reference is the initial policy
    assert after["rewards/margins"] > 0.05
    assert after["rewards/accuracies"] > 0.6
    assert after["loss"] < before["loss"]
    assert summary["train"]["global_step"] == demo.QUICK["max_steps"]


def test_quick_demo_memory_comparison(quick_demo):
    _, summary = quick_demo
    m = summary["memory"]
    # The plain way holds at least the float32 logits; the fused loss never builds them.
    assert m["reference_bytes"] >= m["logits_bytes_fp32"]
    assert m["fused_bytes"] < m["reference_bytes"] / 2
    assert m["loss_agreement"] < 1e-4


def test_quick_demo_report(quick_demo):
    _, summary = quick_demo
    text = demo.format_report(summary)
    for needle in ("reward accuracy", "reward margin", "policy prefers chosen", "dpo_fast.loss(hidden=, weight=)",
                   "plain PyTorch", "summary.json"):
        assert needle in text


def test_cli_options():
    from dpo_fast.cli import build_parser

    args = build_parser().parse_args(["demo", "--quick", "--max-steps", "3", "--output-dir", "x"])
    assert (args.quick, args.max_steps, args.output_dir, args.threads) == (True, 3, "x", 1)
    assert torch.get_num_threads() >= 1
