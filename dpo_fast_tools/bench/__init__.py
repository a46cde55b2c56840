"""`dpo-fast bench`: side-by-side micro-benchmarks of DPO log-prob and loss kernels.

    dpo-fast bench [--device cpu|cuda] [--quick] [--ops logits,linear,loss] [--output-dir DIR]
    dpo-fast bench --targets            # exactly the cases the project's targets are stated on

Ops (each implementation gets the same inputs, built from one seed):
  logits  per-sequence log-probs from logits (S, T, V), backward with a non-uniform
          gradient per sequence
  loss    the DPO sigmoid loss from logits and reference log-probs
  linear  the DPO sigmoid loss from hidden states (S, T, H) and the lm_head weight (V, H)
          (logits never exist in the fused implementations)

Implementations: the plain PyTorch reference ("pytorch": float32 log_softmax, gather, masked
sum, logsigmoid, as TRL does it), every dpo_fast backend usable on the device (with and without
inplace_backward), TRL's fused LM head, Liger-Kernel's LigerFusedLinearDPOLoss and Cut
Cross-Entropy's linear_cross_entropy when they are importable, and for `linear` two timing
floors: "gemm3" (6NHV FLOPs: forward, dH, dW with the logits kept) and "gemm4" (8NHV FLOPs:
the same plus the recomputation a fused O(tokens) loss pays), with no loss at all.

Every case is checked against the float32 truth before it is timed; on the CPU every case runs
in its own fresh process. Results go to DIR: results.csv, results.md and one PNG per op.
Other implementations can be benchmarked side by side with --impl-plugin FILE.py: the file
calls dpo_fast_tools.bench.register(Impl(...)) at import.

Layout (one home per concern):
  cases.py    shapes, sweeps, --shapes, the target cases and their thresholds, evaluate_targets
  impls.py    the registry (Impl, Runner, register) and the built-in implementations and peers
  inputs.py   seeded inputs          meters.py  memory meters, fresh processes, timing
  check.py    agreement with the float32 truth
  run.py      one case, a whole run  report.py  CSV, markdown, plots, README tables
  cli.py      the command's arguments and entry point
Only cases.py, report.py and cli.py load at `dpo-fast --help`; the rest (torch) on first use.
"""

from __future__ import annotations

import importlib

from .cases import (  # noqa: F401
    BETA, DTYPES, IGNORE_INDEX, MB, OPS, PASSES, SEED, TARGET_SHAPES, TARGETS, VOCABS, Shape, Target, element_size,
    evaluate_targets, grad_bytes, parse_shapes, plan, target_shapes, work_model,
)
from .cli import add_arguments, run_cli  # noqa: F401
from .report import (  # noqa: F401
    CSV_COLUMNS, markdown, plot, read_csv, replace_readme_section, update_readme, write_csv, write_outputs,
)

# Loaded on first use: these modules import torch.
_LAZY = {
    "impls": ("REGISTRY", "Impl", "Runner", "register", "load_plugin", "installed", "dpo_fast_impl",
              "dpo_from_logps"),
    "inputs": ("make_inputs", "tiny_shape"),
    "meters": ("CpuMeter", "CudaMeter", "ForkServer", "MeterUnavailable", "Peak", "measure_in_fresh_process",
               "time_cpu", "time_cuda"),
    "check": ("compare", "reference_outputs", "truth_by_sequence", "RTOL_F32"),
    "run": ("run_benchmark", "measure", "environment", "device_peaks", "TRUTH"),
}
_HOME = {name: mod for mod, names in _LAZY.items() for name in names}


def __getattr__(name):
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    if name in _LAZY:  # a submodule not imported yet
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_HOME))
