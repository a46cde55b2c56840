"""The benchmarked implementations: a registry, the PyTorch reference, every dpo_fast backend,
the peers (TRL's fused LM head, Liger-Kernel, Cut Cross-Entropy, PyTorch's F.linear_cross_entropy) and the GEMM timing floors.

A new implementation is one `register(Impl(...))` call (here, or in a plugin file passed with
--impl-plugin); a new dpo_fast variant is one `register(dpo_fast_impl(...))`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dpo_fast.backends import BACKENDS, available_backends
from dpo_fast.functional import sequence_logprobs
from dpo_fast.loss import loss as dpo_fast_loss
from dpo_fast.kernels.reference import naive_sequence_logprobs
from .cases import BETA, IGNORE_INDEX, OPS, Shape, element_size


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


def register(impl: Impl) -> Impl:
    """Add (or replace) an implementation; plugins (--impl-plugin) call this at import."""
    REGISTRY[impl.name] = impl
    return impl


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


def installed(dist: str, module: str) -> str | None:
    """The installed version of `dist` when `module` can be imported, else None."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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


def dpo_from_logps(lp, ref_c, ref_r):
    """The DPO sigmoid loss of (2P,) policy log-probs, as in the DPO paper and TRL."""
    P = lp.shape[0] // 2
    return -F.logsigmoid(BETA * ((lp[:P] - ref_c) - (lp[P:] - ref_r))).mean()


def _loss_runner(fwd, inp: dict) -> Runner:
    """A linear-op runner whose forward returns (loss, detached per-sequence log-probs)."""
    h, w = inp["hidden"], inp["weight"]
    return Runner(fwd, lambda out: out[0].backward(),
                  lambda out: {"loss": out[0].detach(), "logps": out[1], "grad_hidden": h.grad, "grad_weight": w.grad},
                  [h, w])


def _logits_view(inp):
    # Logits enter as a view of the leaf tensor, as they would leave an lm_head: autograd then
    # hands the gradient upstream without copying it. (On a bare leaf, AccumulateGrad clones a
    # gradient that aliases storage someone else still references.)
    x = inp["logits"]
    return x.view(x.shape)


def _restore_logits(inp):
    if "pristine" not in inp:
        return None

    def restore():
        with torch.no_grad():
            inp["logits"].copy_(inp["pristine"])
    return restore


# ================================================================ the reference


def _build_pytorch(shape: Shape, inp) -> Runner:
    labels = inp["labels"]
    if shape.op == "linear":
        h, w = inp["hidden"], inp["weight"]

        def fwd():
            logits = h @ w.t()  # as the model's lm_head computes them, in the input dtype
            lp = naive_sequence_logprobs(logits, labels, ignore_index=IGNORE_INDEX)
            return dpo_from_logps(lp, inp["ref_c"], inp["ref_r"]), lp.detach()

        return _loss_runner(fwd, inp)

    x = inp["logits"]
    if shape.op == "logits":
        def fwd_logps():
            return naive_sequence_logprobs(_logits_view(inp), labels, ignore_index=IGNORE_INDEX)

        return Runner(fwd_logps, lambda lp: lp.backward(inp["gout"]),
                      lambda lp: {"logps": lp.detach(), "grad_logits": x.grad}, [x])

    def fwd_loss():
        lp = naive_sequence_logprobs(_logits_view(inp), labels, ignore_index=IGNORE_INDEX)
        return dpo_from_logps(lp, inp["ref_c"], inp["ref_r"]), lp.detach()

    return Runner(fwd_loss, lambda out: out[0].backward(),
                  lambda out: {"loss": out[0].detach(), "logps": out[1], "grad_logits": x.grad}, [x])


# ================================================================ dpo_fast


def _dpo_fast_builder(backend: str, inplace: bool, options):
    def build(shape: Shape, inp) -> Runner:
        extra = options(shape) if callable(options) else dict(options)
        labels = inp["labels"]
        if shape.op == "linear":
            def fwd():
                out = dpo_fast_loss(labels=labels, ref_chosen_logps=inp["ref_c"], ref_rejected_logps=inp["ref_r"],
                                    hidden=inp["hidden"], weight=inp["weight"], beta=BETA, backend=backend, **extra)
                return out.loss, torch.cat([out.chosen_logps, out.rejected_logps])

            return _loss_runner(fwd, inp)
        x = inp["logits"]
        if shape.op == "logits":
            def fwd_logps():
                return sequence_logprobs(_logits_view(inp), labels, ignore_index=IGNORE_INDEX,
                                         inplace_backward=inplace, backend=backend, **extra)

            return Runner(fwd_logps, lambda lp: lp.backward(inp["gout"]),
                          lambda lp: {"logps": lp.detach(), "grad_logits": x.grad}, [x], _restore_logits(inp))

        def fwd_loss():
            out = dpo_fast_loss(_logits_view(inp), labels, inp["ref_c"], inp["ref_r"], beta=BETA,
                                inplace_backward=inplace, backend=backend, **extra)
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
        ok, reason = available_backends(device)[backend]
        return ok, ("" if ok else f"unavailable: {reason}")
    return available


def dpo_fast_impl(backend: str, *, inplace: bool = False, variant: str = "", ops: tuple | None = None,
                  options: dict | Callable[[Shape], dict] | None = None, label: str = "") -> Impl:
    """dpo_fast on one backend, named "dpo_fast:BACKEND[+VARIANT][+inplace]".

    options: extra keyword arguments of dpo_fast.loss / sequence_logprobs (or a function of the
    Shape returning them), e.g. a variant ("budget", ops=("linear",), options={"logits_memory_mb": 600}).
    ops defaults to every op (logits and loss only with inplace: the linear op has no logits to give up).
    """
    name = f"dpo_fast:{backend}" + (f"+{variant}" if variant else "") + ("+inplace" if inplace else "")
    ops = ops or (("logits", "loss") if inplace else OPS)
    text = label or (f"dpo_fast backend={backend!r}" + (f", {options}" if options and isinstance(options, dict) else "")
                     + (", inplace_backward=True" if inplace else ""))
    return Impl(name, ops, _dpo_fast_builder(backend, inplace, options or {}), _dpo_fast_available(backend),
                inplace=inplace, label=text)


# ================================================================ peers


def _trl_available(device: str):
    if installed("trl", "trl") is None:
        return False, "not installed"
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: F401
    except ImportError as e:  # an older TRL, or a broken install
        return False, f"unavailable: trl {installed('trl', 'trl')} has no fused LM head ({e})"
    return True, ""


def _build_trl(shape: Shape, inp) -> Runner:
    """TRL's fused LM head (trl.kernels.chunked_logprob.ChunkedLogProbFunction) called the way
    trl.trainer.utils.add_fused_lm_head calls it: hidden states of positions 0..T-2 against the
    labels shifted by one, -100 positions compacted out where TRL compacts them (Triton devices;
    elsewhere every position is scored with a clamped label and masked after), TRL's vocab tile
    width, no softcap, scale 1, temperature 1, log-probs only. The per-token log-probs are
    summed per sequence and the same DPO sigmoid loss is taken on top."""
    from trl.kernels import chunked_logprob as trl_kernel
    from trl.trainer import utils as trl_utils

    h, w = inp["hidden"], inp["weight"]
    labels = inp["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    compact = trl_kernel._use_triton(h.device)  # the rule add_fused_lm_head follows
    chunk = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE

    def fwd():
        hs = h[:, :-1]
        if compact:
            tok = trl_kernel.ChunkedLogProbFunction.apply(hs[mask], w, None, labels[mask], 1.0, chunk, None, 1.0,
                                                          ("log_probs",))[0]
            tok = tok.new_zeros(mask.shape).masked_scatter(mask, tok)
        else:
            tok = trl_kernel.ChunkedLogProbFunction.apply(hs.reshape(-1, shape.hidden), w, None,
                                                          labels.clamp(min=0).reshape(-1), 1.0, chunk, None, 1.0,
                                                          ("log_probs",))[0]
            tok = tok.view(mask.shape).masked_fill(~mask, 0)
        lp = tok.sum(-1)
        return dpo_from_logps(lp, inp["ref_c"], inp["ref_r"]), lp.detach()

    return _loss_runner(fwd, inp)


def _liger_available(device: str):
    if installed("liger-kernel", "liger_kernel") is None:
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
    extra: dict[str, Any] = {}
    if "ref_chosen_logps" in fwd_params:
        extra = dict(ref_chosen_logps=inp["ref_c"], ref_rejected_logps=inp["ref_r"])

    def fwd():
        out = mod(w, h[:, :-1], labels, **extra)
        return out[0] if isinstance(out, (tuple, list)) else out

    return Runner(fwd, lambda loss: loss.backward(),
                  lambda loss: {"loss": loss.detach(), "grad_hidden": h.grad, "grad_weight": w.grad}, [h, w])


def _cce_available(device: str):
    if installed("cut-cross-entropy", "cut_cross_entropy") is None:
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
        return dpo_from_logps(lp, inp["ref_c"], inp["ref_r"]), lp.detach()

    return _loss_runner(fwd, inp)


def _torch_lce_available(device: str):
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return False, f"unavailable: torch {torch.__version__} has no chunked F.linear_cross_entropy (2.13+)"
    return True, ""


def _build_torch_lce(shape: Shape, inp) -> Runner:
    """PyTorch's own fused linear + cross-entropy (torch.nn.functional.linear_cross_entropy, 2.13+),
    chunked (options=LinearCrossEntropyOptions(): its "auto" chunking and accumulation picks),
    per-token losses (reduction="none") on the shifted labels summed per sequence into log-probs,
    the DPO loss on top: what a PyTorch user would write first."""
    h, w = inp["hidden"], inp["weight"]
    shifted = inp["labels"][:, 1:].reshape(-1)
    options = torch.nn.LinearCrossEntropyOptions()

    def fwd():
        tok = F.linear_cross_entropy(h[:, :-1].reshape(-1, shape.hidden), w, shifted, reduction="none",
                                     ignore_index=IGNORE_INDEX, options=options)
        lp = -tok.reshape(shape.batch, -1).float().sum(-1)
        return dpo_from_logps(lp, inp["ref_c"], inp["ref_r"]), lp.detach()

    return _loss_runner(fwd, inp)


# ================================================================ timing floors


def _scored_rows(shape: Shape, inp):
    return inp["hidden"].detach()[:, :-1].reshape(-1, shape.hidden), inp["weight"].detach()


def _build_gemm4(shape: Shape, inp) -> Runner:
    """The floor of a fused linear loss that keeps O(tokens) memory: forward h @ W^T, its
    recomputation in backward, dH = G @ W and dW = G^T @ h, on the scored rows, with a
    logits-sized G (no loss, no check)."""
    h, w = _scored_rows(shape, inp)

    def bwd(z):
        g = torch.mm(h, w.t())
        torch.mm(g, w)
        torch.mm(g.t(), h)

    return Runner(lambda: torch.mm(h, w.t()), bwd, lambda out: {}, [])


def _build_gemm3(shape: Shape, inp) -> Runner:
    """The floor of a linear loss that keeps the logits: forward h @ W^T, then dH = G @ W and
    dW = G^T @ h with G = the forward's output, no recomputation (no loss, no check)."""
    h, w = _scored_rows(shape, inp)

    def bwd(z):
        torch.mm(z, w)
        torch.mm(z.t(), h)

    return Runner(lambda: torch.mm(h, w.t()), bwd, lambda out: {}, [])


def _budget(pairs: int | None):
    """logits_memory_mb holding `pairs` pairs' logits (None: all of them) of a shape: 2 x T x V x element size each."""
    def options(shape: Shape) -> dict:
        n = shape.batch // 2 if pairs is None else pairs
        return {"logits_memory_mb": n * 2 * shape.seqlen * shape.vocab * element_size(shape.dtype) / 1e6}
    return options


def _builtin_impls() -> None:
    register(Impl("pytorch", OPS, _build_pytorch, kind="reference",
                  label="PyTorch reference (log_softmax + gather + masked sum, as TRL)"))
    for backend in BACKENDS:
        register(dpo_fast_impl(backend))
        if backend != "reference":
            register(dpo_fast_impl(backend, inplace=True))
        # The hidden-state loss holding logits within a budget (3 GEMM passes, no recompute): the
        # target's 600 MB, one pair's logits, all pairs' logits.
        register(dpo_fast_impl(backend, variant="budget600", ops=("linear",), options={"logits_memory_mb": 600}))
        register(dpo_fast_impl(backend, variant="budget_pair", ops=("linear",), options=_budget(1),
                               label=f"dpo_fast backend={backend!r}, logits_memory_mb = one pair's logits"))
        register(dpo_fast_impl(backend, variant="budget_all", ops=("linear",), options=_budget(None),
                               label=f"dpo_fast backend={backend!r}, logits_memory_mb = all pairs' logits"))
    register(Impl("trl", ("linear",), _build_trl, _trl_available,
                  label="TRL fused LM head (ChunkedLogProbFunction, as add_fused_lm_head calls it) + DPO"))
    register(Impl("liger", ("linear",), _build_liger, _liger_available, full_warmup=True,
                  label="Liger-Kernel LigerFusedLinearDPOLoss"))
    register(Impl("cce", ("linear",), _build_cce, _cce_available,
                  label="Cut Cross-Entropy linear_cross_entropy + DPO"))
    register(Impl("torch_lce", ("linear",), _build_torch_lce, _torch_lce_available,
                  label="PyTorch F.linear_cross_entropy (chunked, reduction='none') + DPO"))
    register(Impl("gemm3", ("linear",), _build_gemm3, kind="baseline",
                  label="3 plain GEMMs (6NHV FLOPs): the floor of a linear loss that keeps the logits"))
    register(Impl("gemm4", ("linear",), _build_gemm4, kind="baseline",
                  label="4 plain GEMMs (8NHV FLOPs): the floor of a fused linear loss (logits recomputed)"))


_builtin_impls()
