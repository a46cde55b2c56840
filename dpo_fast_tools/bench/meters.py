"""Measuring: peak memory (CPU peak RSS, CUDA peak allocation), a fresh process per measurement
(a fork server), and timing.

    from dpo_fast_tools.bench.meters import measure_in_fresh_process
    peak = measure_in_fresh_process("my_pkg.my_mod:setup", "inputs.pt", device="cpu")
    peak.peak_bytes, peak.result

torch has no CPU peak-memory counter: on CPU the peak is the growth of the process's resident
set high-water mark (VmHWM, reset to the current RSS through /proc/self/clear_refs, Linux >= 4.0)
over the RSS at the start of the window. That is only the measured code's memory in a process
that has run nothing before it, so every measurement runs in a child forked from a server that
has imported torch and dpo_fast and never run an op (no allocator caches, no thread pools; a
fork costs milliseconds where a torch import costs seconds). On CUDA: max_memory_allocated.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds dpo_fast/

# ================================================================ peak-memory meters


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_hiwater() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """Hand the allocator's free memory back to the system (glibc malloc_trim), so that buffers an
    earlier phase left cached in the heap do not hide a later phase's peak from the growth."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class CpuMeter:
    """Peak RSS growth over the RSS at start(). VmHWM, not getrusage's ru_maxrss: a process
    started by exec inherits its parent's ru_maxrss, and clear_refs does not reset it.
    trim=True: start() first releases the heap's free memory (release_free_heap), for a meter
    used in a process that has already run other work."""

    method = "peak RSS growth (VmHWM), fresh process"

    def __init__(self, trim: bool = False):
        self.can_reset = reset_hiwater()
        self.trim = trim

    def start(self):
        gc.collect()
        if self.trim:
            release_free_heap()
        reset_hiwater()
        self.base = status_bytes("VmRSS")

    def window(self) -> int:
        """Peak growth since start() (or the last window()), relative to the baseline."""
        peak = status_bytes("VmHWM") - self.base
        reset_hiwater()
        return max(0, peak)


class CudaMeter:
    method = "torch.cuda.max_memory_allocated"

    def __init__(self, device):
        self.device = torch.device(device)

    def start(self):
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def window(self) -> int:
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - self.base
        torch.cuda.reset_peak_memory_stats(self.device)
        return max(0, peak)


def meter_for(device) -> CpuMeter | CudaMeter:
    return CudaMeter(device) if torch.device(device).type == "cuda" else CpuMeter()


# ================================================================ a fresh process per measurement


def resolve(spec: str) -> Callable:
    """"package.module:function" or "path/to/file.py:function" -> the function."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"{spec!r}: expected 'module:function' or 'file.py:function'")
    if where.endswith(".py"):
        mod_name = "dpo_fast_fresh_" + str(abs(hash(os.path.abspath(where))))
        mod = sys.modules.get(mod_name)
        if mod is None:
            file_spec = importlib.util.spec_from_file_location(mod_name, where)
            mod = importlib.util.module_from_spec(file_spec)
            sys.modules[mod_name] = mod
            file_spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(where)
    obj: Any = mod
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def spec_of(fn: str | Callable) -> str:
    """The name under which a fresh process finds `fn` (see resolve())."""
    if isinstance(fn, str):
        return fn
    qual = getattr(fn, "__qualname__", "")
    if not qual or "<locals>" in qual or "<lambda>" in qual:
        raise ValueError(f"{fn!r}: a fresh process can only call a module-level function (or 'module:function')")
    if fn.__module__ == "__main__":
        return f"{os.path.abspath(sys.modules['__main__'].__file__)}:{qual}"
    return f"{fn.__module__}:{qual}"


def child_env(env: dict | None = None, drop: tuple = (), path: tuple = ()) -> dict:
    """This process's environment for a child that must import this dpo_fast (and `path`)."""
    out = dict(os.environ)
    for k in drop:
        out.pop(k, None)
    entries = [_ROOT, *path] + ([out["PYTHONPATH"]] if out.get("PYTHONPATH") else [])
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(entries))
    out.update(env or {})
    return out


_PRELOAD = ("torch._dynamo", "torch._functorch.aot_autograd",  # custom ops import these on first call
            "dpo_fast", "dpo_fast.ops", "dpo_fast.kernels.reference")


def _run_call(msg: dict) -> int:
    """In a forked child: call msg["call"](**msg["kwargs"]) and write {"value"} or {"error"}."""
    try:
        value = resolve(msg["call"])(**msg["kwargs"])
        out, code = {"value": value}, 0
    except BaseException as e:  # noqa: BLE001  (reported to the parent, never raised there)
        traceback.print_exc()
        out, code = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}, 1
    with open(msg["result"], "w") as f:
        json.dump(out, f)
    return code


def _wait(pid: int, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(st)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.02)


def serve(preload: list[str]) -> None:
    """The fork server's main loop: import, compute nothing, then fork one child per call (read
    as a JSON line on stdin; the child's exit status is answered as a JSON line on stdout)."""
    for mod in (*_PRELOAD, *preload):
        importlib.import_module(mod)
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        pass
    gc.collect()
    gc.freeze()  # the imports' objects: never scanned by the children's collections

    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, not into the protocol
    for line in sys.stdin:
        msg = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_call(msg)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        answer.write(json.dumps({"status": _wait(pid, msg["timeout"])}) + "\n")
    answer.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (frozen objects; extension modules' leak reports)


class ForkServer:
    """Runs each call in a fresh process, forked from a server (see serve()).

    preload: more modules the server imports before it forks; env: variables set for it;
    drop: variables removed; path: directories put on its PYTHONPATH (after this dpo_fast).
    """

    def __init__(self, *, preload=(), env=None, drop=(), path=(), timeout: float = 1800):
        self.timeout = timeout
        self.tmp = tempfile.TemporaryDirectory(prefix="dpo_fast_fresh_")
        code = f"from dpo_fast_tools.bench.meters import serve; serve({list(preload)!r})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=child_env(env, drop, tuple(path)), text=True)

    def call(self, target: str, timeout: float | None = None, **kwargs) -> tuple[Any, str | None]:
        """(value of target(**kwargs) in a fresh process, None) or (None, "error: ...").
        kwargs and the value travel as JSON."""
        timeout = self.timeout if timeout is None else timeout
        result = os.path.join(self.tmp.name, "result.json")
        if os.path.exists(result):
            os.remove(result)
        msg = {"call": target, "kwargs": kwargs, "result": result, "timeout": timeout}
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            reply = ""
        if not reply:
            return None, "error: the case server died"
        status = json.loads(reply)["status"]
        if status == "timeout":
            return None, f"error: timed out after {timeout:.0f} s"
        got = None
        if os.path.exists(result):
            with open(result) as f:
                got = json.load(f)
        if status == 0 and got is not None and "value" in got:
            return got["value"], None
        if got is not None and "error" in got:
            return None, f"error: {got['error']}"
        why = "killed (out of memory?)" if status == -9 else f"exit code {status}"
        return None, f"error: worker {why}"

    def measure(self, fn: str | Callable, *args, device: str = "cpu", timeout: float | None = None,
                **kwargs) -> "Peak":
        """measure_in_fresh_process() on this server (one torch import for many measurements)."""
        got, err = self.call("dpo_fast_tools.bench.meters:_measure_call", timeout=timeout, spec=spec_of(fn),
                             args=list(args), kwargs=kwargs, device=device)
        if err is not None:
            raise RuntimeError(f"measuring {spec_of(fn)} in a fresh process failed: {err}")
        if "unavailable" in got:
            raise MeterUnavailable(got["unavailable"])
        return Peak(**got)

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()
        self.tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MeterUnavailable(RuntimeError):
    """Peak memory cannot be measured on this machine (no writable /proc/self/clear_refs)."""


@dataclasses.dataclass
class Peak:
    peak_bytes: int  # peak memory beyond the baseline taken just before the measured step
    result: Any  # what the step returned
    method: str  # how it was measured


def _measure_call(spec: str, args: list, kwargs: dict, device: str) -> dict:
    """In the fresh process: set up (untimed, unmeasured), then measure the step."""
    step = resolve(spec)(*args, **kwargs)
    if not callable(step):
        raise TypeError(f"{spec} must return the step to measure (a function of no arguments), "
                        f"got {type(step).__name__}")
    meter = meter_for(device)
    if isinstance(meter, CpuMeter) and not meter.can_reset:
        return {"unavailable": "/proc/self/clear_refs is not writable: the peak RSS cannot be reset, so a CPU "
                               "peak cannot be measured here"}
    meter.start()
    value = step()
    peak = meter.window()
    return {"peak_bytes": int(peak), "result": value, "method": meter.method}


def measure_in_fresh_process(fn: str | Callable, *args, device: str = "cpu", env: dict | None = None,
                             timeout: float = 600, **kwargs) -> Peak:
    """Peak memory of one step, in a process that has run nothing else.

    In a fresh process, `fn(*args, **kwargs)` sets up (load inputs, warm up: not measured) and
    returns the step, a function of no arguments; the step runs once, measured from a baseline
    taken just before it: CPU, peak RSS growth (VmHWM); CUDA (device "cuda" or "cuda:N"),
    torch.cuda.max_memory_allocated growth. Whatever the step keeps alive until it returns
    (gradients, outputs) counts. Returns Peak(peak_bytes, result = the step's return value, method).

    fn: a module-level function, or its name: "package.module:function" or "file.py:function".
    args, kwargs and the step's return value travel as JSON (str, numbers, lists, dicts).
    env: variables for the fresh process (it inherits this one's environment and sys.path);
    MALLOC_MMAP_THRESHOLD_ defaults to 65536, so freed large blocks leave RSS at once and RSS
    tracks live tensors. Raises MeterUnavailable where a CPU peak cannot be measured, and
    RuntimeError (with the child's exception) when fn or the step fails.
    """
    env = {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536"), **(env or {})}
    path = tuple(p for p in sys.path if p and os.path.isdir(p))
    with ForkServer(env=env, path=path, timeout=timeout) as server:
        return server.measure(fn, *args, device=device, **kwargs)


# ================================================================ timing


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile)."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]

    def q(p):
        i = p * (len(xs) - 1)
        lo, hi = math.floor(i), math.ceil(i)
        return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)
    return statistics.median(xs), q(0.2), q(0.8)


def time_cpu(runner, repeats: int) -> dict[str, tuple]:
    """Repeated steps; forward and backward timed separately inside each step."""
    wall: dict[str, list] = {p: [] for p in ("fwd", "bwd", "fwd+bwd")}
    cpu: dict[str, list] = {p: [] for p in ("fwd", "bwd", "fwd+bwd")}
    for _ in range(repeats):
        runner.reset()
        c0, t0 = time.process_time(), time.perf_counter()
        out = runner.forward()
        c1, t1 = time.process_time(), time.perf_counter()
        runner.backward(out)
        c2, t2 = time.process_time(), time.perf_counter()
        del out
        for p, (a, b, ca, cb) in {"fwd": (t0, t1, c0, c1), "bwd": (t1, t2, c1, c2),
                                  "fwd+bwd": (t0, t2, c0, c2)}.items():
            wall[p].append((b - a) * 1e3)
            cpu[p].append((cb - ca) * 1e3)
    runner.reset()
    # Wall-clock quantiles, plus the median CPU time of the process (all its threads): the
    # latter barely moves when other work competes for the cores, the former does.
    return {p: quantiles(wall[p]) + (quantiles(cpu[p])[0],) for p in wall}


def time_cuda(runner, step_ms: float, inplace: bool, repeats: int) -> dict[str, tuple]:
    """triton.testing.do_bench quantiles (0.5, 0.2, 0.8); CUDA events around the timed part
    where an untimed setup must run before each repetition (backward alone, in-place runs)."""
    from triton.testing import do_bench as triton_do_bench

    n = max(repeats, min(100, int(2000 / max(step_ms, 1e-3))))

    def events(setup, body):
        times = []
        for _ in range(3):
            body(setup())
        for _ in range(n):
            arg = setup()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            body(arg)
            e.record()
            times.append((s, e))
        torch.cuda.synchronize()
        return quantiles([s.elapsed_time(e) for s, e in times])

    def do_bench(fn):
        q = triton_do_bench(fn, warmup=max(25.0, 3 * step_ms), rep=max(100.0, 20 * step_ms),
                            quantiles=[0.5, 0.2, 0.8], grad_to_none=runner.leaves or None)
        return tuple(float(v) for v in q)

    def step():
        runner.backward(runner.forward())

    res = {}
    if inplace:
        res["fwd"] = events(lambda: runner.reset(), lambda _: runner.forward())
        res["fwd+bwd"] = events(lambda: runner.reset(), lambda _: step())
    else:
        res["fwd"] = do_bench(lambda: runner.forward())
        res["fwd+bwd"] = do_bench(step)

    def setup_bwd():
        runner.reset()
        return runner.forward()
    res["bwd"] = events(setup_bwd, lambda out: runner.backward(out))
    runner.reset()
    return res
