"""The one runner of Hugging Face causal LMs: load a model, find what the fused op needs, and get
per-sequence log-probs of a collated batch without ever building logits.

    model = load_causal_lm("path/to/model", device="cpu")      # clear errors, attention chosen here
    head = lm_head_parts(model)                                   # decoder, lm_head, softcap, scale
    logps = sequence_logps(head, batch, backend="auto")          # (rows,) float32, fused op

The policy loss, the on-the-fly reference, precompute-ref, evaluation, the TRL integration and the
demo all go through `final_hidden` + `lm_head_parts`; nothing calls the model's own forward for
logits. What lies between the decoder and the logits (a head transform, soft-caps and scales, a vocabulary
cut) is found by dpo_fast.heads, and checked once per model against the model's own forward on a probe
batch: a head the fused path would get wrong is refused, never trained.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from . import gguf_loading, tied_gradient
from .heads import LOGIT_SCALES, LMHead, ModelError, logit_scale, verified_parts  # noqa: F401 (re-exported)
from .data.shared import decoder_attention_mask, is_shared_layout

logger = logging.getLogger(__name__)

_HEAD_ARCHITECTURES = ("CausalLM", "LMHead", "ForConditionalGeneration")


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

    if gguf_loading.is_gguf(source):
        return _from_gguf(gguf_loading.load_gguf_config, source)
    if looks_local(source) and not Path(str(source)).expanduser().exists():
        raise ModelError(f"model {source}: no such directory")
    try:
        return AutoConfig.from_pretrained(str(source), revision=revision)
    except (OSError, ValueError) as e:
        where = "the directory holds no readable config.json" if Path(str(source)).is_dir() else \
            "not a local directory, and not loadable from the Hugging Face hub (no network, or no such repository)"
        raise ModelError(f"model {source}: {where} ({str(e).splitlines()[0]})") from None


def _from_gguf(load, source):
    """load(source) for a GGUF file, its errors (a missing file, a type or architecture transformers
    cannot load) as a ModelError naming the file."""
    try:
        return load(source)
    except (OSError, ValueError) as e:
        raise ModelError(f"model {source}: {str(e).splitlines()[0]}") from None


def check_causal_lm(source, config) -> None:
    """Refuse, before any work, a model that is no causal LM with a trained lm_head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelError(f"model {source}: a {type(config).__name__} has no causal-LM class "
                         "(AutoModelForCausalLM); a decoder with an lm_head is needed")
    arch = list(getattr(config, "architectures", None) or [])
    masked = [a for a in arch if "MaskedLM" in a]
    if masked and len(masked) == len(arch):
        raise ModelError(f"model {source}: the checkpoint is a {', '.join(masked)}, a masked LM, not a causal LM; a "
                         "causal LM checkpoint (e.g. *ForCausalLM) is needed")
    causal_names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    if arch and not any(key in a for a in arch for key in _HEAD_ARCHITECTURES) and not causal_names & set(arch):
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
                   revision: str | None = None, tp_mesh=None, check_head: bool = True) -> nn.Module:
    """AutoModelForCausalLM from a local directory or hub name, checked: a missing path, a config
    that is no causal LM and a checkpoint without lm_head weights are ModelErrors naming the model.
    The checkpoint's own dtype is kept as `model.checkpoint_dtype` (saves write what came in).

    tp_mesh: a 1-D tensor-parallel device mesh (dpo_fast.distributed.setup(tp=N)): the model is
    sharded with transformers' plan for its family (tp_plan "auto"; the lm_head weight becomes a
    DTensor Shard(0) over the vocabulary). Over the whole world transformers loads the shards
    directly; over a part of it (data parallelism across the other mesh dimension) the model is
    loaded whole, then sharded on that part.

    check_head: run the lm_head self-check (dpo_fast.heads) now, so a model whose head the fused path
    gets wrong is refused at load time; False is the explicit opt-out (--skip-head-check)."""
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
        if gguf_loading.is_gguf(source):
            model, info = gguf_loading.load_gguf_model(source, dtype=dtype, **extra)
        else:
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
    model.checkpoint_dtype = dtype if gguf_loading.is_gguf(source) else checkpoint_dtype(config)
    if not native_tp:
        model = model.to(device)
    if tp_mesh is not None and not native_tp:
        _shard_tensor_parallel(model, tp_mesh)
    lm_head_parts(model, check=check_head)
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

    if gguf_loading.is_gguf(source):
        tok = _from_gguf(gguf_loading.load_gguf_tokenizer, source)
    elif looks_local(source) and not Path(str(source)).expanduser().exists():
        raise ModelError(f"tokenizer {source}: no such directory")
    else:
        try:
            tok = AutoTokenizer.from_pretrained(str(source), revision=revision)
        except (OSError, ValueError) as e:
            raise ModelError(f"tokenizer {source}: cannot be loaded ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------------------------
# The parts of a loaded model


def unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside a PEFT or DDP wrapper (the one that owns get_output_embeddings)."""
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    return model


def lm_head_parts(model: nn.Module, *, check: bool = True) -> LMHead:
    """The decoder (with any head transform), the lm_head and the logit transform of a causal LM, or a
    ModelError. check: compare the fused path with the model's own forward on a probe batch the first
    time a model comes here, and refuse it when they disagree (dpo_fast.heads); check=False is the
    user's explicit opt-out, kept on the model."""
    name = type(model).__name__
    return verified_parts(unwrap(model), check=check, name=name)


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
    device = head.weight.device
    dtype = compute_dtype or head.weight.dtype
    half = dtype in (torch.bfloat16, torch.float16)
    # a tied embedding's gradient folded into one dense buffer (tied_gradient says how)
    with tied_gradient.head_weight(head.decoder, head.weight) as weight, \
            torch.autocast(device.type, dtype=dtype if half else torch.bfloat16, enabled=half and weight.dtype != dtype):
        hidden = final_hidden(head.decoder, batch, device)
    hidden, bias = head.scaled(hidden, head.bias)
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
