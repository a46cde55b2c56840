"""Agreement with the truth: the float32 outputs of the reference's math, before anything is timed.

Relative tolerance of float32 results, per compared output. For the DPO losses (ops loss and
linear) the loss and its gradients depend on the difference of two long sums of log-probs, so
their float32 error grows with beta * |logps|: the tolerance is multiplied by that condition
number. Low precision: at most twice the PyTorch reference's own error against float32
(flash-attention's rule), and never tighter than the float32 tolerance.
"""

from __future__ import annotations

import gc
import math

import torch

from dpo_fast.kernels.reference import naive_sequence_logprobs
from .cases import BETA, IGNORE_INDEX, Shape
from .impls import Runner, dpo_from_logps

RTOL_F32 = 2e-5
FLOOR = 0.01  # entries are compared relative to |truth| + FLOOR * rms(truth)
_CHUNK = 1 << 22  # elements per slice: no full-size float32 temporaries


def tensor_stats(t) -> dict:
    x = t.detach().reshape(-1)
    ss, n = 0.0, x.numel()
    for i in range(0, n, _CHUNK):
        ss += float(x[i:i + _CHUNK].float().square().sum(dtype=torch.float64))
    return {"rms": math.sqrt(ss / max(n, 1)), "numel": n}


def rel_err(x, t, rms: float) -> float:
    """max_i |x_i - t_i| / (|t_i| + FLOOR * rms(t)), chunked; any NaN or inf gives inf."""
    if tuple(x.shape) != tuple(t.shape):
        return math.inf
    xf, tf = x.detach().reshape(-1), t.detach().reshape(-1)
    floor = FLOOR * rms + 1e-30
    worst = 0.0
    for i in range(0, xf.numel(), _CHUNK):
        a = xf[i:i + _CHUNK].float()
        b = tf[i:i + _CHUNK].to(a.device).float()
        d = float((a - b).abs_().div_(b.abs().add_(floor)).max())
        if not math.isfinite(d):
            return math.inf
        worst = max(worst, d)
    return worst


def _condition(shape: Shape, meta: dict) -> float:
    if shape.op == "logits":
        return 1.0
    return 1.0 + 2.0 * BETA * meta.get("max_abs_logps", 0.0)


REQUIRED = {"logits": ("logps", "grad_logits"), "loss": ("loss", "grad_logits"),
            "linear": ("loss", "grad_hidden", "grad_weight")}


def compare(shape: Shape, outputs: dict, ref: dict) -> tuple[bool | None, float | None, float | None, str]:
    """(agrees, worst error, tolerance of that output, which output or why unchecked)."""
    truth, stats = ref["truth"], ref["stats"]
    cond = _condition(shape, ref["meta"])
    if ref["ref_err"] is None and shape.dtype not in ("float32", "float64"):
        # Without the low-precision reference's own error there is no fair bar to hold a
        # low-precision implementation to.
        return None, None, None, "the reference did not run"
    missing = [k for k in REQUIRED[shape.op] if outputs.get(k) is None]
    if missing:
        return False, math.inf, 0.0, f"missing outputs {missing}"
    worst_ratio, worst = -1.0, (math.inf, 0.0, "")
    for k in [k for k in truth if outputs.get(k) is not None]:
        tol = max(RTOL_F32 * (cond if k != "logps" else 1.0), 2.0 * (ref["ref_err"] or {}).get(k, 0.0))
        e = rel_err(outputs[k], truth[k], stats[k]["rms"])
        ratio = e / tol if tol > 0 else math.inf
        if ratio > worst_ratio:
            worst_ratio, worst = ratio, (e, tol, k)
    e, tol, k = worst
    return worst_ratio <= 1.0, e, tol, k


def truth_by_sequence(shape: Shape, inp: dict) -> dict:
    """The reference's math in float32, one sequence at a time (bounded memory): the value and
    gradients every implementation is checked against when the inputs are bf16/fp16, and when
    the reference itself does not fit in memory. Two passes: the log-probs, then (once the
    loss's gradient per sequence is known) each sequence's backward."""
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
        loss = dpo_from_logps(lpg, inp["ref_c"], inp["ref_r"])
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


def reference_outputs(shape: Shape, runner: Runner | None, out, inp: dict) -> dict:
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
        truth = truth_by_sequence(shape, inp)
        ref_err = None if outs is None else {
            k: rel_err(outs[k], truth[k], tensor_stats(truth[k])["rms"]) for k in truth if k in outs}
    meta = {"max_abs_logps": float(truth["logps"].abs().max()) if "logps" in truth else 0.0,
            "source": "reference" if outs is not None else "float32 per-sequence (the reference did not run)"}
    return {"truth": truth, "ref_err": ref_err, "meta": meta, "stats": {k: tensor_stats(v) for k, v in truth.items()}}
