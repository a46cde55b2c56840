"""`dpo-fast train` and `dpo_fast.train(...)`: a thin DPO trainer around the fused loss.

    dpo-fast train --model PATH_OR_NAME --data PATH_OR_NAME --output-dir DIR [options]
    torchrun --nproc_per_node N -m dpo_fast train ...          # DDP (gloo on CPU, nccl on CUDA)
    summary = dpo_fast.train("model_dir", "pairs.jsonl", "out", eval_data="eval.jsonl", max_steps=100)

One step: the policy's decoder gives the final hidden states, and `dpo_fast.loss(hidden=...,
weight=lm_head.weight)` turns them into the loss without ever building logits. Reference
log-probs come from a reference cache on disk (`--ref-cache`, or one this command precomputes
into DIR/ref_cache from the initial `--model`, which is then the reference), so only one model
is in memory while training; `--ref-model` computes them on the fly instead (two models).

Data order is a pure function of (seed, epoch, step): every step takes the next `--batch-size`
pairs of that epoch's seeded permutation (the last incomplete batch of an epoch is dropped) and
splits them into `world_size x grad_accum` equal micro-batches. A run therefore resumes from
its step number alone, and the same global batch gives the same loss on any number of ranks.

DIR after a run:
    metrics.jsonl        one JSON line per logging step (and one per evaluation)
    summary.json         {"eval_before": {...}, "eval_after": {...}, "train": {...}}
    config.json, model.safetensors, tokenizer files: the trained policy (save_pretrained)
    checkpoint-N/        every --save-steps: model, optimizer.pt, scheduler.pt, rng_state.pt,
                         trainer_state.json (step, metric accumulators, eval_before)
    ref_cache/           the precomputed reference log-probs (when no --ref-cache was given)
    runs/                TensorBoard event files (when tensorboard is installed)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import inspect
import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Per-step metrics, with TRL's names; eval adds "logps/accuracies" (the policy's own preference:
# logp(chosen) > logp(rejected), which unlike the reward accuracy is informative at step 0).
LOSS_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")
EVAL_METRICS = LOSS_METRICS + ("logps/accuracies",)
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
OPTIMIZERS = ("rmsprop", "adamw", "adam", "sgd")
SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("auto", "bf16", "fp32")


class TrainError(ValueError):
    """A problem with the run's inputs or settings that the user can fix; the message says how."""


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Every option of `dpo_fast.train` (and `dpo-fast train`); defaults follow the DPO paper
    (Rafailov et al. 2023, sec. B) where it gives one: beta 0.1, RMSprop, lr 1e-6 with a linear
    warmup over 150 steps, batch 64."""

    model: Any
    data: Any
    output_dir: str
    tokenizer: Any = None
    ref_cache: str | None = None
    ref_model: str | None = None
    reference_free: bool = False
    eval_data: Any = None
    split: str = "train"
    eval_split: str = "test"
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    learning_rate: float = 1e-6
    optimizer: str = "rmsprop"
    weight_decay: float = 0.0
    warmup_steps: int = 150
    lr_scheduler: str = "constant"
    max_grad_norm: float = 1.0
    batch_size: int = 64
    grad_accum: int = 1
    eval_batch_size: int | None = None
    max_steps: int | None = None
    epochs: float | None = None
    max_length: int | None = 512
    max_prompt_length: int | None = None
    truncation_side: str = "keep_start"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    packing: bool | None = None
    attn_implementation: str | None = None
    fsdp: bool = False
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = None
    resume: Any = None
    device: str | None = None
    backend: str = "auto"
    progress: bool = True
    tensorboard: bool = True

    def check(self) -> None:
        from .objectives import check_loss_args

        try:
            check_loss_args(self.loss_type, self.beta, self.label_smoothing)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if self.ref_cache is not None and self.ref_model is not None:
            raise TrainError("give --ref-cache or --ref-model, not both")
        if self.reference_free and (self.ref_cache is not None or self.ref_model is not None):
            raise TrainError("--reference-free takes no --ref-cache / --ref-model")
        if self.optimizer not in OPTIMIZERS:
            raise TrainError(f"optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise TrainError(f"lr_scheduler: expected one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.dtype not in DTYPES:
            raise TrainError(f"dtype: expected one of {DTYPES}, got {self.dtype!r}")
        for name in ("batch_size", "grad_accum", "logging_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise TrainError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.max_steps is not None and self.epochs is not None:
            raise TrainError("give max_steps or epochs, not both")
        if self.max_steps is not None and self.max_steps < 0:
            raise TrainError(f"max_steps: expected >= 0, got {self.max_steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise TrainError(f"epochs: expected > 0, got {self.epochs}")
        if self.warmup_steps < 0 or self.save_steps < 0:
            raise TrainError("warmup_steps and save_steps must be >= 0")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise TrainError(f"eval_batch_size: expected a positive integer, got {self.eval_batch_size}")
        if not self.learning_rate > 0:
            raise TrainError(f"learning_rate: expected > 0, got {self.learning_rate}")


def _paper(text: str) -> str:
    return f"{text} (default: %(default)s, as in the DPO paper)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `dpo-fast train` options (also used by `python -m dpo_fast train`)."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="policy to train: local directory or hub name; also the "
                   "reference when no --ref-model is given")
    g.add_argument("--data", required=True, help="preference pairs: JSON/JSONL/Parquet/CSV file, save_to_disk "
                   "directory or hub name (prompt/chosen/rejected, conversational or implicit prompt)")
    g.add_argument("--output-dir", required=True, help="where checkpoints, metrics.jsonl, summary.json and the "
                   "final model go")
    g.add_argument("--eval-data", default=None, help="held-out pairs, evaluated before and after training")
    g.add_argument("--split", default="train", help="split of --data")
    g.add_argument("--eval-split", default="test", help="split of --eval-data (a single file loads whatever "
                   "the name)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory or name; unset: the model's")
    ref = g.add_mutually_exclusive_group()
    ref.add_argument("--ref-cache", default=None, metavar="DIR", help="reference log-probs precomputed with "
                     "`dpo-fast precompute-ref` from the same --model; unset: computed into OUTPUT_DIR/ref_cache")
    ref.add_argument("--ref-model", default=None, metavar="PATH", help="compute reference log-probs on the fly "
                     "with this model (holds two models in memory)")
    ref.add_argument("--reference-free", action="store_true", help="no reference model (log-ratios against 0)")

    from .objectives import LOSS_TYPES

    g = parser.add_argument_group("loss")
    g.add_argument("--loss-type", default="sigmoid", choices=LOSS_TYPES, metavar="TYPE",
                   help=f"sigmoid is DPO; one of {', '.join(LOSS_TYPES)}")
    g.add_argument("--beta", type=float, default=0.1, help=_paper("KL strength beta"))
    g.add_argument("--label-smoothing", type=float, default=0.0, help="conservative-DPO label smoothing")
    g.add_argument("--sft-weight", type=float, default=0.0, help="weight of the chosen responses' NLL (RPO)")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--learning-rate", "--lr", type=float, default=1e-6, help=_paper("peak learning rate"))
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="rmsprop", help=_paper("optimizer"))
    g.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    g.add_argument("--warmup-steps", type=int, default=150, help=_paper("linear warmup steps from 0"))
    g.add_argument("--lr-scheduler", choices=SCHEDULERS, default="constant",
                   help="after warmup: constant (as in the DPO paper), linear or cosine decay to 0")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--batch-size", type=int, default=64, help=_paper("pairs per optimizer step, over all "
                   "ranks and accumulation steps"))
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step and rank")
    g.add_argument("--eval-batch-size", type=int, default=None, help="pairs per eval forward; unset: the "
                   "training micro-batch")
    steps = g.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, default=None, help="optimizer steps")
    steps.add_argument("--epochs", type=float, default=None, help="passes over the data (unset with no --max-steps: 1)")
    g.add_argument("--seed", type=int, default=42, help="data order and RNG seed")

    g = parser.add_argument_group("sequences and speed")
    g.add_argument("--max-length", type=int, default=512, help="max prompt + completion tokens")
    g.add_argument("--max-prompt-length", type=int, default=None, help="max prompt tokens")
    g.add_argument("--truncation-side", choices=("keep_start", "keep_end"), default="keep_start",
                   help="which end of a too-long prompt to keep")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="bf16: bf16 autocast over float32 weights; "
                   "auto: bf16 on CUDA devices that support it, fp32 otherwise")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="padding-free packed batches; default: on with flash-attention 2, off otherwise")
    g.add_argument("--attn-implementation", default=None, help="default: flash_attention_2 when flash-attn is "
                   "importable on CUDA, sdpa otherwise")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP2 fully_shard "
                   "instead of DDP (models that do not fit one device)")
    g.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    g.add_argument("--backend", default="auto", help="fused-loss backend (auto, triton, chunked)")

    g = parser.add_argument_group("logging and checkpoints")
    g.add_argument("--logging-steps", type=int, default=10, help="steps per metrics line")
    g.add_argument("--save-steps", type=int, default=500, help="steps per checkpoint (0: only the final model)")
    g.add_argument("--save-total-limit", type=int, default=None, help="keep only the newest N checkpoints")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in --output-dir (or the one given); starts fresh "
                   "if there is none")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar "
                   "(shown: %(default)s)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard events "
                   "(written when tensorboard is installed: %(default)s)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run_cli(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        # Under torchrun only rank 0 talks; the others report warnings and errors.
        level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
        logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    from .data import MalformedRowError
    from .refcache import CacheError

    try:
        summary = train(config=config_from_args(args))
    except (TrainError, CacheError, MalformedRowError, FileNotFoundError) as e:
        print(f"dpo-fast train: error: {e}", file=sys.stderr)
        return 2
    if summary is not None and int(os.environ.get("RANK", "0")) == 0:
        print(_summary_line(summary))
    return 0


def _summary_line(summary: dict) -> str:
    parts = [f"steps {summary['train'].get('global_step')}"]
    for name in ("eval_before", "eval_after"):
        ev = summary.get(name) or {}
        if ev:
            parts.append(f"{name}: rewards/accuracies {ev['rewards/accuracies']:.3f} "
                         f"margins {ev['rewards/margins']:.3f} loss {ev['loss']:.4f}")
    return "dpo-fast train: done; " + "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False  # this call initialised the process group

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_type: str) -> _Dist:
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_available():
        raise TrainError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    # The group lives until the process exits: a second train() in the same torchrun job reuses
    # it (a destroyed and re-created default group can hang in its rendezvous on the old store).
    atexit.register(_destroy_process_group)
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, True)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _resolve_device(cfg: TrainConfig):
    import torch

    if cfg.device is not None:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Model


def _attn_implementation(cfg: TrainConfig, device) -> str:
    if cfg.attn_implementation:
        return cfg.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


_HEAD_ARCHITECTURES = ("CausalLM", "LMHead", "ForConditionalGeneration")


def check_model_source(source) -> None:
    """Fail fast, before any work, on a model directory/name that is no causal LM with an lm_head."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise TrainError(f"model {source}: cannot read its config ({e})") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise TrainError(f"model {source}: a {type(config).__name__} has no causal-LM class "
                         "(AutoModelForCausalLM); dpo-fast train needs a decoder with an lm_head")
    arch = list(getattr(config, "architectures", None) or [])
    if arch and not any(key in a for a in arch for key in _HEAD_ARCHITECTURES):
        raise TrainError(f"model {source}: the checkpoint is a {', '.join(arch)} without an lm_head (a base "
                         "model); dpo-fast train needs a causal LM checkpoint (e.g. *ForCausalLM) whose lm_head "
                         "weights were trained")


def _load_policy(source, attn: str, device):
    """AutoModelForCausalLM in float32 (bf16 runs autocast over float32 master weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, attn_implementation=attn,
                                                           output_loading_info=True)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "AutoModelForCausalLM" in str(e):
            raise TrainError(f"model {source}: not a causal language model that AutoModelForCausalLM can load "
                             f"({e}); dpo-fast train needs a decoder with an lm_head") from None
        raise
    except OSError as e:
        raise TrainError(f"model {source}: cannot be loaded ({e})") from None
    head = model.get_output_embeddings()
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    head_name = names.get(id(getattr(head, "weight", None)))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if head_name is not None and not tied and head_name in set(info.get("missing_keys") or ()):
        raise TrainError(f"model {source}: its checkpoint has no lm_head weights ({head_name} would be random); "
                         "dpo-fast train needs a causal LM checkpoint, not a base model")
    return model.to(device)


def _lm_head_parts(model):
    """(decoder, lm_head module, logit soft-cap): what the fused path needs, or a clear error."""
    import torch

    name = type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if head is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TrainError(f"{name} has no lm_head (get_output_embeddings() gives no (vocab, hidden) weight): "
                         "dpo-fast train needs a causal LM whose logits are hidden_states @ lm_head.weight.T, "
                         "e.g. one loaded with AutoModelForCausalLM")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if decoder is None or decoder is model:
        raise TrainError(f"{name}: cannot find its decoder (get_decoder()) to get the final hidden states")
    config = getattr(model, "config", None)
    for attr in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise TrainError(f"{name} scales its logits ({attr}={value}); the fused lm_head path does not "
                             "support that yet")
    softcap = getattr(config, "final_logit_softcapping", None)
    return decoder, head, softcap


def _enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing with the non-reentrant torch.utils.checkpoint."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise TrainError(f"{type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _hidden_states(decoder, batch: dict, device):
    """The decoder's final hidden states (after the final norm) for a padded or packed batch."""
    kwargs = {"input_ids": batch["input_ids"].to(device, non_blocking=True), "use_cache": False}
    if "sequence_ids" in batch:  # packed: boundaries come from position_ids, no mask
        kwargs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
    else:
        kwargs["attention_mask"] = batch["attention_mask"].to(device, non_blocking=True)
    return decoder(**kwargs).last_hidden_state


def _seq_logps(decoder, head, softcap, batch: dict, device, compute_dtype, backend):
    """Summed completion log-probs per row under a model, fused (no logits). For --ref-model."""
    import torch

    from .functional import linear_sequence_logprobs

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype == torch.bfloat16):
        hidden = _hidden_states(decoder, batch, device)
    w = head.weight
    with torch.autocast(device.type, enabled=False):
        packed = {}
        if "sequence_ids" in batch:
            packed = dict(sequence_ids=batch["sequence_ids"].to(device), num_sequences=int(batch["num_sequences"]))
        return linear_sequence_logprobs(hidden.to(compute_dtype), w.to(compute_dtype), batch["labels"].to(device),
                                        bias=_cast(getattr(head, "bias", None), compute_dtype),
                                        logit_softcap=softcap, backend=backend, **packed)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


_POLICY_CLASS = None


def _policy_loss_class():
    """nn.Module running decoder + fused loss in its forward, so DDP / FSDP hooks see it all."""
    global _POLICY_CLASS
    if _POLICY_CLASS is not None:
        return _POLICY_CLASS
    import torch

    class PolicyLoss(torch.nn.Module):
        def __init__(self, model, loss_options: dict, compute_dtype, backend: str):
            super().__init__()
            self.model = model
            self.loss_options = loss_options
            self.compute_dtype = compute_dtype
            self.backend = backend
            # A tuple, not attributes: the decoder and head stay registered once, under model.
            self._parts = _lm_head_parts(model)

        def forward(self, batch: dict, ref_chosen=None, ref_rejected=None):
            import dpo_fast

            decoder, head, softcap = self._parts
            device = head.weight.device
            bf16 = self.compute_dtype == torch.bfloat16
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                hidden = _hidden_states(decoder, batch, device)
            weight = head.weight
            bias = getattr(head, "bias", None)
            packed = {}
            if "sequence_ids" in batch:
                packed = dict(sequence_ids=batch["sequence_ids"].to(device),
                              num_sequences=int(batch["num_sequences"]))
            # Autocast off: the fused op takes hidden and weight in one dtype (bf16 here is what
            # autocast would give the lm_head matmul) and accumulates in float32 itself.
            with torch.autocast(device.type, enabled=False):
                return dpo_fast.loss(
                    hidden=hidden.to(self.compute_dtype), weight=weight.to(self.compute_dtype),
                    bias=None if bias is None else bias.to(self.compute_dtype), logit_softcap=softcap,
                    labels=batch["labels"].to(device), ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
                    backend=self.backend, **packed, **self.loss_options)

    _POLICY_CLASS = PolicyLoss
    return PolicyLoss


def _fsdp_wrap(policy, model, compute_dtype, world: int, device):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
        if compute_dtype != torch.float32 else MixedPrecisionPolicy()
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        logger.warning("FSDP: %s names no transformer block classes (_no_split_modules); sharding the whole "
                       "model as one unit", type(model).__name__)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # The root is the loss wrapper: its forward unshards the embeddings, final norm and lm_head
    # (used by the fused loss outside the decoder's forward).
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    return policy


# ----------------------------------------------------------------------------------------------
# Data


class _Schedule:
    """Which pairs each step uses: a seeded permutation per epoch, `batch_size` pairs per step."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int):
        import torch

        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm

    def global_batch(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        return perm[pos * self.batch_size:(pos + 1) * self.batch_size]


def _rows(ds, indices: list[int]) -> list[dict]:
    cols = ds[indices]
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


def _tokenize(source, tokenizer, cfg: TrainConfig, split: str, what: str):
    from .data import load_and_tokenize

    try:
        tokenized, report, fmt = load_and_tokenize(
            source, tokenizer, split=split, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
            truncation_side=cfg.truncation_side)
    except ValueError as e:
        if type(e).__name__ == "MalformedRowError":
            raise
        raise TrainError(f"{what} {source}: {e}") from None
    if fmt == "ranked":
        raise TrainError(f"{what} {source}: ranked data (prompt/responses); dpo-fast train takes pairs "
                         "(prompt/chosen/rejected)")
    if len(tokenized) == 0:
        raise TrainError(f"{what} {source}: no usable pairs ({report})")
    logger.info("%s: %s", what, report)
    return tokenized


# ----------------------------------------------------------------------------------------------
# Reference log-probs


class _References:
    """Reference log-probs of a batch: from a cache on disk, a reference model, or none."""

    def __init__(self, caches=(), model=None, compute_dtype=None, backend="auto"):
        self.cache = caches[0] if caches else None
        self.model = model
        self.parts = _lm_head_parts(model) if model is not None else None
        self.compute_dtype, self.backend = compute_dtype, backend

    def __call__(self, batch: dict, device):
        import torch

        if self.cache is not None:
            ref = self.cache.lookup(batch["example_ids"], dtype=torch.float32, device=device)
            return ref["ref_chosen_logps"], ref["ref_rejected_logps"]
        if self.model is not None:
            decoder, head, softcap = self.parts
            with torch.no_grad():
                lp = _seq_logps(decoder, head, softcap, batch, device, self.compute_dtype, self.backend).float()
            P = lp.shape[0] // 2
            return lp[:P], lp[P:]
        return None, None


def _cache_covers(directory: Path, ids) -> bool:
    """Whether `directory` holds a complete cache with every id (the fingerprint is checked later)."""
    from .refcache import CacheError, ReferenceCache

    if not (Path(directory) / "manifest.json").exists():
        return False
    try:
        return not ReferenceCache.open(directory, check_files=False).missing(ids)
    except CacheError:
        return False  # incomplete: precompute_reference resumes it


def _eval_cache_dir(cfg: TrainConfig, out_dir: Path) -> Path:
    # Our own cache holds train and eval pairs; a user's cache is never written into.
    return out_dir / ("ref_cache" if cfg.ref_cache is None else "ref_cache_eval")


def _ensure_reference_caches(cfg: TrainConfig, out_dir: Path, tokenizer, train_ds, eval_ds, device, module=None,
                             progress: bool = True) -> None:
    """Precompute what the run needs and no cache holds yet, from the initial policy (--model),
    which is the reference. Runs before the policy is loaded (or with it, for a module), so two
    models are never in memory during training. Every rank calls it: precompute_reference
    splits the work over torch.distributed ranks."""
    from .refcache import precompute_reference

    source = cfg.model if module is None else module

    def compute(data, split, directory):
        logger.info("precomputing reference log-probs of %s into %s", data, directory)
        precompute_reference(
            source, data, directory, tokenizer=tokenizer, split=split, batch_size=cfg.eval_batch_size or 8,
            max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
            truncation_side=cfg.truncation_side, dtype="float32" if module is None else None, device=device,
            backend=cfg.backend, progress=progress)

    if cfg.ref_cache is None and not _cache_covers(out_dir / "ref_cache", train_ds["example_id"]):
        compute(cfg.data, cfg.split, out_dir / "ref_cache")
    if eval_ds is not None:
        ids = eval_ds["example_id"]
        if cfg.ref_cache is not None and _cache_covers(Path(cfg.ref_cache), ids):
            return
        directory = _eval_cache_dir(cfg, out_dir)
        if not _cache_covers(directory, ids):
            compute(cfg.eval_data, cfg.eval_split, directory)


def _open_reference_caches(cfg: TrainConfig, out_dir: Path, fingerprint: dict, train_ds, eval_ds):
    """(train refs, eval refs): caches checked against the reference's fingerprint."""
    from .refcache import MissingExamplesError, ReferenceCache

    def open_checked(path, ids, what):
        cache = ReferenceCache.open(path, expected_fingerprint=fingerprint, ignore=("dtype",))
        try:
            cache.check_covers(ids)
        except MissingExamplesError as e:
            raise TrainError(f"{what}: {e}") from None
        return cache

    train_path = Path(cfg.ref_cache) if cfg.ref_cache is not None else out_dir / "ref_cache"
    train_cache = open_checked(train_path, train_ds["example_id"],
                               "--ref-cache" if cfg.ref_cache is not None else "reference cache")
    eval_cache = train_cache
    if eval_ds is not None and train_cache.missing(eval_ds["example_id"]):
        eval_cache = open_checked(_eval_cache_dir(cfg, out_dir), eval_ds["example_id"], "reference cache (eval data)")
    logger.info("reference log-probs from %s (fingerprint %s)", train_cache.path,
                fingerprint_digest_short(fingerprint))
    return _References(caches=[train_cache]), _References(caches=[eval_cache])


def fingerprint_digest_short(fingerprint: dict) -> str:
    from .refcache import fingerprint_digest

    return fingerprint_digest(fingerprint)[:12]


# ----------------------------------------------------------------------------------------------
# Optimizer, schedule


def _make_optimizer(cfg: TrainConfig, params):
    import torch

    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): a linear warmup
    from 1/(warmup+1) to 1 over `warmup` steps, then constant or a linear/cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Metrics output


class _MetricsWriter:
    """metrics.jsonl, TensorBoard (when installed) and the progress bar; only rank 0 writes."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, progress: bool, total: int, start: int):
        self.enabled = enabled
        self.path = out_dir / METRICS_FILE
        self.tb = None
        self.bar = None
        if not enabled:
            return
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "runs"), purge_step=start or None)
            except Exception as e:  # a broken tensorboard install must not stop training
                logger.warning("TensorBoard disabled: %s", e)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="dpo train", unit="step", dynamic_ncols=True)

    def truncate_after(self, step: int) -> None:
        """Drop lines of a killed run past the checkpoint being resumed (they are recomputed)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if rec.get("step", 0) <= step and not (rec.get("step") == step and rec.get("phase") == "eval_after"):
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k not in ("step", "phase") and isinstance(v, (int, float)):
                    self.tb.add_scalar(prefix + k, v, step)
            self.tb.flush()

    def progress(self, n: int = 1, postfix: dict | None = None) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _peak_memory_gb(device) -> float:
    """CUDA: max allocated by torch on this device; CPU: the process's peak resident set."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            name = p.name
            if p.is_dir() and name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit() \
                    and (p / STATE_FILE).exists():
                found.append((int(name[len(CHECKPOINT_PREFIX):]), p))
    return sorted(found)


def _find_resume(cfg: TrainConfig, out_dir: Path) -> Path | None:
    if cfg.resume in (None, False):
        return None
    if cfg.resume not in (True, "latest"):
        path = Path(str(cfg.resume))
        if not (path / STATE_FILE).exists():
            raise TrainError(f"--resume {path}: not a checkpoint directory (no {STATE_FILE})")
        return path
    found = _checkpoints(out_dir)
    if not found:
        logger.info("--resume: no checkpoint in %s yet; starting from the beginning", out_dir)
        return None
    return found[-1][1]


def _rng_state() -> dict:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_gauss": [int(np_state[3]), float(np_state[4])], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _full_state_dicts(cfg, policy, model, optimizer):
    """(model state dict or None, optimizer state dict or None) in full, on rank 0."""
    if not cfg.fsdp:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(policy, options=opts)  # collective
    osd = get_optimizer_state_dict(policy, optimizer, options=opts)
    prefix = "model."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in msd.items()}, osd


def _save_checkpoint(cfg, dist_info, out_dir: Path, step: int, policy, model, tokenizer, optimizer, scheduler,
                     trainer_state: dict) -> None:
    import torch
    import torch.distributed as dist

    msd, osd = _full_state_dicts(cfg, policy, model, optimizer)
    rng = _rng_state()
    rngs = [None] * dist_info.world
    if dist_info.enabled:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if dist_info.main:
        final = out_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = out_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if msd is not None:
            model.save_pretrained(tmp, state_dict=msd)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(osd, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"ranks": rngs}, tmp / "rng_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1) + "\n")  # written last
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if cfg.save_total_limit:
            for _, old in _checkpoints(out_dir)[:-cfg.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved %s", final)
    if dist_info.enabled:
        dist.barrier()


def _load_optimizer_state(cfg, ckpt: Path, policy, optimizer, scheduler, dist_info) -> None:
    import torch

    osd = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(policy, optimizer, optim_state_dict=osd,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(osd)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
    rngs = torch.load(ckpt / "rng_state.pt", map_location="cpu", weights_only=True)["ranks"]
    if len(rngs) == dist_info.world:
        _set_rng_state(rngs[dist_info.rank])
    else:
        logger.warning("resuming on %d rank(s) a run saved on %d: RNG states are not restored", dist_info.world,
                       len(rngs))


# ----------------------------------------------------------------------------------------------
# Evaluation


def _evaluate(policy_fwd, ds, refs, collator, eval_bs: int, dist_info, device, vocab_size: int) -> dict:
    """Metrics of the whole eval set, each pair counted once over all ranks: per-pair means, and
    logits/* as token-level means over all scored tokens (as within one batch)."""
    import torch
    import torch.distributed as dist

    from .data import batch_completion_tokens

    n = len(ds)
    mine = list(range(dist_info.rank, n, dist_info.world))
    # Every rank runs the same number of forwards (FSDP's are collective): a rank with no pairs
    # left for a batch runs one pair and counts nothing of it.
    n_batches = math.ceil(math.ceil(n / dist_info.world) / eval_bs)
    per_pair_names = [m for m in EVAL_METRICS if not m.startswith("logits/")]
    sums = torch.zeros(len(EVAL_METRICS) + 3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for b in range(n_batches):
            idx = mine[b * eval_bs:(b + 1) * eval_bs]
            dummy = not idx
            batch = collator(_rows(ds, idx or [0]))
            ref_c, ref_r = refs(batch, device)
            out = policy_fwd(batch, ref_c, ref_r)
            if dummy:
                continue
            per_pair = {
                "loss": out.losses, "rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
                "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards),
                "rewards/margins": out.chosen_rewards - out.rejected_rewards,
                "logps/chosen": out.chosen_logps, "logps/rejected": out.rejected_logps,
                "logps/accuracies": (out.chosen_logps > out.rejected_logps),
            }
            tokens = batch_completion_tokens(batch).to(torch.float64)
            P = len(idx)
            denom = {"logits/chosen": float(tokens[:P].sum()) * vocab_size,
                     "logits/rejected": float(tokens[P:].sum()) * vocab_size}
            vals = []
            for name in EVAL_METRICS:
                if name in per_pair:
                    vals.append(per_pair[name].double().sum())
                else:  # the batch's token-level mean back to a sum, over the same denominator
                    vals.append(out.metrics[name].double() * max(denom[name], 1.0))
            vals += [torch.tensor(v, dtype=torch.float64, device=device) for v in
                     (max(denom["logits/chosen"], 1.0), max(denom["logits/rejected"], 1.0), float(P))]
            sums += torch.stack([v.to(device) for v in vals])
    if dist_info.enabled:
        dist.all_reduce(sums)
    count = max(float(sums[-1]), 1.0)
    result = {name: float(sums[i]) / count for i, name in enumerate(EVAL_METRICS) if name in per_pair_names}
    result["logits/chosen"] = float(sums[EVAL_METRICS.index("logits/chosen")]) / float(sums[-3])
    result["logits/rejected"] = float(sums[EVAL_METRICS.index("logits/rejected")]) / float(sums[-2])
    return {name: result[name] for name in EVAL_METRICS} | {"pairs": int(sums[-1])}


# ----------------------------------------------------------------------------------------------
# Training


def train(model=None, data=None, output_dir=None, *, config: TrainConfig | None = None, **options) -> dict:
    """Train `model` (a directory, hub name or loaded causal LM; then also pass `tokenizer=`) with
    DPO on `data`, writing to `output_dir`; returns the summary also written to summary.json:
    {"eval_before": {...} or None, "eval_after": {...} or None, "train": {...}}.

    Options are the fields of TrainConfig (the `dpo-fast train` flags with underscores), e.g.
    eval_data=, ref_cache=, beta=, learning_rate=, optimizer=, batch_size=, max_steps=,
    save_steps=, resume=True. Under torchrun every rank calls it; rank 0 writes the files.
    """
    if config is None:
        if model is None or data is None or output_dir is None:
            raise TrainError("train() needs model, data and output_dir")
        config = TrainConfig(model=model, data=data, output_dir=str(output_dir), **options)
    elif options or model is not None:
        raise TrainError("give either config= or model/data/output_dir with options, not both")
    config.check()
    return _Run(config).run()


class _Run:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def run(self) -> dict:
        import torch

        cfg = self.cfg
        device = _resolve_device(cfg)
        dist_info = _init_distributed(device.type)
        with _quiet_progress_bars(not cfg.progress or not dist_info.main):
            return self._run(torch, device, dist_info)

    def _run(self, torch, device, dist_info: _Dist) -> dict:
        import torch.distributed as dist
        from transformers import AutoTokenizer

        from .data import PreferenceCollator

        cfg = self.cfg
        out_dir = Path(cfg.output_dir)
        if dist_info.main:
            out_dir.mkdir(parents=True, exist_ok=True)
        if dist_info.enabled:
            dist.barrier()
        if cfg.fsdp and not dist_info.enabled:
            logger.warning("--fsdp without several processes (torchrun): training on one device unsharded")
        world = dist_info.world
        if cfg.batch_size % (world * cfg.grad_accum):
            raise TrainError(
                f"batch size {cfg.batch_size} is not divisible by world size {world} x grad_accum "
                f"{cfg.grad_accum} = {world * cfg.grad_accum}: every rank and accumulation step needs the same "
                f"number of pairs; use a batch size that is a multiple of {world * cfg.grad_accum}")
        micro = cfg.batch_size // (world * cfg.grad_accum)

        compute_dtype = torch.float32
        if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
            compute_dtype = torch.bfloat16
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        # --- resume point, tokenizer, data
        ckpt = _find_resume(cfg, out_dir)
        state = json.loads((ckpt / STATE_FILE).read_text()) if ckpt is not None else None
        if ckpt is None and dist_info.main and _checkpoints(out_dir):
            logger.warning("%s holds checkpoints of an earlier run; pass --resume to continue it. This run "
                           "overwrites them as it goes", out_dir)
        model_is_path = isinstance(cfg.model, (str, Path))
        if model_is_path:
            check_model_source(cfg.model)
        else:
            _lm_head_parts(cfg.model)
        tokenizer = cfg.tokenizer if cfg.tokenizer is not None else (str(cfg.model) if model_is_path else None)
        if tokenizer is None:
            raise TrainError("tokenizer: required when the model is given as a module")
        if isinstance(tokenizer, (str, Path)):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
            except OSError as e:
                raise TrainError(f"tokenizer {tokenizer}: cannot be loaded ({e})") from None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        train_ds = _tokenize(cfg.data, tokenizer, cfg, cfg.split, "--data")
        eval_ds = _tokenize(cfg.eval_data, tokenizer, cfg, cfg.eval_split, "--eval-data") \
            if cfg.eval_data is not None else None
        use_cache = not cfg.reference_free and cfg.ref_model is None
        if use_cache and model_is_path:
            _ensure_reference_caches(cfg, out_dir, tokenizer, train_ds, eval_ds, device,
                                     progress=cfg.progress and dist_info.main)

        # --- the policy (from the checkpoint when resuming)
        attn = _attn_implementation(cfg, device)
        if model_is_path:
            model = _load_policy(ckpt if ckpt is not None else cfg.model, attn, device)
        else:
            model = cfg.model.to(device)
            if use_cache and ckpt is None:
                _ensure_reference_caches(cfg, out_dir, tokenizer, train_ds, eval_ds, device, module=model,
                                         progress=cfg.progress and dist_info.main)
            if ckpt is not None:
                from safetensors.torch import load_file

                sd = {}
                for f in sorted(ckpt.glob("*.safetensors")):
                    sd.update(load_file(str(f), device=str(device)))
                missing, unexpected = model.load_state_dict(sd, strict=False)
                if unexpected or [k for k in missing if "lm_head" not in k]:
                    raise TrainError(f"--resume {ckpt}: its weights do not fit the model given "
                                     f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        _lm_head_parts(model)  # fail early on a model without an lm_head
        packing = cfg.packing if cfg.packing is not None else attn == "flash_attention_2"
        if cfg.gradient_checkpointing:
            _enable_checkpointing(model)
        if hasattr(model, "config"):
            model.config.use_cache = False

        # --- reference log-probs
        ref_fp = None
        if cfg.reference_free:
            refs_train = refs_eval = _References()
        elif cfg.ref_model is not None:
            ref = _load_policy(cfg.ref_model, attn, device).eval().requires_grad_(False)
            refs_train = refs_eval = _References(model=ref, compute_dtype=compute_dtype, backend=cfg.backend)
        else:
            # The reference is the initial policy: its fingerprint comes from the loaded model on a
            # fresh run (the safetensors files of a local --model), from the first run's state on resume.
            if state is not None and state.get("reference_fingerprint"):
                ref_fp = state["reference_fingerprint"]
            else:
                from .refcache import compute_fingerprint

                local = Path(str(cfg.model)) if model_is_path and Path(str(cfg.model)).is_dir() else None
                ref_fp = compute_fingerprint(model, tokenizer, max_length=cfg.max_length,
                                             max_prompt_length=cfg.max_prompt_length,
                                             truncation_side=cfg.truncation_side, dtype="float32",
                                             data_kind="paired", model_path=local)
            refs_train, refs_eval = _open_reference_caches(cfg, out_dir, ref_fp, train_ds, eval_ds)
        collator = PreferenceCollator(tokenizer.pad_token_id, packing=packing)
        schedule = _Schedule(len(train_ds), cfg.batch_size, cfg.seed)
        if schedule.steps_per_epoch == 0:
            raise TrainError(f"--data has {len(train_ds)} usable pairs, fewer than one batch of {cfg.batch_size}; "
                             "lower --batch-size")
        if cfg.max_steps is not None:
            total_steps = cfg.max_steps
        else:
            total_steps = max(1, int((cfg.epochs or 1.0) * schedule.steps_per_epoch))
        eval_bs = cfg.eval_batch_size or micro

        # --- the trained module
        loss_options = dict(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                            sft_weight=cfg.sft_weight)
        policy = _policy_loss_class()(model, loss_options, compute_dtype, cfg.backend)
        model.train()
        if dist_info.enabled and cfg.fsdp:
            policy = _fsdp_wrap(policy, model, compute_dtype, world, device)
            wrapped = policy
            eval_fwd = policy
        elif dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # No buffer broadcast per forward: eval forwards run on the ranks independently.
            no_sync_buffers = {"forward_sync_buffers": False} \
                if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters \
                else {"broadcast_buffers": False}
            wrapped = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None, **no_sync_buffers)
            eval_fwd = policy
        else:
            wrapped = eval_fwd = policy
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = _make_optimizer(cfg, params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.lr_scheduler))

        # --- resume
        start_step = 0
        window = None
        eval_before = None
        if ckpt is not None:
            _load_optimizer_state(cfg, ckpt, policy, optimizer, scheduler, dist_info)
            start_step = int(state["global_step"])
            windows = state.get("window_ranks") or []
            window = windows[dist_info.rank] if len(windows) == world else None
            eval_before = state.get("eval_before")
            if state.get("batch_size") != cfg.batch_size or state.get("seed") != cfg.seed \
                    or state.get("num_pairs") != len(train_ds):
                logger.warning("resuming %s with another batch size, seed or data than it was saved with: the "
                               "data order will differ from an uninterrupted run", ckpt)
            logger.info("resuming from %s (step %d)", ckpt, start_step)
        writer = _MetricsWriter(out_dir, dist_info.main, cfg.tensorboard, cfg.progress, total_steps, start_step)
        if ckpt is not None:
            writer.truncate_after(start_step)
        elif dist_info.main and (out_dir / METRICS_FILE).exists():
            (out_dir / METRICS_FILE).unlink()  # a fresh run: no stale lines from an earlier one

        def run_eval(phase: str, step: int) -> dict | None:
            if eval_ds is None:
                return None
            model.eval()
            with torch.autocast(device.type, enabled=False):
                metrics = _evaluate(eval_fwd, eval_ds, refs_eval, collator, eval_bs, dist_info, device,
                                    vocab_size=_lm_head_parts(model)[1].weight.shape[0])
            model.train()
            writer.write({"step": step, "phase": phase, **{f"eval_{k}": v for k, v in metrics.items()}})
            logger.info("%s: %s", phase, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            return metrics

        if start_step == 0 and eval_before is None:
            eval_before = run_eval("eval_before", 0)

        # --- the loop
        n_acc = len(LOSS_METRICS) + 3  # + grad_norm, tokens, steps
        acc = torch.zeros(n_acc, dtype=torch.float64, device=device)
        if window:
            acc = torch.tensor(window, dtype=torch.float64, device=device)
        last_logged: dict = dict(state.get("last_logged") or {}) if state else {}
        total_tokens = float(state.get("total_tokens", 0.0)) if state else 0.0
        t_window = time.perf_counter()
        t_start = time.perf_counter()
        tokens_run = 0.0
        sync_ctx = _grad_sync_controller(wrapped, dist_info, cfg.fsdp)
        for step in range(start_step, total_steps):
            indices = schedule.global_batch(step)
            lr_now = optimizer.param_groups[0]["lr"]
            step_acc = torch.zeros(len(LOSS_METRICS), dtype=torch.float64, device=device)
            step_tokens = 0
            for k in range(cfg.grad_accum):
                chunk = (dist_info.rank * cfg.grad_accum + k) * micro
                batch = collator(_rows(train_ds, indices[chunk:chunk + micro]))
                ref_c, ref_r = refs_train(batch, device)
                last = k == cfg.grad_accum - 1
                with sync_ctx(last):
                    out = wrapped(batch, ref_c, ref_r)
                    (out.loss / cfg.grad_accum).backward()
                vals = [out.loss.detach()] + [out.metrics[m] for m in LOSS_METRICS[1:]]
                step_acc += torch.stack([v.double() for v in vals]) / cfg.grad_accum
                step_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch \
                    else int((batch["sequence_ids"] >= 0).sum())
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                gn = torch.nn.utils.clip_grad_norm_(params, float("inf"))
            if hasattr(gn, "full_tensor"):
                gn = gn.full_tensor()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            acc += torch.cat([step_acc, torch.stack([gn.detach().double().to(device),
                                                     torch.tensor(float(step_tokens), dtype=torch.float64,
                                                                  device=device),
                                                     torch.ones((), dtype=torch.float64, device=device)])])
            acc_lr = lr_now
            done = step + 1
            if done % cfg.logging_steps == 0 or done == total_steps:
                vec = acc.clone()
                if dist_info.enabled:
                    dist.all_reduce(vec)
                    vec[:len(LOSS_METRICS) + 1] /= world  # means over ranks; tokens summed
                nsteps = max(float(vec[-1]) / (world if dist_info.enabled else 1), 1.0)
                elapsed = max(time.perf_counter() - t_window, 1e-9)
                window_tokens = float(vec[-2])
                peak = torch.tensor(_peak_memory_gb(device), dtype=torch.float64, device=device)
                if dist_info.enabled:
                    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                record = {"step": done, "epoch": round(done / schedule.steps_per_epoch, 4)}
                record.update({m: float(vec[i]) / nsteps for i, m in enumerate(LOSS_METRICS)})
                record.update({"learning_rate": acc_lr, "grad_norm": float(vec[len(LOSS_METRICS)]) / nsteps,
                               "tokens_per_second": window_tokens / elapsed, "peak_memory_gb": float(peak)})
                writer.write(record)
                last_logged = record
                total_tokens += window_tokens
                tokens_run += window_tokens
                acc.zero_()
                t_window = time.perf_counter()
                writer.progress(0, {"loss": record["loss"], "acc": record["rewards/accuracies"]})
            writer.progress(1)
            if cfg.save_steps and done % cfg.save_steps == 0 and done < total_steps:
                windows = [acc.tolist()]  # this logging window's per-rank sums so far
                if dist_info.enabled:
                    windows = [None] * world
                    dist.all_gather_object(windows, acc.tolist())
                trainer_state = {
                    "global_step": done, "epoch": done / schedule.steps_per_epoch, "batch_size": cfg.batch_size,
                    "grad_accum": cfg.grad_accum, "world_size": world, "seed": cfg.seed,
                    "num_pairs": len(train_ds), "total_steps": total_steps, "window_ranks": windows,
                    "eval_before": eval_before, "last_logged": last_logged, "total_tokens": total_tokens,
                    "reference_fingerprint": ref_fp,
                    "config": _jsonable_config(cfg),
                }
                _save_checkpoint(cfg, dist_info, out_dir, done, policy, model, tokenizer, optimizer, scheduler,
                                 trainer_state)
        runtime = time.perf_counter() - t_start

        # --- after training
        eval_after = run_eval("eval_after", total_steps)
        msd, _ = _full_state_dicts(cfg, policy, model, optimizer) if cfg.fsdp and dist_info.enabled else (None, None)
        summary = {
            "eval_before": eval_before,
            "eval_after": eval_after,
            "train": dict(last_logged, global_step=total_steps, runtime_s=runtime, total_tokens=total_tokens,
                          tokens_per_second_overall=tokens_run / max(runtime, 1e-9), world_size=world,
                          packing=packing, attn_implementation=attn,
                          dtype="bf16" if compute_dtype == torch.bfloat16 else "fp32"),
        }
        if dist_info.main:
            if msd is not None:
                model.save_pretrained(out_dir, state_dict=msd)
            else:
                model.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)
            (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        writer.close()
        if dist_info.enabled:
            dist.barrier()
        return summary


@contextlib.contextmanager
def _quiet_progress_bars(datasets_too: bool):
    """Hide the Hugging Face progress bars (weights loading/writing; with `datasets_too` also the
    datasets map bars) for the run, restoring them afterwards."""
    import datasets
    import transformers.utils.logging as hf_logging

    hf_was = hf_logging.is_progress_bar_enabled()
    ds_was = datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if datasets_too:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hf_was:
            hf_logging.enable_progress_bar()
        if datasets_too and ds_was:
            datasets.enable_progress_bars()


def _grad_sync_controller(wrapped, dist_info: _Dist, fsdp: bool):
    """context(last_micro_step): skip the gradient all-reduce on all but the last micro-step."""
    if not dist_info.enabled:
        return lambda last: contextlib.nullcontext()
    if fsdp:
        @contextlib.contextmanager
        def ctx(last):
            wrapped.set_requires_gradient_sync(last)
            yield
        return ctx
    return lambda last: contextlib.nullcontext() if last else wrapped.no_sync()


def _jsonable_config(cfg: TrainConfig) -> dict:
    out = {}
    for k, v in asdict(cfg).items():
        out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else f"<{type(v).__name__}>"
    return out
