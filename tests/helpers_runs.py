"""What the run tests share: one tiny model on disk per test module, the CLI run in a subprocess as a
user would run it, and readers of a run's metrics and weights."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from dpo_fast_tools.demo import build_demo_model
from helpers_tiny import run_in_session

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model"
    build_demo_model(path, vocab_size=256, seed=0, hidden_size=32, layers=2, heads=4)
    return path


def cli_env() -> dict:
    """This checkout's dpo_fast first on the path, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_cli(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return run_in_session(cmd, cli_env(), timeout)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train_records(out) -> list[dict]:
    return [r for r in records(out) if "phase" not in r]


def weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))
