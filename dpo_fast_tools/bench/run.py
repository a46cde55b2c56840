"""Running the benchmark: one case (one shape x one implementation), then every case of a run.

Order of one case:
  1. inputs are built and touched; a tiny warm-up run loads libraries and thread pools;
  2. memory baseline; one forward + backward step, the peak of each half recorded (meters.py);
  3. the step's outputs are checked against the truth (check.py) before any time is taken;
     a disagreeing implementation is flagged, not timed;
  4. timing (meters.py): CPU, repeated steps; CUDA, triton.testing.do_bench.
On the CPU every case runs in its own process, forked from a server that has only imported
torch and dpo_fast and never run an op (meters.ForkServer).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import math
import os
import platform
import time
import traceback
from typing import Any, Callable

import torch

from dpo_fast import __version__ as dpo_fast_version
from .cases import MB, OPS, PASSES, DTYPES, Shape, grad_bytes, work_model
from .check import compare, reference_outputs
from .impls import REGISTRY, Impl, Runner, installed, load_plugin
from .inputs import make_inputs, tiny_shape
from .meters import CudaMeter, CpuMeter, ForkServer, time_cpu, time_cuda
from .report import CSV_COLUMNS

TRUTH = "__truth__"  # the task that computes only the float32 truth
_KIND_ORDER = {"reference": 0, "candidate": 1, "baseline": 2}


# ================================================================ one case


def _step(runner: Runner, meter) -> tuple[Any, int, int]:
    meter.start()
    out = runner.forward()
    peak_f = meter.window()
    runner.backward(out)
    peak_b = meter.window()
    return out, peak_f, peak_b


def _result_rows(impl: str, status: str, agrees=None, err=None, tol=None, times=None, peaks=None,
                 repeats=None) -> list[dict]:
    """One row per pass, as measure() returns them."""
    rows = []
    for pas in PASSES:
        t = (times or {}).get(pas)
        pk = None if peaks is None else {"fwd": peaks[0], "bwd": peaks[1], "fwd+bwd": max(peaks)}[pas]
        rows.append(dict(implementation=impl, pass_=pas, status=status, agrees=agrees, max_err=err, tolerance=tol,
                         time=t, peak=pk, repeats=repeats if t is not None else None))
    return rows


def _verdict(impl: Impl, shape: Shape, runner: Runner, out, inp: dict, ref: dict | None, on_reference):
    """(agrees, error, tolerance, status) of the step's outputs."""
    if impl.kind == "reference":
        produced = reference_outputs(shape, runner, out, inp)
        if on_reference is not None:
            on_reference(produced)
        return True, 0.0, None, "ok"
    if impl.kind != "candidate":
        return None, None, None, "baseline (no loss: not checked)"
    if ref is None:
        return None, None, None, "unchecked: neither the reference nor the float32 truth could run"
    agrees, err, tol, which = compare(shape, runner.outputs(out), ref)
    if agrees is None:
        return None, err, tol, f"unchecked: {which}"
    return agrees, err, tol, ("ok" if agrees else f"disagrees ({which})")


def _measure_impl(impl: Impl, shape: Shape, device: str, repeats: int, ref, on_reference) -> list[dict]:
    cuda = device == "cuda"
    tiny = tiny_shape(shape)  # warm-up: imports, lazy initialisation, thread pools
    tr = impl.build(tiny, make_inputs(tiny, device, pristine=impl.inplace))
    tr.backward(tr.forward())
    del tr
    inp = make_inputs(shape, device, pristine=impl.inplace)
    runner = impl.build(shape, inp)
    if impl.full_warmup or cuda:
        runner.backward(runner.forward())
        runner.reset()
    meter = CudaMeter("cuda") if cuda else CpuMeter()
    t0 = time.perf_counter()
    out, peak_f, peak_b = _step(runner, meter)
    if cuda:
        torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) * 1e3
    agrees, err, tol, status = _verdict(impl, shape, runner, out, inp, ref, on_reference)
    del out
    runner.reset()
    gc.collect()
    times = None
    if agrees or impl.kind == "baseline":
        times = time_cuda(runner, step_ms, impl.inplace, repeats) if cuda else time_cpu(runner, repeats)
    return _result_rows(impl.name, status, agrees, err, tol, times, (peak_f, peak_b), repeats)


def measure(task: dict, ref: dict | None, on_reference: Callable[[dict], None] | None = None) -> list[dict]:
    """Run one implementation on one shape; return one row per pass (see the module docstring).

    task: shape (dict of Shape fields), impl, device, repeats, plugins. ref: what the reference
    produced on this shape (see check.reference_outputs), or None when it could not run (then
    nothing can be checked, and nothing checked is timed). The reference itself hands its
    outputs to on_reference before it is timed.
    """
    for p in task.get("plugins", []):
        load_plugin(p)
    shape = Shape(**task["shape"])
    device = task["device"]
    if task["impl"] == TRUTH:  # only the float32 truth, for when the reference did not run
        on_reference(reference_outputs(shape, None, None, make_inputs(shape, device)))
        return []
    impl = REGISTRY[task["impl"]]
    try:
        return _measure_impl(impl, shape, device, task["repeats"], ref, on_reference)
    except Exception as e:  # recorded, never fatal: the other implementations still run
        oom = "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
        msg = "out of memory" if oom else f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if os.environ.get("DPO_FAST_BENCH_TRACEBACK"):
            traceback.print_exc()
        return _result_rows(impl.name, msg)


def run_case(task: dict, ref_path: str) -> list[dict]:
    """A case in a fresh process (called through ForkServer): the reference (or the truth task)
    saves what it produced to ref_path; the others read it from there."""
    for p in task.get("plugins", []):
        load_plugin(p)
    producer = task["impl"] == TRUTH or REGISTRY[task["impl"]].kind == "reference"
    ref = None
    if os.path.exists(ref_path) and not producer:
        ref = torch.load(ref_path, mmap=True, weights_only=True)
    return measure(task, ref, on_reference=lambda produced: torch.save(produced, ref_path))


# ================================================================ environment


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def environment(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"
    return {
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": installed("triton", "triton") or "not installed",
        "dpo_fast": dpo_fast_version,
        "trl": installed("trl", "trl") or "not installed",
        "liger_kernel": installed("liger-kernel", "liger_kernel") or "not installed",
        "cut_cross_entropy": installed("cut-cross-entropy", "cut_cross_entropy") or "not installed",
        "python": platform.python_version(),
    }


# Dense peak numbers from the vendors' data sheets: (name substring, HBM GB/s, {dtype: TFLOP/s}).
# float32 is the non-tensor-core rate (torch keeps TF32 off for matmuls by default).
DEVICE_PEAKS = [
    ("H200", 4800, {"bfloat16": 989, "float16": 989, "float32": 67}),
    ("H100 NVL", 3900, {"bfloat16": 835, "float16": 835, "float32": 60}),
    ("H100 PCIe", 2000, {"bfloat16": 756, "float16": 756, "float32": 51}),
    ("H100", 3350, {"bfloat16": 989, "float16": 989, "float32": 67}),
    ("A100-SXM4-80GB", 2039, {"bfloat16": 312, "float16": 312, "float32": 19.5}),
    ("A100 80GB PCIe", 1935, {"bfloat16": 312, "float16": 312, "float32": 19.5}),
    ("A100", 1555, {"bfloat16": 312, "float16": 312, "float32": 19.5}),
    ("L40S", 864, {"bfloat16": 362, "float16": 362, "float32": 91.6}),
    ("A10G", 600, {"bfloat16": 70, "float16": 70, "float32": 31.2}),
]


def device_peaks(device_name: str, peak_bw=None, peak_tflops=None):
    for sub, bw, fl in DEVICE_PEAKS:
        if sub.lower() in device_name.lower():
            return (peak_bw or bw), ({k: peak_tflops for k in fl} if peak_tflops else fl)
    return peak_bw, ({k: peak_tflops for k in DTYPES} if peak_tflops else {})


# ================================================================ a run


def applicable(device: str, ops, only=None):
    """(runnable impls per op, rows for the ones that cannot run)."""
    run, notes = {}, []
    for op in ops:
        run[op] = []
        for impl in REGISTRY.values():
            if op not in impl.ops or (only and impl.name not in only and impl.kind != "reference"):
                continue
            ok, why = impl.available(device)
            if ok:
                run[op].append(impl)
            else:
                notes.append({"implementation": impl.name, "op": op, "status": why, "kind": impl.kind})
    return run, notes


@dataclasses.dataclass
class _Run:
    """What every case of a run shares."""

    device: str
    repeats: int
    plugins: list
    server: ForkServer | None  # None: cases run in this process
    env: dict
    stamp: str
    peaks: tuple
    log: Callable
    total: int
    done: int = 0

    def task(self, shape: Shape, impl: str) -> dict:
        return {"shape": dataclasses.asdict(shape), "impl": impl, "device": self.device,
                "repeats": self.repeats, "plugins": self.plugins}

    def case(self, shape: Shape, impl: str, kept: dict) -> list[dict]:
        """Run one case, here or in a fresh process; the reference's outputs go to `kept`."""
        task = self.task(shape, impl)
        if self.server is None:
            return measure(task, kept.get("ref"), on_reference=lambda produced: kept.update(ref=produced))
        got, err = self.server.call("dpo_fast_tools.bench.run:run_case", task=task, ref_path=self.ref_path)
        return got if got is not None else _result_rows(impl, err)

    @property
    def ref_path(self) -> str:
        return os.path.join(self.server.tmp.name, "reference.pt")


def _run_shape(run: _Run, shape: Shape, impls: list[Impl]) -> list[dict]:
    rows, ref_time, kept = [], {}, {}  # kept: the reference's outputs, when cases run here
    if run.server is not None and os.path.exists(run.ref_path):
        os.remove(run.ref_path)
    for impl in sorted(impls, key=lambda i: _KIND_ORDER[i.kind]):
        have_ref = "ref" in kept or (run.server is not None and os.path.exists(run.ref_path))
        if impl.kind != "reference" and not have_ref and not kept.get("tried"):
            kept["tried"] = True  # the reference did not run: compute the float32 truth alone
            try:
                run.case(shape, TRUTH, kept)
            except Exception as e:  # noqa: BLE001  (then the candidates stay unchecked)
                run.log(f"float32 truth for {shape.label()} failed: {e}")
        t0 = time.perf_counter()
        got = run.case(shape, impl.name, kept)
        run.done += 1
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        for r in got:
            row = _row(shape, run, r, load, impl.kind)
            if impl.kind == "reference" and row["time_ms"] is not None:
                ref_time[r["pass_"]] = row["time_ms"]
            if ref_time.get(r["pass_"]) and row["time_ms"]:
                row["speedup_vs_ref"] = round(ref_time[r["pass_"]] / row["time_ms"], 3)
            rows.append(row)
        fb = next(r for r in got if r["pass_"] == "fwd+bwd")
        t = f"{fb['time'][0]:.1f} ms" if fb.get("time") else "not timed"
        pk = f"{fb['peak'] / MB:.0f} MB" if fb.get("peak") is not None else "-"
        run.log(f"[{run.done}/{run.total}] {shape.label():<44} {impl.name:<22} fwd+bwd {t:>12}, peak {pk:>8}, "
                f"{fb['status']}  ({time.perf_counter() - t0:.1f} s)")
    return rows


def run_benchmark(shapes: list[Shape], device: str, *, repeats: int, only=None, plugins=(),
                  in_process: bool = False, timeout: float = 1800, log=print, peak_bw=None,
                  peak_tflops=None) -> list[dict]:
    """Measure every runnable implementation on every shape; rows as in CSV_COLUMNS."""
    for p in plugins:
        load_plugin(p)
    ops = sorted({s.op for s in shapes}, key=OPS.index)
    runnable, notes = applicable(device, ops, only)
    env = environment(device)
    peaks = device_peaks(env["device_name"], peak_bw, peak_tflops) if device == "cuda" else (None, {})
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    rows = [{**{c: None for c in CSV_COLUMNS}, **env, **n, "device": device, "timestamp": stamp} for n in notes]
    server = None
    if not (in_process or device == "cuda"):  # never benchmark the Triton interpreter
        server = ForkServer(preload=["dpo_fast_tools.bench.run"], drop=("TRITON_INTERPRET",), timeout=timeout)
    run = _Run(device, repeats, list(plugins), server, env, stamp, peaks, log,
               total=sum(len(runnable[s.op]) for s in shapes))
    if server is None:
        # Cases run here: keep the objects that exist now (modules, caller's state) out of the
        # collections the cases make before each memory baseline (a full one can take a second).
        gc.collect()
        gc.freeze()
    try:
        for shape in shapes:
            rows += _run_shape(run, shape, runnable[shape.op])
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        if server is not None:
            server.close()
        else:
            gc.unfreeze()
    return rows


def _row(shape: Shape, run: _Run, r: dict, load, kind: str) -> dict:
    pas = r["pass_"]
    t = r.get("time")
    gb = grad_bytes(shape)
    bw_peak, fl_peak = run.peaks
    row = {c: None for c in CSV_COLUMNS}
    row.update(run.env)
    row.update(implementation=r["implementation"], kind=kind, op=shape.op, device=run.device, dtype=shape.dtype,
               tokens=shape.tokens, hidden=shape.hidden or None, vocab=shape.vocab, batch=shape.batch,
               seqlen=shape.seqlen, **{"pass": pas}, repeats=r.get("repeats"), agrees=r.get("agrees"),
               status=r["status"], sweep=shape.sweep, timestamp=run.stamp, grad_mb=round(gb / MB, 3),
               loadavg=None if load is None else round(load, 2))
    if r.get("max_err") is not None:
        row["max_err"] = float(f"{r['max_err']:.3g}") if math.isfinite(r["max_err"]) else "inf"
    if r.get("tolerance") is not None:
        row["tolerance"] = float(f"{r['tolerance']:.3g}")
    if r.get("peak") is not None:
        row["peak_mem_mb"] = round(r["peak"] / MB, 1)
        row["mem_vs_grad"] = round(r["peak"] / gb, 3)
    if t is not None:
        med, p20, p80 = t[:3]
        row.update(time_ms=round(med, 3), time_p20_ms=round(p20, 3), time_p80_ms=round(p80, 3))
        if len(t) > 3:
            row["cpu_time_ms"] = round(t[3], 3)
        flops, nbytes = work_model(shape, pas)
        sec = med / 1e3
        row["gbps"] = round(nbytes / sec / 1e9, 2)
        if flops:
            row["tflops"] = round(flops / sec / 1e12, 4)
        if bw_peak:
            row["pct_peak_bw"] = round(100 * row["gbps"] / bw_peak, 1)
        if flops and fl_peak.get(shape.dtype):
            row["pct_peak_flops"] = round(100 * row["tflops"] / fl_peak[shape.dtype], 1)
    return row
