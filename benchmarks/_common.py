"""Shared by the scripts in benchmarks/: run `dpo-fast bench` (dpo_fast_tools/bench/) into
benchmarks/results/<device>/[sub/] and paste the table into benchmarks/README.md, between its
<!-- bench:<device>[:sub] --> markers."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from dpo_fast_tools.bench import update_readme  # noqa: E402
from dpo_fast.cli import main  # noqa: E402

README = os.path.join(HERE, "README.md")


def results_dir(device: str, *sub: str) -> str:
    return os.path.join(HERE, "results", device, *sub)


def bench(device: str, extra: list[str], sub: tuple[str, ...] = (), readme: bool = True) -> int:
    """`dpo-fast bench --device DEVICE EXTRA` into results/DEVICE/SUB; then the README section
    bench:DEVICE[:SUB] (e.g. bench:cpu:targets, bench:cpu:linear) gets its results.md."""
    out = results_dir(device, *sub)
    rc = main(["bench", "--device", device, "--output-dir", out] + extra)
    if readme and rc == 0:
        update_readme(README, os.path.join(out, "results.md"), ":".join(["bench", device, *sub]))
    return rc
