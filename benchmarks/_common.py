"""Shared by the scripts in benchmarks/: run `dpo-fast bench` into benchmarks/results/<device>/
and paste the table into benchmarks/README.md (between its bench:<device> markers)."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from dpo_fast.cli import main  # noqa: E402

README = os.path.join(HERE, "README.md")


def results_dir(device: str, *sub: str) -> str:
    return os.path.join(HERE, "results", device, *sub)


def bench(device: str, extra: list[str], sub: tuple[str, ...] = (), readme: bool = True) -> int:
    args = ["bench", "--device", device, "--output-dir", results_dir(device, *sub)] + extra
    if readme:
        args += ["--readme", README]
    return main(args)
