"""Canonical per-token targets (the shift, ignored tokens, packed sequences) and the input checks
shared by every public entry point.

Every kernel sees the same canonical form, so none of them knows about shifting or packing:
`targets[s, t]` is the vocabulary index scored by the logits row (s, t), -1 where that row
scores nothing, and -2 where the user gave a negative label that is not `ignore_index` (the
ops reject it with a clear error). `token_seq[s, t]` is the output sequence the row adds to.
All of this is O(tokens) tensor code: no host synchronisation, no branching on values.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

IGNORED = -1
INVALID_NEGATIVE = -2


class Targets(NamedTuple):
    targets: torch.Tensor  # (S, T) int64
    token_seq: torch.Tensor  # (S, T) int64, in [0, num_sequences)
    counts: torch.Tensor  # (num_sequences,) float32: scored tokens per sequence
    num_sequences: int


class Layout(NamedTuple):
    """Where the scored tokens are: labels equal to ignore_index score nothing; shift as in Hugging
    Face models; packed batches number their sequences (sequence_ids, num_sequences)."""
    ignore_index: int = -100
    shift: bool = True
    sequence_ids: Tensor | None = None
    num_sequences: int | None = None

    def targets(self, labels: Tensor):
        return prepare_targets(labels, **self._asdict())


def prepare_targets(
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> Targets:
    """Canonical targets for `labels` (S, T); see the module docstring.

    With `sequence_ids` (1, N) the batch is packed: each token belongs to the sequence its id
    names (-1 = padding) and the shift never crosses from one sequence into the next.
    """
    labels = labels.long()
    S, T = labels.shape
    ignored = labels == ignore_index
    canon = torch.where(ignored, IGNORED, torch.where(labels < 0, INVALID_NEGATIVE, labels))

    if sequence_ids is None:
        seq = torch.arange(S, device=labels.device).unsqueeze(1).expand(S, T)
        n_seq = S
        if shift:
            canon = torch.cat([canon[:, 1:], canon.new_full((S, 1), IGNORED)], dim=1)
    else:
        seq_ids = sequence_ids.long()
        n_seq = int(num_sequences)
        if shift:
            nxt_seq = torch.cat([seq_ids[:, 1:], seq_ids.new_full((S, 1), -1)], dim=1)
            nxt = torch.cat([canon[:, 1:], canon.new_full((S, 1), IGNORED)], dim=1)
            canon = torch.where((nxt_seq == seq_ids) & (seq_ids >= 0), nxt, IGNORED)
        else:
            canon = torch.where(seq_ids >= 0, canon, IGNORED)
        seq = seq_ids.clamp(min=0)

    scored = (canon != IGNORED).float()
    if sequence_ids is None:
        # A row sum, not an index_add over the expanded arange: inductor's CPU codegen fails on that.
        counts = scored.sum(1)
    else:
        # Clamped so that bad ids reach check_targets (inside the ops) rather than failing here.
        counts = scored.new_zeros(n_seq).index_add_(0, seq.clamp(max=n_seq - 1).reshape(-1), scored.reshape(-1))
    return Targets(canon.contiguous(), seq.contiguous(), counts, n_seq)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every kernel accumulates and returns per-token values in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sum_per_sequence(values: torch.Tensor, token_seq: torch.Tensor | None, num_sequences: int) -> torch.Tensor:
    """Sum per-token values into their sequences: a row sum when padded (token_seq None, values
    (S, T)), an index_add over token_seq when packed (any matching shapes)."""
    if token_seq is None:
        return values.sum(1)
    return values.new_zeros(num_sequences).index_add_(0, token_seq.reshape(-1), values.reshape(-1))


def check_targets(targets: torch.Tensor, vocab_size: int, token_seq: torch.Tensor | None = None,
                  num_sequences: int = 0) -> None:
    """Raise ValueError if a scored label is outside [0, vocab_size) or (packed batches) a
    sequence id is >= num_sequences. Called inside the ops: one host sync, no graph break."""
    bad = (targets < IGNORED) | (targets >= vocab_size)
    if token_seq is not None and bool((token_seq >= num_sequences).any()):
        raise ValueError(f"sequence_ids: values must be < num_sequences = {num_sequences} (or -1 for padding)")
    if bool(bad.any()):
        n = int(bad.sum())
        raise ValueError(
            f"labels: {n} scored label(s) outside [0, {vocab_size}) that are not ignore_index "
            f"(vocab size V = {vocab_size})"
        )


# ---------------------------------------------------------------- input checks


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


def check_linear_inputs(hidden, weight, labels, *, bias=None, logit_softcap=None, sequence_ids=None,
                        num_sequences=None, vocab_shard=False) -> None:
    """Shapes, dtypes and devices of a from-hidden-states call; raises ValueError naming the argument.
    vocab_shard: `weight` is one rank's rows of a vocab-parallel weight, which may be none."""
    check_float_batch(hidden, "hidden", "H", "the hidden size")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    H = hidden.shape[-1]
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H) as stored by nn.Linear, got shape {tuple(weight.shape)}")
    if weight.shape[1] != H:
        raise ValueError(f"weight must be (V, H) with H = hidden.shape[-1] = {H}, got shape "
                         f"{tuple(weight.shape)} (pass the lm_head weight as stored, not transposed)")
    if weight.shape[0] == 0 and not vocab_shard:
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
    check_softcap(logit_softcap)
    check_labels(labels, batch_shape=hidden.shape[:2], device=hidden.device,
                 sequence_ids=sequence_ids, num_sequences=num_sequences)


def check_softcap(logit_softcap) -> None:
    if logit_softcap is None:
        return
    if isinstance(logit_softcap, bool) or not isinstance(logit_softcap, (int, float)):
        raise ValueError(f"logit_softcap must be a positive float or None, got {logit_softcap!r}")
    if not (math.isfinite(logit_softcap) and logit_softcap > 0):
        raise ValueError(f"logit_softcap must be a positive finite float or None, got {logit_softcap!r}")


def check_form(logits, labels, hidden, weight, bias, logit_softcap) -> None:
    """One of the two input forms, whole (dpo_fast.loss and ranking_loss)."""
    if labels is None:
        raise ValueError("labels are required")
    if (logits is None) == (hidden is None):
        raise ValueError("give either logits=... or hidden=... with weight=..., not both or neither")
    if logits is not None and (weight is not None or bias is not None or logit_softcap is not None):
        raise ValueError("weight, bias and logit_softcap go with hidden=..., not with logits")
    if hidden is not None and weight is None:
        raise ValueError("hidden=... needs the lm_head weight=... (V, H)")
