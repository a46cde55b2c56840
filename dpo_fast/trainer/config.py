"""TrainConfig: every option of `dpo_fast.train` and `dpo-fast train`, each stated once (default,
help, range); the CLI is generated from it and both are checked the same way, before any work."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import hf, options
from ..backends import BACKENDS
from ..data import DEFAULT_MAX_LENGTH, TRUNCATION_SIDES
from ..loss_settings import LOSS_TYPES, LossSettings
from ..options import option

OPTIMIZERS = ("rmsprop", "adamw", "adam", "sgd")
ADAM_OPTIMIZERS = ("adamw", "adam")
SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("auto", "bf16", "fp16", "fp32")
REPORT_TO = ("tensorboard", "wandb", "none")
PAPER_WARMUP_STEPS = 150


class TrainError(ValueError):
    """A problem with the run's inputs or settings that the user can fix; the message says how."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: where it stopped (`step`: optimizer steps done, None before training
    began) and the newest checkpoint it can resume from (None: none was saved)."""

    def __init__(self, output_dir, step: int | None, checkpoint):
        super().__init__(f"interrupted at step {step}")
        self.output_dir, self.step, self.checkpoint = output_dir, step, checkpoint


def _paper(text: str) -> str:
    return f"{text} (default: %(default)s, as in the DPO paper)"


@dataclass
class TrainConfig:
    """Defaults follow the DPO paper (Rafailov et al. 2023, sec. B) where it gives one: beta 0.1,
    RMSprop, lr 1e-6 with a linear warmup over 150 steps, batch 64."""

    # --- model and data
    model: Any = option(help="policy to train: local directory or hub name; also the reference when no --ref-model "
                        "is given", required=True, group="model and data")
    data: Any = option(help="preference pairs: JSON/JSONL/Parquet/CSV file, save_to_disk directory or hub name "
                       "(prompt/chosen/rejected, conversational or implicit prompt), or rankings (prompt/responses, "
                       "best first, the same number per prompt: trained with the Plackett-Luce loss)",
                       required=True, group="model and data")
    output_dir: str = option(help="where checkpoints, metrics.jsonl, summary.json and the final model go (a "
                             "directory holding an earlier run is refused without --resume or "
                             "--overwrite-output-dir)", required=True, group="model and data")
    eval_data: Any = option(None, "held-out pairs (or rankings), evaluated before and after training and every "
                            "--eval-steps", group="model and data", resumable=True)
    split: str = option("train", "split of --data", group="model and data")
    eval_split: str = option("test", "split of --eval-data (a single file loads whatever the name)",
                             group="model and data", resumable=True)
    tokenizer: Any = option(None, "tokenizer directory or name; unset: the model's", group="model and data")
    ref_cache: str | None = option(None, "reference log-probs precomputed with `dpo-fast precompute-ref` from the "
                                   "same --model; unset: computed into OUTPUT_DIR/ref_cache (with --lora-r: the "
                                   "base model with the adapter disabled, in the same forward)", metavar="DIR",
                                   group="model and data")
    ref_model: str | None = option(None, "compute reference log-probs on the fly with this model (holds two "
                                   "models in memory)", metavar="PATH", group="model and data")
    reference_free: bool = option(False, "no reference model (log-ratios against 0)", group="model and data")

    # --- loss
    loss_type: Any = option("sigmoid", f"sigmoid is DPO; one of {', '.join(LOSS_TYPES)}, or several separated by "
                            "commas, mixed with --loss-weights (as TRL's loss_type list); ranked data trains with "
                            "sigmoid's Plackett-Luce form", metavar="TYPE[,TYPE...]", group="loss")
    loss_weights: Any = option(None, "weights of the --loss-type list, separated by commas; unset: 1 each",
                               metavar="W[,W...]", group="loss")
    # The loss settings' ranges are checked once, by LossSettings (loss_settings()).
    beta: float = option(0.1, _paper("KL strength beta (> 0)"), group="loss")
    label_smoothing: float = option(0.0, "conservative-DPO label smoothing, in [0, 0.5)", group="loss")
    sft_weight: float = option(0.0, "weight (>= 0) of the chosen responses' per-token NLL added to the loss (RPO)",
                               group="loss")

    # --- optimisation
    learning_rate: float = option(1e-6, _paper("peak learning rate"), flags=("--lr",), minimum=0.0, exclusive=True,
                                  group="optimisation")
    optimizer: str = option("rmsprop", _paper("optimizer"), choices=OPTIMIZERS, group="optimisation")
    adam_beta1: float | None = option(None, "beta1 of adam/adamw, in [0, 1); unset: 0.9 (torch's and TRL's)",
                                      minimum=0.0, maximum=1.0, group="optimisation")
    adam_beta2: float | None = option(None, "beta2 of adam/adamw, in [0, 1); unset: 0.999 (torch's and TRL's)",
                                      minimum=0.0, maximum=1.0, group="optimisation")
    adam_epsilon: float | None = option(None, "epsilon of adam/adamw; unset: 1e-8 (torch's and TRL's)", minimum=0.0,
                                        exclusive=True, group="optimisation")
    weight_decay: float = option(0.0, "weight decay", minimum=0.0, group="optimisation")
    warmup_steps: int | None = option(None, f"linear warmup steps from 0; unset: {PAPER_WARMUP_STEPS} (as in the DPO "
                                      "paper), or --warmup-ratio", minimum=0, group="optimisation")
    warmup_ratio: float | None = option(None, "warmup as a share of the total steps (rounded up), instead of "
                                        "--warmup-steps", minimum=0.0, maximum=1.0, group="optimisation")
    lr_scheduler: str = option("constant", "after warmup: constant (as in the DPO paper), linear or cosine decay "
                               "to 0", choices=SCHEDULERS, group="optimisation")
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)", minimum=0.0, group="optimisation")
    batch_size: int = option(64, _paper("pairs (or ranked prompts) per optimizer step, over all ranks and "
                                        "accumulation steps"),
                             minimum=1, group="optimisation")
    grad_accum: int = option(1, "micro-batches per optimizer step and rank", minimum=1, group="optimisation")
    eval_batch_size: int | None = option(None, "pairs (or ranked prompts) per eval forward; unset: the training "
                                         "micro-batch",
                                         minimum=1, group="optimisation", resumable=True)
    max_steps: int | None = option(None, "optimizer steps (unset: --epochs)", minimum=0, group="optimisation",
                                   resumable=True)
    epochs: float | None = option(None, "passes over the data (unset with no --max-steps: 1)", minimum=0.0,
                                  exclusive=True, group="optimisation", resumable=True)
    seed: int = option(42, "data order and RNG seed", group="optimisation")

    # --- sequences and speed
    max_length: int | None = option(DEFAULT_MAX_LENGTH, "max prompt + completion tokens (as precompute-ref)",
                                    minimum=1, group="sequences and speed")
    max_prompt_length: int | None = option(None, "max prompt tokens", minimum=1, group="sequences and speed")
    max_completion_length: int | None = option(None, "max tokens per completion (cut before --max-length applies)",
                                               minimum=1, group="sequences and speed")
    truncation_side: str = option("keep_start", "which end of a too-long prompt to keep", choices=TRUNCATION_SIDES,
                                  group="sequences and speed")
    dtype: str = option("auto", "bf16: bf16 autocast over float32 weights; fp16: fp16 autocast with loss scaling "
                        "(CUDA only, not with --fsdp); auto: bf16 on CUDA devices that support it, fp32 otherwise",
                        choices=DTYPES, group="sequences and speed")
    gradient_checkpointing: bool = option(False, "recompute activations in backward", group="sequences and speed",
                                          resumable=True)
    packing: bool | None = option(None, "padding-free packed batches; default: on with flash-attention 2, off "
                                  "otherwise", group="sequences and speed", resumable=True)
    prefix_sharing: bool = option(False, "run each prompt once for both responses ([prompt | chosen | rejected] with "
                                  "a tree attention mask); refused, with the reason, for a model family where it is "
                                  "not exact (flash-attention, recurrent layers, ...)", group="sequences and speed",
                                  resumable=True)
    attn_implementation: str | None = option(None, "default: flash_attention_2 when flash-attn is importable on "
                                             "CUDA, else what the model family supports (sdpa or eager)",
                                             group="sequences and speed", resumable=True)
    skip_head_check: bool = option(False, "do not compare the fused lm_head path with the model's own forward on a probe batch when the model "
                                "is loaded (default: compare, and refuse a model whose head it gets wrong)",
                                   group="sequences and speed")
    keep_dropout: bool = option(False, "keep the model's dropout on (default: off in policy and reference, as TRL)",
                                group="sequences and speed")
    fsdp: bool = option(False, "under torchrun: shard the model with FSDP2 fully_shard instead of DDP (models "
                        "that do not fit one device)", group="sequences and speed", resumable=True)
    tp: int = option(1, "under torchrun: tensor-parallel degree; the model is sharded over groups of this many ranks "
                     "with transformers' plan for its family, the loss is vocab-parallel (the lm_head weight is "
                     "never gathered), and the groups are data-parallel", minimum=1, group="sequences and speed")
    device: str | None = option(None, "default: cuda:LOCAL_RANK when CUDA is available, else cpu",
                                group="sequences and speed", resumable=True)
    logits_memory_mb: float | None = option(None, "megabytes the loss may hold logits in, pair by pair, to skip "
                                            "their recompute (3 GEMM passes instead of 4; one pair costs its "
                                            "tokens x vocabulary x 2 or 4 bytes); unset: never hold logits",
                                            group="sequences and speed",
                                            resumable=True)
    backend: str = option("auto", "kernel backend of the fused loss (dpo_fast.available_backends)",
                          choices=("auto",) + BACKENDS, group="sequences and speed", resumable=True)

    # --- LoRA (the peft extra: pip install -e ".[peft]")
    lora_r: int | None = option(None, "train a LoRA adapter of this rank instead of the whole model; the reference "
                                "is the base model (the adapter disabled); unset: no LoRA", minimum=1, group="LoRA")
    lora_alpha: float | None = option(None, "LoRA alpha (the update is scaled by alpha / r); unset: 32 (TRL's)",
                                      minimum=0.0, exclusive=True, group="LoRA")
    lora_dropout: float = option(0.0, "dropout on the adapter's input, in [0, 1) (0: the policy starts as the "
                                 "reference exactly)", minimum=0.0, maximum=1.0, group="LoRA")
    lora_target_modules: str | None = option(None, "modules to adapt, by name, separated by commas (e.g. q_proj,"
                                             "v_proj), or all-linear; unset: the attention and MLP projections "
                                             "the model family names", metavar="NAMES", group="LoRA")
    merge_lora: bool = option(False, "also save the model with the adapter merged in, to OUTPUT_DIR/merged",
                              group="LoRA", resumable=True)

    # --- logging and checkpoints
    logging_steps: int = option(10, "steps per metrics line", minimum=1, group="logging and checkpoints",
                                resumable=True)
    eval_steps: int | None = option(None, "evaluate --eval-data every N steps too (metrics under eval_ names; the "
                                    "evaluations before and after training are always made)", minimum=1,
                                    metavar="N", group="logging and checkpoints", resumable=True)
    save_steps: int = option(500, "steps per checkpoint (0: none before the final step, which is always "
                             "checkpointed)", minimum=0, group="logging and checkpoints", resumable=True)
    save_total_limit: int | None = option(None, "keep only this run's newest N checkpoints", minimum=1,
                                          group="logging and checkpoints", resumable=True)
    save_only_model: bool = option(False, "checkpoints hold the model only (no optimizer, scheduler or RNG state: "
                                   "smaller, but --resume refuses them)", group="logging and checkpoints",
                                   resumable=True)
    resume: Any = option(None, "continue from the newest checkpoint in --output-dir (or the one given); starts "
                         "fresh if there is none", const="latest", metavar="CHECKPOINT",
                         group="logging and checkpoints", resumable=True)
    overwrite_output_dir: bool = option(False, "delete an earlier run in --output-dir before starting",
                                        group="logging and checkpoints", resumable=True)
    progress: bool = option(True, "hide the progress bars (training, data loading and tokenizing, model loading, "
                            "the reference log-probs) (default: shown)", negative_flag="--no-progress",
                            group="logging and checkpoints", resumable=True)
    report_to: Any = option("none", "where metrics go besides metrics.jsonl (always written): tensorboard, wandb "
                            "(honours WANDB_MODE, e.g. offline), both separated by a comma, or none; a target whose "
                            "package is not installed is refused; none needs nothing installed",
                            metavar="TARGETS", group="logging and checkpoints", resumable=True)
    tensorboard: bool = option(True, "no TensorBoard events: the same as --report-to none, the default (kept "
                               "for older scripts) (default: TensorBoard only when --report-to names it)", negative_flag="--no-tensorboard",
                               group="logging and checkpoints", resumable=True)

    def check(self) -> None:
        """Every setting's type and range, and the combinations, before any work (TrainError)."""
        if isinstance(self.beta, (int, float)) or _is_scalar_tensor(self.beta):
            self.beta = float(self.beta)
        options.check_ranges(self, TrainError)
        self._check_loss()
        if sum(x is not None and x is not False for x in (self.ref_cache, self.ref_model, self.reference_free or None)) > 1:
            raise TrainError("give one of --ref-cache, --ref-model and --reference-free, not several")
        if self.max_steps is not None and self.epochs is not None:
            raise TrainError("give --max-steps or --epochs, not both")
        if self.tp > 1:
            for flag, value in (("--lora-r", self.lora_r), ("--logits-memory-mb", self.logits_memory_mb)):
                if value is not None:
                    raise TrainError(f"--tp with {flag} is not supported yet (tested: the vocab-parallel loss of a "
                                     "full model); leave one of them unset")
        if self.tp > 1 and self.fsdp:
            raise TrainError("--tp with --fsdp (FSDP2 on the data dimension) is not supported yet; the tp groups are "
                             "data-parallel replicas without it")
        if self.resume and self.overwrite_output_dir:
            raise TrainError("give --resume or --overwrite-output-dir, not both")
        if self.ref_cache is not None and not Path(self.ref_cache).is_dir():
            raise TrainError(f"--ref-cache {self.ref_cache}: the directory does not exist; precompute it first "
                             f"(dpo-fast precompute-ref --model ... --data ... --output-dir {self.ref_cache}) or leave "
                             "--ref-cache unset to compute the reference into the output directory")
        if self.eval_steps is not None and self.eval_data is None:
            raise TrainError("--eval-steps needs --eval-data (the pairs to evaluate)")
        self._check_optimisation()
        self._check_precision()
        self._check_reporting()
        self._check_lora()
        if self.overwrite_output_dir:
            self._check_nothing_inside_output_dir()

    def loss_settings(self) -> LossSettings:
        """The loss as one LossSettings (TrainError naming the flag of a bad setting)."""
        try:
            return LossSettings.make(beta=self.beta, loss_type=self.loss_type, loss_weights=self.loss_weights,
                                     label_smoothing=self.label_smoothing, sft_weight=self.sft_weight,
                                     logits_memory_mb=self.logits_memory_mb, backend=self.backend)
        except ValueError as e:
            raise TrainError(re.sub(r"\b(loss_weights|loss_type|label_smoothing|sft_weight|logits_memory_mb|beta|backend)"
                                    r"\b", lambda m: "--" + m.group(1).replace("_", "-"), str(e))) from None

    def _check_loss(self) -> None:
        parts = self.loss_settings().parts  # stored in one spelling, so a resumed run compares like with like
        self.loss_type = ",".join(c.loss_type for c in parts)
        self.loss_weights = None if all(c.weight == 1.0 for c in parts) else ",".join(repr(c.weight) for c in parts)

    def _check_optimisation(self) -> None:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise TrainError("give --warmup-steps or --warmup-ratio, not both")
        if self.warmup_steps is None and self.warmup_ratio is None:
            self.warmup_steps = PAPER_WARMUP_STEPS
        adam = [f"--{n.replace('_', '-')}" for n in ("adam_beta1", "adam_beta2", "adam_epsilon")
                if getattr(self, n) is not None]
        for name in ("adam_beta1", "adam_beta2"):
            if getattr(self, name) == 1.0:
                raise TrainError(f"--{name.replace('_', '-')}: expected < 1, got 1.0")
        if adam and self.optimizer not in ADAM_OPTIMIZERS:
            raise TrainError(f"{', '.join(adam)} set the adam/adamw optimizer, but --optimizer is {self.optimizer}; "
                             "pass --optimizer adamw (or adam), or drop them")

    def warmup(self, total_steps: int) -> int:
        """Warmup steps of a run of total_steps (after check())."""
        if self.warmup_ratio is not None:
            return math.ceil(self.warmup_ratio * total_steps)
        return self.warmup_steps

    def _check_precision(self) -> None:
        if self.dtype != "fp16":
            return
        if hf.resolve_device(self.device).type != "cuda":
            raise TrainError("--dtype fp16: float16 autocast with loss scaling runs on CUDA devices only; use --dtype "
                             "bf16 or fp32 on the CPU")
        if self.fsdp:
            raise TrainError("--dtype fp16 with --fsdp: the loss scaler would see each rank's shard of the "
                             "gradients apart; use --dtype bf16 with --fsdp")

    def report_targets(self) -> tuple[str, ...]:
        """The --report-to targets besides metrics.jsonl (after check())."""
        return () if self.report_to == "none" else tuple(self.report_to.split(","))

    def _check_reporting(self) -> None:
        text = self.report_to if isinstance(self.report_to, str) else ",".join(self.report_to or ())
        targets = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in targets if t not in REPORT_TO]
        if unknown or not targets:
            raise TrainError(f"--report-to: expected a comma-separated subset of {', '.join(REPORT_TO)}, "
                             f"got {self.report_to!r}")
        if "none" in targets:
            if len(targets) > 1:
                raise TrainError(f"--report-to {self.report_to}: none goes alone")
            targets = []
        if not self.tensorboard and "tensorboard" in targets:
            raise TrainError("--no-tensorboard and --report-to tensorboard contradict each other; give one")
        for target in targets:
            if not _importable(target):
                raise TrainError(f"--report-to {target}: the {target} package is not installed (pip install "
                                 f"{target}), or leave --report-to at none (metrics.jsonl is always written)")
        self.report_to = ",".join(dict.fromkeys(targets)) or "none"
        self.tensorboard = "tensorboard" in targets

    def _check_lora(self) -> None:
        if self.lora_dropout == 1.0:
            raise TrainError("--lora-dropout: expected < 1, got 1.0")
        if self.lora_r is None:
            given = [f"--{n.replace('_', '-')}" for n in ("lora_alpha", "lora_target_modules")
                     if getattr(self, n) is not None]
            given += ["--lora-dropout"] * bool(self.lora_dropout) + ["--merge-lora"] * bool(self.merge_lora)
            if given:
                raise TrainError(f"{', '.join(given)} need(s) --lora-r (the rank of the LoRA adapter)")
            return
        if not _importable("peft"):
            raise TrainError('--lora-r: LoRA needs the peft package; install the extra: pip install -e ".[peft]" '
                             "(or pip install peft)")
        if self.merge_lora and self.fsdp and not isinstance(self.model, (str, Path)):
            raise TrainError("--merge-lora with --fsdp needs --model as a path (the merged model is built from the "
                             "base weights on disk and the saved adapter)")

    def _check_nothing_inside_output_dir(self) -> None:
        out = Path(self.output_dir).resolve()
        for name in ("model", "data", "eval_data", "tokenizer", "ref_cache", "ref_model"):
            value = getattr(self, name)
            if isinstance(value, (str, Path)) and Path(str(value)).exists():
                path = Path(str(value)).resolve()
                if path == out or out in path.parents:
                    raise TrainError(f"--overwrite-output-dir would delete --{name.replace('_', '-')} {value}, "
                                     f"which lies inside --output-dir {self.output_dir}")

    def run_settings(self) -> dict:
        """The settings that define what is trained (compared with a checkpoint's on --resume)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata.get("resumable") and f.name != "output_dir"}

    def as_json(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:
        return False


def _is_scalar_tensor(x) -> bool:
    return type(x).__name__ == "Tensor" and getattr(x, "ndim", 1) == 0


def _jsonable(v):
    if isinstance(v, (str, int, float, bool, type(None))):
        return v
    if isinstance(v, Path):
        return str(v)
    return f"<{type(v).__name__}>"


def make_config(model=None, data=None, output_dir=None, **kwargs) -> TrainConfig:
    """TrainConfig from the Python API's arguments; CLI spellings (lr=) are accepted too."""
    alias = options.aliases(TrainConfig)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given, spelled = {}, {}
    for key, value in kwargs.items():
        name = alias.get(key, key)
        if name not in names:
            raise TrainError(f"unknown option {key!r}; the options are the fields of TrainConfig "
                             "(the dpo-fast train flags with underscores)")
        if name in given:
            raise TrainError(f"{spelled[name]!r} and {key!r} are the same option; give it once")
        given[name], spelled[name] = value, key
    if model is None or data is None or output_dir is None:
        raise TrainError("train() needs model, data and output_dir")
    return TrainConfig(model=model, data=data, output_dir=str(output_dir), **given)
