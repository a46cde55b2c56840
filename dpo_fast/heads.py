"""What lies between a causal LM's decoder and its logits, and a check that it is all of it.

`find_parts(model)` finds, from the module tree and the config, everything the fused op needs:

    logits = softcap(scale * (transform(decoder(x)) @ W[:vocab]^T + b[:vocab]))

- decoder: the submodule whose output's `last_hidden_state` feeds the head (get_decoder() when that is
  a module above the head, else the base model found by name);
- transform: modules on the head's side before the vocabulary Linear (BERT's dense -> activation ->
  LayerNorm, ModernBERT-decoder's prediction head); they run in PyTorch as part of the decoder side,
  so their parameters get gradients;
- softcap and scale under every config name transformers uses, read from the text config of a
  multimodal wrapper (`get_text_config()`); a scale multiplies the hidden states (and bias) first:
  s * (h W^T + b) = (s h) W^T + s b;
- vocab: the unpadded vocabulary when the model cuts its logits (inkling).

`check_parts(model, parts)` runs the fused path and the model's own forward on one probe batch (2 rows
of 6 tokens, deterministic, the model's dtype, no_grad, no copy of any weight) and refuses, naming the
class and the difference, a model whose per-token log-probs differ. What cannot be fused (one head per
codebook, n-gram streams, parameters of the head that are neither weight nor bias) is refused with the
reason before any work.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .functional import linear_sequence_logprobs


class ModelError(ValueError):
    """A model that cannot be used here; the message names the model and what to do."""


# model_type -> (config attribute, multiply or divide): the families that scale their logits. The same
# attribute name means opposite things in different families (HyperCLOVA X multiplies by logits_scaling,
# Granite divides), so the table is keyed by family; an unknown family with a scaling attribute that is
# not 1 is refused rather than guessed. None: the family has the attribute but its forward never reads it.
LOGIT_SCALES = {
    "cohere": ("logit_scale", "mul"), "cohere2": ("logit_scale", "mul"), "cohere2_moe": ("logit_scale", "mul"),
    "cohere_compass": ("logit_scale", "mul"), "cohere_compass_text": ("logit_scale", "mul"),
    "granite": ("logits_scaling", "div"), "granitemoe": ("logits_scaling", "div"),
    "granitemoeshared": ("logits_scaling", "div"), "granitemoehybrid": ("logits_scaling", "div"),
    "granite_swa": ("logits_scaling", "div"), "granitemoe_swa": ("logits_scaling", "div"),
    "minicpm3": ("logits_scaling", "div"), "hyperclovax": ("logits_scaling", "mul"),
    "falcon_h1": ("lm_head_multiplier", "mul"), "inkling_text": ("logits_mup_width_multiplier", "div"),
    "inkling": ("logits_mup_width_multiplier", "div"), "mpt": None,
}
SCALE_ATTRIBUTES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier",
                    "logits_mup_width_multiplier", "logit_multiplier", "logits_multiplier")
# the names of a final tanh soft-cap of the logits, as transformers' configs spell them
SOFTCAP_ATTRIBUTES = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
VOCAB_CUT_ATTRIBUTES = ("unpadded_vocab_size",)


@dataclass
class LMHead:
    """What the fused op needs from a causal LM: logits = softcap(scale * (decoder(x) @ W^T + b)),
    with W and b the first `vocab` rows of the head (all of them when vocab is None), each row scaled
    by the head's learned per-token scale where it has one (Dory: a weight-sized product per call)."""

    decoder: nn.Module
    head: nn.Module
    softcap: float | None
    scale: float
    vocab: int | None = None

    @property
    def weight(self) -> Tensor:
        weight = self.head.weight
        rows = per_token_scale(self.head)
        if rows is not None:
            weight = weight * rows.to(weight.dtype).unsqueeze(1)
        return weight if self.vocab is None else weight[:self.vocab]

    @property
    def bias(self) -> Tensor | None:
        bias = getattr(self.head, "bias", None)
        rows = per_token_scale(self.head) if bias is not None else None
        if rows is not None:
            bias = bias * rows.to(bias.dtype)
        return bias if bias is None or self.vocab is None else bias[:self.vocab]

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def scaled(self, hidden: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """hidden and bias with the logit scale applied (the op then gives the model's logits)."""
        if self.scale == 1.0:
            return hidden, bias
        return hidden * self.scale, None if bias is None else bias * self.scale


class TransformedDecoder(nn.Module):
    """A decoder followed by the head's transform: called like the decoder, its `last_hidden_state` is
    what the model's vocabulary Linear takes in."""

    def __init__(self, decoder: nn.Module, transform: list[nn.Module]):
        super().__init__()
        self.decoder = decoder
        self.transform = nn.ModuleList(transform)

    def forward(self, **kwargs):
        hidden = self.decoder(**kwargs).last_hidden_state
        for module in self.transform:
            hidden = module(hidden)
            if isinstance(hidden, tuple) and len(hidden) == 1:  # a head that returns (logits,) (XLM)
                hidden = hidden[0]
        return types.SimpleNamespace(last_hidden_state=hidden)


def text_configs(config) -> list:
    """The config, then its text config where a multimodal wrapper has one."""
    configs = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        configs.append(text)
    return configs


def logit_scale(config) -> float:
    """The family's logit multiplier (1.0 for most); ModelError for an unknown scaling family."""
    for conf in reversed(text_configs(config)):  # the text config's family decides where there is one
        model_type = getattr(conf, "model_type", "")
        if model_type in LOGIT_SCALES:
            if LOGIT_SCALES[model_type] is None:
                return 1.0
            attr, how = LOGIT_SCALES[model_type]
            value = getattr(conf, attr, None)
            if value is None:
                return 1.0
            return float(value) if how == "mul" else 1.0 / float(value)
    for conf in text_configs(config):
        for attr in SCALE_ATTRIBUTES:
            value = getattr(conf, attr, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (1, 1.0):
                raise ModelError(f"{getattr(conf, 'model_type', '') or 'this model'} scales its logits ({attr}="
                                 f"{value}) in a way dpo_fast does not know; add the family to "
                                 "dpo_fast.heads.LOGIT_SCALES")
    return 1.0


def config_value(config, names) -> float | None:
    for conf in text_configs(config):
        for attr in names:
            value = getattr(conf, attr, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
                return value
    return None


def refuse_unfusable(name: str, model: nn.Module, head) -> None:
    """Refuse, with the reason, the heads that are no single vocabulary Linear after the decoder."""
    config = getattr(model, "config", None)
    if "MaskedLM" in type(model).__name__:
        raise ModelError(f"{name} is a masked LM, not a causal LM (it predicts masked tokens from both sides); a "
                         "causal LM is needed, e.g. one loaded with AutoModelForCausalLM")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{name} is an encoder-decoder model, not a causal LM (its decoder needs encoder "
                         "outputs); a decoder-only causal LM is needed")
    if isinstance(head, (nn.ModuleList, list, tuple)):
        raise ModelError(f"{name} has one output head per codebook (get_output_embeddings() is a list); "
                         "dpo_fast fuses a single lm_head over one token stream")
    if isinstance(config_value(config, ("ngram",)), int) and config_value(config, ("ngram",)) > 1:
        raise ModelError(f"{name} predicts from n-gram streams (ngram={config_value(config, ('ngram',))}), not from "
                         "the decoder's last_hidden_state; dpo_fast fuses a single next-token stream")
    extra = sorted(n for n, _ in head.named_parameters() if n not in ("weight", "bias"))
    if extra and per_token_scale(head) is None:
        raise ModelError(f"{name}'s lm_head ({type(head).__name__}) has parameters other than weight and bias "
                         f"({', '.join(extra)}) that the fused op cannot apply; a plain Linear head is needed")


def per_token_scale(head: nn.Module) -> Tensor | None:
    """The learned per-token logit scale of a head whose logits are (h W^T + b) * logit_scale *
    logit_scale_factor (Dory), as a (vocab,) tensor; None for any other head."""
    scale, weight = getattr(head, "logit_scale", None), getattr(head, "weight", None)
    extra = [n for n, _ in head.named_parameters() if n not in ("weight", "bias")]
    if extra != ["logit_scale"] or not isinstance(getattr(head, "logit_scale_factor", None), (int, float)) \
            or not isinstance(weight, Tensor) or scale.shape != weight.shape[:1]:
        return None
    return scale * head.logit_scale_factor


def module_path(root: nn.Module, target: nn.Module) -> list[nn.Module] | None:
    """The modules from root down to target (both included), or None when target is not inside root."""
    for name, module in root.named_modules(remove_duplicate=False):
        if module is target:
            path, here = [root], root
            for part in filter(None, name.split(".")):
                here = getattr(here, part)
                path.append(here)
            return path
    return None


def contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def find_decoder(name: str, model: nn.Module, head: nn.Module) -> nn.Module:
    """The submodule whose last_hidden_state feeds the head: get_decoder() when it is a module apart
    from the head (ModernBERT-decoder's get_decoder() is its vocabulary Linear), else the base model."""
    candidates = [model.get_decoder() if hasattr(model, "get_decoder") else None]
    candidates += [getattr(model, attr, None) for attr in
                   (getattr(model, "base_model_prefix", ""), "model", "transformer", "backbone", "language_model")]
    for module in candidates:
        if isinstance(module, nn.Module) and module is not model and not contains(module, head) \
                and not isinstance(module, (nn.Linear, nn.Embedding)):
            return module
    raise ModelError(f"{name}: cannot find its decoder (get_decoder(), or a base model apart from the lm_head) "
                     "to get the final hidden states")


def without(module: nn.Module, path: list[nn.Module]) -> nn.Module:
    """A shallow clone of module in which the last module of path (a descendant) is the identity: the
    clone shares every parameter with the original (their gradients land there), the model is unchanged."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    child = path[0]
    name = next(n for n, m in module._modules.items() if m is child)
    clone._modules[name] = nn.Identity() if len(path) == 1 else without(child, path[1:])
    return clone


def head_transform(model: nn.Module, decoder: nn.Module, head: nn.Module) -> list[nn.Module]:
    """What the model applies to the decoder's hidden states before its vocabulary Linear:
    - the head module the Linear sits in (BERT's cls, RoBERTa's lm_head: dense -> activation ->
      LayerNorm -> Linear), run with the Linear as the identity;
    - else the modules with parameters beside the Linear that neither are nor hold the decoder
      (ModernBERT-decoder's lm_head before its `decoder` Linear), in the order they were registered.
    The probe check (check_parts) verifies the guess."""
    path = module_path(model, head) or [model, head]
    top = max(i for i, m in enumerate(path) if contains(m, decoder))  # the last module holding both
    if path[top + 1] is not head:
        return [without(path[top + 1], path[top + 2:])]
    return [child for child in path[top].children()
            if child is not head and not contains(child, decoder) and not contains(decoder, child)
            and any(True for _ in child.parameters())]


def find_parts(model: nn.Module, name: str | None = None) -> LMHead:
    """The decoder (with the head's transform), the lm_head and the logit transform of a causal LM
    (unwrapped), or a ModelError naming the class and why."""
    name = name or type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        refuse_unfusable(name, model, head)
    weight = getattr(head, "weight", None)
    if head is None or not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ModelError(f"{name} has no lm_head (get_output_embeddings() gives no (vocab, hidden) weight): "
                         "a causal LM whose logits are hidden_states @ lm_head.weight.T is needed, e.g. one "
                         "loaded with AutoModelForCausalLM")
    decoder = find_decoder(name, model, head)
    transform = head_transform(model, decoder, head)
    if transform:
        decoder = TransformedDecoder(decoder, transform)
    config = getattr(model, "config", None)
    softcap = config_value(config, SOFTCAP_ATTRIBUTES)
    vocab = config_value(config, VOCAB_CUT_ATTRIBUTES)
    vocab = int(vocab) if vocab and vocab < weight.shape[0] else None
    return LMHead(decoder, head, float(softcap) if softcap else None, logit_scale(config), vocab)


# ----------------------------------------------------------------------------------------------
# The self-check on a probe batch

PROBE_ROWS, PROBE_TOKENS, PROBE_PAD = 2, 6, 2
VERDICT = "dpo_fast_head_check"  # attribute of a checked model: "passed" or "skipped" (checked once per model)


def probe_batch(model: nn.Module, parts: LMHead, device) -> dict:
    """2 rows of 6 token ids (fixed seed, ids valid for both embedding and head), the second row
    right-padded by 2: input_ids, attention_mask, labels (-100 on padding)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(getattr(embeddings, "weight", None), "shape", (parts.vocab_size,))[0]
    vocab = min(rows, parts.vocab_size)
    ids = torch.randint(0, vocab, (PROBE_ROWS, PROBE_TOKENS), generator=torch.Generator().manual_seed(1234))
    mask = torch.ones_like(ids)
    mask[-1, -PROBE_PAD:] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": ids.masked_fill(mask == 0, -100).to(device)}


def fused_token_logps(parts: LMHead, batch: dict) -> Tensor:
    """Per-token log-probs of the probe's labels through the fused path (each scored token its own
    sequence of the packed op), float64, flattened over the scored positions."""
    hidden = parts.decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).last_hidden_state
    hidden, bias = parts.scaled(hidden, parts.bias)
    weight = parts.weight
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    n = int(scored.sum())
    hidden = hidden[:, :-1][scored].unsqueeze(0)
    logps = linear_sequence_logprobs(hidden.to(weight.dtype), weight, labels[scored].unsqueeze(0),
                                     bias=None if bias is None else bias.to(weight.dtype),
                                     logit_softcap=parts.softcap, shift=False,
                                     sequence_ids=torch.arange(n, device=hidden.device).unsqueeze(0), num_sequences=n)
    return logps.double()


def own_token_logps(model: nn.Module, batch: dict) -> tuple[Tensor, float]:
    """Per-token log-probs from the model's own forward (its logits, log_softmax in float64) and the
    largest logit magnitude (what the tolerance scales with)."""
    # the class's forward: an instance-level replacement (TRL's fused-head forward, accelerate's autocast
    # wrapper) is not what the model's head computes
    logits = type(model).forward(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).logits
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    logits = logits[:, :-1][scored].double()
    logps = logits.log_softmax(-1).gather(-1, labels[scored].unsqueeze(-1)).squeeze(-1)
    return logps, float(logits.abs().max())


def tolerance(dtype: torch.dtype, largest_logit: float) -> float:
    """How far per-token log-probs of the fused path may be from the model's own: the rounding of
    logits of this size in this dtype (the model's forward rounds them, the op accumulates in float32),
    and at least the float32 floor."""
    if dtype == torch.float64:
        return 1e-6
    floor = 2e-3 if dtype == torch.float32 else 3e-2
    return max(floor, 8 * torch.finfo(dtype).eps * (1.0 + largest_logit))


def check_parts(model: nn.Module, parts: LMHead, name: str | None = None) -> float:
    """Compare the fused path with the model's own forward on the probe batch; ModelError naming the
    class and the difference when they disagree. Returns the largest per-token difference (nats)."""
    name = name or type(model).__name__
    weight = parts.weight
    was = model.training
    model.eval()
    try:
        # the probe compares the head in the model's own dtype: an autocast region around the caller
        # (TRL's bf16) would run the two paths at different precisions
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            batch = probe_batch(model, parts, weight.device)
            own, largest = own_token_logps(model, batch)
            mine = fused_token_logps(parts, batch)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the probe is a refusal that names it
        raise ModelError(f"{name}: the lm_head self-check could not run ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); pass check_head=False / --skip-head-check to "
                         "use the model unchecked") from e
    finally:
        model.train(was)
    if own.shape != mine.shape:
        raise ModelError(f"{name}: its forward scores {own.numel()} probe tokens, the fused path {mine.numel()}")
    diff = float((own - mine).abs().max()) if own.numel() else 0.0
    tol = tolerance(weight.dtype, largest)
    if not diff <= tol:  # NaN disagrees too
        raise ModelError(f"{name}: the fused lm_head path disagrees with the model's own logits on a probe batch "
                         f"(per-token log-probs differ by up to {diff:.3g} nats, tolerance {tol:.2g} in "
                         f"{str(weight.dtype).removeprefix('torch.')}); its head does something dpo_fast does not "
                         "know. Refused rather than trained wrongly (check_head=False / --skip-head-check to "
                         "override)")
    return diff


def verified_parts(model: nn.Module, *, check: bool = True, name: str | None = None) -> LMHead:
    """find_parts, then the probe check once per model (the verdict is kept on the model: later calls
    on it, e.g. once per training step, do not probe again). check=False records the model as
    'skipped' (the user's explicit opt-out) and never probes it."""
    parts = find_parts(model, name)
    verdict = getattr(model, VERDICT, None)
    if verdict is None:
        if check:
            check_parts(model, parts, name)
        object.__setattr__(model, VERDICT, "passed" if check else "skipped")
    return parts
