"""dpo_fast as a drop-in for TRL's DPOTrainer (tested with trl 1.16.0).

    from trl import DPOConfig
    from dpo_fast.integrations.trl import DPOTrainer      # instead of trl.DPOTrainer
    DPOTrainer(model, args=DPOConfig(...), train_dataset=ds, processing_class=tokenizer).train()

The subclass keeps TRL's data preparation, collation, truncation, batching, gradient accumulation,
logging, evaluation and checkpoints, and replaces two steps: the policy loss is
`dpo_fast.loss(hidden=, weight=)` on the decoder's final hidden states and the lm_head weight (no
logits), and reference log-probs (a `ref_model`, the PEFT model with its adapter disabled, or TRL's
`precompute_ref_log_probs`) come from `dpo_fast.linear_sequence_logprobs` without grad. Both run
inside the model's own forward (a `dpo_fast_request=` keyword is added to it), so DDP, PEFT and
accelerate's wrappers see one ordinary forward call, as with TRL's fused head.

TRL's batch layout is already dpo_fast's: 2P rows, chosen first; labels are input_ids with -100
where TRL's completion_mask is 0 (prompt and padding), shifted inside the op as in Hugging Face.
Settings whose results would differ from trl.DPOTrainer are refused at construction
(`check_config`); see docs/trl.md for the list and the reasons.

`precompute_ref_dataset` fills TRL's `ref_chosen_logps` / `ref_rejected_logps` columns from a
dpo_fast reference cache (`dpo-fast precompute-ref`), checked against the reference model, the
tokenizer and the truncation settings, and the trainer checks that TRL tokenized every example
into the same token sequences the cache was computed on.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import math
import types
import warnings
from pathlib import Path

import torch

from datasets import Dataset

from .. import hf
from ..data import tokenize_preferences
from ..data.shared import shared_from_padded
from ..prefix_sharing import check_prefix_sharing
from ..functional import linear_sequence_logprobs
from ..loss import DPOLoss
from ..loss_settings import LossSettings
from ..refcache import (MissingExamplesError, ReferenceCache, compute_fingerprint, fingerprint_digest,
                        safetensors_fingerprint)

try:
    import trl
    from accelerate.utils import is_peft_model
    from transformers import ProcessorMixin
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError(f"dpo_fast.integrations.trl needs trl ({e}); install it with: pip install \"dpo_fast[trl]\"") \
        from None

logger = logging.getLogger(__name__)

TESTED_TRL_VERSION = "1.16.0"

# TRL loss types whose value and gradient dpo_fast's loss reproduces (TRL 1.16's formulas).
SUPPORTED_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "exo_pair", "nca_pair", "sppo_hard", "apo_zero",
                        "apo_down", "sigmoid_norm")
# TRL loss types refused, and why.
REFUSED_LOSS_TYPES = {
    "bco_pair": "TRL 1.16's bco_pair has no reward shift (-log s(beta a) - log s(-beta b)), dpo_fast's "
                "subtracts the batch-mean reward delta as in the BCO paper, so values and gradients differ",
    "aot": "dpo_fast has no AOT loss (it sorts log-ratios across the batch)",
    "aot_unpaired": "dpo_fast has no AOT loss (it sorts log-ratios across the batch)",
    "discopop": "dpo_fast has no DiscoPOP loss",
    "sft": "TRL averages the SFT term over all chosen tokens of the batch, dpo_fast (sft_weight) per sequence, "
           "so values differ; and a pure SFT loss is no preference loss",
}
# TRL reads label_smoothing only for these (it ignores it for 'sigmoid', where dpo_fast would do cDPO).
LABEL_SMOOTHING_TYPES = ("robust", "exo_pair")
# TRL divides by the unshifted completion length for these; dpo_fast by the scored (shifted) tokens.
PER_TOKEN_TYPES = ("ipo", "sigmoid_norm")
# TRL's metrics that need the full softmax per token, which the fused op does not compute.
UNLOGGED_METRICS = ("entropy", "mean_token_accuracy")

REQUEST = "dpo_fast_request"  # the keyword the patched model forward takes
DIGEST = "dpo_fast_sequences_sha256"  # column of precompute_ref_dataset: the token sequences cached
_MODEL_KEYS = ("input_ids", "attention_mask")
_TRL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


# ----------------------------------------------------------------------------------------------
# What is refused


def check_loss(loss_types, f_divergence_type, ld_alpha, use_weighting) -> str:
    """Refuse loss settings this trainer cannot compute as trl.DPOTrainer does (ValueError naming the
    setting); returns the one loss type. Checked at construction and again at every step, since TRL
    reads these from the trainer at every step."""
    loss_types = list(loss_types)
    if len(loss_types) != 1:
        raise ValueError(f"loss_type={loss_types}: dpo_fast's fused loss computes one loss type per step; TRL's "
                         "weighted mixtures (loss_weights, e.g. MPO or RPO as ['sigmoid', 'sft']) are not supported. "
                         "Use one loss type, or trl.DPOTrainer")
    loss_type = loss_types[0]
    if loss_type in REFUSED_LOSS_TYPES:
        raise ValueError(f"loss_type='{loss_type}' is not supported: {REFUSED_LOSS_TYPES[loss_type]}. Supported: "
                         f"{', '.join(SUPPORTED_LOSS_TYPES)}")
    if loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"loss_type='{loss_type}' is not supported; supported: {', '.join(SUPPORTED_LOSS_TYPES)}")
    if f_divergence_type != "reverse_kl":
        raise ValueError(f"f_divergence_type='{f_divergence_type}' is not supported: dpo_fast's losses are on "
                         "log-ratios (reverse KL); use f_divergence_type='reverse_kl', or trl.DPOTrainer")
    if ld_alpha is not None:
        raise ValueError(f"ld_alpha={ld_alpha} is not supported: the fused op sums every completion token with "
                         "weight 1 (LD-DPO down-weights the tokens past the shorter completion); unset ld_alpha")
    if use_weighting:
        raise ValueError("use_weighting=True (WPO) is not supported: its weights need the sum of squared token "
                         "probabilities, which the fused op does not compute; set use_weighting=False")
    return loss_type


def loss_settings(loss_type: str, beta, label_smoothing, *, logits_memory_mb=None, backend="auto") -> LossSettings:
    """dpo_fast's settings for TRL's: label_smoothing only where TRL reads it (ValueError naming a bad one)."""
    if loss_type == "exo_pair" and label_smoothing == 0.0:
        raise ValueError("label_smoothing=0.0 with loss_type='exo_pair': TRL refuses it (EXO needs a smoothing > 0; "
                         "the paper uses 1e-3)")
    smoothing = label_smoothing if loss_type in LABEL_SMOOTHING_TYPES else 0.0
    return LossSettings.make(beta=beta, loss_type=loss_type, label_smoothing=smoothing,
                             logits_memory_mb=logits_memory_mb, backend=backend)


def check_config(args) -> None:
    """Refuse a DPOConfig that this trainer cannot honour with trl.DPOTrainer's results:
    ValueError naming the setting."""
    loss_type = check_loss(args.loss_type, args.f_divergence_type, args.ld_alpha, args.use_weighting)
    if not (loss_type == "exo_pair" and args.label_smoothing == 0.0):  # TRL's own message for that one
        loss_settings(loss_type, args.beta, args.label_smoothing)
    if loss_type == "sigmoid" and args.label_smoothing:
        warnings.warn(f"label_smoothing={args.label_smoothing} is ignored with loss_type='sigmoid', as "
                      "trl.DPOTrainer ignores it (dpo_fast's own trainer would do conservative DPO)", stacklevel=3)
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        raise ValueError("DeepSpeed ZeRO-3 (deepspeed zero_stage=3) is not supported: the fused op recomputes the "
                         "lm_head tiles in backward from the weight it saved, which ZeRO-3 has partitioned away by "
                         "then; use ZeRO-1/2, FSDP2 or DDP")


def check_model(model, processing_class, args, peft_config=None) -> None:
    """Refuse a model setup the fused path cannot run as TRL would (ValueError naming it)."""
    if isinstance(processing_class, ProcessorMixin):
        raise ValueError(f"processing_class is a {type(processing_class).__name__} (a vision-language model): the "
                         "fused path runs the text decoder on input_ids only; use trl.DPOTrainer")
    if isinstance(model, str):
        return
    text_config = model.config.get_text_config()
    coef = args.router_aux_loss_coef
    coef = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
    if hasattr(text_config, "output_router_logits") and coef:
        raise ValueError(f"router_aux_loss_coef={coef}: the MoE load-balancing loss is not computed on the fused "
                         "path; set router_aux_loss_coef=0.0 in DPOConfig, or use trl.DPOTrainer")
    for config in [peft_config, *(getattr(model, "peft_config", None) or {}).values()]:
        if config is not None and getattr(config, "is_prompt_learning", False):
            raise ValueError(f"peft_config: prompt learning ({type(config).__name__}) prepends virtual tokens the "
                             "fused path does not see; use a LoRA-style adapter, or trl.DPOTrainer")


# ----------------------------------------------------------------------------------------------
# The model forward that runs dpo_fast


def causal_lm(model, accelerator=None):
    """The causal LM inside accelerate / DDP / DeepSpeed / PEFT wrappers (whose forward gets patched)."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    if is_peft_model(model):
        model = model.get_base_model()
    return hf.unwrap(model)


def install_forward(lm, check_head: bool = True) -> None:
    """Give `lm.forward` the keyword dpo_fast_request=: then the forward computes what the request asks
    (the fused loss, or reference log-probs) instead of logits. Without it, the forward is the one it
    had (TRL's fused-head forward, or the model's own). Idempotent. check_head: the lm_head self-check
    (dpo_fast.heads), once per model."""
    if getattr(lm, "_dpo_fast_forward", False):
        return
    hf.lm_head_parts(lm, check=check_head)  # a ModelError now, not at the first step
    previous = lm.forward

    @functools.wraps(type(lm).forward)  # keeps the signature generate() checks its kwargs against
    def forward(self, *args, dpo_fast_request=None, **kwargs):
        if dpo_fast_request is None:
            return previous(*args, **kwargs)
        return run_request(self, dpo_fast_request, args, kwargs)

    lm.forward = types.MethodType(forward, lm)
    lm._dpo_fast_forward = True


def run_request(lm, request: dict, args, kwargs):
    """The body of the patched forward: decoder -> final hidden states -> fused op. Returns a
    dpo_fast.DPOOutput for a loss request, per-sequence log-probs (2P,) float32 for a reference one."""
    if args:
        raise TypeError(f"{REQUEST}: pass the model inputs as keywords")
    extra = sorted(k for k, v in kwargs.items() if v is not None and k not in _MODEL_KEYS + ("use_cache",))
    if extra:
        raise ValueError(f"the batch holds model inputs {extra} that the fused path does not pass to the decoder "
                         "(it runs on input_ids and attention_mask): a custom data_collator? Use TRL's collator")
    head = hf.lm_head_parts(lm)
    if type(head.weight).__name__ == "DTensor":
        raise ValueError("the lm_head weight is a sharded DTensor inside the forward (tensor parallelism, or an "
                         "FSDP2 unit of its own): shard the lm_head with the root module")
    batch = {"input_ids": kwargs["input_ids"], "attention_mask": kwargs.get("attention_mask"),
             "labels": request["labels"]}
    if batch["attention_mask"] is None:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if request.get("prefix_sharing"):  # TRL's padded rows, each prompt once (unshared where prompt tokens differ)
        batch = shared_from_padded(batch["input_ids"], batch["attention_mask"], batch["labels"] != -100, 0)
    device = head.weight.device
    # Under autocast (DPOConfig bf16/fp16) the op takes hidden and weight in the autocast dtype, as TRL's
    # head multiplies them under autocast; it accumulates in float32 itself.
    compute_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    inputs = hf.fused_inputs(head, batch, compute_dtype)
    with torch.autocast(device.type, enabled=False):
        if request.get("loss") is None:
            return linear_sequence_logprobs(**inputs, backend=request["backend"]).float()
        ref_chosen, ref_rejected = request["ref"]
        return request["loss"](**inputs, ref_chosen_logps=ref_chosen.float(), ref_rejected_logps=ref_rejected.float())


def completion_labels(inputs: dict) -> torch.Tensor:
    """TRL's labels: input_ids with -100 outside the completion (prompt and padding)."""
    return inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)


# ----------------------------------------------------------------------------------------------
# The trainer


class DPOTrainer(trl.DPOTrainer):
    """trl.DPOTrainer with dpo_fast's fused loss and reference log-probs; same arguments, plus
    `backend=` (dpo_fast kernel backend, default "auto"), `logits_memory_mb=` (dpo_fast.loss's
    budget: hold whole pairs' logits, 3 GEMM passes instead of 4; default None, never hold logits) and
    `check_head=` (default True: compare the fused path with each model's own forward on a probe batch
    and refuse a model whose lm_head it gets wrong; False is the explicit opt-out) and
    `prefix_sharing=` (run each prompt once for both responses; refused with the reason for a model
    family where it is not exact, see dpo_fast.prefix_sharing).
    Refuses (ValueError naming the setting) what it cannot compute as TRL does: see `check_config`,
    `check_model` and docs/trl.md."""

    def __init__(self, *args, backend: str = "auto", logits_memory_mb: float | None = None, check_head: bool = True,
                 prefix_sharing: bool = False, **kwargs):
        LossSettings(logits_memory_mb=logits_memory_mb, backend=backend)  # ValueError naming a bad one, up front
        bound = inspect.signature(trl.DPOTrainer.__init__).bind(self, *args, **kwargs).arguments
        config = bound.get("args")
        if config is not None:
            check_config(config)
            check_model(bound["model"], bound.get("processing_class"), config, bound.get("peft_config"))
            if not config.precompute_ref_log_probs:
                for name in ("train_dataset", "eval_dataset"):
                    _refuse_unused_cache(bound.get(name), name)
        if trl.__version__ != TESTED_TRL_VERSION:
            logger.warning("dpo_fast.integrations.trl was tested with trl %s; this is trl %s (it overrides "
                           "DPOTrainer._compute_loss, compute_ref_log_probs and _precompute_ref_logps)",
                           TESTED_TRL_VERSION, trl.__version__)
        self._dpo_fast_backend, self._dpo_fast_logits_memory_mb = backend, logits_memory_mb
        self._dpo_fast_loss = None
        self._dpo_fast_prefix_sharing = bool(prefix_sharing)
        super().__init__(*args, **kwargs)
        if config is None:
            check_config(self.args)
        check_model(self.model, self.processing_class, self.args)
        if self.args.disable_dropout:  # also the attention dropout configs hold (TRL zeroes nn.Dropout only)
            for m in (self.model, self.ref_model):
                if m is not None:
                    hf.disable_dropout(m)
        install_forward(causal_lm(self.model, self.accelerator), check_head)
        if self.ref_model is not None:
            install_forward(causal_lm(self.ref_model, self.accelerator), check_head)
        if prefix_sharing:
            for m in (self.model, self.ref_model):
                if m is not None:
                    check_prefix_sharing(causal_lm(m, self.accelerator))

    # -- reference log-probs

    def compute_ref_log_probs(self, model, inputs):
        """(ref_chosen_logps, ref_rejected_logps) of a collated batch through the fused op, without grad;
        for a PEFT model without ref_model, with the adapter disabled (or TRL's "ref" adapter)."""
        install_forward(causal_lm(model, self.accelerator))
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            peft_model = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None)
        request = {"labels": completion_labels(inputs), "backend": self._dpo_fast_backend,
                   "prefix_sharing": self._dpo_fast_prefix_sharing}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter, self.accelerator.autocast():
            logps = model(**{k: inputs[k] for k in _MODEL_KEYS}, use_cache=False, **{REQUEST: request})
        return logps.chunk(2, dim=0)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Columns from precompute_ref_dataset (or the user's own) are used as they are.
        columns = set(getattr(dataset, "column_names", None) or ())
        if {"ref_chosen_logps", "ref_rejected_logps"} <= columns:
            if DIGEST in columns:
                check_cached_sequences(dataset, self.args.max_length, name)
                dataset = dataset.remove_columns(DIGEST)
            else:
                logger.info("%s dataset: using its own ref_chosen_logps / ref_rejected_logps columns", name)
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)

    # -- the loss

    def step_loss(self) -> DPOLoss:
        """This step's loss, from the settings TRL reads from the trainer at every step (a callback
        may change beta, label_smoothing, loss_weights, ...): supported ones are followed, others
        refused (ValueError naming the setting)."""
        loss_type = check_loss(self.loss_types, self.f_divergence_type, self.ld_alpha, self.use_weighting)
        if self.aux_loss_enabled:
            raise ValueError(f"router_aux_loss_coef={self.router_aux_loss_coef}: the MoE load-balancing loss is not "
                             "computed on the fused path")
        settings = loss_settings(loss_type, self.beta, self.label_smoothing,
                                 logits_memory_mb=self._dpo_fast_logits_memory_mb, backend=self._dpo_fast_backend)
        if self._dpo_fast_loss is None or self._dpo_fast_loss.settings != settings:
            self._dpo_fast_loss = DPOLoss(settings)
        return self._dpo_fast_loss

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        extra = sorted(set(inputs) - set(_MODEL_KEYS) - set(_TRL_KEYS))
        if extra:
            raise ValueError(f"the batch holds {extra}, which the fused path does not pass to the decoder (it runs "
                             "on input_ids and attention_mask): a custom data_collator? Use TRL's collator")
        loss = self.step_loss()
        loss_type = loss.settings.spec
        if loss_type in PER_TOKEN_TYPES and bool(inputs["completion_mask"][:, 0].any()):
            raise ValueError(f"loss_type='{loss_type}': a completion starts at position 0 (an empty prompt). TRL "
                             "then counts that first token, which nothing predicts, in its per-token average and "
                             "dpo_fast does not; give every example a prompt token (e.g. the tokenizer's BOS)")
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, inputs)
        install_forward(causal_lm(model, self.accelerator))
        request = {"labels": completion_labels(inputs), "backend": self._dpo_fast_backend, "loss": loss,
                   "prefix_sharing": self._dpo_fast_prefix_sharing,
                   "ref": (ref_chosen, ref_rejected)}
        out = model(**{k: inputs[k] for k in _MODEL_KEYS}, use_cache=False, **{REQUEST: request})
        loss = out.loss * self.loss_weights[0]
        self._log_dpo_metrics(mode, out, inputs, ref_chosen.float(), ref_rejected.float())
        if return_outputs:  # as TRL: logits for compute_metrics come from an extra plain forward
            warnings.warn("return_outputs=True recomputes the logits with an extra forward pass", FutureWarning,
                          stacklevel=2)
            with torch.no_grad():
                outputs = model(**{k: inputs[k] for k in _MODEL_KEYS}, use_cache=False)
            return loss, outputs
        return loss

    def _log_dpo_metrics(self, mode, out, inputs, ref_chosen, ref_rejected) -> None:
        """TRL's metrics, under TRL's names and reductions over processes (not UNLOGGED_METRICS)."""
        acc, metrics = self.accelerator, self._metrics[mode]
        if mode == "train":
            tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        scored = inputs["completion_mask"][:, 1:].chunk(2, dim=0)
        for side, mask in zip(("chosen", "rejected"), scored):
            count = mask.sum()
            # dpo_fast's logits/<side> is the mean logit over scored tokens and the vocabulary; TRL sums the
            # per-token vocabulary means and divides by the tokens of all processes.
            total = acc.gather_for_metrics(out.metrics[f"logits/{side}"] * count).sum().item()
            count = acc.gather_for_metrics(count).sum().item()
            metrics[f"logits/{side}"].append(total / count if count > 0 else 0.0)
        chosen_rewards = self.beta * (out.chosen_logps - ref_chosen)  # summed log-ratios, as TRL (also for ipo)
        rejected_rewards = self.beta * (out.rejected_logps - ref_rejected)
        metrics["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(acc.gather(out.chosen_logps).mean().item())
        metrics["logps/rejected"].append(acc.gather(out.rejected_logps).mean().item())


def _refuse_unused_cache(dataset, name: str) -> None:
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    if any(DIGEST in (getattr(d, "column_names", None) or ()) for d in datasets if d is not None):
        raise ValueError(f"{name} carries reference log-probs from precompute_ref_dataset, but "
                         "precompute_ref_log_probs=False would compute them again from a reference model: set "
                         "precompute_ref_log_probs=True in DPOConfig")


# ----------------------------------------------------------------------------------------------
# Reference log-probs from a dpo_fast cache


def sequences_digest(prompt, chosen, rejected, max_length: int | None) -> str:
    """SHA-256 of the token sequences a pair is scored on, after TRL's keep_start truncation of
    prompt + completion to max_length (which cuts only the completion of a pair TRL keeps)."""
    room = None if max_length is None else max(0, max_length - len(prompt))
    parts = [list(map(int, prompt)), list(map(int, chosen))[:room], list(map(int, rejected))[:room]]
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def check_cached_sequences(dataset, max_length: int | None, name: str) -> None:
    """Refuse a TRL-tokenized dataset whose token sequences are not the ones its cached reference
    log-probs (precompute_ref_dataset) were computed on."""
    rows = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids", DIGEST])
    unscored, differ = [], []
    for i, row in enumerate(rows):
        if not row[DIGEST]:
            unscored.append(i)
        elif sequences_digest(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"], max_length) != row[DIGEST]:
            differ.append(i)
    if unscored:
        raise ValueError(f"{name} dataset: {len(unscored)} row(s) have no cached reference log-probs (dpo_fast's "
                         f"tokenization skipped them: the prompt alone fills max_length) but TRL kept them "
                         f"(rows {unscored[:10]}); drop them from the data")
    if differ:
        raise ValueError(f"{name} dataset: TRL tokenized {len(differ)} of {len(rows)} example(s) into other token "
                         f"sequences than the ones the dpo_fast cache was computed on (rows {differ[:10]}), so "
                         "their cached reference log-probs do not apply. TRL tokenizes prompt+completion jointly, "
                         "dpo_fast apart (e.g. a prompt ending in a space); use precompute_ref_log_probs=True "
                         "without cached columns, or data whose completions start on a token boundary")


def precompute_ref_dataset(dataset, cache_dir, *, model, tokenizer, args):
    """`dataset` (prompt/chosen/rejected, as trl.DPOTrainer takes it) with TRL's `ref_chosen_logps` /
    `ref_rejected_logps` columns filled from a dpo_fast reference cache, for
    `DPOTrainer(..., args=args)` with `args.precompute_ref_log_probs=True` (then no reference model
    is loaded nor run).

    model: the reference, as `dpo-fast precompute-ref --model` got it: a local directory (its
        safetensors files are fingerprinted) or a loaded module. tokenizer: the one TRL uses.
    args: the DPOConfig the trainer gets (its max_length must be the cache's).
    Raises CacheMismatchError for a cache made for another model, tokenizer or settings, and
    MissingExamplesError naming how many rows (and which) the cache lacks.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset: a datasets.Dataset is needed (TRL precomputes on map-style data), got "
                        f"{type(dataset).__name__}")
    if args.truncation_mode != "keep_start":
        raise ValueError(f"truncation_mode='{args.truncation_mode}': TRL's keep_end cuts the start of prompt + "
                         "completion, which no dpo_fast cache does; use truncation_mode='keep_start'")
    settings = {"max_length": args.max_length, "max_prompt_length": None, "truncation_side": "keep_start"}
    local = Path(str(model)).expanduser() if isinstance(model, (str, Path)) else None
    if local is not None and local.is_dir() and safetensors_fingerprint(local) is not None:
        model = types.SimpleNamespace(config=hf.load_config(local))  # only the config is read
    else:
        if local is not None:
            model = hf.load_causal_lm(model, device="cpu", check_head=False)  # its weights are hashed, never run
        local = None
    fingerprint = compute_fingerprint(model, tokenizer, **settings, dtype="float32", model_path=local)
    cache = ReferenceCache.open(cache_dir, expected_fingerprint=fingerprint, ignore=("dtype",))
    logger.info("reference cache %s (fingerprint %s, computed in %s)", cache.path,
                fingerprint_digest(cache.fingerprint)[:12], cache.fingerprint.get("dtype"))

    tokenized, report = tokenize_preferences(dataset, tokenizer, **settings)
    absent = set(cache.missing(tokenized["example_id"]))
    if absent:
        missing = [f"row {i} ({e})" for i, e in zip(tokenized["row_index"], tokenized["example_id"]) if e in absent]
        raise MissingExamplesError(cache.path, missing, len(tokenized))
    chosen, rejected = [math.nan] * len(dataset), [math.nan] * len(dataset)
    digests = [""] * len(dataset)  # rows dpo_fast skipped (prompt fills max_length): TRL drops them too
    if len(tokenized):
        rows = tokenized["row_index"]
        values = cache.lookup(tokenized["example_id"])
        for k, (i, p, c, r) in enumerate(zip(rows, tokenized["prompt_input_ids"], tokenized["chosen_input_ids"],
                                             tokenized["rejected_input_ids"])):
            chosen[i] = float(values["ref_chosen_logps"][k])
            rejected[i] = float(values["ref_rejected_logps"][k])
            digests[i] = sequences_digest(p, c, r, args.max_length)
    if report.skipped:
        logger.info("precompute_ref_dataset: %d row(s) have no reference values (%s)", report.skipped, report)
    dataset = dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)
    return dataset.add_column(DIGEST, digests)
