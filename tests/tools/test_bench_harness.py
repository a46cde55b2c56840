"""The benchmark harness (dpo_fast_tools/bench/) on tiny shapes: outputs, agreement gate, memory meters.

Numbers are not checked here (speed and memory targets live in benchmarks/, see DESIGN.md);
what is checked is that the harness measures what it says it measures.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap

import pytest
import torch

from dpo_fast_tools import bench
from dpo_fast.cli import main as cli_main

REQUIRED_COLUMNS = {"implementation", "op", "device", "dtype", "tokens", "hidden", "vocab", "time_ms",
                    "peak_mem_mb", "agrees", "device_name", "torch", "dpo_fast", "triton"}

# A deliberately wrong implementation: the reference's log-probs scaled by 1.001 (and so its
# gradient too). The harness must flag it and must not time it.
PLUGIN = textwrap.dedent('''
    from dpo_fast_tools import bench

    def build(shape, inp):
        ok = bench.REGISTRY["pytorch"].build(shape, inp)
        x = inp["logits"]
        return bench.Runner(lambda: ok.forward() * 1.001, lambda lp: lp.backward(inp["gout"]),
                            lambda lp: {"logps": lp.detach(), "grad_logits": x.grad}, [x])

    bench.register(bench.Impl("wrong", ("logits",), build, label="scaled log-probs (a test)"))
''')


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    plugin = out / "wrong_impl.py"
    plugin.write_text(PLUGIN)
    shapes = "logits:float32:2x16:300,logits:float32:2x16:700,linear:float32:2x8:300:16,linear:bfloat16:2x8:300:16"
    impls = "dpo_fast:cpu,dpo_fast:reference,gemm3,gemm4,trl,torch_lce,wrong,liger,dpo_fast:triton,dpo_fast:cuda"
    rc = cli_main(["bench", "--device", "cpu", "--shapes", shapes, "--repeats", "1", "--in-process",
                   "--impls", impls, "--impl-plugin", str(plugin), "--output-dir", str(out / "res")])
    assert rc == 0
    return out / "res"


def test_outputs_written(tiny_run):
    rows = _read(tiny_run / "results.csv")
    assert REQUIRED_COLUMNS <= set(rows[0])
    md = (tiny_run / "results.md").read_text()
    assert "## logits" in md and "## linear" in md and "Measured on" in md
    png = tiny_run / "logits.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    measured = [r for r in rows if r["pass"]]
    assert {r["pass"] for r in measured} == {"fwd", "bwd", "fwd+bwd"}
    assert {int(r["vocab"]) for r in measured if r["op"] == "logits"} == {300, 700}
    assert all(r["device"] == "cpu" for r in rows)


def test_reference_and_dpo_fast_agree_and_are_timed(tiny_run):
    rows = [r for r in _read(tiny_run / "results.csv") if r["pass"] == "fwd+bwd"]
    ref = [r for r in rows if r["implementation"] == "pytorch"]
    assert ref and all(r["agrees"] == "True" and float(r["time_ms"]) > 0 for r in ref)
    fast = [r for r in rows if r["implementation"] in ("dpo_fast:cpu", "dpo_fast:reference")]
    assert fast
    for r in fast:
        assert r["agrees"] == "True", r
        assert float(r["time_ms"]) > 0 and r["peak_mem_mb"] != ""
        assert float(r["max_err"]) <= float(r["tolerance"])
    for floor in ("gemm3", "gemm4"):
        base = [r for r in rows if r["implementation"] == floor]
        assert len(base) == 2  # both linear shapes
        assert all(r["agrees"] == "" and r["time_ms"] != "" and r["kind"] == "baseline" for r in base)
    md = (tiny_run / "results.md").read_text()
    assert "Timing floors (plain GEMMs, no loss, not checked): `gemm3`, `gemm4`." in md


def test_trl_fused_head_is_checked_then_timed(tiny_run):
    """TRL's fused LM head goes through the same agreement check as dpo_fast, fp32 and bf16."""
    rows = [r for r in _read(tiny_run / "results.csv") if r["implementation"] == "trl"]
    if bench.installed("trl", "trl") is None:
        assert rows and rows[0]["status"] == "not installed"
        return
    fb = {r["dtype"]: r for r in rows if r["pass"] == "fwd+bwd"}
    assert set(fb) == {"float32", "bfloat16"}
    for r in fb.values():
        assert r["agrees"] == "True", r
        assert float(r["max_err"]) <= float(r["tolerance"]) and float(r["time_ms"]) > 0


def test_torch_linear_cross_entropy_is_a_checked_peer(tiny_run):
    """PyTorch's chunked F.linear_cross_entropy goes through the agreement check on the linear op:
    float32 agrees and is timed; bfloat16 is checked (its per-token losses are rounded to bf16, which
    may put it outside the tolerance: then it is reported, not timed)."""
    rows = [r for r in _read(tiny_run / "results.csv") if r["implementation"] == "torch_lce"]
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        assert rows and rows[0]["status"].startswith("unavailable")
        return
    fb = {r["dtype"]: r for r in rows if r["pass"] == "fwd+bwd"}
    assert set(fb) == {"float32", "bfloat16"} and {r["op"] for r in fb.values()} == {"linear"}
    f32 = fb["float32"]
    assert f32["agrees"] == "True" and float(f32["max_err"]) <= float(f32["tolerance"]) and float(f32["time_ms"]) > 0
    assert fb["bfloat16"]["max_err"] != ""


def test_disagreeing_implementation_is_flagged_not_timed(tiny_run):
    rows = [r for r in _read(tiny_run / "results.csv") if r["implementation"] == "wrong"]
    assert len(rows) == 2 * 3  # two logits shapes x three passes
    for r in rows:
        assert r["agrees"] == "False"
        assert r["status"].startswith("disagrees")
        assert r["time_ms"] == "" and r["time_p20_ms"] == ""
        assert float(r["max_err"]) > float(r["tolerance"])
    assert "✗ disagrees" in (tiny_run / "results.md").read_text()


def test_unavailable_implementations_are_reported(tiny_run):
    rows = _read(tiny_run / "results.csv")
    notes = {(r["implementation"], r["op"]): r["status"] for r in rows if not r["pass"]}
    if bench.installed("liger-kernel", "liger_kernel") is None:
        assert notes[("liger", "linear")] == "not installed"
    if not torch.cuda.is_available():
        assert "interpreter" in notes[("dpo_fast:triton", "logits")]
        assert notes[("dpo_fast:cuda", "logits")].startswith("unavailable")


def test_isolated_worker_measures_memory(tmp_path):
    """One case through the case server (a forked process per case): the reference's
    forward + backward must show at least the gradient's size in peak memory."""
    shapes = [bench.Shape("logits", "float32", 2, 64, 40000, 0, "custom")]
    rows = bench.run_benchmark(shapes, "cpu", repeats=1, only={"pytorch"}, log=lambda m: None)
    fb = [r for r in rows if r["pass"] == "fwd+bwd" and r["implementation"] == "pytorch"][0]
    assert fb["agrees"] is True, fb
    grad = 2 * 64 * 40000 * 4 / bench.MB
    assert fb["peak_mem_mb"] >= 0.9 * grad, fb


def test_cpu_meter_sees_an_allocation():
    meter = bench.CpuMeter()
    if not meter.can_reset:
        pytest.skip("/proc/self/clear_refs is not writable here")
    meter.start()
    x = torch.ones(25_000_000)  # 100 MB, touched
    peak = meter.window()
    del x
    assert 90e6 <= peak <= 200e6


def test_targets_are_judged_from_rows():
    def row(op, impl, tokens, vocab, t, mem, hidden=None):
        return {"op": op, "dtype": "float32", "tokens": tokens, "vocab": vocab, "implementation": impl,
                "pass": "fwd+bwd", "hidden": hidden, "time_ms": t, "peak_mem_mb": mem, "agrees": True,
                "status": "ok"}
    rows = [row("logits", "pytorch", 4096, 128256, 4400.0, 6000.0),
            row("logits", "dpo_fast:cpu", 4096, 128256, 1500.0, 2200.0),
            row("logits", "dpo_fast:cpu+inplace", 4096, 128256, 1400.0, 10.0),
            row("linear", "pytorch", 2048, 128256, 8000.0, 2550.0, 1024),
            row("linear", "dpo_fast:cpu", 2048, 128256, 11000.0, 560.0, 1024),
            row("linear", "trl", 2048, 128256, 17000.0, 2200.0, 1024),
            row("linear", "gemm3", 2048, 128256, 6000.0, 1000.0, 1024)]
    judged = bench.evaluate_targets(rows, "cpu")
    got = {t["target"]: t["met"] for t in judged}
    measured = {t["target"]: t["measured"] for t in judged}
    assert got["linear: dpo_fast time <= 1x TRL's fused LM head"] is True
    assert got["linear: dpo_fast peak extra <= 1x TRL's"] is True
    assert measured["linear: 3-GEMM floor (6NHV FLOPs, logits kept), for context"] == "6.00 s"
    # Optional targets whose implementations did not run are left out; stated ones say "not run".
    assert not any("4-GEMM" in t or "bf16: dpo_fast" in t for t in got)
    assert measured["linear bf16 4x512 H=1024 V=128256 fwd+bwd: PyTorch reference"] == "not run, not run extra"
    assert {t.shape.key() for t in bench.TARGETS["cpu"]} == {s.key() for s in bench.target_shapes("cpu")}
    assert got["logits: dpo_fast cpu time <= 0.4x reference"] is True
    assert got["logits: dpo_fast cpu peak extra <= 1.1x the gradient (2.10 GB)"] is True
    assert got["logits: dpo_fast cpu inplace_backward peak extra near zero (<= 5% of the gradient)"] is True
    assert got["linear: dpo_fast time <= 1.25x reference"] is False
    assert got["linear: dpo_fast peak extra <= 1.25x the gradients dH + dW (0.53 GB)"] is True


def test_parse_shapes_rejects_bad_input():
    assert bench.parse_shapes("linear:bfloat16:4x512:128256:1024")[0].hidden == 1024
    for bad in ("logits:float32:3x8:100", "linear:float32:2x8:100", "nope:float32:2x8:100", "logits:f32:2x8:100"):
        with pytest.raises(ValueError):
            bench.parse_shapes(bad)


def test_plan_covers_the_sweeps():
    shapes = bench.plan("cpu", True, bench.OPS)
    for op in bench.OPS:
        mine = [s for s in shapes if s.op == op]
        assert {s.vocab for s in mine if "vocab" in s.sweep} == set(bench.VOCABS)
        if op != "loss":  # quick: the loss op gets the vocab sweep only
            assert len({s.tokens for s in mine if "tokens" in s.sweep}) >= 2
            assert {s.dtype for s in mine} >= {"float32", "bfloat16"}
    full = bench.plan("cpu", False, bench.OPS)
    assert {s.dtype for s in full if s.op == "loss"} >= {"float32", "bfloat16"}
    assert len({s.hidden for s in shapes if s.op == "linear" and "hidden" in s.sweep}) >= 2
    assert len(set(s.key() for s in shapes)) == len(shapes)
    cuda = bench.plan("cuda", False, bench.OPS)
    assert {s.vocab for s in cuda} >= set(bench.VOCABS)


def test_without_the_reference_candidates_are_checked_against_float32_truth(monkeypatch):
    """When the reference cannot run (out of memory on big shapes), float32 candidates are
    checked against the reference's math computed one sequence at a time; low-precision ones
    stay unchecked and untimed."""
    def broken(shape, inp):
        raise MemoryError("simulated: out of memory")
    monkeypatch.setitem(bench.REGISTRY, "pytorch", bench.Impl("pytorch", bench.OPS, broken, kind="reference"))
    shapes = [bench.Shape("logits", "float32", 2, 8, 200, 0, "custom"),
              bench.Shape("linear", "bfloat16", 2, 8, 200, 16, "custom")]
    rows = bench.run_benchmark(shapes, "cpu", repeats=1, only={"dpo_fast:reference"},
                               in_process=True, log=lambda m: None)
    fb = {(r["op"], r["implementation"]): r for r in rows if r["pass"] == "fwd+bwd"}
    status = fb[("logits", "pytorch")]["status"]
    assert status == "out of memory" or status.startswith("error")
    assert fb[("logits", "dpo_fast:reference")]["agrees"] is True
    assert fb[("logits", "dpo_fast:reference")]["time_ms"] is not None
    assert fb[("linear", "dpo_fast:reference")]["status"].startswith("unchecked")
    assert fb[("linear", "dpo_fast:reference")]["time_ms"] is None


def test_trl_is_marked_unavailable_with_a_reason(monkeypatch):
    impl = bench.REGISTRY["trl"]
    monkeypatch.setattr(bench.impls, "installed", lambda dist, module: None)
    assert impl.available("cpu") == (False, "not installed")
    monkeypatch.setattr(bench.impls, "installed", lambda dist, module: "0.9.0")
    monkeypatch.setitem(sys.modules, "trl.kernels.chunked_logprob", None)  # importing it fails
    ok, why = impl.available("cpu")
    assert not ok and why.startswith("unavailable: trl 0.9.0 has no fused LM head")


def test_gemm3_floor_keeps_the_logits_and_gemm4_recomputes_them():
    """The floors do the GEMMs their FLOP counts say: gemm3 = forward, dH, dW from the forward's
    output; gemm4 = the same plus a recomputation of the logits."""
    shape = bench.Shape("linear", "float32", 2, 6, 50, 8, "custom")
    inp = bench.make_inputs(shape, "cpu")
    calls = []
    real_mm = torch.mm

    def counting_mm(a, b, **kw):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real_mm(a, b, **kw)

    for name, n in (("gemm3", 3), ("gemm4", 4)):
        runner = bench.REGISTRY[name].build(shape, inp)
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "mm", counting_mm)
            z = runner.forward()
            runner.backward(z)
        N = shape.scored
        assert z.shape == (N, shape.vocab)
        assert len(calls) == n
        assert calls[-2:] == [((N, shape.vocab), (shape.vocab, 8)), ((shape.vocab, N), (N, 8))]


def test_dpo_fast_variant_is_one_register_call(monkeypatch):
    """A dpo_fast variant (e.g. the budgeted linear path) is registered with dpo_fast_impl: its
    options reach dpo_fast.loss, computed per shape when given as a function."""
    seen = []

    def options(shape):
        seen.append(shape)
        return {"no_such_option": 1}

    impl = bench.dpo_fast_impl("reference", variant="test", ops=("linear",), options=options)
    assert impl.name == "dpo_fast:reference+test" and impl.ops == ("linear",)
    monkeypatch.setitem(bench.REGISTRY, impl.name, impl)
    shape = bench.Shape("linear", "float32", 2, 6, 50, 8, "custom")
    runner = bench.REGISTRY[impl.name].build(shape, bench.make_inputs(shape, "cpu"))
    assert seen == [shape]
    with pytest.raises(TypeError, match="no_such_option"):
        runner.forward()


def test_unknown_impls_are_refused(tmp_path, capsys):
    rc = cli_main(["bench", "--device", "cpu", "--shapes", "logits:float32:2x8:100", "--impls", "dpo_fast:nope",
                   "--output-dir", str(tmp_path)])
    assert rc == 2
    assert "--impls" in capsys.readouterr().err


# ---------------------------------------------------------------- the public memory meter

def _setup_with_resident_inputs(keep_mb: int, step_mb: int):
    """Set up: keep_mb MB that exist before the baseline (must not count); step: step_mb more."""
    kept = torch.ones(keep_mb * 250_000)

    def step():
        x = torch.ones(step_mb * 250_000)
        return {"sum": float(x.sum()), "kept": kept.numel()}
    return step


def _setup_that_fails():
    raise ValueError("deliberately broken set-up")


def test_measure_in_fresh_process_counts_only_the_step():
    from dpo_fast_tools.bench.meters import CpuMeter, measure_in_fresh_process
    if not CpuMeter().can_reset:
        pytest.skip("/proc/self/clear_refs is not writable here")
    peak = measure_in_fresh_process(_setup_with_resident_inputs, 300, 100, device="cpu")
    assert 90e6 <= peak.peak_bytes <= 150e6, peak
    assert peak.result == {"sum": 25_000_000.0, "kept": 75_000_000}
    assert "VmHWM" in peak.method
    with pytest.raises(RuntimeError, match="deliberately broken set-up"):
        measure_in_fresh_process(f"{__name__}:_setup_that_fails")
    with pytest.raises(ValueError, match="module-level"):
        measure_in_fresh_process(lambda: None)


def test_cpu_meter_ignores_the_parents_high_water_mark():
    """A process started by exec inherits its parent's ru_maxrss (clear_refs does not reset it):
    the meter must read VmHWM, or a child of a big process reports the parent's peak."""
    from dpo_fast_tools.bench.meters import CpuMeter, child_env
    if not CpuMeter().can_reset:
        pytest.skip("/proc/self/clear_refs is not writable here")
    big = torch.ones(100_000_000)  # 400 MB resident in this (parent) process
    code = ("import torch; from dpo_fast_tools.bench.meters import CpuMeter; m = CpuMeter(); m.start(); "
            "x = torch.ones(12_500_000); print(m.window())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=child_env({"OMP_NUM_THREADS": "1"}))
    del big
    assert 45e6 <= int(out.stdout.split()[-1]) <= 100e6


def test_cuda_targets_are_judged_from_rows():
    def row(op, dtype, impl, tokens, t, mem, hidden=None, **kw):
        return {"op": op, "dtype": dtype, "tokens": tokens, "vocab": 128256, "implementation": impl,
                "pass": "fwd+bwd", "hidden": hidden, "time_ms": t, "peak_mem_mb": mem, "agrees": True,
                "status": "ok", **kw}
    g = (16384 * 4096 + 128256 * 4096) * 2 / bench.MB  # dH + dW in bf16, MB
    rows = [row("logits", "bfloat16", "pytorch", 16384, 40.0, 20000.0),
            row("logits", "bfloat16", "dpo_fast:triton", 16384, 10.0, 4200.0, pct_peak_bw=85.0, gbps=4080.0,
                speedup_vs_ref=4.0),
            row("linear", "bfloat16", "dpo_fast:triton", 16384, 130.0, g + 100.0, 4096),
            row("linear", "bfloat16", "gemm4", 16384, 100.0, 5000.0, 4096)]
    got = {t["target"]: (t["met"], t["measured"]) for t in bench.evaluate_targets(rows, "cuda")}
    bw = got["logits bfloat16 8x2048 V=128256 fwd+bwd, dpo_fast triton: >= 80% of HBM bandwidth (3 passes)"]
    assert bw == (True, "85.0% (4080.0 GB/s)")
    assert got["logits bfloat16 8x2048 V=128256 fwd+bwd, dpo_fast triton: >= 3x the reference"][0] is True
    assert not any("dpo_fast cuda" in t or "float32" in t for t in got)  # not run: left out
    beyond = got["linear bf16 16384 tokens H=4096 V=128256: extra memory <= 64 MB beyond dH and dW"]
    assert beyond[0] is False and beyond[1].startswith("100 MB beyond")
    assert got["linear bf16: time <= 1.3x four cuBLAS GEMMs (8NHV FLOPs)"][0] is True


# ----------------------------------------------------------------------------------------------
# Issue 22, item 4: every sweep option selects exactly what it names, or refuses what it cannot run


class _Planned(Exception):
    pass


def _planned_shapes(monkeypatch, *argv):
    """The shapes `dpo-fast bench ARGV` would measure (the run itself is stopped before any work)."""
    seen = {}

    def fake_run(shapes, *a, **k):
        seen["shapes"] = shapes
        raise _Planned

    monkeypatch.setattr(bench.run, "run_benchmark", fake_run)
    with pytest.raises(_Planned):
        cli_main(["bench", "--device", "cpu", *argv])
    return seen["shapes"]


@pytest.mark.parametrize("quick", [[], ["--quick"]])
def test_vocabs_select_exactly_the_vocabularies_named(monkeypatch, quick):
    shapes = _planned_shapes(monkeypatch, *quick, "--vocabs", "8000,32000")
    assert {s.vocab for s in shapes} == {8000, 32000}  # the token, hidden and dtype sweeps too
    assert {s.op for s in shapes} == set(bench.OPS)
    swept = {s.sweep for s in shapes}
    assert any("tokens" in s for s in swept) and any("vocab" in s for s in swept)


def test_dtypes_are_all_measured_with_quick(monkeypatch):
    shapes = _planned_shapes(monkeypatch, "--quick", "--dtypes", "float32,bfloat16,float16", "--ops", "loss")
    assert {s.dtype for s in shapes} == {"float32", "bfloat16", "float16"}


@pytest.mark.parametrize("argv,expect", [
    (["--vocabs", "8000,abc"], "--vocabs"),
    (["--vocabs", "1"], "--vocabs"),
    (["--shapes", "logits:float32:2x8:100", "--vocabs", "8000"], "--vocabs"),
    (["--shapes", "logits:float32:2x8:100", "--dtypes", "bfloat16"], "--dtypes"),
    (["--targets", "--vocabs", "8000"], "--vocabs"),
    (["--shapes", "logits:float32:2x8:100", "--ops", "linear"], "--ops"),
])
def test_sweep_options_that_cannot_be_honoured_are_refused(capsys, argv, expect):
    assert cli_main(["bench", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert expect in err and err.count("\n") == 1, err
