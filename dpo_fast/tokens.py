"""Turn user labels into per-token targets: the shift, ignored tokens and packed sequences.

Every kernel sees the same canonical form, so none of them knows about shifting or packing:
`targets[s, t]` is the vocabulary index scored by the logits row (s, t), -1 where that row
scores nothing, and -2 where the user gave a negative label that is not `ignore_index` (the
ops reject it with a clear error). `token_seq[s, t]` is the output sequence the row adds to.
All of this is O(tokens) tensor code: no host synchronisation, no branching on values.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

IGNORED = -1
INVALID_NEGATIVE = -2


class Targets(NamedTuple):
    targets: torch.Tensor  # (S, T) int64
    token_seq: torch.Tensor  # (S, T) int64, in [0, num_sequences)
    counts: torch.Tensor  # (num_sequences,) float32: scored tokens per sequence
    num_sequences: int


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
    counts = torch.zeros(n_seq, dtype=torch.float32, device=labels.device)
    # Clamped so that bad ids reach check_targets (inside the ops) rather than failing here.
    counts.index_add_(0, seq.clamp(max=n_seq - 1).reshape(-1), scored.reshape(-1))
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
