"""`dpo-fast train --tp N` and `precompute-ref --tp N` under torchrun (gloo, CPU): a tiny Llama sharded
with transformers' plan, the vocab-parallel loss, data parallelism across the tp groups. The losses,
evaluation and weights equal one process with the same global batch; resume continues bit for bit;
the saved model loads with from_pretrained; bad settings are refused before anything is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_fast_tools.demo import EVAL_FILE, TRAIN_FILE, build_demo_model
from dpo_fast.refcache import ReferenceCache, precompute_reference
from dpo_fast.trainer import train
from helpers_tiny import one_thread, run_in_session

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--data", str(TRAIN_FILE), "--split", "train[:48]", "--batch-size", "8", "--optimizer", "adamw", "--lr", "3e-3",
        "--warmup-steps", "1", "--logging-steps", "1", "--seed", "2", "--max-length", "64", "--no-progress",
        "--no-tensorboard", "--eval-data", str(EVAL_FILE), "--eval-split", "test[:6]", "--eval-batch-size", "2"]
KEYS = ("loss", "rewards/margins", "logps/chosen", "logits/rejected", "grad_norm")

# One torchrun launch runs several commands (launches are the slow part on 2 cores).
_DRIVER = """
import faulthandler, json, sys
faulthandler.dump_traceback_later(400, exit=True)
from dpo_fast.cli import main
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    if code != 0:
        sys.exit(code)
"""


def _torchrun(tmp_path, nproc: int, commands: list[list[str]], timeout: float = 600) -> subprocess.CompletedProcess:
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script),
           json.dumps(commands)]
    return run_in_session(cmd, env, timeout)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"phase"' not in line]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tp") / "model"
    build_demo_model(path, vocab_size=101, seed=0, hidden_size=32, layers=2, heads=4)  # V odd: uneven shards
    return path


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    with one_thread():
        train(str(tiny), str(TRAIN_FILE), out, split="train[:48]", batch_size=8, optimizer="adamw", learning_rate=3e-3,
              warmup_steps=1, logging_steps=1, seed=2, max_length=64, progress=False, tensorboard=False,
              eval_data=str(EVAL_FILE), eval_split="test[:6]", eval_batch_size=2, max_steps=3, save_steps=0)
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = _records(a), _records(b)
    assert len(ra) == len(rb) == 3
    for x, y in zip(ra, rb):
        for k in KEYS:
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (b.name, x["step"], k)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for phase in ("eval_before", "eval_after"):
        assert sb[phase]["pairs"] == sa[phase]["pairs"] == 6
        for k in ("loss", "rewards/accuracies", "logps/chosen", "logits/chosen"):
            assert sb[phase][k] == pytest.approx(sa[phase][k], rel=1e-5, abs=1e-6), (b.name, phase, k)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_tp2_matches_one_process_resumes_and_precomputes(tiny, one_process, tmp_path):
    tp, resumed, cache = tmp_path / "tp", tmp_path / "resumed", tmp_path / "cache"
    model = ["--model", str(tiny)]
    res = _torchrun(tmp_path, 2, [
        ["train", *model, *ARGS, "--output-dir", str(tp), "--tp", "2", "--max-steps", "3", "--save-steps", "2"],
        ["train", *model, *ARGS, "--output-dir", str(resumed), "--tp", "2", "--max-steps", "2", "--save-steps", "1"],
        ["train", *model, *ARGS, "--output-dir", str(resumed), "--tp", "2", "--max-steps", "3", "--save-steps", "1",
         "--resume"],
        ["precompute-ref", *model, "--data", str(TRAIN_FILE), "--split", "train[:24]", "--output-dir", str(cache),
         "--tp", "2", "--batch-size", "4", "--shard-size", "8", "--no-progress"],
    ])
    assert res.returncode == 0, res.stderr[-4000:]
    _assert_same_run(one_process, tp)
    assert json.loads((tp / "summary.json").read_text())["train"]["lm_head_rows_per_rank"] == 51  # 51 + 50 of 101
    # Resumed from checkpoint-2 of a tp run: bit for bit the uninterrupted tp run.
    a, b = _weights(tp), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _records(tp)] == [r["loss"] for r in _records(resumed)]
    # Checkpoints and the final model are whole models, loadable without torchrun.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(tp / "checkpoint-2")).lm_head.weight.shape == (101, 32)
    assert "distributed_config" not in json.loads((tp / "config.json").read_text())
    # precompute-ref --tp 2: the values of the one-process cache.
    single = tmp_path / "cache1"
    precompute_reference(str(tiny), str(TRAIN_FILE), single, split="train[:24]", batch_size=4, progress=False)
    x = ReferenceCache.open(cache).to_pandas().set_index("example_id").sort_index()
    y = ReferenceCache.open(single).to_pandas().set_index("example_id").sort_index()
    assert list(x.index) == list(y.index)
    for c in ("ref_chosen_logps", "ref_rejected_logps"):
        assert (x[c] - y[c]).abs().max() < 1e-4


def test_tp2_with_two_data_groups_matches_one_process(tiny, one_process, tmp_path):
    """Four ranks: two data-parallel replicas of a model sharded over two ranks each."""
    out = tmp_path / "tp2x2"
    res = _torchrun(tmp_path, 4, [["train", "--model", str(tiny), *ARGS, "--output-dir", str(out), "--tp", "2",
                                   "--max-steps", "3", "--save-steps", "0"]])
    assert res.returncode == 0, res.stderr[-4000:]
    _assert_same_run(one_process, out)
    assert json.loads((out / "summary.json").read_text())["train"]["lm_head_rows_per_rank"] == 51


def test_bad_tp_settings_are_refused_before_loading(tiny, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers import AutoTokenizer

    gpt2 = tmp_path / "gpt2"
    tok = AutoTokenizer.from_pretrained(str(tiny))
    GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    res = _torchrun(tmp_path, 2, [["train", "--model", str(tiny), *ARGS, "--output-dir", str(tmp_path / "a"),
                                   "--tp", "3"]])
    # torchrun exits 1 when a worker fails; the workers print the one-line error and exit 2
    assert res.returncode != 0 and "dpo-fast train: error: --tp 3 needs torchrun with a world size that is a " \
        "multiple of it (world size 2)" in res.stderr
    res = _torchrun(tmp_path, 2, [["train", "--model", str(gpt2), *ARGS, "--output-dir", str(tmp_path / "b"),
                                   "--tp", "2"]])
    assert res.returncode != 0 and "the gpt2 family has no tensor-parallel plan" in res.stderr
    assert not (tmp_path / "b" / "ref_cache").exists()
