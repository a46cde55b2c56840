"""The public per-sequence log-prob functions, over both op families.

  sequence_logprobs         from logits (S, T, V), without a float32 copy of them
  linear_sequence_logprobs  from hidden states and the lm_head weight: logits never exist
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops, tensor_parallel
from .backends import resolve_backend
from .targets import Targets, check_labels, check_linear_inputs, check_logits, check_softcap, prepare_targets


def prepare_logits_call(logits, labels, *, ignore_index, shift, sequence_ids, num_sequences, backend):
    """Checks, canonical targets and the concrete backend for a from-logits call."""
    check_logits(logits)
    check_labels(labels, batch_shape=logits.shape[:2], device=logits.device,
                 sequence_ids=sequence_ids, num_sequences=num_sequences)
    if logits.stride(2) != 1:
        # Rare (a transposed vocab axis); the kernels need unit vocab stride.
        logits = logits.contiguous()
    tg = prepare_targets(labels, ignore_index=ignore_index, shift=shift,
                         sequence_ids=sequence_ids, num_sequences=num_sequences)
    return logits, tg, resolve_backend(backend, logits.device)


def packed_token_seq(tg: Targets, sequence_ids) -> Tensor | None:
    """The ops take token_seq only for packed batches (padded ones sum rows)."""
    return tg.token_seq if sequence_ids is not None else None


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Sum over each sequence's scored tokens of log_softmax(logits)[label], shape (S,).

    logits (S, T, V) float32/bfloat16/float16/float64; any batch and time strides are read in
    place. labels (S, T) int64/int32. Hugging Face convention: with shift=True the logits at
    position t score the label at t + 1. Labels equal to ignore_index score nothing.
    average=True divides by the number of scored tokens (0 tokens gives 0).
    Packed batches: logits (1, N, V), sequence_ids (1, N) (the sequence of each token, -1 for
    padding) and num_sequences; the shift never crosses a sequence boundary.
    inplace_backward=True writes the gradient into the logits' own storage during backward
    (the caller gives the logits up; eager mode only, a compiled graph uses a new buffer).
    Returns float32 (float64 for float64 logits). Only one float per token is kept for backward.
    """
    logits, tg, backend = prepare_logits_call(logits, labels, ignore_index=ignore_index, shift=shift,
                                              sequence_ids=sequence_ids, num_sequences=num_sequences,
                                              backend=backend)
    token_seq = packed_token_seq(tg, sequence_ids)
    args = (logits, tg.targets, token_seq, tg.num_sequences, backend)
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        logps = ops.logprobs.InplaceSequenceLogprobs.apply(*args)[0]
    else:
        logps = torch.ops.dpo_fast.sequence_logprobs(*args)[0]
    if average:
        logps = logps / tg.counts.to(logps.dtype).clamp(min=1)
    return logps


def linear_logprobs_with_stats(hidden: Tensor, weight: Tensor, targets: Tensor, token_seq: Tensor,
                               num_sequences: int, *, bias: Tensor | None = None,
                               logit_softcap: float | None = None, backend: str = "auto"):
    """(logps, logit_sums), both (num_sequences,), from canonical targets (dpo_fast.targets).

    logps: sum over each sequence's scored tokens of log_softmax(hidden @ weight.T + bias)[target]
    (soft-capped logits if logit_softcap), float32 (float64 for float64 inputs), differentiable
    w.r.t. hidden, weight and bias. logit_sums: float32, no gradient, the sum over scored tokens of
    the sum over the vocabulary of the (capped) logits, accumulated in the same forward pass.
    Inputs are assumed checked (check_linear_inputs); labels are range-checked inside the op.
    """
    check_softcap(logit_softcap)
    backend = resolve_backend(backend, hidden.device)
    H = hidden.shape[-1]
    cap = None if logit_softcap is None else float(logit_softcap)
    logps, logit_sums, _ = torch.ops.dpo_fast.linear_logprobs(
        hidden.reshape(-1, H), weight, bias, targets.reshape(-1), token_seq.reshape(-1), num_sequences, cap,
        backend)
    return logps, logit_sums.detach()


def hidden_logprobs(hidden, weight, bias, logit_softcap, labels, prepare, *, sequence_ids, num_sequences,
                    backend) -> tuple[tuple, int, Tensor, Tensor]:
    """(prepare(), V, logps, logit_sums) of a hidden-state loss (dpo_fast.loss, ranking_loss):
    per-sequence log-probs (differentiable) through the fused lm_head op, vocabulary-sharded or
    not; prepare() -> (targets, ...) runs after the input checks (on every rank alike when sharded)."""
    if tensor_parallel.is_sharded(weight):  # checks and prepare() agreed on by every rank first
        return tensor_parallel.sharded_logprobs(hidden, weight, bias, labels, prepare, logit_softcap=logit_softcap,
                                                sequence_ids=sequence_ids, num_sequences=num_sequences,
                                                backend=backend)
    check_linear_inputs(hidden, weight, labels, bias=bias, logit_softcap=logit_softcap,
                        sequence_ids=sequence_ids, num_sequences=num_sequences)
    prepared = prepare()
    tg = prepared[0]
    logps, logit_sums = linear_logprobs_with_stats(hidden, weight, tg.targets, tg.token_seq, tg.num_sequences,
                                                   bias=bias, logit_softcap=logit_softcap, backend=backend)
    return prepared, weight.shape[0], logps, logit_sums


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
    and bias. backend: as for sequence_logprobs (dpo_fast.available_backends)
    Tensor parallelism: weight (and bias) a DTensor placed Shard(0), or a dpo_fast.VocabShard;
    hidden the same plain tensor on every rank (dpo_fast.tensor_parallel).
    """
    def prepare():
        return (prepare_targets(labels, ignore_index=ignore_index, shift=shift,
                                sequence_ids=sequence_ids, num_sequences=num_sequences),)

    (tg,), _, logps, _ = hidden_logprobs(hidden, weight, bias, logit_softcap, labels, prepare,
                                         sequence_ids=sequence_ids, num_sequences=num_sequences, backend=backend)
    if average:
        logps = logps / tg.counts.to(logps.dtype).clamp(min=1)
    return logps
