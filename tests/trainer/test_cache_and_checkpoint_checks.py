"""What a run trusts is checked first (issue 22, items 6b, 6c and parts of 9): a reference cache
computed in another dtype is accepted with a note naming it (and its own fingerprint is the one
printed), a damaged checkpoint is never loaded (--resume falls back to the previous one, saying so),
--resume past the end changes nothing, a damaged or half-written cache says how to repair it."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from dpo_fast.cli import main
from dpo_fast_tools.demo import TRAIN_FILE
from dpo_fast.refcache import precompute_reference
from dpo_fast.trainer import TrainError, train
from helpers_runs import tiny  # noqa: F401  (the tiny model fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = dict(optimizer="adamw", learning_rate=3e-3, warmup_steps=2, logging_steps=1, save_steps=0, progress=False,
            tensorboard=False, max_length=64, split="train[:16]", batch_size=8)


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# 6b. A cache computed in another dtype: accepted, with a note; its own fingerprint printed


def test_a_bfloat16_cache_is_accepted_with_a_note_and_its_own_fingerprint(tiny, tmp_path, caplog):
    cache = tmp_path / "cache_bf16"
    precompute_reference(str(tiny), str(TRAIN_FILE), cache, split="train[:16]", max_length=64, dtype="bfloat16",
                         progress=False)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["fingerprint"]["dtype"] == "bfloat16"
    with caplog.at_level(logging.INFO):
        train(str(tiny), str(TRAIN_FILE), tmp_path / "run", ref_cache=str(cache), max_steps=1, **FAST)
    text = caplog.text
    assert "computed in bfloat16" in text and "float32" in text, text
    assert manifest["fingerprint_sha256"][:12] in text  # the cache's own fingerprint, which names its dtype


# ----------------------------------------------------------------------------------------------
# 6c. Checkpoints are verified before --resume trusts them; --resume past the end changes nothing


@pytest.fixture
def run_at_4(tiny, tmp_path):
    out = tmp_path / "run"
    train(str(tiny), str(TRAIN_FILE), out, max_steps=4, seed=0, **dict(FAST, save_steps=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt"])
def test_resume_skips_a_damaged_newest_checkpoint_saying_so(tiny, run_at_4, damaged, caplog):
    _truncate(run_at_4 / "checkpoint-4" / damaged)
    with caplog.at_level(logging.WARNING):
        summary = train(str(tiny), str(TRAIN_FILE), run_at_4, max_steps=6, seed=0, resume=True,
                        **dict(FAST, save_steps=2))
    assert summary["train"]["global_step"] == 6
    assert f"checkpoint-4 is damaged ({damaged}" in caplog.text and "checkpoint-2" in caplog.text, caplog.text
    steps = [json.loads(line)["step"] for line in (run_at_4 / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6] or steps[-4:] == [3, 4, 5, 6]


def test_a_bad_checkpoint_named_or_the_only_one_left_is_refused_in_one_line(tiny, run_at_4, capsys):
    _truncate(run_at_4 / "checkpoint-4" / "model.safetensors")
    _truncate(run_at_4 / "checkpoint-2" / "optimizer.pt")
    before = _snapshot(run_at_4)
    common = ["train", "--model", str(tiny), "--data", str(TRAIN_FILE), "--split", "train[:16]", "--max-length", "64",
              "--batch-size", "8", "--optimizer", "adamw", "--learning-rate", "3e-3", "--warmup-steps", "2",
              "--logging-steps", "1", "--save-steps", "2", "--max-steps", "6", "--seed", "0", "--no-progress", "--no-tensorboard",
              "--output-dir", str(run_at_4)]
    for resume in ("--resume", f"--resume={run_at_4 / 'checkpoint-4'}"):
        assert main(common + [resume]) == 2
        err = capsys.readouterr().err
        assert "is damaged" in err and "Traceback" not in err and err.count("\n") == 1, err
    assert _snapshot(run_at_4) == before


def test_resume_past_the_end_is_refused_and_changes_nothing(tiny, run_at_4):
    (run_at_4 / ".dpo_fast.lock").write_text("pid 1 on elsewhere, since 2000-01-01 00:00:00\n")  # compared too
    before = _snapshot(run_at_4)
    with pytest.raises(TrainError, match=r"already at step 4.*--max-steps 2.*nothing"):
        train(str(tiny), str(TRAIN_FILE), run_at_4, max_steps=2, seed=0, resume=True, **dict(FAST, save_steps=2))
    assert _snapshot(run_at_4) == before
