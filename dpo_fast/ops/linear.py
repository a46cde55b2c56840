"""The fused lm_head + log-probs ops: per-sequence log-probs from hidden states and the lm_head
weight, without logits. Only scored tokens (targets >= 0) are computed: prompt, padding and
shifted-out rows are compacted out first. Kernels: kernels.triton_linear for backend "triton",
kernels.chunked_linear (GEMM tiles through the backend's row kernels) for every other backend.

Ops (namespace dpo_fast), functional, with fake kernels and autograd:
  linear_logprobs           (hidden (N,H), weight, bias?, targets (N,), token_seq (N,), S, cap?, backend)
                            -> (logps (S,), logit_sums (S,), lse (N,)); lse is kept for backward
  linear_logprobs_backward  -> (d hidden, d weight, d bias); a gradient that is not needed is
                            returned as an empty (0,) tensor and never computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import chunked_linear
from ..targets import acc_dtype, check_targets, sum_per_sequence
from .double_backward import refuse_double_backward


def _scored(targets: Tensor):
    idx = (targets >= 0).nonzero().squeeze(1)
    return idx, idx.numel()


def _rows(x: Tensor, idx: Tensor, M: int) -> Tensor:
    return x if M == x.shape[0] else x.index_select(0, idx)


def row_stats(hidden, weight, bias, idx, tgt, softcap, backend):
    """(lse, target logit, logit sum) of the compacted rows hidden[idx] with targets tgt."""
    if backend == "triton":
        from ..kernels import triton_linear
        return triton_linear.forward(hidden, weight, bias, idx, tgt, softcap)
    return chunked_linear.stats(_rows(hidden, idx, idx.numel()), weight, bias, tgt, softcap, backend)


def row_grads(hidden, weight, bias, idx, tgt, lse, g, softcap, need_dh, need_dw, need_db, backend):
    """(dh of the compacted rows, dW, db) for per-row upstream gradients g."""
    if backend == "triton":
        from ..kernels import triton_linear
        return triton_linear.backward(hidden, weight, bias, idx, tgt, lse, g, softcap, need_dh, need_dw, need_db)
    return chunked_linear.grads(_rows(hidden, idx, idx.numel()), weight, bias, tgt, lse, g, softcap,
                                need_dh, need_dw, need_db, backend)


# ---------------------------------------------------------------- the ops


@torch.library.custom_op("dpo_fast::linear_logprobs", mutates_args=())
def _linear_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, token_seq: Tensor,
                     num_sequences: int, logit_softcap: float | None, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    V = weight.shape[0]
    check_targets(targets, V, token_seq, num_sequences)

    def stats(idx, tgt):
        lse, picked, lsum = row_stats(hidden, weight, bias, idx, tgt, logit_softcap, backend)
        return lse, picked - lse, lsum

    return per_sequence(hidden, targets, token_seq, num_sequences, stats)


def per_sequence(hidden: Tensor, targets: Tensor, token_seq: Tensor, num_sequences: int, stats):
    """(logps, logit_sums, lse) of a lm_head op: `stats(idx, tgt)` gives the compacted scored rows'
    (log-sum-exp, log-prob, logit sum); unscored rows hold zeros, and the sums run per sequence."""
    acc = acc_dtype(hidden.dtype)
    lse = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
    token_lp = torch.zeros_like(lse)
    token_lsum = torch.zeros_like(lse)
    idx, M = _scored(targets)
    if M > 0:
        lse_c, lp_c, lsum_c = stats(idx, _rows(targets, idx, M))
        lse.index_copy_(0, idx, lse_c)
        token_lp.index_copy_(0, idx, lp_c)
        token_lsum.index_copy_(0, idx, lsum_c)
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
    dh, dW, db = row_grads(hidden, weight, bias, idx, tgt, lse_c, g, logit_softcap, need_hidden, need_weight,
                           need_bias, backend)
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
    refuse_double_backward("linear_sequence_logprobs")
    hidden, weight, bias, targets, token_seq, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    dH, dW, dB = torch.ops.dpo_fast.linear_logprobs_backward(
        grad_logps, hidden, weight, bias, targets, token_seq, lse, ctx.logit_softcap, ctx.backend,
        need_h, need_w, need_b and bias is not None)
    return (dH if need_h else None, dW if need_w else None, dB if (need_b and bias is not None) else None,
            None, None, None, None, None)


_linear_logprobs.register_autograd(_backward, setup_context=_setup_context)
