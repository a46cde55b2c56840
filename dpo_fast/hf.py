"""The one runner of Hugging Face causal LMs: load a model, find what the fused op needs, and get
per-sequence log-probs of a collated batch without ever building logits.

    model = load_causal_lm("path/to/model", device="cpu")      # clear errors, attention chosen here
    head = lm_head_parts(model)                                   # decoder, lm_head, softcap, scale
    logps = sequence_logps(head, batch, backend="auto")          # (rows,) float32, fused op

The policy loss, the on-the-fly reference, precompute-ref, evaluation, the TRL integration and the
demo all go through `final_hidden` + `lm_head_parts`; nothing calls the model's own forward for
logits. Logit transforms: a final soft-cap (Gemma 2) is passed to the op; a family's logit scale
(Cohere, Granite, Falcon-H1, ...) multiplies the hidden states (and bias) first, which is the same
logits: s * (h W^T + b) = (s h) W^T + s b.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .data.shared import decoder_attention_mask, is_shared_layout

logger = logging.getLogger(__name__)

_HEAD_ARCHITECTURES = ("CausalLM", "LMHead", "ForConditionalGeneration")

# model_type -> (config attribute, multiply or divide): the families that scale their logits.
# The same attribute name means opposite things in different families (HyperCLOVA X multiplies by
# logits_scaling, Granite divides), so the table is keyed by family, and an unknown family with a
# scaling attribute that is not 1 is refused rather than guessed.
LOGIT_SCALES = {
    "cohere": ("logit_scale", "mul"), "cohere2": ("logit_scale", "mul"), "cohere2_moe": ("logit_scale", "mul"),
    "granite": ("logits_scaling", "div"), "granitemoe": ("logits_scaling", "div"),
    "granitemoeshared": ("logits_scaling", "div"), "granitemoehybrid": ("logits_scaling", "div"),
    "minicpm3": ("logits_scaling", "div"), "hyperclovax": ("logits_scaling", "mul"),
    "falcon_h1": ("lm_head_multiplier", "mul"),
}
_SCALE_ATTRIBUTES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


class ModelError(ValueError):
    """A model that cannot be used here; the message names the model and what to do."""


def looks_local(source) -> bool:
    """Whether a model name is meant as a local path (then a missing one is a local error, not a hub one)."""
    text = str(source)
    return isinstance(source, Path) or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text \
        or Path(text).exists()


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else the CPU (one rule for every command)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_device(device) -> torch.device:
    if device is None:
        return default_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def load_config(source, revision: str | None = None):
    """The model's config, with errors that say what is wrong with the source."""
    from transformers import AutoConfig

    if looks_local(source) and not Path(str(source)).expanduser().exists():
        raise ModelError(f"model {source}: no such directory")
    try:
        return AutoConfig.from_pretrained(str(source), revision=revision)
    except (OSError, ValueError) as e:
        where = "the directory holds no readable config.json" if Path(str(source)).is_dir() else \
            "not a local directory, and not loadable from the Hugging Face hub (no network, or no such repository)"
        raise ModelError(f"model {source}: {where} ({str(e).splitlines()[0]})") from None


def check_causal_lm(source, config) -> None:
    """Refuse, before any work, a model that is no causal LM with a trained lm_head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelError(f"model {source}: a {type(config).__name__} has no causal-LM class "
                         "(AutoModelForCausalLM); a decoder with an lm_head is needed")
    arch = list(getattr(config, "architectures", None) or [])
    if arch and not any(key in a for a in arch for key in _HEAD_ARCHITECTURES):
        raise ModelError(f"model {source}: the checkpoint is a {', '.join(arch)} without an lm_head (a base "
                         "model); a causal LM checkpoint (e.g. *ForCausalLM) whose lm_head weights were trained "
                         "is needed")


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (float32 when the config does not say)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def attn_implementation(config, device: torch.device, requested: str | None = None) -> str | None:
    """What to ask transformers for: the user's choice, flash-attention 2 on CUDA when it is
    importable and the family supports it, else None (transformers picks sdpa where the family
    supports it, eager otherwise: Gemma 2 trains with eager, whose attention soft-cap sdpa lacks)."""
    if requested:
        return requested
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None \
            and getattr(cls, "_supports_flash_attn", False):
        return "flash_attention_2"
    return None


def check_tp_plan(source, config) -> None:
    """Refuse, before loading, a model family transformers has no tensor-parallel plan for."""
    if not getattr(config, "base_model_tp_plan", None):
        raise ModelError(f"model {source}: the {getattr(config, 'model_type', type(config).__name__)} family has no "
                         "tensor-parallel plan in transformers (base_model_tp_plan); train it without --tp")


def load_causal_lm(source, *, dtype: torch.dtype = torch.float32, device=None, attn: str | None = None,
                   revision: str | None = None, tp_mesh=None) -> nn.Module:
    """AutoModelForCausalLM from a local directory or hub name, checked: a missing path, a config
    that is no causal LM and a checkpoint without lm_head weights are ModelErrors naming the model.
    The checkpoint's own dtype is kept as `model.checkpoint_dtype` (saves write what came in).

    tp_mesh: a 1-D tensor-parallel device mesh (dpo_fast.distributed.setup(tp=N)): the model is
    sharded with transformers' plan for its family (tp_plan "auto"; the lm_head weight becomes a
    DTensor Shard(0) over the vocabulary). Over the whole world transformers loads the shards
    directly; over a part of it (data parallelism across the other mesh dimension) the model is
    loaded whole, then sharded on that part."""
    from transformers import AutoModelForCausalLM

    config = load_config(source, revision)
    check_causal_lm(source, config)
    device = resolve_device(device)
    impl = attn_implementation(config, device, attn)
    extra = {"attn_implementation": impl} if impl else {}
    native_tp = tp_mesh is not None and tp_mesh.size() == torch.distributed.get_world_size()
    if tp_mesh is not None:
        check_tp_plan(source, config)
    if native_tp:
        from transformers.distributed import DistributedConfig

        extra["distributed_config"] = DistributedConfig(tp_plan="auto", tp_size=tp_mesh.size())
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, revision=revision,
                                                           output_loading_info=True, **extra)
    except (OSError, ValueError) as e:
        raise ModelError(f"model {source}: cannot be loaded ({str(e).splitlines()[0]})") from None
    head = model.get_output_embeddings()
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    head_name = names.get(id(getattr(head, "weight", None)))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if head_name is not None and not tied and head_name in set(info.get("missing_keys") or ()):
        raise ModelError(f"model {source}: its checkpoint has no lm_head weights ({head_name} would be random); "
                         "a causal LM checkpoint is needed, not a base model")
    model.checkpoint_dtype = checkpoint_dtype(config)
    if not native_tp:
        model = model.to(device)
    if tp_mesh is not None and not native_tp:
        _shard_tensor_parallel(model, tp_mesh)
    return model


def _shard_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Shard a loaded model on a tensor-parallel mesh with its family's plan, as transformers'
    own loading does over the whole world (same styles, same placements)."""
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    try:  # the family's plan with `*` replaced by the layer numbers (transformers' own expansion)
        plan = model._expand_parallel_plan(dict(model.tp_plan))
    except AttributeError as e:
        raise ModelError(f"this transformers version cannot apply a tensor-parallel plan on a sub-mesh ({e}); "
                         "use --tp equal to the world size") from None
    apply_tensor_parallelism(model, tp_mesh, plan)


def load_tokenizer(source, revision: str | None = None):
    """AutoTokenizer with a pad token (the eos token when the tokenizer has none)."""
    from transformers import AutoTokenizer

    if looks_local(source) and not Path(str(source)).expanduser().exists():
        raise ModelError(f"tokenizer {source}: no such directory")
    try:
        tok = AutoTokenizer.from_pretrained(str(source), revision=revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"tokenizer {source}: cannot be loaded ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------------------------
# The parts of a loaded model


@dataclass
class LMHead:
    """What the fused op needs from a causal LM: logits = softcap(scale * (decoder(x) @ W^T + b))."""

    decoder: nn.Module
    head: nn.Module
    softcap: float | None
    scale: float

    @property
    def weight(self) -> Tensor:
        return self.head.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.head, "bias", None)

    @property
    def vocab_size(self) -> int:
        return self.head.weight.shape[0]


def logit_scale(config) -> float:
    """The family's logit multiplier (1.0 for most); ModelError for an unknown scaling family."""
    model_type = getattr(config, "model_type", "")
    if model_type in LOGIT_SCALES:
        attr, how = LOGIT_SCALES[model_type]
        value = getattr(config, attr, None)
        if value is None:
            return 1.0
        return float(value) if how == "mul" else 1.0 / float(value)
    for attr in _SCALE_ATTRIBUTES:
        value = getattr(config, attr, None)
        if isinstance(value, (int, float)) and value not in (1, 1.0):
            raise ModelError(f"{model_type or 'this model'} scales its logits ({attr}={value}) in a way dpo_fast "
                             "does not know; add the family to dpo_fast.hf.LOGIT_SCALES")
    return 1.0


def unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside a PEFT or DDP wrapper (the one that owns get_output_embeddings)."""
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    return model


def lm_head_parts(model: nn.Module) -> LMHead:
    """The decoder, the lm_head and the logit transform of a causal LM, or a ModelError."""
    name = type(model).__name__
    model = unwrap(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if head is None or not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ModelError(f"{name} has no lm_head (get_output_embeddings() gives no (vocab, hidden) weight): a "
                         "causal LM whose logits are hidden_states @ lm_head.weight.T is needed, e.g. one loaded "
                         "with AutoModelForCausalLM")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if decoder is None or decoder is model:
        raise ModelError(f"{name}: cannot find its decoder (get_decoder()) to get the final hidden states")
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LMHead(decoder, head, float(softcap) if softcap else None, logit_scale(config))


def disable_dropout(model: nn.Module) -> int:
    """Zero every dropout of a model, module and functional (attention dropout is often a float
    attribute read in forward, e.g. Llama's `attention_dropout`); the config is left as it came.
    Returns how many places were changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p != 0:
            module.p = 0.0
            changed += 1
        for attr, value in list(vars(module).items()):
            if isinstance(value, float) and value != 0 and ("dropout" in attr or attr.endswith("pdrop")):
                setattr(module, attr, 0.0)
                changed += 1
    return changed


# ----------------------------------------------------------------------------------------------
# Running a collated batch


def final_hidden(decoder: nn.Module, batch: dict, device) -> Tensor:
    """The decoder's final hidden states (after the final norm) for a padded or packed batch
    (dpo_fast.data.PreferenceCollator); packed batches find their boundaries from position_ids, the
    prefix-sharing layout gets its tree mask (dpo_fast.data.shared)."""
    kwargs = {"input_ids": batch["input_ids"].to(device, non_blocking=True), "use_cache": False}
    if is_shared_layout(batch):
        dtype = next(decoder.parameters()).dtype
        kwargs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
        kwargs["attention_mask"] = decoder_attention_mask(decoder.config, batch, dtype, device)
    elif "sequence_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
    else:
        kwargs["attention_mask"] = batch["attention_mask"].to(device, non_blocking=True)
    return decoder(**kwargs).last_hidden_state


def packed_arguments(batch: dict, device) -> dict:
    """The sequence_ids / num_sequences arguments of the fused ops for a packed batch ({} if padded);
    (1, N): the rows of a prefix-sharing batch are one packed row to the op."""
    if "sequence_ids" not in batch:
        return {}
    return {"sequence_ids": batch["sequence_ids"].reshape(1, -1).to(device),
            "num_sequences": int(batch["num_sequences"])}


def fused_inputs(head: LMHead, batch: dict, compute_dtype: torch.dtype | None = None) -> dict:
    """hidden, weight, bias, logit_softcap and labels for dpo_fast.loss / linear_sequence_logprobs:
    the decoder runs under bf16 / fp16 autocast when compute_dtype is one of them; the op then takes
    hidden and weight in one dtype and accumulates in float32 itself (no autocast around it)."""
    weight = head.weight
    device = weight.device
    dtype = compute_dtype or weight.dtype
    half = dtype in (torch.bfloat16, torch.float16)
    with torch.autocast(device.type, dtype=dtype if half else torch.bfloat16, enabled=half and weight.dtype != dtype):
        hidden = final_hidden(head.decoder, batch, device)
    bias = head.bias
    if head.scale != 1.0:
        hidden = hidden * head.scale
        bias = None if bias is None else bias * head.scale
    labels = batch["labels"]
    if "sequence_ids" in batch:
        hidden, labels = hidden.reshape(1, -1, hidden.shape[-1]), labels.reshape(1, -1)
    return {"hidden": hidden.to(dtype), "weight": weight.to(dtype), "bias": None if bias is None else bias.to(dtype),
            "logit_softcap": head.softcap, "labels": labels.to(device), **packed_arguments(batch, device)}


def sequence_logps(head: LMHead, batch: dict, *, compute_dtype: torch.dtype | None = None,
                   backend: str = "auto") -> Tensor:
    """Summed completion log-probs per row of a collated batch, float32, through the fused op (no
    logits). Differentiable; call under torch.no_grad() / inference_mode() for reference values."""
    from .functional import linear_sequence_logprobs

    with torch.autocast(head.weight.device.type, enabled=False):
        return linear_sequence_logprobs(**fused_inputs(head, batch, compute_dtype), backend=backend).float()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """model.eval() for the block, the previous mode restored after it."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
