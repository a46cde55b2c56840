"""The fused lm_head + log-probs under tensor parallelism over the vocabulary.

Each rank of the tensor-parallel group holds rows [vocab_start, vocab_start + V_r) of the lm_head
weight (and bias) and the same hidden states; no rank ever holds the whole weight, the logits,
or any tokens x vocabulary buffer. The rank-local work is ops.linear's (row_stats / row_grads,
which score a target outside the rank's rows through its softmax terms only):

  forward   per scored token, over the rank's own rows: (log-sum-exp, target logit or 0, sum of
            logits); ONE all-gather of these 3 floats per scored token; every rank merges the
            table in rank order (lse = logsumexp over ranks, the others summed), so every rank
            holds the same bits, and the loss computed from them above is the same everywhere.
  backward  with the whole vocabulary's lse from the forward and the same upstream gradient on
            every rank: the rank's dW rows and db, and its partial dH of the scored rows; ONE
            all-reduce (sum) of the partial dH (scored tokens x H floats), the reduction a
            column-parallel layer's input gradient needs anyway.

Communicated per rank and step: 12 (W - 1) M bytes gathered in the forward (M scored tokens,
W ranks; float32) and one M x H float32 all-reduce in the backward.

Ops (namespace dpo_fast), with fake kernels and autograd, as dpo_fast::linear_logprobs but for
one shard; targets are global vocabulary ids, the group is named by its group_name:
  vocab_parallel_logprobs           (hidden (N,H), weight (V_r,H), bias (V_r,)?, targets (N,), token_seq (N,),
                                     S, vocab_start, cap?, backend, group_name) -> (logps, logit_sums, lse)
  vocab_parallel_logprobs_backward  -> (d hidden summed over the group, d weight rows, d bias rows)
Inputs are assumed checked and the same on every rank (dpo_fast.tensor_parallel does that).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
# A custom op's schema cannot carry a ProcessGroup: the ops name their group, as torch's own
# functional collectives do, and resolve the name with the function those use.
from torch.distributed.distributed_c10d import _resolve_process_group as group_by_name

from ..targets import acc_dtype
from .double_backward import refuse_double_backward
from .linear import _rows, _scored, per_sequence, row_grads, row_stats


def all_gather(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """(world, *x.shape): every rank's x, in group rank order."""
    x = x.contiguous()
    out = x.new_empty((dist.get_world_size(group) * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather_single(out, x, group=group)  # the concatenated form: gloo takes no other
    return out.view((-1,) + tuple(x.shape))


def _local_stats(hidden, weight, bias, idx, tgt, softcap, backend, acc):
    if weight.shape[0] == 0:  # an empty shard: torch.chunk leaves one when V is small
        M = idx.numel()
        return (hidden.new_full((M,), -torch.inf, dtype=acc), hidden.new_zeros(M, dtype=acc),
                hidden.new_zeros(M, dtype=acc))
    return row_stats(hidden, weight, bias, idx, tgt, softcap, backend)


@torch.library.custom_op("dpo_fast::vocab_parallel_logprobs", mutates_args=())
def _vp_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, token_seq: Tensor,
                 num_sequences: int, vocab_start: int, logit_softcap: float | None, backend: str,
                 group_name: str) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(hidden.dtype)

    def stats(idx, tgt):  # the same scored rows on every rank (tensor_parallel checks the targets agree)
        local = torch.stack(_local_stats(hidden, weight, bias, idx, tgt - vocab_start, logit_softcap, backend, acc))
        table = all_gather(local, group_by_name(group_name))  # (W, 3, M)
        lse = torch.logsumexp(table[:, 0], 0)
        return lse, table[:, 1].sum(0) - lse, table[:, 2].sum(0)

    return per_sequence(hidden, targets, token_seq, num_sequences, stats)


@_vp_logprobs.register_fake
def _(hidden, weight, bias, targets, token_seq, num_sequences, vocab_start, logit_softcap, backend, group_name):
    acc = acc_dtype(hidden.dtype)
    return (hidden.new_empty(num_sequences, dtype=acc), hidden.new_empty(num_sequences, dtype=torch.float32),
            hidden.new_empty(hidden.shape[0], dtype=acc))


@torch.library.custom_op("dpo_fast::vocab_parallel_logprobs_backward", mutates_args=())
def _vp_logprobs_backward(grad_logps: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                          targets: Tensor, token_seq: Tensor, lse: Tensor, vocab_start: int,
                          logit_softcap: float | None, backend: str, group_name: str, need_hidden: bool,
                          need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    need_bias = need_bias and bias is not None
    acc = acc_dtype(hidden.dtype)
    idx, M = _scored(targets)
    empty = hidden.new_empty(0)
    if M == 0 or not (need_hidden or need_weight or need_bias):
        return (torch.zeros_like(hidden) if need_hidden else empty,
                torch.zeros_like(weight) if need_weight else empty.clone(),
                torch.zeros_like(bias) if need_bias else empty.clone())
    tgt = _rows(targets, idx, M) - vocab_start
    g = grad_logps.to(acc)[token_seq.index_select(0, idx)].contiguous()
    lse_c = lse.index_select(0, idx).to(acc)
    if weight.shape[0] > 0:
        dh, dW, db = row_grads(hidden, weight, bias, idx, tgt, lse_c, g, logit_softcap, need_hidden, need_weight,
                               need_bias, backend)
    else:  # an empty shard still takes part in the all-reduce
        dh = hidden.new_zeros(M, hidden.shape[1], dtype=acc) if need_hidden else None
        dW = torch.zeros_like(weight)
        db = torch.zeros_like(bias) if need_bias else None
    if need_hidden:
        dh = dh.contiguous()
        dist.all_reduce(dh, group=group_by_name(group_name))
        dH = dh.to(hidden.dtype) if M == hidden.shape[0] else \
            torch.zeros_like(hidden).index_copy_(0, idx, dh.to(hidden.dtype))
    else:
        dH = empty
    return dH, dW if need_weight else empty.clone(), db.to(bias.dtype) if need_bias else empty.clone()


@_vp_logprobs_backward.register_fake
def _(grad_logps, hidden, weight, bias, targets, token_seq, lse, vocab_start, logit_softcap, backend, group_name,
      need_hidden, need_weight, need_bias):
    empty = hidden.new_empty(0)
    return (torch.empty_like(hidden) if need_hidden else empty,
            torch.empty_like(weight) if need_weight else empty.clone(),
            torch.empty_like(bias) if (need_bias and bias is not None) else empty.clone())


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, token_seq, _, vocab_start, logit_softcap, backend, group_name = inputs
    _, logit_sums, lse = output
    ctx.mark_non_differentiable(logit_sums, lse)
    ctx.save_for_backward(hidden, weight, bias, targets, token_seq, lse)
    ctx.args = (vocab_start, logit_softcap, backend, group_name)


def _backward(ctx, grad_logps, grad_logit_sums, grad_lse):
    refuse_double_backward("vocab-parallel linear_sequence_logprobs")
    hidden, weight, bias, targets, token_seq, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias is not None
    dH, dW, dB = torch.ops.dpo_fast.vocab_parallel_logprobs_backward(
        grad_logps, hidden, weight, bias, targets, token_seq, lse, *ctx.args, need_h, need_w, need_b)
    return (dH if need_h else None, dW if need_w else None, dB if need_b else None) + (None,) * 7


_vp_logprobs.register_autograd(_backward, setup_context=_setup_context)
