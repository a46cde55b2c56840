"""LoRA through peft (the optional extra: pip install -e ".[peft]"): which modules get an adapter,
adding it, the reference as the base model with the adapter disabled, and saving / loading.

The reference without a cache: computed on the fly, inside the policy's forward, with
`model.disable_adapter()` through the same fused op, rather than precomputed from the base model
before the adapter is added. The reference then sees the very batch the policy sees (same
shapes, same kernels), so at step 0, where the adapter's B matrix is 0, every reward is exactly
0 (the loss exactly ln 2, every pair a tie, not float noise); nothing is written to disk and no
extra pass runs before training. Its cost is one no-grad forward per step, which for one epoch
is the same compute a precompute pass would spend; for several epochs a cache (--ref-cache, made
from the base model) saves those forwards, and is accepted: its fingerprint is the base weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .. import hf
from .config import TrainConfig, TrainError

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The attention and MLP projections as the model families name them (Llama/Mistral/Qwen/Gemma,
# Phi-3, GPT-NeoX/Falcon, GPT-2, MPT/Phi, OPT, Mixtral experts, ...); never the lm_head.
PROJECTIONS = frozenset((
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
    "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "c_attn", "c_proj", "c_fc", "Wqkv", "out_proj",
    "fc1", "fc2", "fc_in", "fc_out", "w1", "w2", "w3", "query", "key", "value",
))
TRL_LORA_ALPHA = 32.0


def _linear_names(model: nn.Module) -> dict[str, str]:
    """Full name -> last name part of the model's linear layers (nn.Linear and GPT-2's Conv1D),
    without the output embeddings."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for name, module in model.named_modules():
        if module is head or not name:
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            out[name] = name.rsplit(".", 1)[-1]
    return out


def _head_names(model: nn.Module) -> set[str]:
    """The full and last names of the output embeddings (lm_head) module."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names | {n.rsplit(".", 1)[-1] for n in names}


def target_modules(model: nn.Module, requested: str | None) -> list[str] | str:
    """What the adapter wraps: the requested names (each must name a linear layer), "all-linear",
    or by default the model's linear layers named as attention / MLP projections."""
    linear = _linear_names(model)
    available = sorted(set(linear.values()))
    if requested is not None:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        if names == ["all-linear"]:
            return "all-linear"
        heads = _head_names(model)
        refused = [n for n in names if n in heads]
        if refused:
            raise TrainError(f"--lora-target-modules: {', '.join(refused)} is the output layer (lm_head), which is "
                             "never adapted: the fused loss multiplies by its weight directly, so an adapter there "
                             f"would be bypassed; choose among {', '.join(available)}")
        missing = [n for n in names if n not in available and not any(f.endswith("." + n) or f == n for f in linear)]
        if missing or not names:
            raise TrainError(f"--lora-target-modules: no linear layer of this model is named {', '.join(missing)}; "
                             f"its linear layers are named {', '.join(available)}")
        return names
    found = sorted(set(linear.values()) & PROJECTIONS)
    if not found:
        raise TrainError(f"LoRA: none of {type(model).__name__}'s linear layers has a known attention or MLP "
                         f"projection name (they are named {', '.join(available) or 'nothing'}); name them with "
                         "--lora-target-modules")
    return found


def add_adapter(model: nn.Module, cfg: TrainConfig, checkpoint: Path | None = None) -> nn.Module:
    """The model with a fresh LoRA adapter (B = 0: the policy starts as the base model), or with
    the adapter weights of a checkpoint being resumed; only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules(model, cfg.lora_target_modules)
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else TRL_LORA_ALPHA
    config = LoraConfig(r=cfg.lora_r, lora_alpha=alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if isinstance(cfg.model, (str, Path)) and Path(str(cfg.model)).is_dir():  # found from any working directory
        peft_model.peft_config["default"].base_model_name_or_path = str(Path(str(cfg.model)).resolve())
    if checkpoint is not None:
        load_adapter_weights(peft_model, checkpoint)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d alpha=%g on %s: %d trainable parameters", cfg.lora_r, alpha,
                targets if isinstance(targets, str) else ",".join(targets), trainable)
    return peft_model


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def base_model_logps(model, head: hf.LMHead, batch: dict, compute_dtype, backend: str) -> torch.Tensor:
    """Per-row log-probs of the base model (the adapter disabled), no gradient: the reference."""
    with torch.no_grad(), model.disable_adapter():
        return hf.sequence_logps(head, batch, compute_dtype=compute_dtype, backend=backend)


def save_adapter(model, directory: Path, state_dict: dict | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors (peft.PeftModel.from_pretrained loads them);
    state_dict: the full (gathered) state dict under FSDP."""
    model.save_pretrained(str(directory), state_dict=state_dict)


def load_adapter_weights(model, checkpoint: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(checkpoint) / ADAPTER_WEIGHTS
    if not path.exists():
        raise TrainError(f"--resume {checkpoint}: no {ADAPTER_WEIGHTS}; the checkpoint was not made by a LoRA run")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise TrainError(f"--resume {checkpoint}: its adapter does not fit this model and --lora-* settings "
                         f"(unexpected {unexpected[:3]})")


def is_adapter_dir(path) -> bool:
    return isinstance(path, (str, Path)) and (Path(str(path)) / ADAPTER_CONFIG).is_file()


def load_merged_for_eval(path, device, attn: str | None = None, check_head: bool = True) -> nn.Module:
    """A LoRA output directory as a plain model: its base (adapter_config.json's
    base_model_name_or_path) with the adapter merged in."""
    try:
        from peft import PeftModel
    except ImportError:
        raise hf.ModelError(f'model {path} is a LoRA adapter: loading it needs peft (pip install -e ".[peft]")') \
            from None
    base_path = json.loads((Path(str(path)) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_path:
        raise hf.ModelError(f"model {path}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    base = hf.load_causal_lm(base_path, device=device, attn=attn, check_head=check_head)
    dtype = base.checkpoint_dtype
    merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    merged.checkpoint_dtype = dtype
    return merged
