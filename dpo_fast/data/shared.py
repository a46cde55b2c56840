"""The prefix-sharing layout: each example's prompt is run once, its responses branch off it.

One example with prompt p (n tokens) and responses c_1..c_K becomes one tree:

    trunk      p[0 .. n-2]                         positions 0 .. n-2   sequence id -1 (scored by none)
    branch k   p[n-1] + c_k                        positions n-1 ..     sequence id (k-1)*B + b

The last prompt token starts every branch (it is repeated once per response: its logits score the
first completion token, and each branch scores a different one), so the per-token targets stay the
ordinary shifted labels inside each branch and the fused op's packed arguments (`sequence_ids`,
`num_sequences`) sum them per response, in the collator's order (chosen rows 0..B-1, rejected
B..2B-1). A token sees the earlier tokens of its own trunk and its own branch, never another branch
(`tree_attention_mask`), with the positions it has in the unshared row, so every scored token's
logits are those of the unshared layout.

An example whose responses do not start with the same prompt tokens (a chat template that differs
per response, a tokenizer merging across the boundary, given as full rows by the TRL drop-in) is
laid out unshared: one segment per response, nothing merged; the batch counts them in
`unshared_examples`.

Batch keys: `input_ids`, `labels` (-100 off the completions), `position_ids`, `sequence_ids`
(-1 on trunks and padding), all (R, T); `segment_ids` (R, T), the attention group of a token inside
its row (-1 on padding); `branch_ids` (R, T), 0 on trunks and unshared segments, k on branch k;
`num_sequences` = K*B, `unshared_examples`, `example_ids`, `num_responses`. Unpacked: one row per
example; packed: trees concatenated into one row (R = 1).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
LAYOUT_KEYS = ("segment_ids", "branch_ids")


def is_shared_layout(batch: dict) -> bool:
    return "branch_ids" in batch


def _pieces(responses: list[tuple[list[int], int]], b: int, B: int):
    """The segments of one example: lists of (tokens, positions, sequence id, branch, scored-from)."""
    K = len(responses)
    prompts = [tuple(tokens[:n]) for tokens, n in responses]
    if len(set(prompts)) != 1:  # unshared: each response its own segment, as the unshared layout has it
        return [[(list(tokens), list(range(len(tokens))), k * B + b, 0, n)]
                for k, (tokens, n) in enumerate(responses)], True
    n = len(prompts[0])
    split = max(n - 1, 0)
    tree = [(list(prompts[0][:split]), list(range(split)), -1, 0, split)] if split else []
    for k, (tokens, _) in enumerate(responses):
        branch = list(tokens[split:])
        tree.append((branch, list(range(split, split + len(branch))), k * B + b, k + 1, n - split))
    return [tree], False


def shared_layout(examples: list[list[tuple[list[int], int]]], pad_token_id: int, *, packing: bool = False,
                  label_pad_token_id: int = IGNORE_INDEX, pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """The layout of B examples, each a list of K (tokens, prompt length) responses (the full
    prompt + completion row of each and where its completion starts), chosen first."""
    if not examples:
        raise ValueError("shared_layout: empty batch")
    ks = {len(e) for e in examples}
    if len(ks) != 1 or min(ks) < 2:
        raise ValueError(f"shared_layout: every example needs the same number (>= 2) of responses; got {sorted(ks)}")
    K, B = ks.pop(), len(examples)
    rows: list[list[list]] = []  # per row: segments; per segment: pieces
    unshared = 0
    for b, responses in enumerate(examples):
        for tokens, n in responses:
            if not 0 <= n <= len(tokens):
                raise ValueError(f"shared_layout: example {b}: prompt length {n} outside its row of "
                                 f"{len(tokens)} tokens")
        segments, fell_back = _pieces(responses, b, B)
        unshared += fell_back
        if packing and rows:
            rows[0].extend(segments)
        else:
            rows.append(segments)
    lengths = [sum(len(p[0]) for seg in row for p in seg) for row in rows]
    T = max(lengths)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    R = len(rows)
    out = {"input_ids": torch.full((R, T), int(pad_token_id), dtype=torch.long),
           "labels": torch.full((R, T), label_pad_token_id, dtype=torch.long),
           "position_ids": torch.zeros((R, T), dtype=torch.long),
           "sequence_ids": torch.full((R, T), -1, dtype=torch.long),
           "segment_ids": torch.full((R, T), -1, dtype=torch.long),
           "branch_ids": torch.zeros((R, T), dtype=torch.long)}
    for r, row in enumerate(rows):
        pos = 0
        for s, segment in enumerate(row):
            for tokens, positions, seq, branch, scored_from in segment:
                L = len(tokens)
                span = slice(pos, pos + L)
                t = torch.tensor(tokens, dtype=torch.long)
                out["input_ids"][r, span] = t
                out["labels"][r, pos + scored_from:pos + L] = t[scored_from:]
                out["position_ids"][r, span] = torch.tensor(positions, dtype=torch.long)
                out["sequence_ids"][r, span] = seq
                out["segment_ids"][r, span] = s
                out["branch_ids"][r, span] = branch
                pos += L
    if unshared:
        logger.info("prefix sharing: %d of %d examples in this batch laid out unshared (their responses do not start "
                    "with the same prompt tokens)", unshared, B)
    out.update(num_sequences=K * B, unshared_examples=unshared, num_responses=K)
    return out


def tree_attention_mask(batch: dict, sliding_window: int | None = None) -> torch.Tensor:
    """(R, 1, T, T) bool, True where query t may attend to key s: same segment, s not after t, and s
    on the trunk or on t's own branch; with a sliding window, also within `sliding_window` positions
    (position ids, which follow the unshared row). Padding attends to itself only (no empty rows)."""
    seg, branch, pos = batch["segment_ids"], batch["branch_ids"], batch["position_ids"]
    T = seg.shape[1]
    idx = torch.arange(T, device=seg.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    allowed = causal & same & visible
    if sliding_window is not None:
        allowed &= (pos[:, :, None] - pos[:, None, :]) < sliding_window
    allowed |= (seg < 0)[:, :, None] & torch.eye(T, dtype=torch.bool, device=seg.device)[None]
    return allowed[:, None]


MASKED_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_attention(config) -> list[str]:
    """The attention kind of each layer: the config's `layer_types`, else every layer sliding when the
    config has a `sliding_window` (Mistral, Phi-3), else full."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    n = getattr(config, "num_hidden_layers", 1)
    return ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * n


def decoder_attention_mask(config, batch: dict, dtype: torch.dtype, device) -> torch.Tensor | dict:
    """The tree mask as a Hugging Face decoder takes it (a 4D mask is used as given): boolean for sdpa,
    additive (0 / dtype min) for eager; one tensor when every layer attends alike, else a dict per
    layer kind (Gemma 2/3, Qwen2 with sliding layers: their forward takes such a dict)."""
    kinds = sorted(set(layer_attention(config)))
    layout = {k: batch[k].to(device) for k in ("segment_ids", "branch_ids", "position_ids")}
    masks = {}
    for kind in kinds:
        window = getattr(config, "sliding_window", None) if kind == "sliding_attention" else None
        allowed = tree_attention_mask(layout, window)
        if getattr(config, "_attn_implementation", None) == "eager":
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed,
                                                                                         torch.finfo(dtype).min)
        masks[kind] = allowed
    return masks[kinds[0]] if len(kinds) == 1 else masks


def shared_from_features(features: list[dict], pad_token_id: int, **options) -> dict[str, Any]:
    """shared_layout of tokenized preference examples (prompt_input_ids + chosen/rejected or responses)."""
    if not features:
        raise ValueError("PreferenceCollator: empty batch")
    examples = []
    for f in features:
        prompt = list(f["prompt_input_ids"])
        completions = f["responses_input_ids"] if "responses_input_ids" in f else \
            [f["chosen_input_ids"], f["rejected_input_ids"]]
        examples.append([(prompt + list(c), len(prompt)) for c in completions])
    out = shared_layout(examples, pad_token_id, **options)
    out["example_ids"] = [f["example_id"] for f in features]
    return out


def shared_from_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                       pad_token_id: int, **options) -> dict[str, Any]:
    """shared_layout of a padded (2P, T) batch with chosen rows first (TRL's collator): each row's tokens
    are where attention_mask is 1 (left or right padding), its prompt what comes before the first
    completion token."""
    rows = []
    for ids, att, comp in zip(input_ids.tolist(), attention_mask.bool().tolist(), completion_mask.bool().tolist()):
        tokens = [t for t, a in zip(ids, att) if a]
        scored = [c for c, a in zip(comp, att) if a]
        rows.append((tokens, scored.index(True) if True in scored else len(tokens)))
    if len(rows) % 2:
        raise ValueError(f"shared_from_padded: {len(rows)} rows; pairs need chosen rows then rejected rows")
    P = len(rows) // 2
    return shared_layout([[rows[i], rows[P + i]] for i in range(P)], pad_token_id, **options)
