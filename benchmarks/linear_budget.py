"""The hidden-state DPO loss with and without a logits budget, side by side in one run.

  otokens      dpo_fast.loss(hidden=, weight=): logits never exist, backward recomputes them (4 GEMM passes)
  budget=N     dpo_fast.loss(..., logits_memory_mb=N): chunks of whole pairs, 3 GEMM passes
  gemm3/gemm4  plain torch.mm on the scored rows, no loss: h W^T, G W, G^T h (+ the recompute): the floors
               (dpo_fast_tools.bench's "gemm3" / "gemm4" implementations)

Inputs as in `dpo-fast bench`'s linear op: every position scored (the shift drops the last one),
sigmoid loss, reference log-probs. Each budget's loss and gradients are compared with the O(tokens)
path's before any time is reported; timed steps alternate between implementations (fairer on a
loaded machine). Peak extra memory: dpo_fast_tools.bench.meters.measure_in_fresh_process, one fresh process
per case (CPU, the RSS high-water growth over the RSS once the inputs exist; CUDA,
torch.cuda.max_memory_allocated growth). The target is the gradients (dH + dW) plus the budget.

  python benchmarks/linear_budget.py                                    # small shape, quick
  python benchmarks/linear_budget.py --shape 4x512:1024:128256 --budgets none,600 --dtypes float32,bfloat16
  python benchmarks/linear_budget.py --budgets none,pair,all            # the sweep: O(tokens), one pair, all pairs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

import torch  # noqa: E402

import dpo_fast  # noqa: E402
from dpo_fast_tools.bench.cases import Shape  # noqa: E402
from dpo_fast_tools.bench.impls import REGISTRY  # noqa: E402
from dpo_fast_tools.bench.meters import measure_in_fresh_process  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_shape(text: str):
    """'BxT:H:V' -> (B, T, H, V); B = 2P sequences."""
    bt, h, v = text.split(":")
    b, t = bt.split("x")
    return int(b), int(t), int(h), int(v)


def budget_mb(token: str, shape, dtype) -> float | None:
    """'none' (the O(tokens) path), 'pair' / 'all' (exactly one pair's / all pairs' scored logits), or MB."""
    B, T, H, V = shape
    elem = dtype.itemsize
    if token == "none":
        return None
    if token in ("pair", "all"):
        rows = 2 * (T - 1) * (1 if token == "pair" else B // 2)
        return (rows * V * elem + elem / 2) / 1e6
    return float(token)


def make_inputs(shape, dtype, device, seed=0):
    B, T, H, V = shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(dtype).to(device)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    ref = (torch.randn(B, generator=g) * 3 - 30 * T ** 0.5).to(device)
    return hidden, weight, labels, ref[: B // 2].contiguous(), ref[B // 2:].contiguous()


def step(inputs, mb, backend):
    """One forward + backward; (loss, dH, dW)."""
    hidden, weight, labels, rc, rr = inputs
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    out = dpo_fast.loss(hidden=h, weight=w, labels=labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                        logits_memory_mb=mb, backend=backend)
    out.loss.backward()
    return out.loss.detach(), h.grad, w.grad


def gemm_floor(name: str, inputs, shape, dtype_name: str):
    """The bench harness's GEMM floor `name` ("gemm3" or "gemm4") on these inputs: one fwd + bwd."""
    B, T, H, V = shape
    runner = REGISTRY[name].build(Shape("linear", dtype_name, B, T, V, H), {"hidden": inputs[0], "weight": inputs[1]})
    return lambda: runner.backward(runner.forward())


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def rel_err(x, ref) -> float:
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)).item()


# ---------------------------------------------------------------- memory


def memory_case(shape, dtype_name: str, mb, backend: str, device: str, threads: int):
    """Set up one case in the meter's fresh process (kernels loaded on a small shape first, then the
    inputs); returns the step it measures."""
    if threads:
        torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    step(make_inputs((2, 8, 16, 64), dtype, device), mb, backend)
    inputs = make_inputs(tuple(shape), dtype, device)

    def measured():
        step(inputs, mb, backend)  # its gradients are alive until it returns: they count

    return measured


def peak_of(args, shape, dtype_name, mb) -> int:
    return measure_in_fresh_process(f"{os.path.abspath(__file__)}:memory_case", list(shape), dtype_name, mb,
                                    args.backend, args.device, args.threads, device=args.device).peak_bytes


# ---------------------------------------------------------------- the run


def run_dtype(args, shape, dtype_name) -> list[dict]:
    dtype = DTYPES[dtype_name]
    B, T, H, V = shape
    inputs = make_inputs(shape, dtype, args.device)
    cases = {}
    for token in args.budgets.split(","):
        mb = budget_mb(token, shape, dtype)
        cases["otokens" if mb is None else f"budget={mb:.0f}MB" if mb >= 10 else f"budget={mb:.3g}MB"] = mb
    if "otokens" not in cases:
        cases = {"otokens": None, **cases}
    # Agreement first (this also warms every path up).
    ref = step(inputs, None, args.backend)
    checks = {}
    for name, mb in cases.items():
        got = step(inputs, mb, args.backend) if mb is not None else ref
        checks[name] = {"loss": rel_err(got[0], ref[0]), "dH": rel_err(got[1], ref[1]), "dW": rel_err(got[2], ref[2])}
        del got
    del ref
    gc.collect()
    runners = {name: (lambda mb=mb: step(inputs, mb, args.backend)) for name, mb in cases.items()}
    runners["gemm3"] = gemm_floor("gemm3", inputs, shape, dtype_name)
    runners["gemm4"] = gemm_floor("gemm4", inputs, shape, dtype_name)
    times = {name: [] for name in runners}
    cpu_times = {name: [] for name in runners}
    for _ in range(args.repeats):  # alternate: load on the machine spreads over every implementation
        for name, fn in runners.items():
            sync(args.device)
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
            del out
            gc.collect()
    del inputs
    grads = (B * T * H + V * H) * dtype.itemsize
    rows = []
    base_t, base_c = statistics.median(times["otokens"]), statistics.median(cpu_times["otokens"])
    for name in runners:
        mb = cases.get(name)
        t, c = statistics.median(times[name]), statistics.median(cpu_times[name])
        row = {"dtype": dtype_name, "impl": name, "time_s": t, "vs_otokens": t / base_t, "cpu_s": c,
               "cpu_vs_otokens": c / base_c, "times_s": times[name], "check_rel_err": checks.get(name)}
        if name in cases and not args.no_memory:
            row["peak_extra_mb"] = peak_of(args, shape, dtype_name, mb) / 1e6
            row["target_mb"] = (grads + (mb or 0) * 1e6) / 1e6
        rows.append(row)
    return rows


def plot(results: dict, path: str) -> None:
    """Time (x the O(tokens) path) and peak extra memory against the budget, one panel each, a line
    per dtype; the 3- and 4-GEMM floors dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for dtype in dict.fromkeys(r["dtype"] for r in results["rows"]):
        rows = [r for r in results["rows"] if r["dtype"] == dtype]
        runs = sorted((0.0 if r["impl"] == "otokens" else float(r["impl"].split("=")[1].rstrip("MB")), r)
                      for r in rows if r["impl"] == "otokens" or r["impl"].startswith("budget="))
        xs = [mb for mb, _ in runs]
        line = ax_t.plot(xs, [r["vs_otokens"] for _, r in runs], "o-", label=dtype)[0]
        for floor, style in (("gemm3", "--"), ("gemm4", ":")):
            f = next((r for r in rows if r["impl"] == floor), None)
            if f:
                ax_t.axhline(f["vs_otokens"], color=line.get_color(), linestyle=style, linewidth=0.8,
                             label=f"{dtype} {floor} floor")
        ax_m.plot(xs, [r.get("peak_extra_mb", float("nan")) for _, r in runs], "o-", color=line.get_color(),
                  label=f"{dtype} peak extra")
        ax_m.plot(xs, [r.get("target_mb", float("nan")) for _, r in runs], "x:", color=line.get_color(),
                  label=f"{dtype} gradients + budget")
    B, T, H, V = results["shape"]
    ax_t.set(xlabel="logits_memory_mb (0: O(tokens) path)", ylabel="fwd+bwd time / O(tokens) path",
             title=f"{B}x{T} tokens, H={H}, V={V}")
    ax_m.set(xlabel="logits_memory_mb (0: O(tokens) path)", ylabel="peak extra memory, MB", title=results["device_name"])
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4x64:256:8192", help="BxT:H:V, B = 2P sequences (default: a quick one)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--budgets", default="none,pair,all", help="comma list: none, pair, all, or megabytes")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    p.add_argument("--json", help="also write the rows here, and a plot beside them (same name, .png)")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot of an existing --json file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plot_only:
        with open(args.json) as f:
            plot(json.load(f), os.path.splitext(args.json)[0] + ".png")
        return 0
    shape = parse_shape(args.shape)
    B, T, H, V = shape
    from dpo_fast_tools.bench.run import environment

    dev = environment(args.device)["device_name"]
    print(f"# {args.device} ({dev}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"# {B} x {T} tokens ({B // 2} pairs), H = {H}, V = {V}, backend {args.backend}; "
          f"median of {args.repeats} fwd+bwd, wall and process CPU time (all threads: steadier under load); "
          f"rel. error vs otokens (max |diff| / max |ref|)")
    print(f"{'dtype':9} {'impl':16} {'time s':>8} {'x otokens':>9} {'cpu s':>8} {'x otokens':>9} "
          f"{'peak MB':>9} {'target MB':>9}  "
          f"{'err loss':>8} {'err dH':>8} {'err dW':>8}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        for r in run_dtype(args, shape, dtype_name):
            rows.append(r)
            c = r["check_rel_err"] or {}
            fmt = lambda k: f"{c[k]:8.1e}" if k in c else f"{'-':>8}"  # noqa: E731
            peak = f"{r['peak_extra_mb']:9.0f}" if "peak_extra_mb" in r else f"{'-':>9}"
            target = f"{r['target_mb']:9.0f}" if "target_mb" in r else f"{'-':>9}"
            print(f"{r['dtype']:9} {r['impl']:16} {r['time_s']:8.3f} {r['vs_otokens']:9.2f} {r['cpu_s']:8.3f} "
                  f"{r['cpu_vs_otokens']:9.2f} {peak} {target}  "
                  f"{fmt('loss')} {fmt('dH')} {fmt('dW')}", flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "device_name": dev, "torch": torch.__version__, "shape": shape,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
        with open(args.json) as f:
            plot(json.load(f), os.path.splitext(args.json)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
