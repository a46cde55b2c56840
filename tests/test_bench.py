"""The benchmark harness (dpo_fast/bench.py) on tiny shapes: outputs, agreement gate, memory meter.

Numbers are not checked here (speed and memory targets live in benchmarks/, see DESIGN.md);
what is checked is that the harness measures what it says it measures.
"""

from __future__ import annotations

import csv
import textwrap

import pytest
import torch

from dpo_fast import bench
from dpo_fast.cli import main as cli_main

REQUIRED_COLUMNS = {"implementation", "op", "device", "dtype", "tokens", "hidden", "vocab", "time_ms",
                    "peak_mem_mb", "agrees", "device_name", "torch", "dpo_fast", "triton"}

# A deliberately wrong implementation: the reference's log-probs scaled by 1.001 (and so its
# gradient too). The harness must flag it and must not time it.
PLUGIN = textwrap.dedent('''
    from dpo_fast import bench

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
    shapes = "logits:float32:2x16:300,logits:float32:2x16:700,linear:float32:2x8:300:16"
    impls = "dpo_fast:cpu,dpo_fast:reference,gemm4,wrong,liger,dpo_fast:triton,dpo_fast:cuda"
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
    base = [r for r in rows if r["implementation"] == "gemm4"]
    assert base and all(r["agrees"] == "" and r["time_ms"] != "" for r in base)


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
    if bench._installed("liger-kernel", "liger_kernel") is None:
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
            row("linear", "dpo_fast:cpu", 2048, 128256, 11000.0, 560.0, 1024)]
    got = {t["target"]: t["met"] for t in bench.evaluate_targets(rows, "cpu")}
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
