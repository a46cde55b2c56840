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
inplace_backward), Liger-Kernel's LigerFusedLinearDPOLoss and Cut Cross-Entropy's
linear_cross_entropy when they are importable, and for `linear` a 4-GEMM timing floor
("gemm4": the 8NHV FLOPs of forward, recompute, dH and dW, with no loss at all).

Order of one case (one shape x one implementation):
  1. inputs are built and touched; a tiny warm-up run loads libraries and thread pools;
  2. memory baseline; one forward + backward step, the peak of each half recorded
     (CPU: RSS high-water mark of a fresh process, reset with /proc/self/clear_refs and read
     from getrusage; CUDA: torch.cuda.max_memory_allocated), relative to the baseline;
  3. the step's outputs (value and gradients) are compared with the reference's, on the same
     inputs, before any time is taken; a disagreeing implementation is flagged, not timed;
  4. timing: CPU, repeated steps (forward and backward timed separately within each step);
     CUDA, triton.testing.do_bench (CUDA events where an untimed per-run setup is needed).

On the CPU every case runs in its own process, forked from a server that has only imported
torch and dpo_fast and never run an op, so memory peaks are not polluted by earlier cases.
Results go to DIR: results.csv, results.md and one PNG per op (time and memory against vocab
and tokens, one line per implementation).

Other implementations can be benchmarked side by side with --impl-plugin FILE.py: the file
calls dpo_fast.bench.register(Impl(...)) at import (see register()).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import resource
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

OPS = ("logits", "loss", "linear")
PASSES = ("fwd", "bwd", "fwd+bwd")
VOCABS = (32000, 128256, 151936, 256000)
DTYPES = ("float32", "bfloat16", "float16")
BETA = 0.1
IGNORE_INDEX = -100
SEED = 1234
MB = 1e6  # memory columns are in MB = 10^6 bytes

CSV_COLUMNS = [
    "implementation", "op", "device", "dtype", "tokens", "hidden", "vocab", "batch", "seqlen", "pass",
    "time_ms", "time_p20_ms", "time_p80_ms", "cpu_time_ms", "repeats", "peak_mem_mb", "grad_mb", "mem_vs_grad",
    "speedup_vs_ref", "agrees", "max_err", "tolerance", "status", "tflops", "gbps", "pct_peak_flops",
    "pct_peak_bw", "sweep", "device_name", "threads", "loadavg", "torch", "triton", "dpo_fast", "liger_kernel",
    "cut_cross_entropy", "python", "timestamp",
]


# ================================================================ shapes and plans


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark point: every implementation of `op` runs on the same inputs of this shape."""

    op: str
    dtype: str
    batch: int  # S sequences = 2P (P chosen rows, then P rejected rows)
    seqlen: int  # T
    vocab: int  # V
    hidden: int = 0  # H, for op == "linear"
    sweep: str = ""  # which sweeps the point belongs to, "|"-joined (vocab, tokens, hidden, dtype, target)

    @property
    def tokens(self) -> int:
        return self.batch * self.seqlen

    @property
    def scored(self) -> int:  # rows that score a token: the shift drops each sequence's last position
        return self.batch * (self.seqlen - 1)

    def key(self) -> tuple:
        return (self.op, self.dtype, self.batch, self.seqlen, self.vocab, self.hidden)

    def label(self) -> str:
        h = f" H={self.hidden}" if self.op == "linear" else ""
        return f"{self.op} {self.dtype} S={self.batch} T={self.seqlen}{h} V={self.vocab}"


def _elt(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[dtype]


def grad_bytes(s: Shape) -> int:
    """The unavoidable output of a backward: d logits, or d hidden + d weight."""
    if s.op == "linear":
        return (s.tokens * s.hidden + s.vocab * s.hidden) * _elt(s.dtype)
    return s.tokens * s.vocab * _elt(s.dtype)


def work_model(s: Shape, pas: str) -> tuple[float | None, float]:
    """(useful FLOPs, minimal bytes moved) of one pass, the same for every implementation.

    From logits: the reads and writes of the vocab-sized tensors, forward 1 read, backward 1 read
    + 1 write (the "three passes"). Linear: 2NHV FLOPs forward and 4NHV backward (dH and dW,
    without recomputation), bytes = hidden + weight read per pass, gradients written in backward.
    """
    e = _elt(s.dtype)
    mult = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[pas]
    if s.op == "linear":
        n = s.scored
        fl = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[pas] * n * s.hidden * s.vocab
        return float(fl), float(mult * (s.tokens + s.vocab) * s.hidden * e)
    return None, float(mult * s.tokens * s.vocab * e)


def _sweep_points(op, dtype, base, vocabs, token_points, hiddens) -> list[Shape]:
    """One-factor-at-a-time sweeps around a base point (batch, seqlen, vocab, hidden)."""
    S, T, V, H = base
    pts: dict[tuple, set] = {}

    def add(tag, batch, seqlen, vocab, hidden, dt=dtype):
        pts.setdefault((dt, batch, seqlen, vocab, hidden), set()).add(tag)

    for v in vocabs:
        add("vocab", S, T, v, H)
    for (b, t) in token_points:
        add("tokens", b, t, V, H)
    if op == "linear":
        for h in hiddens:
            add("hidden", S, T, V, h)
    return [Shape(op, dt, b, t, v, h if op == "linear" else 0, "|".join(sorted(tags)))
            for (dt, b, t, v, h), tags in pts.items()]


def plan(device: str, quick: bool, ops, dtypes=None) -> list[Shape]:
    """The sweep: vocab sizes, token counts, hidden sizes (linear) and dtypes, per op."""
    cuda = device == "cuda"
    base_dtype = "bfloat16" if cuda else "float32"
    dtypes = list(dtypes) if dtypes else ([base_dtype, "float32"] if cuda else [base_dtype, "bfloat16"])
    if quick:
        dtypes = dtypes[:2]
    shapes: list[Shape] = []
    for op in ops:
        if cuda:
            if op == "linear":
                base = (8, 2048, 128256, 4096)
                toks = [(2, 2048), (4, 2048), (8, 2048)] + ([] if quick else [(16, 2048)])
                hid = [2048, 4096] + ([] if quick else [8192])
            else:
                base = (8, 2048, 128256, 0)
                toks = [(2, 2048), (4, 2048), (8, 2048)] + ([] if quick else [(16, 2048)])
                hid = []
            vocabs = VOCABS
        elif quick:
            if op == "linear":
                base = (2, 64, 128256, 256)
                toks, hid = [(2, 32), (2, 64), (4, 64)], [256, 512]
            else:
                base = (2, 256, 128256, 0)
                toks, hid = [(2, 128), (2, 256), (4, 256)], []
            vocabs = VOCABS
        else:
            if op == "linear":
                base = (2, 512, 128256, 1024)
                toks, hid = [(2, 256), (2, 512), (4, 512)], [512, 1024, 2048]
            else:
                base = (4, 512, 128256, 0)
                toks, hid = [(2, 512), (4, 512), (8, 512)], []
            vocabs = VOCABS
        extra_dtypes = dtypes[1:]
        if quick and op == "loss":  # the loss op costs what the logits op costs: vocab sweep only
            toks, extra_dtypes = [], []
        pts = _sweep_points(op, dtypes[0], base, vocabs, toks, hid)
        S, T, V, H = base
        for dt in extra_dtypes:
            pts.append(Shape(op, dt, S, T, V, H if op == "linear" else 0, "dtype"))
        shapes += pts
    return shapes


def parse_shapes(text: str) -> list[Shape]:
    """"op:dtype:SxT:V[:H]" items, comma-separated (S = 2P sequences, even)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        parts = item.split(":")
        try:
            op, dtype, st, v = parts[:4]
            S, T = (int(x) for x in st.lower().split("x"))
            H = int(parts[4]) if len(parts) > 4 else 0
            V = int(v)
        except ValueError:
            raise ValueError(f"--shapes: cannot read {item!r}; expected op:dtype:SxT:V[:H]") from None
        if op not in OPS or dtype not in DTYPES:
            raise ValueError(f"--shapes: {item!r}: op must be one of {OPS} and dtype one of {DTYPES}")
        if S < 2 or S % 2 or T < 2 or V < 2 or (op == "linear") != (H > 0):
            raise ValueError(f"--shapes: {item!r}: need an even S >= 2, T >= 2, V >= 2, and H > 0 exactly for linear")
        out.append(Shape(op, dtype, S, T, V, H, "custom"))
    return out


# The cases the project's targets are stated on (README / issues), measured side by side.
TARGET_SHAPES = {
    "cpu": [
        Shape("logits", "float32", 8, 512, 128256, 0, "target"),
        Shape("linear", "float32", 4, 512, 128256, 1024, "target"),
    ],
    "cuda": [
        Shape("logits", "bfloat16", 8, 2048, 128256, 0, "target"),
        Shape("logits", "float32", 8, 2048, 128256, 0, "target"),
        Shape("linear", "bfloat16", 8, 2048, 128256, 4096, "target"),
    ],
}


# ================================================================ implementations


@dataclasses.dataclass
class Impl:
    """A benchmarked implementation.

    build(shape, inputs) returns a Runner. available(device) returns (ok, status) where status
    is shown when not ok ("not installed", "unavailable: ..."). kind: "reference" (the oracle
    every other implementation is checked against), "candidate", or "baseline" (a timing floor
    that computes no loss: not checked, always timed).
    """

    name: str
    ops: tuple
    build: Callable
    available: Callable = lambda device: (True, "")
    kind: str = "candidate"
    inplace: bool = False  # overwrites its logits input: restored (untimed) before each run
    full_warmup: bool = False  # compiled (torch.compile) code: warm up on the real shape first
    label: str = ""


REGISTRY: dict[str, Impl] = {}
TRUTH = "__truth__"  # the task that computes only the float32 truth


def register(impl: Impl) -> Impl:
    """Add (or replace) an implementation; plugins (--impl-plugin) call this at import."""
    REGISTRY[impl.name] = impl
    return impl


class Runner:
    """One implementation bound to one set of inputs.

    forward() -> out; backward(out); outputs(out) -> {name: tensor} after backward (the value and
    the gradients that are compared); reset() before each timed run (gradients to None, logits
    restored for in-place implementations).
    """

    def __init__(self, forward, backward, outputs, leaves, restore=None):
        self.forward, self.backward, self._outputs = forward, backward, outputs
        self.leaves, self._restore = leaves, restore

    def outputs(self, out):
        return self._outputs(out)

    def reset(self):
        for t in self.leaves:
            t.grad = None
        if self._restore is not None:
            self._restore()


def _torch():
    import torch
    return torch


def _dpo_from_logps(lp, ref_c, ref_r):
    """The DPO sigmoid loss of (2P,) policy log-probs, as in the DPO paper and TRL."""
    F = _torch().nn.functional
    P = lp.shape[0] // 2
    return -F.logsigmoid(BETA * ((lp[:P] - ref_c) - (lp[P:] - ref_r))).mean()


def _logits_view(inp):
    # Logits enter as a view of the leaf tensor, as they would leave an lm_head: autograd then
    # hands the gradient upstream without copying it. (On a bare leaf, AccumulateGrad clones a
    # gradient that aliases storage someone else still references.)
    x = inp["logits"]
    return x.view(x.shape)


def _restore_logits(inp):
    torch = _torch()
    if "pristine" not in inp:
        return None

    def restore():
        with torch.no_grad():
            inp["logits"].copy_(inp["pristine"])
    return restore


def _build_pytorch(shape: Shape, inp) -> Runner:
    from .kernels.reference import naive_sequence_logprobs
    torch = _torch()
    labels = inp["labels"]
    if shape.op == "linear":
        h, w = inp["hidden"], inp["weight"]

        def fwd():
            logits = h @ w.t()  # as the model's lm_head computes them, in the input dtype
            lp = naive_sequence_logprobs(logits, labels, ignore_index=IGNORE_INDEX)
            return _dpo_from_logps(lp, inp["ref_c"], inp["ref_r"]), lp.detach()

        return Runner(fwd, lambda out: out[0].backward(),
                      lambda out: {"loss": out[0].detach(), "logps": out[1],
                                   "grad_hidden": h.grad, "grad_weight": w.grad}, [h, w])

    x = inp["logits"]
    if shape.op == "logits":
        def fwd():
            return naive_sequence_logprobs(_logits_view(inp), labels, ignore_index=IGNORE_INDEX)

        return Runner(fwd, lambda lp: lp.backward(inp["gout"]),
                      lambda lp: {"logps": lp.detach(), "grad_logits": x.grad}, [x])

    def fwd_loss():
        lp = naive_sequence_logprobs(_logits_view(inp), labels, ignore_index=IGNORE_INDEX)
        return _dpo_from_logps(lp, inp["ref_c"], inp["ref_r"]), lp.detach()

    return Runner(fwd_loss, lambda out: out[0].backward(),
                  lambda out: {"loss": out[0].detach(), "logps": out[1], "grad_logits": x.grad}, [x])


def _dpo_fast_builder(backend: str, inplace: bool):
    def build(shape: Shape, inp) -> Runner:
        import dpo_fast
        torch = _torch()
        labels = inp["labels"]
        if shape.op == "linear":
            h, w = inp["hidden"], inp["weight"]

            def fwd():
                out = dpo_fast.loss(labels=labels, ref_chosen_logps=inp["ref_c"], ref_rejected_logps=inp["ref_r"],
                                    hidden=h, weight=w, beta=BETA, backend=backend)
                return out.loss, torch.cat([out.chosen_logps, out.rejected_logps])

            return Runner(fwd, lambda out: out[0].backward(),
                          lambda out: {"loss": out[0].detach(), "logps": out[1],
                                       "grad_hidden": h.grad, "grad_weight": w.grad}, [h, w])
        x = inp["logits"]
        if shape.op == "logits":
            def fwd():
                return dpo_fast.sequence_logprobs(_logits_view(inp), labels, ignore_index=IGNORE_INDEX,
                                                  inplace_backward=inplace, backend=backend)

            return Runner(fwd, lambda lp: lp.backward(inp["gout"]),
                          lambda lp: {"logps": lp.detach(), "grad_logits": x.grad}, [x], _restore_logits(inp))

        def fwd_loss():
            out = dpo_fast.loss(_logits_view(inp), labels, inp["ref_c"], inp["ref_r"], beta=BETA,
                                inplace_backward=inplace, backend=backend)
            return out.loss, torch.cat([out.chosen_logps, out.rejected_logps])

        return Runner(fwd_loss, lambda out: out[0].backward(),
                      lambda out: {"loss": out[0].detach(), "logps": out[1], "grad_logits": x.grad}, [x],
                      _restore_logits(inp))
    return build


def _dpo_fast_available(backend: str):
    def available(device: str):
        if backend == "triton" and device == "cpu":
            return False, ("unavailable: Triton runs on CPU tensors only in the interpreter (TRITON_INTERPRET=1), "
                           "a test vehicle far too slow to benchmark")
        from dpo_fast import available_backends
        ok, reason = available_backends(device)[backend]
        return ok, ("" if ok else f"unavailable: {reason}")
    return available


def _installed(dist: str, module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _liger_available(device: str):
    if _installed("liger-kernel", "liger_kernel") is None:
        return False, "not installed"
    return True, ""


def _build_liger(shape: Shape, inp) -> Runner:
    """LigerFusedLinearDPOLoss on the same batch. Liger takes no shift and expects chosen rows
    then rejected rows (as we lay them out); it gets the hidden states of the scored positions
    and the shifted labels. Reference log-probs are equal for the two halves of each pair in
    the `linear` op, so Liger's reference-free mode computes the same loss (DPO only uses
    their difference). Options are set by name where this Liger version has them."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    h, w = inp["hidden"], inp["weight"]
    labels = inp["labels"][:, 1:].contiguous()
    init = inspect.signature(LigerFusedLinearDPOLoss.__init__).parameters
    want = dict(ignore_index=IGNORE_INDEX, beta=BETA, compute_nll_loss=False, use_ref_model=False,
                average_log_prob=False, loss_type="sigmoid")
    mod = LigerFusedLinearDPOLoss(**{k: v for k, v in want.items() if k in init})
    fwd_params = inspect.signature(mod.forward).parameters
    extra = {}
    if "ref_chosen_logps" in fwd_params:
        extra = dict(ref_chosen_logps=inp["ref_c"], ref_rejected_logps=inp["ref_r"])

    def fwd():
        out = mod(w, h[:, :-1], labels, **extra)
        return out[0] if isinstance(out, (tuple, list)) else out

    return Runner(fwd, lambda loss: loss.backward(),
                  lambda loss: {"loss": loss.detach(), "grad_hidden": h.grad, "grad_weight": w.grad}, [h, w])


def _cce_available(device: str):
    if _installed("cut-cross-entropy", "cut_cross_entropy") is None:
        return False, "not installed"
    if device != "cuda":
        return False, "unavailable: Cut Cross-Entropy's kernels need CUDA"
    return True, ""


def _build_cce(shape: Shape, inp) -> Runner:
    """Cut Cross-Entropy's per-token losses (reduction="none"), summed per sequence into
    log-probs, with the DPO loss on top. CCE's defaults (gradient filtering included) are kept:
    they are what its users get."""
    from cut_cross_entropy import linear_cross_entropy
    h, w = inp["hidden"], inp["weight"]
    params = inspect.signature(linear_cross_entropy).parameters
    labels = inp["labels"]
    shifted = labels[:, 1:].contiguous()

    def fwd():
        if "shift" in params:
            tok = linear_cross_entropy(h, w, labels, ignore_index=IGNORE_INDEX, reduction="none", shift=True)
        else:
            tok = linear_cross_entropy(h[:, :-1], w, shifted, ignore_index=IGNORE_INDEX, reduction="none")
        tok = tok.reshape(shape.batch, -1).float()
        lp = -tok.sum(-1)
        return _dpo_from_logps(lp, inp["ref_c"], inp["ref_r"]), lp.detach()

    return Runner(fwd, lambda out: out[0].backward(),
                  lambda out: {"loss": out[0].detach(), "logps": out[1],
                               "grad_hidden": h.grad, "grad_weight": w.grad}, [h, w])


def _build_gemm4(shape: Shape, inp) -> Runner:
    """The timing floor of a fused linear loss: forward h @ W^T, its recomputation in backward,
    dH = G @ W and dW = G^T @ h, on the scored rows, with a logits-sized G (no loss, no check)."""
    torch = _torch()
    h = inp["hidden"].detach()[:, :-1].reshape(-1, shape.hidden)
    w = inp["weight"].detach()

    def fwd():
        return torch.mm(h, w.t())

    def bwd(z):
        g = torch.mm(h, w.t())
        torch.mm(g, w)
        torch.mm(g.t(), h)

    return Runner(fwd, bwd, lambda out: {}, [])


def _builtin_impls() -> None:
    register(Impl("pytorch", OPS, _build_pytorch, kind="reference",
                  label="PyTorch reference (log_softmax + gather + masked sum, as TRL)"))
    for backend in ("cpu", "cuda", "triton", "reference"):
        for inplace in ((False, True) if backend != "reference" else (False,)):
            name = f"dpo_fast:{backend}" + ("+inplace" if inplace else "")
            ops = ("logits", "loss") if inplace else OPS  # the linear op has no logits to give up
            register(Impl(name, ops, _dpo_fast_builder(backend, inplace), _dpo_fast_available(backend),
                          inplace=inplace, label=f"dpo_fast backend={backend!r}"
                          + (", inplace_backward=True" if inplace else "")))
    register(Impl("liger", ("linear",), _build_liger, _liger_available, full_warmup=True,
                  label="Liger-Kernel LigerFusedLinearDPOLoss"))
    register(Impl("cce", ("linear",), _build_cce, _cce_available,
                  label="Cut Cross-Entropy linear_cross_entropy + DPO"))
    register(Impl("gemm4", ("linear",), _build_gemm4, kind="baseline",
                  label="4 plain GEMMs (8NHV FLOPs): the floor of a fused linear loss"))


_builtin_impls()


def load_plugin(path: str) -> None:
    """Import a plugin file (or module name) that registers extra implementations."""
    if path.endswith(".py") or os.sep in path:
        name = "dpo_fast_bench_plugin_" + str(abs(hash(os.path.abspath(path))))
        if name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    else:
        importlib.import_module(path)


# ================================================================ inputs


def _fill_(out, gen, scale: float = 1.0) -> None:
    """Fill `out` (rows x cols, any float dtype) with pseudo-random values without temporaries
    the size of `out`: a random block of up to 64 rows, repeated down the tensor with a random
    scale and shift per repetition (the kernels' cost does not depend on the values)."""
    torch = _torch()
    rows = out.shape[0]
    cols = out.shape[-1]
    flat = out.view(rows, cols)
    R = min(rows, 64)
    block = torch.randn(R, cols, generator=gen, dtype=torch.float32).mul_(scale)
    if out.device.type != "cpu":
        block = block.to(out.device)
    nrep = (rows + R - 1) // R
    ab = torch.rand(nrep, 2, generator=gen, dtype=torch.float32)
    for k in range(nrep):
        r0, r1 = k * R, min(rows, (k + 1) * R)
        a, b = 0.75 + 0.5 * float(ab[k, 0]), (float(ab[k, 1]) - 0.5) * scale
        flat[r0:r1].copy_(block[: r1 - r0]).mul_(a).add_(b)


def make_inputs(shape: Shape, device: str, pristine: bool = False, dtype: str | None = None) -> dict:
    """The inputs of one shape, identical for every implementation (fixed seed)."""
    torch = _torch()
    dt = getattr(torch, dtype or shape.dtype)
    gen = torch.Generator().manual_seed(SEED)
    S, T, V, H = shape.batch, shape.seqlen, shape.vocab, shape.hidden
    P = S // 2
    inp: dict[str, Any] = {"labels": torch.randint(0, V, (S, T), generator=gen).to(device)}
    if shape.op == "linear":
        h = torch.empty(S * T, H, dtype=dt, device=device)
        _fill_(h, gen, 1.0)
        w = torch.empty(V, H, dtype=dt, device=device)
        _fill_(w, gen, 1.0 / math.sqrt(H))
        inp["hidden"] = h.view(S, T, H).requires_grad_(True)
        inp["weight"] = w.requires_grad_(True)
        # Equal within each pair: DPO only uses their difference, so reference-free
        # implementations compute the same loss (see _build_liger).
        ref = (-(T - 1) * math.log(V) + 5 * torch.randn(P, generator=gen)).to(device)
        inp["ref_c"], inp["ref_r"] = ref, ref.clone()
    else:
        x = torch.empty(S * T, V, dtype=dt, device=device)
        _fill_(x, gen, 1.0)
        x = x.view(S, T, V)
        if pristine:
            inp["pristine"] = x.clone()
        inp["logits"] = x.requires_grad_(True)
        inp["gout"] = torch.randn(S, generator=gen).to(device)
        base = -(T - 1) * (math.log(V) + 0.5)
        inp["ref_c"] = (base + 10 * torch.randn(P, generator=gen)).to(device)
        inp["ref_r"] = (base + 10 * torch.randn(P, generator=gen)).to(device)
    return inp


def _tiny(shape: Shape) -> Shape:
    return dataclasses.replace(shape, batch=2, seqlen=8, vocab=64, hidden=16 if shape.op == "linear" else 0)


# ================================================================ measurement


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_hiwater() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class CpuMeter:
    """Peak RSS growth over a baseline read after the inputs exist (a fresh process per case)."""

    def __init__(self):
        self.can_reset = _reset_hiwater()

    def start(self):
        gc.collect()
        _reset_hiwater()
        self.base = _rss_bytes()

    def window(self) -> int:
        """Peak growth since start() (or the last window()), relative to the baseline."""
        peak = _maxrss_bytes() - self.base
        _reset_hiwater()
        return max(0, peak)


class CudaMeter:
    def __init__(self, device):
        self.torch = _torch()
        self.device = device

    def start(self):
        gc.collect()
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.reset_peak_memory_stats(self.device)
        self.base = self.torch.cuda.memory_allocated(self.device)

    def window(self) -> int:
        t = self.torch
        t.cuda.synchronize(self.device)
        peak = t.cuda.max_memory_allocated(self.device) - self.base
        t.cuda.reset_peak_memory_stats(self.device)
        return max(0, peak)


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    import statistics
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]

    def q(p):
        i = p * (len(xs) - 1)
        lo, hi = math.floor(i), math.ceil(i)
        return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)
    return statistics.median(xs), q(0.2), q(0.8)


def _time_cpu(runner: Runner, repeats: int) -> dict[str, tuple]:
    """Repeated steps; forward and backward timed separately inside each step."""
    f, b, fb, cf, cb, cfb = [], [], [], [], [], []
    for _ in range(repeats):
        runner.reset()
        c0, t0 = time.process_time(), time.perf_counter()
        out = runner.forward()
        c1, t1 = time.process_time(), time.perf_counter()
        runner.backward(out)
        c2, t2 = time.process_time(), time.perf_counter()
        del out
        f.append((t1 - t0) * 1e3)
        b.append((t2 - t1) * 1e3)
        fb.append((t2 - t0) * 1e3)
        cf.append((c1 - c0) * 1e3)
        cb.append((c2 - c1) * 1e3)
        cfb.append((c2 - c0) * 1e3)
    runner.reset()
    # Wall-clock quantiles, plus the median CPU time of the process (all its threads): the
    # latter barely moves when other work competes for the cores, the former does.
    return {"fwd": _quantiles(f) + (_quantiles(cf)[0],), "bwd": _quantiles(b) + (_quantiles(cb)[0],),
            "fwd+bwd": _quantiles(fb) + (_quantiles(cfb)[0],)}


def _time_cuda(runner: Runner, step_ms: float, inplace: bool, repeats: int) -> dict[str, tuple]:
    """triton.testing.do_bench quantiles (0.5, 0.2, 0.8); CUDA events around the timed part
    where an untimed setup must run before each repetition (backward alone, in-place runs)."""
    torch = _torch()
    n = max(repeats, min(100, int(2000 / max(step_ms, 1e-3))))

    def events(setup, body):
        times = []
        for _ in range(3):
            arg = setup()
            body(arg)
        for _ in range(n):
            arg = setup()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            body(arg)
            e.record()
            times.append((s, e))
        torch.cuda.synchronize()
        return _quantiles([s.elapsed_time(e) for s, e in times])

    def do_bench(fn):
        from triton.testing import do_bench as tdb
        rep = max(100.0, 20 * step_ms)
        q = tdb(fn, warmup=max(25.0, 3 * step_ms), rep=rep, quantiles=[0.5, 0.2, 0.8],
                grad_to_none=runner.leaves or None)
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


# ---------------------------------------------------------------- agreement

# Relative tolerance of float32 results, per compared output. For the DPO losses (ops loss and
# linear) the loss and its gradients depend on the difference of two long sums of log-probs, so
# their float32 error grows with beta * |logps|: the tolerance is multiplied by that condition
# number. Low precision: at most twice the PyTorch reference's own error against float32
# (flash-attention's rule), and never tighter than the float32 tolerance.
RTOL_F32 = 2e-5
FLOOR = 0.01  # entries are compared relative to |truth| + FLOOR * rms(truth)


def _tensor_stats(t) -> dict:
    torch = _torch()
    x = t.detach().reshape(-1)
    ss, n = 0.0, x.numel()
    for i in range(0, n, 1 << 22):
        ss += float(x[i:i + (1 << 22)].float().square().sum(dtype=torch.float64))
    return {"rms": math.sqrt(ss / max(n, 1)), "numel": n}


def _rel_err(x, t, rms: float) -> float:
    """max_i |x_i - t_i| / (|t_i| + FLOOR * rms(t)), chunked; any NaN or inf gives inf."""
    if tuple(x.shape) != tuple(t.shape):
        return math.inf
    xf, tf = x.detach().reshape(-1), t.detach().reshape(-1)
    floor = FLOOR * rms + 1e-30
    worst = 0.0
    for i in range(0, xf.numel(), 1 << 22):
        a = xf[i:i + (1 << 22)].float()
        b = tf[i:i + (1 << 22)].to(a.device).float()
        d = float((a - b).abs_().div_(b.abs().add_(floor)).max())
        if not math.isfinite(d):
            return math.inf
        worst = max(worst, d)
    return worst


def _condition(shape: Shape, stats: dict) -> float:
    if shape.op == "logits":
        return 1.0
    return 1.0 + 2.0 * BETA * stats.get("max_abs_logps", 0.0)


def compare(shape: Shape, outputs: dict, ref: dict) -> tuple[bool, float, float, str]:
    """(agrees, worst error / tolerance ratio's numerator, tolerance of that output, detail)."""
    truth, stats = ref["truth"], ref["stats"]
    cond = _condition(shape, ref["meta"])
    if ref["ref_err"] is None and shape.dtype not in ("float32", "float64"):
        # Without the low-precision reference's own error there is no fair bar to hold a
        # low-precision implementation to.
        return None, None, None, "the reference did not run"
    required = {"logits": ("logps", "grad_logits"), "loss": ("loss", "grad_logits"),
                "linear": ("loss", "grad_hidden", "grad_weight")}[shape.op]
    missing = [k for k in required if outputs.get(k) is None]
    if missing:
        return False, math.inf, 0.0, f"missing outputs {missing}"
    worst_ratio, worst = -1.0, (math.inf, 0.0, "")
    for k in [k for k in truth if k in outputs and outputs[k] is not None]:
        tol = max(RTOL_F32 * (cond if k != "logps" else 1.0), 2.0 * (ref["ref_err"] or {}).get(k, 0.0))
        e = _rel_err(outputs[k], truth[k], stats[k]["rms"])
        ratio = e / tol if tol > 0 else math.inf
        if ratio > worst_ratio:
            worst_ratio, worst = ratio, (e, tol, k)
    e, tol, k = worst
    return worst_ratio <= 1.0, e, tol, k


# ---------------------------------------------------------------- one case


def _step(runner: Runner, meter) -> tuple[Any, int, int]:
    meter.start()
    out = runner.forward()
    peak_f = meter.window()
    runner.backward(out)
    peak_b = meter.window()
    return out, peak_f, peak_b


def _truth_by_sequence(shape: Shape, inp: dict) -> dict:
    """The reference's math in float32, one sequence at a time (bounded memory): the value and
    gradients every implementation is checked against when the inputs are bf16/fp16, and when
    the reference itself does not fit in memory. Two passes: the log-probs, then (once the
    loss's gradient per sequence is known) each sequence's backward."""
    from .kernels.reference import naive_sequence_logprobs
    torch = _torch()
    S, lin = shape.batch, shape.op == "linear"
    labels = inp["labels"]
    w32 = inp["weight"].detach().float().requires_grad_(True) if lin else None
    src = inp["hidden"] if lin else inp["logits"]

    def logps_of(s: int, leaf):
        z = leaf @ w32.t() if lin else leaf
        return naive_sequence_logprobs(z, labels[s:s + 1], ignore_index=IGNORE_INDEX)[0]

    with torch.no_grad():
        lp = torch.stack([logps_of(s, src[s:s + 1].float()) for s in range(S)])
    if shape.op == "logits":
        g, value = inp["gout"].float(), {"logps": lp.cpu()}
    else:
        lpg = lp.clone().requires_grad_(True)
        loss = _dpo_from_logps(lpg, inp["ref_c"], inp["ref_r"])
        (g,) = torch.autograd.grad(loss, lpg)
        value = {"loss": loss.detach().cpu(), "logps": lp.cpu()}
    grad = torch.empty(src.shape, dtype=torch.float32, device="cpu")
    for s in range(S):
        leaf = src[s:s + 1].detach().float().requires_grad_(True)
        (logps_of(s, leaf) * g[s]).backward()
        grad[s:s + 1].copy_(leaf.grad)
        del leaf
    if lin:
        return {**value, "grad_hidden": grad, "grad_weight": w32.grad.cpu()}
    return {**value, "grad_logits": grad}


def _reference_outputs(shape: Shape, runner: Runner | None, out, inp: dict) -> dict:
    """What the candidates are checked against: the truth (float32 outputs of the reference's
    math), their scale, and the reference's own error against the truth ("ref_err"; zero in
    float32, where the truth is the reference's output; None when the reference did not run)."""
    outs = None
    if runner is not None:
        outs = {k: v.detach().cpu() for k, v in runner.outputs(out).items() if v is not None}
    if outs is not None and shape.dtype in ("float32", "float64"):
        truth, ref_err = outs, {}
    else:
        if runner is not None:
            runner.reset()  # free the reference's gradients first
        gc.collect()
        truth = _truth_by_sequence(shape, inp)
        ref_err = None if outs is None else {
            k: _rel_err(outs[k], truth[k], _tensor_stats(truth[k])["rms"]) for k in truth if k in outs}
    meta = {"max_abs_logps": float(truth["logps"].abs().max()) if "logps" in truth else 0.0,
            "source": "reference" if outs is not None else "float32 per-sequence (the reference did not run)"}
    return {"truth": truth, "ref_err": ref_err, "meta": meta, "stats": {k: _tensor_stats(v) for k, v in truth.items()}}


def measure(task: dict, ref: dict | None, on_reference: Callable[[dict], None] | None = None) -> list[dict]:
    """Run one implementation on one shape; return one row per pass (see module docstring).

    task: shape (dict of Shape fields), impl, device, repeats, plugins. ref: what the reference
    produced on this shape (see _reference_outputs), or None when it could not run (then
    nothing can be checked, and nothing checked is timed). The reference itself hands its
    outputs to on_reference before it is timed.
    """
    torch = _torch()
    for p in task.get("plugins", []):
        load_plugin(p)
    shape = Shape(**task["shape"])
    device = task["device"]
    if task["impl"] == TRUTH:  # only the float32 truth, for when the reference did not run
        inp = make_inputs(shape, device)
        on_reference(_reference_outputs(shape, None, None, inp))
        return []
    impl = REGISTRY[task["impl"]]
    cuda = device == "cuda"
    rows = []

    def emit(status, agrees=None, err=None, tol=None, times=None, peaks=None):
        for pas in PASSES:
            t = (times or {}).get(pas)
            pk = None if peaks is None else {"fwd": peaks[0], "bwd": peaks[1], "fwd+bwd": max(peaks)}[pas]
            rows.append(dict(implementation=impl.name, pass_=pas, status=status, agrees=agrees, max_err=err,
                             tolerance=tol, time=t, peak=pk,
                             repeats=task["repeats"] if t is not None else None))
        return rows

    try:
        # Warm-up on a tiny shape: imports, lazy initialisation, thread pools.
        tiny = _tiny(shape)
        tr = impl.build(tiny, make_inputs(tiny, device, pristine=impl.inplace))
        tr.backward(tr.forward())
        del tr
        inp = make_inputs(shape, device, pristine=impl.inplace)
        runner = impl.build(shape, inp)
        if impl.full_warmup or cuda:
            runner.backward(runner.forward())
            runner.reset()
        meter = CudaMeter(torch.device("cuda")) if cuda else CpuMeter()
        t0 = time.perf_counter()
        out, peak_f, peak_b = _step(runner, meter)
        if cuda:
            torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) * 1e3
        peaks = (peak_f, peak_b)

        agrees, err, tol, status = None, None, None, "ok"
        if impl.kind == "reference":
            produced = _reference_outputs(shape, runner, out, inp)
            if on_reference is not None:
                on_reference(produced)
            del produced
            agrees, err, tol = True, 0.0, None
        elif impl.kind == "candidate":
            if ref is None:
                status = "unchecked: neither the reference nor the float32 truth could run"
            else:
                agrees, err, tol, which = compare(shape, runner.outputs(out), ref)
                if agrees is None:
                    status = f"unchecked: {which}"
                elif not agrees:
                    status = f"disagrees ({which})"
        else:
            status = "baseline (no loss: not checked)"
        del out
        runner.reset()
        gc.collect()
        times = None
        if agrees or impl.kind == "baseline":
            if cuda:
                times = _time_cuda(runner, step_ms, impl.inplace, task["repeats"])
            else:
                times = _time_cpu(runner, task["repeats"])
        return emit(status, agrees, err, tol, times, peaks)
    except Exception as e:  # recorded, never fatal: the other implementations still run
        oom = "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
        msg = "out of memory" if oom else f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if os.environ.get("DPO_FAST_BENCH_TRACEBACK"):
            traceback.print_exc()
        rows.clear()
        return emit(msg)


# ---------------------------------------------------------------- process isolation (CPU)


def _worker_entry(task: dict, ref_path: str | None, result_path: str) -> None:
    """Body of a forked worker: measure one case, save the reference's outputs if it is the
    reference, and write the rows as JSON."""
    torch = _torch()
    for p in task.get("plugins", []):
        load_plugin(p)
    ref = None
    producer = task["impl"] == TRUTH or REGISTRY[task["impl"]].kind == "reference"
    if ref_path is not None and os.path.exists(ref_path) and not producer:
        ref = torch.load(ref_path, mmap=True, weights_only=True)
    rows = measure(task, ref, on_reference=lambda produced: torch.save(produced, ref_path))
    with open(result_path, "w") as f:
        json.dump(rows, f)


def _serve() -> None:
    """The case server: a fresh interpreter that imports torch and dpo_fast, never runs an op,
    and forks one child per case (read as a JSON line on stdin; the exit status is answered as
    a JSON line on stdout). A fork of a process that has computed nothing starts with no
    allocator state and no thread pools, and costs milliseconds instead of a torch import."""
    import signal

    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (custom ops import dynamo, sympy, ... on their first call)
    import torch._functorch.aot_autograd  # noqa: F401
    import dpo_fast  # noqa: F401
    import dpo_fast.ops  # noqa: F401
    import dpo_fast.kernels.reference  # noqa: F401
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
        if pid == 0:  # the case
            code = 1
            try:
                _worker_entry(msg["task"], msg["ref_path"], msg["result"])
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + msg["timeout"]
        status = None
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(st)
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = "timeout"
            else:
                time.sleep(0.02)
        answer.write(json.dumps({"status": status}) + "\n")
    answer.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (frozen objects; extension modules' leak reports)


class _Isolator:
    """Runs each case in a fresh process, forked from the case server (_serve)."""

    def __init__(self, timeout: float):
        import subprocess
        import dpo_fast
        self.timeout = timeout
        self.tmp = tempfile.TemporaryDirectory(prefix="dpo_fast_bench_")
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)  # never benchmark the interpreter
        root = os.path.dirname(os.path.dirname(os.path.abspath(dpo_fast.__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-c", "from dpo_fast.bench import _serve; _serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)

    def run(self, task: dict, ref_path: str | None):
        result = os.path.join(self.tmp.name, "rows.json")
        if os.path.exists(result):
            os.remove(result)
        msg = {"task": task, "ref_path": ref_path, "result": result, "timeout": self.timeout}
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
            return None, f"error: timed out after {self.timeout:.0f} s"
        if status != 0 or not os.path.exists(result):
            why = "killed (out of memory?)" if status == -9 else f"exit code {status}"
            return None, f"error: worker {why}"
        with open(result) as f:
            return json.load(f), None

    def ref_path(self, shape: Shape) -> str:
        return os.path.join(self.tmp.name, "reference.pt")

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        self.tmp.cleanup()


# ================================================================ environment and versions


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
    torch = _torch()
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"
    import dpo_fast
    return {
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _installed("triton", "triton") or "not installed",
        "dpo_fast": dpo_fast.__version__,
        "liger_kernel": _installed("liger-kernel", "liger_kernel") or "not installed",
        "cut_cross_entropy": _installed("cut-cross-entropy", "cut_cross_entropy") or "not installed",
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


# ================================================================ the driver


def _applicable(device: str, ops, only=None):
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
                notes.append({"implementation": impl.name, "op": op, "status": why})
    return run, notes


def run_benchmark(shapes: list[Shape], device: str, *, repeats: int, only=None, plugins=(),
                  in_process: bool = False, timeout: float = 1800, log=print, peak_bw=None,
                  peak_tflops=None) -> list[dict]:
    """Measure every runnable implementation on every shape; rows as in CSV_COLUMNS."""
    torch = _torch()
    for p in plugins:
        load_plugin(p)
    ops = sorted({s.op for s in shapes}, key=OPS.index)
    runnable, notes = _applicable(device, ops, only)
    env = environment(device)
    bw_peak, fl_peak = device_peaks(env["device_name"], peak_bw, peak_tflops) if device == "cuda" else (None, {})
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    rows: list[dict] = []
    for n in notes:
        rows.append({**{c: None for c in CSV_COLUMNS}, **env, **n, "device": device, "timestamp": stamp})

    iso = None if (in_process or device == "cuda") else _Isolator(timeout)
    total = sum(len(runnable[s.op]) for s in shapes)
    done = 0
    if iso is None:
        # Cases run here: keep the objects that exist now (modules, caller's state) out of the
        # collections the cases make before each memory baseline (a full one can take a second).
        gc.collect()
        gc.freeze()
    try:
        for shape in shapes:
            impls = sorted(runnable[shape.op], key=lambda i: {"reference": 0, "candidate": 1, "baseline": 2}[i.kind])
            ref_time = {}
            kept: dict = {}  # in-process: the reference's outputs
            ref_path = iso.ref_path(shape) if iso else None
            if ref_path and os.path.exists(ref_path):
                os.remove(ref_path)
            for impl in impls:
                if impl.kind != "reference" and not (kept or (ref_path and os.path.exists(ref_path))) \
                        and not kept.get("tried"):
                    kept["tried"] = True  # the reference did not run: compute the float32 truth alone
                    t_task = {"shape": dataclasses.asdict(shape), "impl": TRUTH, "device": device,
                              "repeats": 0, "plugins": list(plugins)}
                    try:
                        if iso is not None:
                            iso.run(t_task, ref_path)
                        else:
                            measure(t_task, None, on_reference=lambda produced: kept.update(ref=produced))
                    except Exception as e:  # noqa: BLE001  (then the candidates stay unchecked)
                        log(f"float32 truth for {shape.label()} failed: {e}")
                task = {"shape": dataclasses.asdict(shape), "impl": impl.name, "device": device,
                        "repeats": repeats, "plugins": list(plugins)}
                t0 = time.perf_counter()
                if iso is not None:
                    got, err = iso.run(task, ref_path)
                    if got is None:
                        got = [dict(implementation=impl.name, pass_=p, status=err, agrees=None, max_err=None,
                                    tolerance=None, time=None, peak=None, repeats=None) for p in PASSES]
                else:
                    got = measure(task, kept.get("ref"), on_reference=lambda produced: kept.update(ref=produced))
                done += 1
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                for r in got:
                    row = _row(shape, device, env, stamp, r, load, bw_peak, fl_peak)
                    if impl.kind == "reference" and row["time_ms"] is not None:
                        ref_time[r["pass_"]] = row["time_ms"]
                    if ref_time.get(r["pass_"]) and row["time_ms"]:
                        row["speedup_vs_ref"] = round(ref_time[r["pass_"]] / row["time_ms"], 3)
                    rows.append(row)
                fb = next(r for r in got if r["pass_"] == "fwd+bwd")
                t = f"{fb['time'][0]:.1f} ms" if fb.get("time") else "not timed"
                pk = f"{fb['peak'] / MB:.0f} MB" if fb.get("peak") is not None else "-"
                log(f"[{done}/{total}] {shape.label():<44} {impl.name:<22} fwd+bwd {t:>12}, peak {pk:>8}, "
                    f"{fb['status']}  ({time.perf_counter() - t0:.1f} s)")
            kept.clear()
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        if iso is not None:
            iso.close()
        else:
            gc.unfreeze()
    return rows


def _row(shape, device, env, stamp, r, load, bw_peak, fl_peak) -> dict:
    pas = r["pass_"]
    t = r.get("time")
    gb = grad_bytes(shape)
    row = {c: None for c in CSV_COLUMNS}
    row.update(env)
    row.update(implementation=r["implementation"], op=shape.op, device=device, dtype=shape.dtype,
               tokens=shape.tokens, hidden=shape.hidden or None, vocab=shape.vocab, batch=shape.batch,
               seqlen=shape.seqlen, **{"pass": pas}, repeats=r.get("repeats"), agrees=r.get("agrees"),
               status=r["status"], sweep=shape.sweep, timestamp=stamp, grad_mb=round(gb / MB, 3),
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


# ================================================================ targets


def evaluate_targets(rows: list[dict], device: str) -> list[dict]:
    """Each stated target: the measured numbers and whether it is met (None: cannot tell)."""

    def pick(op, dtype, tokens, vocab, impl, hidden=None, pas="fwd+bwd"):
        for r in rows:
            if (r["op"], r["dtype"], r["tokens"], r["vocab"], r["implementation"], r["pass"]) == \
                    (op, dtype, tokens, vocab, impl, pas) and (hidden is None or r["hidden"] == hidden):
                return r
        return None

    def val(r, k):
        return None if r is None else r.get(k)

    out = []

    def add(name, measured, ok):
        out.append({"target": name, "measured": measured, "met": ok})

    def fmt_t(r):
        return "not run" if r is None else (f"{r['time_ms'] / 1e3:.2f} s" if r.get("time_ms") else r["status"])

    def fmt_m(r):
        return "not run" if r is None or r.get("peak_mem_mb") is None else f"{r['peak_mem_mb'] / 1e3:.2f} GB"

    if device == "cpu":
        S, T, V = 8, 512, 128256
        ref, fast, ip = (pick("logits", "float32", S * T, V, n)
                         for n in ("pytorch", "dpo_fast:cpu", "dpo_fast:cpu+inplace"))
        g = S * T * V * 4
        add("logits fp32 8x512 V=128256 fwd+bwd: PyTorch reference (stated ~4.4 s, ~6.0 GB)",
            f"{fmt_t(ref)}, {fmt_m(ref)} extra", None)
        tr = (val(fast, "time_ms") / val(ref, "time_ms")) if val(fast, "time_ms") and val(ref, "time_ms") else None
        add("logits: dpo_fast cpu time <= 0.4x reference",
            f"{fmt_t(fast)} = {tr:.2f}x" if tr else fmt_t(fast), None if tr is None else tr <= 0.4)
        m = val(fast, "peak_mem_mb")
        add(f"logits: dpo_fast cpu peak extra <= 1.1x the gradient ({g / 1e9:.2f} GB)",
            f"{fmt_m(fast)} = {m * MB / g:.2f}x" if m is not None else fmt_m(fast),
            None if m is None or not fast.get("agrees") else m * MB <= 1.1 * g)
        m = val(ip, "peak_mem_mb")
        add("logits: dpo_fast cpu inplace_backward peak extra near zero (<= 5% of the gradient)",
            f"{fmt_m(ip)} = {m * MB / g:.3f}x" if m is not None else fmt_m(ip),
            None if m is None or not ip.get("agrees") else m * MB <= 0.05 * g)
        S, T, V, H = 4, 512, 128256, 1024
        ref, fast = (pick("linear", "float32", S * T, V, n, H) for n in ("pytorch", "dpo_fast:cpu"))
        g = (S * T * H + V * H) * 4
        add("linear fp32 4x512 H=1024 V=128256 fwd+bwd: PyTorch reference (stated ~8.0 s, 2.55 GB)",
            f"{fmt_t(ref)}, {fmt_m(ref)} extra", None)
        m = val(fast, "peak_mem_mb")
        add(f"linear: dpo_fast peak extra <= 1.25x the gradients dH + dW ({g / 1e9:.2f} GB)",
            f"{fmt_m(fast)} = {m * MB / g:.2f}x" if m is not None else fmt_m(fast),
            None if m is None or not fast.get("agrees") else m * MB <= 1.25 * g)
        tr = (val(fast, "time_ms") / val(ref, "time_ms")) if val(fast, "time_ms") and val(ref, "time_ms") else None
        add("linear: dpo_fast time <= 1.25x reference",
            f"{fmt_t(fast)} = {tr:.2f}x" if tr else fmt_t(fast), None if tr is None else tr <= 1.25)
        gm = pick("linear", "float32", S * T, V, "gemm4", H)
        if gm is not None and gm.get("time_ms"):
            add("linear: 4-GEMM floor (8NHV FLOPs), for context", fmt_t(gm), None)
    else:
        for dt in ("bfloat16", "float32"):
            S, T, V = 8, 2048, 128256
            ref = pick("logits", dt, S * T, V, "pytorch")
            for be in ("triton", "cuda"):
                r = pick("logits", dt, S * T, V, f"dpo_fast:{be}")
                if r is None:
                    continue
                bw = r.get("pct_peak_bw")
                add(f"logits {dt} 8x2048 V=128256 fwd+bwd, dpo_fast {be}: >= 80% of HBM bandwidth (3 passes)",
                    f"{bw}% ({r.get('gbps')} GB/s)" if bw is not None else r["status"],
                    None if bw is None else bw >= 80)
                sp = r.get("speedup_vs_ref")
                add(f"logits {dt} 8x2048 V=128256 fwd+bwd, dpo_fast {be}: >= 3x the reference",
                    f"{sp}x ({fmt_t(r)} vs {fmt_t(ref)})" if sp else r["status"], None if sp is None else sp >= 3)
        S, T, V, H = 8, 2048, 128256, 4096
        fast = pick("linear", "bfloat16", S * T, V, "dpo_fast:triton", H)
        gm = pick("linear", "bfloat16", S * T, V, "gemm4", H)
        g = (S * T * H + V * H) * 2
        m = val(fast, "peak_mem_mb")
        add("linear bf16 16384 tokens H=4096 V=128256: extra memory <= 64 MB beyond dH and dW",
            f"{(m * MB - g) / MB:.0f} MB beyond {g / MB:.0f} MB" if m is not None else fmt_m(fast),
            None if m is None or not fast.get("agrees") else m * MB - g <= 64 * 2**20)
        tr = (val(fast, "time_ms") / val(gm, "time_ms")) if val(fast, "time_ms") and val(gm, "time_ms") else None
        add("linear bf16: time <= 1.3x four cuBLAS GEMMs (8NHV FLOPs)",
            f"{fmt_t(fast)} vs {fmt_t(gm)} = {tr:.2f}x" if tr else fmt_t(fast), None if tr is None else tr <= 1.3)
    return out


# ================================================================ output: CSV, markdown, plots


def write_csv(rows: list[dict], path: str) -> None:
    import csv
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})


def read_csv(path: str) -> list[dict]:
    import csv
    num = {"tokens", "hidden", "vocab", "batch", "seqlen", "repeats", "threads"}
    flt = {"time_ms", "time_p20_ms", "time_p80_ms", "cpu_time_ms", "peak_mem_mb", "grad_mb", "mem_vs_grad",
           "speedup_vs_ref",
           "tflops", "gbps", "pct_peak_flops", "pct_peak_bw", "loadavg", "tolerance"}
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            d = {}
            for k, v in r.items():
                if v == "":
                    d[k] = None
                elif k in num:
                    d[k] = int(float(v))
                elif k in flt:
                    d[k] = float(v)
                elif k == "agrees":
                    d[k] = v == "True"
                else:
                    d[k] = v
            out.append(d)
    return out


def _fmt_ms(v):
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _fmt_mb(v):
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def _cell(r) -> str:
    if r is None:
        return "-"
    if r.get("agrees") is False:
        return "✗ disagrees"
    if r.get("time_ms") is None:
        return (r.get("status") or "-").split(":")[0]
    sp = (f" ({r['speedup_vs_ref']:.2f}x)" if r.get("speedup_vs_ref") and r["implementation"] != "pytorch"
          and r.get("agrees") else "")
    return f"{_fmt_ms(r['time_ms'])} ms{sp} / {_fmt_mb(r.get('peak_mem_mb'))} MB"


def markdown(rows: list[dict], title: str, command: str, targets: list[dict] | None = None,
             plots_dir: str | None = None) -> str:
    measured = [r for r in rows if r.get("pass")]
    notes = [r for r in rows if not r.get("pass")]
    any_r = (measured or rows or [{}])[0]
    dates = sorted({(r.get("timestamp") or "")[:10] for r in measured if r.get("timestamp")})
    loads = [r["loadavg"] for r in measured if r.get("loadavg") is not None]
    L = [f"# {title}", ""]
    L.append(f"Measured on **{any_r.get('device_name')}** ({any_r.get('device')}, {any_r.get('threads')} threads) "
             f"on {', '.join(dates) or '?'}; torch {any_r.get('torch')}, triton {any_r.get('triton')}, "
             f"dpo_fast {any_r.get('dpo_fast')}, Liger-Kernel: {any_r.get('liger_kernel')}, "
             f"Cut Cross-Entropy: {any_r.get('cut_cross_entropy')}, Python {any_r.get('python')}.")
    if loads:
        L.append(f"1-minute load average during the run: {min(loads):.1f} to {max(loads):.1f} on "
                 f"{os.cpu_count()} cores: above the core count, other work competed for the CPU and "
                 f"wall-clock times are inflated; the CPU time column (all threads of the process) "
                 f"is less sensitive to that.")
    L += ["", f"Command: `{command}`", ""]
    L.append("Cells: median time of forward + backward (speed-up over the PyTorch reference) / peak memory "
             "beyond the inputs, in MB (10^6 bytes); the gradient itself is in the `grad MB` column. "
             "✗: outputs disagree with the reference (not timed). All passes, quantiles and errors: results.csv.")
    L.append("")
    if targets:
        L += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        for t in targets:
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            L.append(f"| {t['target']} | {t['measured']} | {met} |")
        L.append("")
    for op in OPS:
        ops_rows = [r for r in measured if r["op"] == op]
        if not ops_rows:
            continue
        impls = []
        for r in ops_rows:
            if r["implementation"] not in impls:
                impls.append(r["implementation"])
        L += [f"## {op}", ""]
        hdr = ["dtype", "tokens"] + (["H"] if op == "linear" else []) + ["V", "grad MB"] + impls
        L += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        shapes = []
        for r in ops_rows:
            k = (r["dtype"], r["tokens"], r.get("hidden"), r["vocab"], r["batch"], r["seqlen"])
            if k not in shapes:
                shapes.append(k)
        for k in shapes:
            dt, tok, h, v, b, t = k
            sel = {r["implementation"]: r for r in ops_rows
                   if (r["dtype"], r["tokens"], r.get("hidden"), r["vocab"], r["batch"], r["seqlen"]) == k
                   and r["pass"] == "fwd+bwd"}
            g = next(iter(sel.values()))["grad_mb"] if sel else None
            cells = [dt, f"{tok} ({b}x{t})"] + ([str(h)] if op == "linear" else []) + [str(v), _fmt_mb(g)]
            L.append("| " + " | ".join(cells + [_cell(sel.get(i)) for i in impls]) + " |")
        # Forward and backward separately, at the points where they were measured.
        L += ["", f"<details><summary>{op}: forward / backward split (median ms; peak MB)</summary>", "",
              "| dtype | tokens | " + ("H | " if op == "linear" else "") + "V | implementation | fwd ms | bwd ms | "
              "fwd+bwd ms (p20-p80) | CPU time ms | peak fwd MB | peak bwd MB | max err / tol |",
              "|---|---|" + ("---|" if op == "linear" else "") + "---|---|---|---|---|---|---|---|---|"]
        for k in shapes:
            dt, tok, h, v, b, t = k
            for i in impls:
                sel = {r["pass"]: r for r in ops_rows if r["implementation"] == i and
                       (r["dtype"], r["tokens"], r.get("hidden"), r["vocab"], r["batch"], r["seqlen"]) == k}
                if not sel:
                    continue
                fb = sel.get("fwd+bwd", {})
                q = (f"{_fmt_ms(fb.get('time_ms'))} ({_fmt_ms(fb.get('time_p20_ms'))}-{_fmt_ms(fb.get('time_p80_ms'))})"
                     if fb.get("time_ms") is not None else (fb.get("status") or "-"))
                et = (f"{fb.get('max_err')} / {fb.get('tolerance')}" if fb.get("tolerance") is not None else "-")
                L.append(f"| {dt} | {tok} | " + (f"{h} | " if op == "linear" else "") +
                         f"{v} | {i} | {_fmt_ms(sel.get('fwd', {}).get('time_ms'))} | "
                         f"{_fmt_ms(sel.get('bwd', {}).get('time_ms'))} | {q} | {_fmt_ms(fb.get('cpu_time_ms'))} | "
                         f"{_fmt_mb(sel.get('fwd', {}).get('peak_mem_mb'))} | "
                         f"{_fmt_mb(sel.get('bwd', {}).get('peak_mem_mb'))} | {et} |")
        L += ["", "</details>", ""]
    pngs = [op for op in OPS if plots_dir and os.path.exists(os.path.join(plots_dir, f"{op}.png"))]
    if pngs:
        L += ["## Plots", ""] + [f"![{op}]({op}.png)" for op in pngs] + [""]
    if notes:
        L += ["## Not measured", "", "| implementation | op | why |", "|---|---|---|"]
        for r in notes:
            L.append(f"| {r['implementation']} | {r['op']} | {r['status']} |")
        L.append("")
    labels = {n: i.label for n, i in REGISTRY.items()}
    used = []
    for r in rows:
        if r["implementation"] not in used:
            used.append(r["implementation"])
    L += ["## Implementations", ""]
    L += [f"- `{n}`: {labels.get(n, n)}" for n in used]
    L.append("")
    return "\n".join(L)


def _series(sel: list[dict], x: str) -> list[dict]:
    """The points of the largest one-factor sweep along x: rows that agree on every other shape
    factor (dtype, and tokens / vocab / hidden other than x), most distinct x values first."""
    others = [k for k in ("dtype", "tokens", "vocab", "hidden") if k != x]
    groups: dict[tuple, list] = {}
    for r in sel:
        groups.setdefault(tuple(r.get(k) for k in others), []).append(r)
    best = max(groups.values(), key=lambda g: (len({r[x] for r in g}), len(g)), default=[])
    return best if len({r[x] for r in best}) >= 2 else []


def plot(rows: list[dict], out_dir: str) -> list[str]:
    """One PNG per op: time and memory (fwd+bwd) against vocab, tokens (and hidden size), one
    line per implementation; the dotted line is the size of the gradient itself."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    meas = [r for r in rows if r.get("pass") == "fwd+bwd"]
    for op in OPS:
        sel = [r for r in meas if r["op"] == op]
        axes_def = [(x, pts) for x in ("vocab", "tokens", "hidden") for pts in [_series(sel, x)] if pts]
        if not axes_def:
            continue
        fig, axs = plt.subplots(2, len(axes_def), figsize=(max(6.0, 4.2 * len(axes_def)), 6.4), squeeze=False)
        impls = []
        for r in sel:
            if r["implementation"] not in impls:
                impls.append(r["implementation"])
        for j, (x, pts) in enumerate(axes_def):
            for i in impls:
                ir = sorted([r for r in pts if r["implementation"] == i], key=lambda r: r[x])
                tr = [(r[x], r["time_ms"]) for r in ir if r.get("time_ms") is not None]
                mr = [(r[x], r["peak_mem_mb"]) for r in ir if r.get("peak_mem_mb") is not None and r.get("agrees")]
                style = "--" if i == "gemm4" else "-"
                if tr:
                    axs[0][j].plot(*zip(*tr), style, marker="o", ms=3, label=i)
                if mr:
                    axs[1][j].plot(*zip(*mr), style, marker="o", ms=3, label=i)
            gr = sorted({(r[x], r["grad_mb"]) for r in pts if r.get("grad_mb") is not None})
            if gr:
                axs[1][j].plot(*zip(*gr), ":", color="black", label="gradient itself")
            xs = sorted({r[x] for r in pts})
            for k, ylabel in ((0, "time fwd+bwd (ms)"), (1, "peak extra memory (MB)")):
                ax = axs[k][j]
                ax.set_xlabel(x if x != "hidden" else "hidden size")
                ax.set_ylabel(ylabel)
                if x != "vocab":
                    ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [f"{v / 1000:.0f}k" if x == "vocab" else str(v) for v in xs], fontsize=7)
                ax.minorticks_off()
                if k == 0:
                    ax.set_yscale("log")
                ax.grid(alpha=0.3)
            base = pts[0]
            fixed = {"vocab": f"tokens={base['tokens']}", "tokens": f"V={base['vocab']}",
                     "hidden": f"tokens={base['tokens']}, V={base['vocab']}"}[x]
            h = f", H={base['hidden']}" if op == "linear" and x != "hidden" else ""
            axs[0][j].set_title(f"{op}: vs {x} ({fixed}{h}, {base['dtype']})", fontsize=9)
        for k in (0, 1):
            if axs[k][0].get_legend_handles_labels()[0]:
                axs[k][0].legend(fontsize=7)
        dev = sel[0].get("device_name", "")
        fig.suptitle(f"dpo_fast bench, {op} op, {dev}, {(sel[0].get('timestamp') or '')[:10]}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=72)
        plt.close(fig)
        files.append(path)
    return files


def write_outputs(rows, out_dir: str, title: str, command: str, targets=None, plots=True) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    write_csv(rows, csv_path)
    rows = read_csv(csv_path)  # the markdown and plots are made from what the CSV holds
    files = [csv_path]
    if plots:
        files += plot(rows, out_dir)
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as f:
        f.write(markdown(rows, title, command, targets, out_dir if plots else None))
    return files + [md]


def update_readme(readme: str, results_md: str, marker: str) -> None:
    """Replace the text between <!-- {marker}:start --> and <!-- {marker}:end --> in `readme`
    with the body of results.md (its title dropped)."""
    with open(results_md) as f:
        body = f.read().split("\n", 1)[1].strip()
    body = body.replace("\n## ", "\n### ")  # under the README's own section heading
    rel = os.path.relpath(os.path.dirname(os.path.abspath(results_md)), os.path.dirname(os.path.abspath(readme)))
    body = re.sub(r"\]\(([\w.+-]+\.png)\)", lambda m: f"]({rel}/{m.group(1)})".replace(os.sep, "/"), body)
    with open(readme) as f:
        text = f.read()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} section")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{start}\n{body}\n{end}{tail}")


# ================================================================ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="device to benchmark (default: cuda when available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="a small sweep (about 5 minutes on 2 CPU cores)")
    parser.add_argument("--ops", default="logits,linear,loss", help="comma-separated subset of logits,linear,loss")
    parser.add_argument("--output-dir", default=None, help="where results.csv/.md and plots go "
                        "(default: bench_results/<device>, or bench_results/<device>/targets)")
    parser.add_argument("--targets", action="store_true",
                        help="run exactly the cases the project's targets are stated on, and judge them")
    parser.add_argument("--dtypes", default=None, help="comma-separated dtypes (first one is swept)")
    parser.add_argument("--impls", default=None, help="only these implementations (the reference always runs)")
    parser.add_argument("--vocabs", default=None, help="override the vocab sweep (comma-separated)")
    parser.add_argument("--shapes", default=None, metavar="OP:DTYPE:SxT:V[:H],...",
                        help="measure exactly these shapes instead of a sweep, e.g. logits:float32:8x512:128256")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions on CPU (default 3 quick, 5 full)")
    parser.add_argument("--impl-plugin", action="append", default=[], metavar="FILE",
                        help="a Python file (or module) that registers more implementations")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU: run cases in this process (debugging; memory peaks are less reliable)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case before it is abandoned")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--peak-bw", type=float, default=None, help="device memory bandwidth in GB/s (CUDA)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s for the dtype (CUDA)")
    parser.add_argument("--readme", default=None,
                        help="also paste results.md into this file, between its "
                             "<!-- bench:<device>[:targets]:start/end --> markers")
    parser.add_argument("--list", action="store_true",
                        help="list the implementations and whether they can run, then exit")


def _command_line(args, device: str) -> str:
    """The options that differ from the defaults, for the record in results.md."""
    parts = ["dpo-fast bench", f"--device {device}"]
    skip = {"device", "output_dir", "readme", "list", "command"}
    p = argparse.ArgumentParser()
    add_arguments(p)
    dflt = vars(p.parse_args([]))
    for k, v in vars(args).items():
        if k in skip or k not in dflt or v == dflt[k]:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            parts.append(flag)
        elif isinstance(v, list):
            parts += [f"{flag} {x}" for x in v]
        else:
            parts.append(f"{flag} {v}")
    return " ".join(parts)


def run_cli(args) -> int:
    torch = _torch()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("dpo-fast bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    for p in args.impl_plugin:
        load_plugin(p)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        print(f"dpo-fast bench: unknown op(s) {bad}; choose from {OPS}", file=sys.stderr)
        return 2
    if args.list:
        for impl in REGISTRY.values():
            ok, why = impl.available(device)
            print(f"{impl.name:<24} {','.join(impl.ops):<20} {'available' if ok else why}")
        return 0
    dtypes = [d.strip() for d in args.dtypes.split(",")] if args.dtypes else None
    if dtypes and any(d not in DTYPES for d in dtypes):
        print(f"dpo-fast bench: dtypes must be among {DTYPES}", file=sys.stderr)
        return 2
    if args.shapes:
        try:
            shapes = parse_shapes(args.shapes)
        except ValueError as e:
            print(f"dpo-fast bench: {e}", file=sys.stderr)
            return 2
    elif args.targets:
        shapes = [s for s in TARGET_SHAPES[device] if s.op in ops]
    else:
        shapes = plan(device, args.quick, ops, dtypes)
        if args.vocabs:  # drop the vocab-only points not asked for (shared base points stay)
            vs = [int(v) for v in args.vocabs.split(",")]
            shapes = [s for s in shapes if s.sweep != "vocab" or s.vocab in vs]
    repeats = args.repeats or (3 if args.quick else 5)
    only = set(i.strip() for i in args.impls.split(",")) if args.impls else None
    out_dir = args.output_dir or os.path.join("bench_results", device, *(["targets"] if args.targets else []))
    command = _command_line(args, device)
    t0 = time.perf_counter()
    rows = run_benchmark(shapes, device, repeats=repeats, only=only, plugins=args.impl_plugin,
                         in_process=args.in_process, timeout=args.timeout, peak_bw=args.peak_bw,
                         peak_tflops=args.peak_tflops,
                         log=lambda m: print(m, flush=True))
    elapsed = time.perf_counter() - t0
    targets = evaluate_targets(rows, device) if args.targets else None
    kind = "targets" if args.targets else ("quick sweep" if args.quick else "sweep")
    title = f"dpo_fast benchmark: {kind} ({device})"
    files = write_outputs(rows, out_dir, title, command, targets, plots=not args.no_plots and not args.targets)
    if args.readme:
        update_readme(args.readme, os.path.join(out_dir, "results.md"),
                      f"bench:{device}" + (":targets" if args.targets else ""))
    print(f"wrote {', '.join(files)} in {elapsed / 60:.1f} min")
    if targets:
        for t in targets:
            print(f"  [{ {True: 'met', False: 'NOT MET', None: 'info'}[t['met']] }] {t['target']}: {t['measured']}")
    return 0
