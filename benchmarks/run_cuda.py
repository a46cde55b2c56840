"""The CUDA benchmark: the full sweep (or --quick), then the target cases, on the visible GPU.

    python benchmarks/run_cuda.py [--quick] [--no-targets] [--peak-bw GB/s --peak-tflops TF]

Writes benchmarks/results/cuda/{results.csv,results.md,*.png} and .../cuda/targets/, and
updates the CUDA tables in benchmarks/README.md. Commit them beside the CPU results, with the
GPU's name (it is in the files). Unknown GPUs need --peak-bw / --peak-tflops for the
percent-of-peak columns.
"""

from __future__ import annotations

import argparse
import sys

from _common import bench


def run() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-targets", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    a, rest = ap.parse_known_args()
    rc = 0
    if not a.no_sweep:
        rc |= bench("cuda", (["--quick"] if a.quick else []) + rest)
    if not a.no_targets:
        rc |= bench("cuda", ["--targets"] + rest, sub=("targets",))
    return rc


if __name__ == "__main__":
    sys.exit(run())
