"""Per-sequence log-probs straight from hidden states and the lm_head weight: no logits.

`linear_sequence_logprobs(hidden, weight, labels)` equals
`sequence_logprobs(hidden @ weight.T + bias, labels)` (with an optional Gemma-2 logit soft-cap
`c * tanh(z / c)`), but no tokens x vocab buffer is ever allocated. Only the scored tokens
(targets >= 0) are computed: prompt, padding and shifted-out rows are compacted out first.

Backends (the `backend=` argument):
  chunked  PyTorch on any device: vocab chunks through matmul with an online log-sum-exp in
           forward; backward recomputes each chunk's logits and accumulates
           dH += G_c @ W_c, dW_c = G_c^T @ H (G = g * (onehot - softmax), with the per-token
           g applied to H and dH outside the chunk loop). 4 GEMMs of 2NHV FLOPs in all; extra
           memory is O(tokens x chunk) plus the gradients themselves.
  triton   the fused kernels of dpo_fast.triton_linear: CUDA tensors, or CPU tensors under
           TRITON_INTERPRET=1 (tests only).
  auto     triton on CUDA when triton is importable, chunked otherwise.

Ops (namespace dpo_fast), functional, with fake kernels and autograd:
  linear_logprobs           (hidden (N,H), weight, bias?, targets (N,), token_seq (N,), S, cap?)
                            -> (logps (S,), logit_sums (S,), lse (N,)); lse is kept for backward
  linear_logprobs_backward  -> (d hidden, d weight, d bias); a gradient that is not needed is
                            returned as an empty (0,) tensor and never computed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends import triton_importable, triton_interpreting
from .logprobs import check_float_batch, check_labels
from .tokens import acc_dtype, check_targets, prepare_targets, sum_per_sequence

LINEAR_BACKENDS = ("auto", "chunked", "triton")

# The chunked backend holds about this many float32 logits at a time (x2 with a soft-cap):
# 2^23 elements = 32 MiB, e.g. 2048 tokens x 4096 vocab entries. Tests lower it to force
# several chunks on tiny vocabularies.
_CHUNK_ELEMENTS = 1 << 23

# Looked up once: resolve_linear_backend runs inside torch.compile'd code, where dynamo would
# warn about tracing through the lru_cache of backends.triton_importable.
_TRITON_IMPORTABLE = triton_importable()


# ---------------------------------------------------------------- argument checks


def check_linear_inputs(hidden, weight, labels, *, bias=None, logit_softcap=None, sequence_ids=None,
                        num_sequences=None) -> None:
    """Shapes, dtypes and devices of a from-hidden-states call; raises ValueError naming the argument."""
    check_float_batch(hidden, "hidden", "H", "the hidden size")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    H = hidden.shape[-1]
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H) as stored by nn.Linear, got shape {tuple(weight.shape)}")
    if weight.shape[1] != H:
        raise ValueError(f"weight must be (V, H) with H = hidden.shape[-1] = {H}, got shape "
                         f"{tuple(weight.shape)} (pass the lm_head weight as stored, not transposed)")
    if weight.shape[0] == 0:
        raise ValueError("weight: the vocabulary size V is 0")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (V), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    _check_softcap(logit_softcap)
    check_labels(labels, batch_shape=hidden.shape[:2], device=hidden.device,
                 sequence_ids=sequence_ids, num_sequences=num_sequences)


def _check_softcap(logit_softcap) -> None:
    if logit_softcap is None:
        return
    if isinstance(logit_softcap, bool) or not isinstance(logit_softcap, (int, float)):
        raise ValueError(f"logit_softcap must be a positive float or None, got {logit_softcap!r}")
    if not (math.isfinite(logit_softcap) and logit_softcap > 0):
        raise ValueError(f"logit_softcap must be a positive finite float or None, got {logit_softcap!r}")


def available_linear_backends(device: torch.device | str = "cpu") -> list[str]:
    """The explicit backends that can run on `device` ("chunked" always)."""
    device = torch.device(device)
    ok = _TRITON_IMPORTABLE and (device.type == "cuda" or (device.type == "cpu" and triton_interpreting()))
    return ["chunked"] + (["triton"] if ok else [])


def resolve_linear_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA when triton imports, "chunked" otherwise; explicit names checked."""
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"backend must be one of {LINEAR_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _TRITON_IMPORTABLE else "chunked"
    if backend == "triton":
        if not _TRITON_IMPORTABLE:
            raise RuntimeError("backend 'triton' is not available: triton is not installed")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            raise RuntimeError(f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                               f"got {device.type}")
    return backend


# ---------------------------------------------------------------- chunked PyTorch implementation


def _mm_dtype(x: Tensor) -> torch.dtype:
    # On the CPU, bf16/fp16 inputs go through float32 GEMMs: ATen's CPU matmul has no
    # float32-output low-precision GEMM, and bf16 logits would add PyTorch's own rounding error.
    # On a GPU without Triton keep the tensor cores and upcast each logits chunk after the GEMM.
    if x.device.type == "cpu" or x.dtype in (torch.float32, torch.float64):
        return acc_dtype(x.dtype)
    return x.dtype


def _chunk_cols(M: int, V: int) -> int:
    c = max(1, _CHUNK_ELEMENTS // max(M, 1))
    if c >= 256:
        c -= c % 256
    return min(c, V)


def _logits_chunk(h, weight, bias, v0, v1, softcap, buf):
    """Logits of the compacted rows `h` for vocab entries [v0, v1), in the accumulation dtype,
    written into the front of the flat buffer `buf`."""
    M = h.shape[0]
    acc = buf.dtype
    w = weight[v0:v1]
    if w.dtype != h.dtype:
        w = w.to(h.dtype)
    z = buf[: M * (v1 - v0)].view(M, v1 - v0)
    if h.dtype == acc:
        torch.mm(h, w.t(), out=z)
    else:
        z.copy_(h @ w.t())
    if bias is not None:
        z.add_(bias[v0:v1].to(acc))
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z, w


def _scored(targets: Tensor):
    idx = (targets >= 0).nonzero().squeeze(1)
    return idx, idx.numel()


def _rows(x: Tensor, idx: Tensor, M: int) -> Tensor:
    return x if M == x.shape[0] else x.index_select(0, idx)


def _chunked_stats(hidden, weight, bias, tgt, softcap):
    """Per compacted row: (log-sum-exp, target logit, sum of logits) over the whole vocabulary."""
    M = hidden.shape[0]
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    h = hidden.to(_mm_dtype(hidden))
    C = _chunk_cols(M, V)
    buf = torch.empty(M * C, dtype=acc, device=hidden.device)
    m = torch.full((M,), -math.inf, dtype=acc, device=hidden.device)
    s = torch.zeros(M, dtype=acc, device=hidden.device)
    lsum = torch.zeros_like(s)
    picked = torch.zeros_like(s)
    for v0 in range(0, V, C):
        v1 = min(v0 + C, V)
        z, _ = _logits_chunk(h, weight, bias, v0, v1, softcap, buf)
        lsum += z.sum(1)
        inside = (tgt >= v0) & (tgt < v1)
        col = (tgt - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
        picked += torch.where(inside, z.gather(1, col).squeeze(1), 0.0)
        m_new = torch.maximum(m, z.amax(1))
        s = s * torch.exp(m - m_new) + z.sub_(m_new.unsqueeze(1)).exp_().sum(1)
        m = m_new
    return m + torch.log(s), picked, lsum


def _chunked_grads(hidden, weight, bias, tgt, lse, g, softcap, need_dh, need_dw, need_db):
    """Gradients for the compacted rows: (dh (M, H) acc dtype, dW (V, H) weight dtype, db (V,) acc).

    The gradient of the logits is G = diag(g) (u * onehot - P), with P the softmax (times
    D = 1 - (z/c)^2 under a soft-cap) and u = D at the target (1 without a cap). The per-row
    scale g is kept out of the vocab-sized work: with Q = P - u * onehot (a handful of entries
    changed per chunk), dh = -g * sum_c Q_c @ W_c, dW_c = Q_c^T @ (-g * h), db_c = -Q_c^T g.
    Per chunk: the three GEMMs (recompute, dh, dW) and two elementwise passes, exp(z - lse)."""
    M, H = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    mm = _mm_dtype(hidden)
    h = hidden.to(mm)
    C = _chunk_cols(M, V)
    buf = torch.empty(M * C, dtype=acc, device=dev)
    dbuf = torch.empty(M * C, dtype=acc, device=dev) if softcap is not None else None
    A = torch.zeros(M, H, dtype=acc, device=dev) if need_dh else None
    dW = torch.empty(V, H, dtype=weight.dtype, device=dev) if need_dw else None
    db = torch.empty(V, dtype=acc, device=dev) if need_db else None
    neg_gh = (hidden.to(acc) * (-g).unsqueeze(1)).to(mm) if need_dw else None
    lse_col = lse.unsqueeze(1)
    # Rows sorted by target: the rows whose target lies in a chunk are one slice of `order`.
    order = torch.argsort(tgt)
    t_sorted = tgt.index_select(0, order)
    starts = list(range(0, V, C))
    bounds = torch.searchsorted(t_sorted, torch.tensor(starts + [V], device=dev)).tolist()
    for k, v0 in enumerate(starts):
        v1 = min(v0 + C, V)
        z, w = _logits_chunk(h, weight, bias, v0, v1, softcap, buf)
        r0, r1 = bounds[k], bounds[k + 1]
        rows, cols = order[r0:r1], t_sorted[r0:r1] - v0
        if softcap is not None:
            u = 1.0 - (z[rows, cols] / softcap).square()
            d = dbuf[: z.numel()].view_as(z)
            torch.mul(z, z, out=d).mul_(-1.0 / (softcap * softcap)).add_(1.0)
        Q = z.sub_(lse_col).exp_()
        if softcap is not None:
            Q.mul_(d)
            Q.index_put_((rows, cols), -u, accumulate=True)
        else:
            Q.index_put_((rows, cols), Q.new_full((r1 - r0,), -1.0), accumulate=True)
        Qm = Q if Q.dtype == mm else Q.to(mm)
        if need_dh:
            if mm == acc:
                A.addmm_(Qm, w)
            else:
                A += (Qm @ w).to(acc)
        if need_dw:
            if mm == weight.dtype:
                torch.mm(Qm.t(), neg_gh, out=dW[v0:v1])
            else:
                dW[v0:v1] = Qm.t() @ neg_gh
        if need_db:
            torch.mv(Q.t(), g, out=db[v0:v1]).neg_()
    dh = A.mul_((-g).unsqueeze(1)) if need_dh else None
    return dh, dW, db


# ---------------------------------------------------------------- the ops


@torch.library.custom_op("dpo_fast::linear_logprobs", mutates_args=())
def _linear_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, token_seq: Tensor,
                     num_sequences: int, logit_softcap: float | None, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    V = weight.shape[0]
    check_targets(targets, V, token_seq, num_sequences)
    acc = acc_dtype(hidden.dtype)
    N = hidden.shape[0]
    lse = torch.zeros(N, dtype=acc, device=hidden.device)
    token_lp = torch.zeros_like(lse)
    token_lsum = torch.zeros_like(lse)
    idx, M = _scored(targets)
    if M > 0:
        tgt = _rows(targets, idx, M)
        if backend == "triton":
            from . import triton_linear
            lse_c, picked, lsum = triton_linear.forward(hidden, weight, bias, idx, tgt, logit_softcap)
        else:
            lse_c, picked, lsum = _chunked_stats(_rows(hidden, idx, M), weight, bias, tgt, logit_softcap)
        lse.index_copy_(0, idx, lse_c)
        token_lp.index_copy_(0, idx, picked - lse_c)
        token_lsum.index_copy_(0, idx, lsum)
    logps = sum_per_sequence(token_lp, token_seq, num_sequences)
    logit_sums = sum_per_sequence(token_lsum, token_seq, num_sequences).float()
    return logps, logit_sums, lse


@_linear_logprobs.register_fake
def _(hidden, weight, bias, targets, token_seq, num_sequences, logit_softcap, backend):
    acc = acc_dtype(hidden.dtype)
    N = hidden.shape[0]
    return (hidden.new_empty(num_sequences, dtype=acc), hidden.new_empty(num_sequences, dtype=torch.float32),
            hidden.new_empty(N, dtype=acc))


@torch.library.custom_op("dpo_fast::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward(grad_logps: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                              targets: Tensor, token_seq: Tensor, lse: Tensor, logit_softcap: float | None,
                              backend: str, need_hidden: bool, need_weight: bool,
                              need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    need_bias = need_bias and bias is not None
    acc = acc_dtype(hidden.dtype)
    idx, M = _scored(targets)
    if M == 0 or not (need_hidden or need_weight or need_bias):
        empty = hidden.new_empty(0)
        return (torch.zeros_like(hidden) if need_hidden else empty,
                torch.zeros_like(weight) if need_weight else empty.clone(),
                torch.zeros_like(bias) if need_bias else empty.clone())
    tgt = _rows(targets, idx, M)
    g = grad_logps.to(acc)[token_seq.index_select(0, idx)].contiguous()
    lse_c = lse.index_select(0, idx).to(acc)
    if backend == "triton":
        from . import triton_linear
        dh, dW, db = triton_linear.backward(hidden, weight, bias, idx, tgt, lse_c, g, logit_softcap,
                                            need_hidden, need_weight, need_bias)
    else:
        dh, dW, db = _chunked_grads(_rows(hidden, idx, M), weight, bias, tgt, lse_c, g, logit_softcap,
                                    need_hidden, need_weight, need_bias)
    empty = hidden.new_empty(0)
    if not need_hidden:
        dH = empty
    elif M == hidden.shape[0]:
        dH = dh.to(hidden.dtype)
    else:
        dH = torch.zeros_like(hidden).index_copy_(0, idx, dh.to(hidden.dtype))
    return dH, dW if need_weight else empty.clone(), db.to(bias.dtype) if need_bias else empty.clone()


@_linear_logprobs_backward.register_fake
def _(grad_logps, hidden, weight, bias, targets, token_seq, lse, logit_softcap, backend, need_hidden,
      need_weight, need_bias):
    empty = hidden.new_empty(0)
    return (torch.empty_like(hidden) if need_hidden else empty,
            torch.empty_like(weight) if need_weight else empty.clone(),
            torch.empty_like(bias) if (need_bias and bias is not None) else empty.clone())


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, token_seq, num_sequences, logit_softcap, backend = inputs
    _, logit_sums, lse = output
    ctx.mark_non_differentiable(logit_sums, lse)
    ctx.save_for_backward(hidden, weight, bias, targets, token_seq, lse)
    ctx.logit_softcap = logit_softcap
    ctx.backend = backend


def _backward(ctx, grad_logps, grad_logit_sums, grad_lse):
    hidden, weight, bias, targets, token_seq, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    dH, dW, dB = torch.ops.dpo_fast.linear_logprobs_backward(
        grad_logps, hidden, weight, bias, targets, token_seq, lse, ctx.logit_softcap, ctx.backend,
        need_h, need_w, need_b and bias is not None)
    return (dH if need_h else None, dW if need_w else None, dB if (need_b and bias is not None) else None,
            None, None, None, None, None)


_linear_logprobs.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public functions


def linear_logprobs_with_stats(hidden: Tensor, weight: Tensor, targets: Tensor, token_seq: Tensor,
                               num_sequences: int, *, bias: Tensor | None = None,
                               logit_softcap: float | None = None, backend: str = "auto"):
    """(logps, logit_sums), both (num_sequences,), from canonical targets (dpo_fast.tokens).

    logps: sum over each sequence's scored tokens of log_softmax(hidden @ weight.T + bias)[target]
    (soft-capped logits if logit_softcap), float32 (float64 for float64 inputs), differentiable
    w.r.t. hidden, weight and bias. logit_sums: float32, no gradient, the sum over scored tokens of
    the sum over the vocabulary of the (capped) logits, accumulated in the same forward pass.
    Inputs are assumed checked (check_linear_inputs); labels are range-checked inside the op.
    """
    _check_softcap(logit_softcap)
    backend = resolve_linear_backend(backend, hidden.device)
    H = hidden.shape[-1]
    cap = None if logit_softcap is None else float(logit_softcap)
    logps, logit_sums, _ = torch.ops.dpo_fast.linear_logprobs(
        hidden.reshape(-1, H), weight, bias, targets.reshape(-1), token_seq.reshape(-1), num_sequences, cap,
        backend)
    return logps, logit_sums.detach()


def linear_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Per-sequence log-probs of `labels` under the lm_head, without materialising logits.

    Same result as `sequence_logprobs(hidden @ weight.T + bias, labels, ...)`, with the optional
    Gemma-2 soft-cap `logit_softcap * tanh(z / logit_softcap)` applied to the logits first.
    hidden (S, T, H), or packed (1, N, H) with sequence_ids (1, N) (-1 = padding) and
    num_sequences; weight (V, H) as stored by nn.Linear; bias (V,) or None; labels (S, T)
    int64/int32 (shift=True: position t scores label t + 1; ignore_index scores nothing).
    average=True divides by the number of scored tokens (0 tokens gives 0).
    Returns (S,) float32 (float64 for float64 inputs), differentiable w.r.t. hidden, weight
    and bias. backend: "auto", "chunked" (PyTorch, any device) or "triton".
    """
    check_linear_inputs(hidden, weight, labels, bias=bias, logit_softcap=logit_softcap,
                        sequence_ids=sequence_ids, num_sequences=num_sequences)
    tg = prepare_targets(labels, ignore_index=ignore_index, shift=shift,
                         sequence_ids=sequence_ids, num_sequences=num_sequences)
    logps, _ = linear_logprobs_with_stats(hidden, weight, tg.targets, tg.token_seq, tg.num_sequences,
                                          bias=bias, logit_softcap=logit_softcap, backend=backend)
    if average:
        logps = logps / tg.counts.to(logps.dtype).clamp(min=1)
    return logps
