"""`sequence_logprobs`: per-sequence log-probabilities from logits, without a float32 copy."""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .backends import resolve_backend
from .tokens import Targets, prepare_targets

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_labels(labels, *, batch_shape, device, sequence_ids=None, num_sequences=None) -> None:
    """Shape, dtype and device checks of labels (and the packed-batch arguments), shared by the
    from-logits and from-hidden-states entry points."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if tuple(labels.shape) != tuple(batch_shape):
        raise ValueError(f"labels must have shape {tuple(batch_shape)} (the batch and time dims of the "
                         f"inputs), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the inputs are on {device}")
    if (sequence_ids is None) != (num_sequences is None):
        raise ValueError("packed batches need both sequence_ids and num_sequences")
    if sequence_ids is not None:
        if batch_shape[0] != 1:
            raise ValueError(f"packed batches have batch size 1 (1, N, ...), got {batch_shape[0]}")
        if not isinstance(sequence_ids, Tensor) or sequence_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError("sequence_ids must be an int64 or int32 tensor")
        if tuple(sequence_ids.shape) != tuple(batch_shape) or sequence_ids.device != device:
            raise ValueError(f"sequence_ids must have shape {tuple(batch_shape)} on {device}, "
                             f"got {tuple(sequence_ids.shape)} on {sequence_ids.device}")
        if not isinstance(num_sequences, int) or num_sequences < 1:
            raise ValueError(f"num_sequences must be a positive int, got {num_sequences!r}")


def check_float_batch(t, name: str, last: str, last_meaning: str) -> None:
    """A float (S, T, last) batch (or (1, N, last) packed) with no empty dimension: the checks
    shared by logits (last = V) and hidden states (last = H)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be (S, T, {last}) (or (1, N, {last}) packed), got shape {tuple(t.shape)}")
    S, T, L = t.shape
    if S == 0 or T == 0:
        raise ValueError(f"{name}: empty batch (shape {tuple(t.shape)})")
    if L == 0:
        raise ValueError(f"{name}: {last_meaning} {last} is 0")


def check_logits(logits) -> None:
    check_float_batch(logits, "logits", "V", "the vocabulary dimension")


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
        logps = ops.InplaceSequenceLogprobs.apply(*args)[0]
    else:
        logps = torch.ops.dpo_fast.sequence_logprobs(*args)[0]
    if average:
        logps = logps / tg.counts.to(logps.dtype).clamp(min=1)
    return logps
