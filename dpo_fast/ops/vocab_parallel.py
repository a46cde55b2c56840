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
  backward: ops.linear's linear_logprobs_backward with the shard's vocab_start and group_name
                                     (d hidden summed over the group, d weight rows, d bias rows)
Inputs are assumed checked and the same on every rank (dpo_fast.tensor_parallel does that).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..targets import acc_dtype
from .double_backward import refuse_double_backward
from .linear import group_by_name, lm_head_backward, per_sequence, row_stats, save_for_lm_head_backward


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


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, token_seq, _, vocab_start, logit_softcap, backend, group_name = inputs
    save_for_lm_head_backward(ctx, hidden, weight, bias, targets, token_seq, output, logit_softcap, backend,
                              vocab_start, group_name)


def _backward(ctx, grad_logps, grad_logit_sums, grad_lse):
    refuse_double_backward("vocab-parallel linear_sequence_logprobs")
    return lm_head_backward(ctx, grad_logps, 10)


_vp_logprobs.register_autograd(_backward, setup_context=_setup_context)
