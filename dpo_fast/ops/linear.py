"""The fused lm_head + log-probs ops: per-sequence log-probs from hidden states and the lm_head
weight, without logits. Only scored tokens (targets >= 0) are computed: prompt, padding and
shifted-out rows are compacted out first. Kernels: kernels.triton_linear for backend "triton",
kernels.chunked_linear (GEMM tiles through the backend's row kernels) for every other backend.

Ops (namespace dpo_fast), functional, with fake kernels and autograd:
  linear_logprobs           (hidden (N,H), weight, bias?, targets (N,), token_seq (N,), S, cap?, backend)
                            -> (logps (S,), logit_sums (S,), lse (N,)); lse is kept for backward
  linear_logprobs_backward  -> (d hidden, d weight, d bias); a gradient that is not needed is
                            returned as an empty (0,) tensor and never computed. Also the backward
                            of ops.vocab_parallel's forward (vocab_start, group_name given).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
# A custom op's schema cannot carry a ProcessGroup: the vocab-parallel ops name their group, as
# torch's own functional collectives do, and resolve the name with the function those use.
from torch.distributed.distributed_c10d import _resolve_process_group as group_by_name

from ..kernels import chunked_linear
from ..targets import acc_dtype, check_targets, sum_per_sequence
from .double_backward import refuse_double_backward


def scored_rows(targets: Tensor) -> tuple[Tensor, int]:
    """(indices of the scored rows (targets >= 0), their count)."""
    idx = (targets >= 0).nonzero().squeeze(1)
    return idx, idx.numel()


def take_rows(x: Tensor, idx: Tensor, M: int) -> Tensor:
    """x[idx] (M rows), or x itself when every row is taken."""
    return x if M == x.shape[0] else x.index_select(0, idx)


def row_stats(hidden, weight, bias, idx, tgt, softcap, backend):
    """(lse, target logit, logit sum) of the compacted rows hidden[idx] with targets tgt."""
    if backend == "triton":
        from ..kernels import triton_linear
        return triton_linear.forward(hidden, weight, bias, idx, tgt, softcap)
    return chunked_linear.stats(take_rows(hidden, idx, idx.numel()), weight, bias, tgt, softcap, backend)


def row_grads(hidden, weight, bias, idx, tgt, lse, g, softcap, need_dh, need_dw, need_db, backend):
    """(dh of the compacted rows, dW, db) for per-row upstream gradients g."""
    if backend == "triton":
        from ..kernels import triton_linear
        return triton_linear.backward(hidden, weight, bias, idx, tgt, lse, g, softcap, need_dh, need_dw, need_db)
    return chunked_linear.grads(take_rows(hidden, idx, idx.numel()), weight, bias, tgt, lse, g, softcap,
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
    idx, M = scored_rows(targets)
    if M > 0:
        lse_c, lp_c, lsum_c = stats(idx, take_rows(targets, idx, M))
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
def linear_logprobs_backward(grad_logps: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                             targets: Tensor, token_seq: Tensor, lse: Tensor, logit_softcap: float | None,
                             backend: str, need_hidden: bool, need_weight: bool, need_bias: bool, vocab_start: int = 0,
                             group_name: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of linear_logprobs and of vocab_parallel_logprobs. With group_name, `weight` holds
    the vocabulary rows [vocab_start, vocab_start + V_r) of one rank (targets are global ids) and the
    partial d hidden of the scored rows is summed over the group (one all-reduce)."""
    need_bias = need_bias and bias is not None
    acc = acc_dtype(hidden.dtype)
    idx, M = scored_rows(targets)
    empty = hidden.new_empty(0)
    if M == 0 or not (need_hidden or need_weight or need_bias):  # alike on every rank: no collective is skipped
        return (torch.zeros_like(hidden) if need_hidden else empty,
                torch.zeros_like(weight) if need_weight else empty.clone(),
                torch.zeros_like(bias) if need_bias else empty.clone())
    tgt = take_rows(targets, idx, M) - vocab_start
    g = grad_logps.to(acc)[token_seq.index_select(0, idx)].contiguous()
    lse_c = lse.index_select(0, idx).to(acc)
    if weight.shape[0] > 0:
        dh, dW, db = row_grads(hidden, weight, bias, idx, tgt, lse_c, g, logit_softcap, need_hidden, need_weight,
                               need_bias, backend)
    else:  # an empty shard (torch.chunk leaves one when V is small) still takes part in the all-reduce
        dh = hidden.new_zeros(M, hidden.shape[1], dtype=acc) if need_hidden else None
        dW = torch.zeros_like(weight)
        db = torch.zeros_like(bias) if need_bias else None
    if not need_hidden:
        dH = empty
    else:
        if group_name is not None:
            dh = dh.contiguous()
            dist.all_reduce(dh, group=group_by_name(group_name))
        dH = dh.to(hidden.dtype) if M == hidden.shape[0] else \
            torch.zeros_like(hidden).index_copy_(0, idx, dh.to(hidden.dtype))
    return dH, dW if need_weight else empty.clone(), db.to(bias.dtype) if need_bias else empty.clone()


@linear_logprobs_backward.register_fake
def _(grad_logps, hidden, weight, bias, targets, token_seq, lse, logit_softcap, backend, need_hidden,
      need_weight, need_bias, vocab_start=0, group_name=None):
    empty = hidden.new_empty(0)
    return (torch.empty_like(hidden) if need_hidden else empty,
            torch.empty_like(weight) if need_weight else empty.clone(),
            torch.empty_like(bias) if (need_bias and bias is not None) else empty.clone())


def save_for_lm_head_backward(ctx, hidden, weight, bias, targets, token_seq, output, logit_softcap, backend,
                              vocab_start: int = 0, group_name: str | None = None) -> None:
    """setup_context of the lm_head log-prob ops (single-device and vocab-parallel)."""
    _, logit_sums, lse = output
    ctx.mark_non_differentiable(logit_sums, lse)
    ctx.save_for_backward(hidden, weight, bias, targets, token_seq, lse)
    ctx.settings = (logit_softcap, backend)
    ctx.shard = (vocab_start, group_name)


def lm_head_backward(ctx, grad_logps, num_inputs: int) -> tuple:
    """The autograd formula of the lm_head log-prob ops: linear_logprobs_backward; gradients for
    hidden, weight and bias (the first three inputs), None for the other num_inputs - 3."""
    hidden, weight, bias, targets, token_seq, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias is not None
    dH, dW, dB = torch.ops.dpo_fast.linear_logprobs_backward(
        grad_logps, hidden, weight, bias, targets, token_seq, lse, *ctx.settings, need_h, need_w, need_b, *ctx.shard)
    return (dH if need_h else None, dW if need_w else None, dB if need_b else None) + (None,) * (num_inputs - 3)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, token_seq, _, logit_softcap, backend = inputs
    save_for_lm_head_backward(ctx, hidden, weight, bias, targets, token_seq, output, logit_softcap, backend)


def _backward(ctx, grad_logps, grad_logit_sums, grad_lse):
    refuse_double_backward("linear_sequence_logprobs")
    return lm_head_backward(ctx, grad_logps, 8)


_linear_logprobs.register_autograd(_backward, setup_context=_setup_context)
