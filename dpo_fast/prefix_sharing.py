"""Prefix sharing on a loaded model: whether its family gives the shared layout's log-probs exactly,
decided once per model by a probe, and refused with the reason otherwise.

    check_prefix_sharing(model)          # PrefixSharingError naming the reason, or None
    collator = PreferenceCollator(pad_id, prefix_sharing=True)
    logps = hf.sequence_logps(hf.lm_head_parts(model), collator(features))

The layout and its tree mask are dpo_fast.data.shared; the model runs it through hf.final_hidden
with a 4D mask, which transformers' masking utilities pass to the attention as given (eager and
sdpa). What cannot work is refused before the probe: flash-attention (its varlen kernel takes
sequence boundaries, not a tree), flex attention (no block mask is built here), layers that are
not masked attention (recurrent / state-space / chunked-attention layers). The probe then runs
random pairs, with prompts longer than a short sliding window, through the unshared padded layout
and the shared layout (unpacked and packed) and compares the per-sequence log-probs: a family that
builds its own mask or ignores the given one fails it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import hf
from .data import PreferenceCollator
from .data.shared import MASKED_LAYER_TYPES, layer_attention

logger = logging.getLogger(__name__)

MASK_ATTENTION = ("eager", "sdpa")
REFUSED_ATTENTION = {
    "flash_attention_2": "flash-attention's varlen kernel takes sequence boundaries, not the tree mask prefix "
                         "sharing needs; load the model with attn_implementation='sdpa'",
    "flash_attention_3": "flash-attention's varlen kernel takes sequence boundaries, not the tree mask prefix "
                         "sharing needs; load the model with attn_implementation='sdpa'",
    "flex_attention": "no flex-attention block mask is built for the shared layout; load the model with "
                      "attn_implementation='sdpa'",
}
PROBE_LONG_WINDOW = 64  # sliding windows up to this are crossed by the probe's prompts
_CHECKED = "_dpo_fast_prefix_sharing"


class PrefixSharingError(hf.ModelError):
    """Prefix sharing cannot give this model's log-probs exactly; the message says why."""


def refusal(model: nn.Module) -> str | None:
    """Why the model's family cannot run the shared layout (from its config), or None."""
    config = hf.unwrap(model).config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl in REFUSED_ATTENTION:
        return f"attention implementation {impl}: {REFUSED_ATTENTION[impl]}"
    if impl not in MASK_ATTENTION:
        return (f"attention implementation {impl}: not known to take a custom 4D mask (prefix sharing runs with "
                f"{' or '.join(MASK_ATTENTION)})")
    other = sorted(set(layer_attention(config)) - set(MASKED_LAYER_TYPES))
    if other:
        return (f"layers of kind {', '.join(other)}: not attention under a mask (recurrent, state-space or chunked "
                "layers), so a shared prompt would be a state copy, not a mask")
    return None


def _probe_features(vocab_size: int, window: int | None, seed: int = 0) -> list[dict]:
    """Three random pairs: prompt of 1 token, a prompt past a short sliding window, no prompt."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(0, vocab_size, (n,), generator=g).tolist()

    long_prompt = window + 3 if window is not None and window <= PROBE_LONG_WINDOW else 9
    shapes = [(1, 4, 6), (long_prompt, 5, 3), (0, 3, 4)]
    return [{"example_id": str(i), "prompt_input_ids": ids(p), "chosen_input_ids": ids(c),
             "rejected_input_ids": ids(r)} for i, (p, c, r) in enumerate(shapes)]


def probe_difference(model: nn.Module, pad_token_id: int = 0) -> float:
    """Largest |log-prob difference| between the unshared and shared layouts on the probe pairs,
    relative to the tolerance of the model's dtype (> 1 fails)."""
    head = hf.lm_head_parts(model)
    config = hf.unwrap(model).config
    windows = [getattr(config, "sliding_window", None)] if "sliding_attention" in layer_attention(config) else []
    features = _probe_features(head.vocab_size, windows[0] if windows else None)
    with torch.no_grad(), hf.eval_mode(model):
        plain = hf.sequence_logps(head, PreferenceCollator(pad_token_id)(features))
        worst = 0.0
        for packing in (False, True):
            shared = hf.sequence_logps(head, PreferenceCollator(pad_token_id, packing, prefix_sharing=True)(features))
            worst = max(worst, float((shared - plain).abs().max()))
    dtype = head.weight.dtype
    tolerance = 1e-3 if dtype in (torch.float32, torch.float64) else 0.1
    return worst / tolerance


def check_prefix_sharing(model: nn.Module) -> None:
    """Refuse (PrefixSharingError with the reason) a model whose shared-layout log-probs are not its
    unshared ones; the verdict is kept on the model, so the probe runs once."""
    lm = hf.unwrap(model)
    verdict = getattr(lm, _CHECKED, None)
    if verdict is None:
        family = getattr(lm.config, "model_type", type(lm).__name__)
        verdict = refusal(lm)
        if verdict is None:
            try:
                ratio = probe_difference(lm)
            except (TypeError, ValueError, RuntimeError, KeyError) as e:
                verdict = f"its forward does not take the tree mask ({type(e).__name__}: {str(e).splitlines()[0]})"
            else:
                if not ratio <= 1.0:
                    verdict = ("its log-probs in the shared layout differ from the unshared ones (it builds its own "
                               "mask or ignores the given one)")
        verdict = f"prefix sharing refused for the {family} family: {verdict}" if verdict else ""
        setattr(lm, _CHECKED, verdict)
        if not verdict:
            logger.info("prefix sharing: the %s family's shared-layout log-probs equal the unshared ones", family)
    if verdict:
        raise PrefixSharingError(verdict)
