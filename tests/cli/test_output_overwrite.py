"""Output commands never overwrite or delete what they did not create in this run (issue 22, items
5 and 6): `dpo-fast reproduce frontier` refuses a non-empty --output-dir and `dpo-fast eval` an existing
--output-file, leaving them byte for byte unchanged, unless asked (--overwrite-output-dir /
--overwrite-output-file)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dpo_fast.cli import main
from dpo_fast_tools.demo import TRAIN_FILE
from helpers_runs import tiny  # noqa: F401  (the tiny model fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_frontier_refuses_a_non_empty_output_dir_unchanged(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "model.safetensors").write_bytes(b"my SFT checkpoint")
    (out / "pairs.jsonl").write_text('{"prompt": "my data", "chosen": "a", "rejected": "b"}\n')
    before = _snapshot(out)
    assert main(["reproduce", "frontier", "--output-dir", str(out), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite-output-dir" in err and err.count("\n") == 1, err
    assert _snapshot(out) == before


def test_frontier_overwrite_clears_the_directory_first(tmp_path, monkeypatch):
    from dpo_fast_tools.reproduce import frontier

    out = tmp_path / "mine"
    out.mkdir()
    (out / "pairs.jsonl").write_text("old\n")
    seen = {}

    def fake_run(self):  # the grid itself is tested in test_reproduce; here only what precedes it
        seen["listing"] = sorted(p.name for p in out.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(frontier._Grid, "run", fake_run)
    with pytest.raises(KeyboardInterrupt):
        frontier.run_frontier(out, frontier.QUICK, overwrite=True, progress=None)
    assert seen["listing"] == [".dpo_fast.lock"]
    with pytest.raises(Exception, match="not empty"):
        (out / "x").write_text("y")
        frontier.run_frontier(out, frontier.QUICK, progress=None)


def _eval_args(tiny, output):
    return ["eval", "--model", str(tiny), "--data", str(TRAIN_FILE), "--split", "train[:8]", "--reference-free",
            "--max-length", "64", "--output-file", str(output)]


def test_eval_refuses_an_existing_metrics_file_unchanged(tiny, tmp_path, capsys):
    output = tmp_path / "eval_metrics.json"
    output.write_text('{"mine": 1}\n')
    assert main(_eval_args(tiny, output)) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite-output-file" in err and err.count("\n") == 1, err
    assert output.read_text() == '{"mine": 1}\n'
    assert main(_eval_args(tiny, output) + ["--overwrite-output-file"]) == 0
    assert "metrics" in json.loads(output.read_text())


FAST = dict(optimizer="adamw", learning_rate=3e-3, warmup_steps=2, logging_steps=1, save_steps=0, progress=False,
            tensorboard=False, max_length=64, split="train[:16]", batch_size=8)


def test_a_refused_rerun_leaves_the_lock_file_unchanged_too(tiny, tmp_path):
    """Issue 22, item 9: the README promises the earlier run's directory byte for byte unchanged."""
    from dpo_fast.trainer import TrainError, train

    out = tmp_path / "run"
    train(str(tiny), str(TRAIN_FILE), out, max_steps=1, **FAST)
    assert (out / ".dpo_fast.lock").read_text().startswith("pid ")
    (out / ".dpo_fast.lock").write_text("pid 1 on elsewhere, since 2000-01-01 00:00:00\n")  # not this process
    before = _snapshot(out)
    with pytest.raises(TrainError, match="holds an earlier run"):
        train(str(tiny), str(TRAIN_FILE), out, max_steps=1, **FAST)
    assert _snapshot(out) == before  # the lock file included


def test_a_missing_ref_cache_is_named_and_leaves_no_output_dir(tiny, tmp_path, capsys):
    """Issue 22, item 9: "does not exist", not "no manifest.json"; no empty output dir with a lock."""
    out = tmp_path / "new_run"
    rc = main(["train", "--model", str(tiny), "--data", str(TRAIN_FILE), "--output-dir", str(out), "--ref-cache",
               str(tmp_path / "nowhere"), "--max-steps", "1", "--no-progress", "--no-tensorboard"])
    err = capsys.readouterr().err
    assert rc == 2 and "--ref-cache" in err and "does not exist" in err and err.count("\n") == 1, err
    assert not out.exists()
