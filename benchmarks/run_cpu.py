"""The CPU benchmark: the quick sweep (default) or the full one, then the target cases.

    python benchmarks/run_cpu.py            # --quick sweep + targets  (about 10 + 15 minutes)
    python benchmarks/run_cpu.py --full     # the full sweep + targets (a few hours)
    python benchmarks/run_cpu.py --linear   # the linear op's full sweep + targets (about 1 + 0.5 hours)
    python benchmarks/run_cpu.py --no-targets

Writes benchmarks/results/cpu/{results.csv,results.md,*.png} (--linear: .../cpu/linear/) and
.../cpu/targets/, and updates the tables in benchmarks/README.md. Other options go to
`dpo-fast bench` (e.g. --impls pytorch,dpo_fast:cpu,trl,gemm3,gemm4).
"""

from __future__ import annotations

import argparse
import sys

from _common import bench


def run() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the full sweep instead of --quick")
    ap.add_argument("--linear", action="store_true",
                    help="only the linear op's full sweep (fp32; bf16 at its base point), into results/cpu/linear/")
    ap.add_argument("--no-targets", action="store_true", help="skip the target cases")
    ap.add_argument("--no-sweep", action="store_true", help="only the target cases")
    a, rest = ap.parse_known_args()
    rc = 0
    if not a.no_sweep:
        if a.linear:
            rc |= bench("cpu", ["--ops", "linear"] + rest, sub=("linear",))
        else:
            rc |= bench("cpu", ([] if a.full else ["--quick"]) + rest)
    if not a.no_targets:
        rc |= bench("cpu", ["--targets"] + rest, sub=("targets",))
    return rc


if __name__ == "__main__":
    sys.exit(run())
