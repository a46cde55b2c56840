"""Ctrl-C (SIGINT) during `dpo-fast train` and `dpo-fast reproduce` (issue 22, item 7): one line saying
where the run stopped, its last checkpoint and how to resume, exit status 130, the output directory's
lock released, and nothing half-written left looking complete. A real SIGINT to a real subprocess."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpo_fast_tools.demo import TRAIN_FILE
from helpers_runs import tiny  # noqa: F401  (the tiny model fixture)

ROOT = Path(__file__).resolve().parents[2]


def _start(*args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen([sys.executable, "-m", "dpo_fast", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 240) -> tuple[int, str, str]:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"never got ready (rc {proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _lock_is_free(directory: Path) -> bool:
    with open(directory / ".dpo_fast.lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def test_ctrl_c_during_train_says_where_and_how_to_resume(tiny, tmp_path):
    out = tmp_path / "run"
    proc = _start("train", "--model", tiny, "--data", TRAIN_FILE, "--split", "train[:64]", "--output-dir", out,
                  "--max-steps", "100000", "--save-steps", "3", "--batch-size", "8", "--max-length", "64",
                  "--logging-steps", "1", "--no-progress", "--no-tensorboard")
    rc, _, err = _interrupt_when(proc, lambda: (out / "checkpoint-3").exists())
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("dpo-fast train: interrupted at step "), line
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert f"checkpoint-{last}" in line and "--resume" in line and str(out) in line, line
    assert _lock_is_free(out)
    assert not list(out.glob(".checkpoint-*")) and not (out / "summary.json").exists()
    assert all((p / "trainer_state.json").exists() for p in out.glob("checkpoint-*"))


def test_ctrl_c_during_reproduce_says_what_is_left(tmp_path):
    out = tmp_path / "frontier"
    proc = _start("reproduce", "frontier", "--quick", "--output-dir", out)
    rc, _, err = _interrupt_when(proc, lambda: (out / ".dpo_fast.lock").exists())
    time.sleep(0)  # the SFT model is training by now
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("dpo-fast reproduce frontier: interrupted") and "--overwrite-output-dir" in line, line
    assert _lock_is_free(out)
    assert not (out / "frontier.csv").exists() and not (out / "frontier.json").exists()
