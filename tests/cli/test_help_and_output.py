"""What the commands say (issue 22, item 8): help texts that read right (no "--no-progress ...
(default: True)"), a --report-to default that works without extra installs, tensorboard and wandb
missing treated alike, --no-progress hiding every bar (data loading and tokenizing too), and the
tokenization summary printed once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_fast.cli import build_parser
from dpo_fast_tools.demo import TRAIN_FILE
from dpo_fast.trainer import TrainError, make_config
from dpo_fast.trainer import config as train_config
from helpers_runs import tiny  # noqa: F401  (the tiny model fixture)

ROOT = Path(__file__).resolve().parents[2]


def _help(command: str) -> str:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return " ".join(sub.format_help().split())  # one line: options' help texts wrap


@pytest.mark.parametrize("command", ["train", "precompute-ref", "demo"])
def test_negative_flags_do_not_read_as_off_by_default(command):
    text = _help(command)
    shown = {}
    for flag in ("--no-progress", "--no-tensorboard"):
        m = re.search(re.escape(flag) + r" ([a-z].*?)(?= --[a-z]|$)", text)  # the option's help, not the usage
        if m:
            shown[flag] = m.group(1)
            assert "(default: True)" not in m.group(1), m.group(0)
    assert "shown" in shown["--no-progress"], shown


def test_report_to_default_works_without_extra_packages_and_says_so():
    text = _help("train")
    m = re.search(r"--report-to TARGETS (.*?)(?= --)", text)
    assert m and "default: none" in m.group(1), text
    cfg = make_config("m", "d", "o")
    cfg.check()
    assert cfg.report_targets() == ()


@pytest.mark.parametrize("target", ["tensorboard", "wandb"])
def test_a_missing_reporting_package_is_refused_the_same_way(monkeypatch, target):
    monkeypatch.setattr(train_config, "_importable", lambda name: False)
    cfg = make_config("m", "d", "o", report_to=target)
    with pytest.raises(TrainError, match=rf"--report-to {target}: the {target} package is not installed"):
        cfg.check()


def _run(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "dpo_fast", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("command", ["train", "precompute-ref"])
def test_no_progress_hides_every_bar_and_the_summary_is_printed_once(tiny, tmp_path, command):
    data = tmp_path / "fresh.jsonl"  # a file datasets has not seen: it is loaded and tokenized anew
    data.write_text("".join(TRAIN_FILE.read_text().splitlines(keepends=True)[:24]))
    extra = ["--max-steps", "1", "--batch-size", "8"] if command == "train" else []
    res = _run(command, "--model", tiny, "--data", data, "--output-dir", tmp_path / "out", "--max-length", "64",
               "--no-progress", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout + res.stderr
    for bar in ("Generating train split", "tokenizing preference data", "Loading weights", "it/s]", "examples/s]"):
        assert bar not in text, text
    assert text.count("examples kept") == 1, text
    assert "not installed" not in text, text  # the default reporting needs no extra package
