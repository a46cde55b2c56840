"""Batching tokenized preference examples: padded or packed, pairs or rankings."""

from __future__ import annotations

from typing import Any

import torch

from .shared import IGNORE_INDEX, shared_from_features

def _rows(features: list[dict]) -> tuple[list[list[int]], list[int], int]:
    """(token rows, prompt lengths, K) with rows ordered response-major: row k*B + b."""
    if not features:
        raise ValueError("PreferenceCollator: empty batch")
    if "responses_input_ids" in features[0]:
        ks = {len(f["responses_input_ids"]) for f in features}
        if len(ks) != 1:
            raise ValueError(f"PreferenceCollator: ranked examples in one batch must have the same number "
                             f"of responses; got {sorted(ks)}")
        K = ks.pop()
        comps = [[list(f["responses_input_ids"][k]) for f in features] for k in range(K)]
    else:
        K = 2
        comps = [[list(f["chosen_input_ids"]) for f in features], [list(f["rejected_input_ids"]) for f in features]]
    prompts = [list(f["prompt_input_ids"]) for f in features]
    rows, plens = [], []
    for k in range(K):
        for p, c in zip(prompts, comps[k]):
            rows.append(p + c)
            plens.append(len(p))
    return rows, plens, K


class PreferenceCollator:
    """Batches tokenized preference examples (the output of `tokenize_preferences`).

    Layout: row k * B + b holds prompt + completion k of example b, so for pairs the B chosen
    rows come first, then the B rejected rows (what `dpo_fast.loss` takes); for ranked data
    with K responses, `logps.view(K, B).T` is the (B, K) best-first matrix of
    `plackett_luce_loss`. All examples of a ranked batch must have the same K.

    Padded (default): `input_ids`, `attention_mask`, `labels` (K*B, T), right-padded with
    `pad_token_id`; labels are -100 on the prompt and the padding.
    Packed (`packing=True`): every row concatenated into `input_ids`, `labels`,
    `position_ids` (restarting at 0 for each row) and `sequence_ids` (the row index, -1 on the
    padding up to `pad_to_multiple_of`), all (1, N), plus `num_sequences` = K*B. No attention
    mask: Hugging Face models find the sequence boundaries from `position_ids` when called with
    `attention_mask=None` and `use_cache=False`.
    Both modes add `example_ids` (list of B str) and `num_responses` (K).
    Prefix sharing (`prefix_sharing=True`): each example's prompt once, its responses branching off
    it (dpo_fast.data.shared; packed or one row per example); the model runs it with the tree
    attention mask (dpo_fast.prefix_sharing).
    """

    def __init__(self, pad_token_id: int, packing: bool = False, *, label_pad_token_id: int = IGNORE_INDEX,
                 pad_to_multiple_of: int | None = None, prefix_sharing: bool = False):
        if pad_token_id is None:
            raise ValueError("pad_token_id: the tokenizer has no pad token; set one (e.g. the eos token)")
        self.pad_token_id = int(pad_token_id)
        self.packing = packing
        self.prefix_sharing = prefix_sharing
        self.label_pad_token_id = label_pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def _padded_length(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else -(-n // m) * m

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        if self.prefix_sharing:
            return shared_from_features(features, self.pad_token_id, packing=self.packing,
                                        label_pad_token_id=self.label_pad_token_id,
                                        pad_to_multiple_of=self.pad_to_multiple_of)
        rows, plens, K = _rows(features)
        out: dict[str, Any] = {"example_ids": [f["example_id"] for f in features], "num_responses": K}
        ign = self.label_pad_token_id
        if not self.packing:
            T = self._padded_length(max(len(r) for r in rows))
            R = len(rows)
            input_ids = torch.full((R, T), self.pad_token_id, dtype=torch.long)
            attention = torch.zeros((R, T), dtype=torch.long)
            labels = torch.full((R, T), ign, dtype=torch.long)
            for i, (r, p) in enumerate(zip(rows, plens)):
                t = torch.tensor(r, dtype=torch.long)
                input_ids[i, :len(r)] = t
                attention[i, :len(r)] = 1
                labels[i, p:len(r)] = t[p:]
            out.update(input_ids=input_ids, attention_mask=attention, labels=labels)
            return out
        n = sum(len(r) for r in rows)
        N = self._padded_length(n)
        input_ids = torch.full((1, N), self.pad_token_id, dtype=torch.long)
        labels = torch.full((1, N), ign, dtype=torch.long)
        position_ids = torch.zeros((1, N), dtype=torch.long)
        sequence_ids = torch.full((1, N), -1, dtype=torch.long)
        pos = 0
        for i, (r, p) in enumerate(zip(rows, plens)):
            L = len(r)
            t = torch.tensor(r, dtype=torch.long)
            input_ids[0, pos:pos + L] = t
            labels[0, pos + p:pos + L] = t[p:]
            position_ids[0, pos:pos + L] = torch.arange(L)
            sequence_ids[0, pos:pos + L] = i
            pos += L
        out.update(input_ids=input_ids, labels=labels, position_ids=position_ids, sequence_ids=sequence_ids,
                   num_sequences=len(rows))
        return out


def batch_completion_tokens(batch: dict) -> Any:
    """Scored completion tokens per row of a collated batch (labels after the shift), shape (rows,) int64."""
    labels = batch["labels"]
    if "sequence_ids" in batch:  # scored when the token before it is of the same sequence (the shift)
        seq, labels = batch["sequence_ids"].reshape(-1), labels.reshape(-1)
        follows = torch.cat([seq.new_zeros(1, dtype=torch.bool), seq[1:] == seq[:-1]])
        scored = (labels != IGNORE_INDEX) & (seq >= 0) & follows
        return torch.bincount(seq[scored], minlength=batch["num_sequences"])
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)
