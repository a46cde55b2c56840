"""The one-call GPU check: build the extension, run the CUDA tests, benchmark against the peers.

    python benchmarks/gpu_check.py [--out DIR] [--budget-s 480] [--skip-build] [--no-bench]

Run from a checkout on a machine with an NVIDIA GPU. In order, each step with its own log and a
share of the time budget (an H100 / H200 finishes within 8 minutes):
  1. device.txt    nvidia-smi and torch's view of the GPU;
  2. build.log     TORCH_CUDA_ARCH_LIST=<the GPU's capability> pip install --no-build-isolation
                   --no-deps -e . (the CUDA extension), then a check that it has CUDA kernels;
  3. tests.log     tests/kernels/test_cuda.py and the CUDA cases of tests/ops/test_linear_logprobs.py (junit in tests.xml);
  4. targets/      `dpo-fast bench --device cuda --targets`: the cases the project's targets are
                   stated on, every implementation that can run (dpo_fast's backends, TRL, Liger,
                   Cut Cross-Entropy, PyTorch's linear_cross_entropy when installed);
  5. bench/        the same peers on the base shapes of the CUDA sweep (bfloat16 and float32);
  6. summary.md    one line per step (status, seconds) and the GPU's name.
Everything goes under DIR (default benchmarks/results/cuda/check/): commit it with the GPU's name.
Exits non-zero if any step failed or did not run for lack of time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Base points of the CUDA sweep: the linear op at H = 4096, the from-logits ops, V = 128256.
SHAPES = ("linear:bfloat16:8x2048:128256:4096,linear:float32:4x2048:128256:4096,"
          "logits:bfloat16:8x2048:128256,loss:bfloat16:8x2048:128256")


def _gpu_arch() -> str:
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False)")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _device_report(out: Path) -> str:
    import torch
    props = torch.cuda.get_device_properties(0)
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout if _has("nvidia-smi") else ""
    text = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
            f"capability {props.major}.{props.minor}; torch {torch.__version__}, CUDA {torch.version.cuda}\n\n{smi}")
    (out / "device.txt").write_text(text)
    return props.name


def _has(tool: str) -> bool:
    return any((Path(d) / tool).exists() for d in os.environ.get("PATH", "").split(os.pathsep))


def _steps(out: Path, arch: str, skip_build: bool, bench: bool) -> list[tuple[str, list[str], dict, int]]:
    """(name, command, extra environment, share of the budget in percent)."""
    py = sys.executable
    steps = []
    if not skip_build:
        steps.append(("build", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                      {"TORCH_CUDA_ARCH_LIST": arch}, 35))
    steps.append(("extension", [py, "-c", "import dpo_fast._C as c; assert c.cuda_built(), 'built without CUDA'; "
                                          "print('cuda kernels: yes')"], {}, 2))
    steps.append(("tests", [py, "-m", "pytest", "tests/kernels/test_cuda.py", "tests/ops/test_linear_logprobs.py", "-k", "cuda", "-q",
                            "-ra", f"--junitxml={out / 'tests.xml'}"], {}, 25))
    if bench:
        cli = [py, "-m", "dpo_fast", "bench", "--device", "cuda", "--timeout", "120"]
        steps.append(("targets", cli + ["--targets", "--output-dir", str(out / "targets")], {}, 20))
        steps.append(("bench", cli + ["--shapes", SHAPES, "--output-dir", str(out / "bench")], {}, 18))
    return steps


def run(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cuda" / "check")
    ap.add_argument("--budget-s", type=float, default=480, help="total seconds for all steps (default 480)")
    ap.add_argument("--skip-build", action="store_true", help="use the extension already built")
    ap.add_argument("--no-bench", action="store_true", help="only build and test")
    a = ap.parse_args(argv)
    if a.budget_s <= 0:
        ap.error("--budget-s: must be > 0")
    arch = _gpu_arch()
    a.out.mkdir(parents=True, exist_ok=True)
    name = _device_report(a.out)
    t_start = time.monotonic()
    lines = [f"# GPU check on {name}\n", "| step | status | seconds | log |", "|---|---|---|---|"]
    failed = False
    for step, cmd, env, share in _steps(a.out, arch, a.skip_build, not a.no_bench):
        left = a.budget_s - (time.monotonic() - t_start)
        # A step may use its share, or what earlier steps left over, of the budget.
        limit = max(left, 0) if step == "bench" else min(max(left, 0), max(a.budget_s * share / 100, 60))
        log = a.out / f"{step}.log"
        if limit < 10:
            lines.append(f"| {step} | not run (budget spent) | 0 | |")
            failed = True
            continue
        t0 = time.monotonic()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=limit).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit:.0f} s"
        failed |= status != "ok"
        lines.append(f"| {step} | {status} | {time.monotonic() - t0:.0f} | {log.name} |")
        print(lines[-1], flush=True)
        if step in ("build", "extension") and status != "ok":
            break  # nothing after it means anything without the extension
    lines.append(f"\nTotal {time.monotonic() - t_start:.0f} s (budget {a.budget_s:.0f} s).")
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"gpu_check: {'FAILED' if failed else 'ok'} -> {a.out / 'summary.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run())
