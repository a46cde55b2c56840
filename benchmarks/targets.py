"""Only the cases the project's targets are stated on, side by side, and whether each is met.

    python benchmarks/targets.py [--device cpu|cuda]

The cases and their thresholds are defined once, in dpo_fast_tools/bench/cases.py (TARGETS).
CPU: logits op fp32 8x512 V=128256 (PyTorch reference, dpo_fast cpu, cpu + inplace_backward);
fused linear fp32 and bf16 at 4x512 tokens, H=1024, V=128256 (reference, dpo_fast cpu, TRL's
fused LM head, the 3-GEMM and 4-GEMM floors).
CUDA: logits op 8x2048 V=128256 bf16 and fp32 (bandwidth and speed-up), fused linear bf16
16384 tokens H=4096 V=128256 (memory beyond dH + dW, time against four cuBLAS GEMMs, TRL).
Writes benchmarks/results/<device>/targets/ and the targets table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys

from _common import bench


def run() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    a, rest = ap.parse_known_args()
    return bench(a.device, ["--targets"] + rest, sub=("targets",))


if __name__ == "__main__":
    sys.exit(run())
