"""TrainConfig: every option of `dpo_fast.train` and `dpo-fast train`, each stated once (default,
help, range); the CLI is generated from it and both are checked the same way, before any work."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import options
from ..backends import BACKENDS
from ..data import DEFAULT_MAX_LENGTH, TRUNCATION_SIDES
from ..objectives import LOSS_TYPES, check_loss_args
from ..options import option

OPTIMIZERS = ("rmsprop", "adamw", "adam", "sgd")
SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("auto", "bf16", "fp32")


class TrainError(ValueError):
    """A problem with the run's inputs or settings that the user can fix; the message says how."""


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
                       "(prompt/chosen/rejected, conversational or implicit prompt)", required=True,
                       group="model and data")
    output_dir: str = option(help="where checkpoints, metrics.jsonl, summary.json and the final model go (a "
                             "directory holding an earlier run is refused without --resume or "
                             "--overwrite-output-dir)", required=True, group="model and data")
    eval_data: Any = option(None, "held-out pairs, evaluated before and after training", group="model and data",
                            resumable=True)
    split: str = option("train", "split of --data", group="model and data")
    eval_split: str = option("test", "split of --eval-data (a single file loads whatever the name)",
                             group="model and data", resumable=True)
    tokenizer: Any = option(None, "tokenizer directory or name; unset: the model's", group="model and data")
    ref_cache: str | None = option(None, "reference log-probs precomputed with `dpo-fast precompute-ref` from the "
                                   "same --model; unset: computed into OUTPUT_DIR/ref_cache", metavar="DIR",
                                   group="model and data")
    ref_model: str | None = option(None, "compute reference log-probs on the fly with this model (holds two "
                                   "models in memory)", metavar="PATH", group="model and data")
    reference_free: bool = option(False, "no reference model (log-ratios against 0)", group="model and data")

    # --- loss
    loss_type: str = option("sigmoid", f"sigmoid is DPO; one of {', '.join(LOSS_TYPES)}", choices=LOSS_TYPES,
                            metavar="TYPE", group="loss")
    beta: float = option(0.1, _paper("KL strength beta"), minimum=0.0, exclusive=True, group="loss")
    label_smoothing: float = option(0.0, "conservative-DPO label smoothing", minimum=0.0, maximum=0.5,
                                    group="loss")
    sft_weight: float = option(0.0, "weight of the chosen responses' per-token NLL added to the loss (RPO)",
                               minimum=0.0, group="loss")

    # --- optimisation
    learning_rate: float = option(1e-6, _paper("peak learning rate"), flags=("--lr",), minimum=0.0, exclusive=True,
                                  group="optimisation")
    optimizer: str = option("rmsprop", _paper("optimizer"), choices=OPTIMIZERS, group="optimisation")
    weight_decay: float = option(0.0, "weight decay", minimum=0.0, group="optimisation")
    warmup_steps: int = option(150, _paper("linear warmup steps from 0"), minimum=0, group="optimisation")
    lr_scheduler: str = option("constant", "after warmup: constant (as in the DPO paper), linear or cosine decay "
                               "to 0", choices=SCHEDULERS, group="optimisation")
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)", minimum=0.0, group="optimisation")
    batch_size: int = option(64, _paper("pairs per optimizer step, over all ranks and accumulation steps"),
                             minimum=1, group="optimisation")
    grad_accum: int = option(1, "micro-batches per optimizer step and rank", minimum=1, group="optimisation")
    eval_batch_size: int | None = option(None, "pairs per eval forward; unset: the training micro-batch",
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
    truncation_side: str = option("keep_start", "which end of a too-long prompt to keep", choices=TRUNCATION_SIDES,
                                  group="sequences and speed")
    dtype: str = option("auto", "bf16: bf16 autocast over float32 weights; auto: bf16 on CUDA devices that support "
                        "it, fp32 otherwise", choices=DTYPES, group="sequences and speed")
    gradient_checkpointing: bool = option(False, "recompute activations in backward", group="sequences and speed",
                                          resumable=True)
    packing: bool | None = option(None, "padding-free packed batches; default: on with flash-attention 2, off "
                                  "otherwise", group="sequences and speed", resumable=True)
    attn_implementation: str | None = option(None, "default: flash_attention_2 when flash-attn is importable on "
                                             "CUDA, else what the model family supports (sdpa or eager)",
                                             group="sequences and speed", resumable=True)
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
                                            minimum=0.0, exclusive=True, group="sequences and speed",
                                            resumable=True)
    backend: str = option("auto", "kernel backend of the fused loss (dpo_fast.available_backends)",
                          choices=("auto",) + BACKENDS, group="sequences and speed", resumable=True)

    # --- logging and checkpoints
    logging_steps: int = option(10, "steps per metrics line", minimum=1, group="logging and checkpoints",
                                resumable=True)
    save_steps: int = option(500, "steps per checkpoint (0: none before the final step, which is always "
                             "checkpointed)", minimum=0, group="logging and checkpoints", resumable=True)
    save_total_limit: int | None = option(None, "keep only this run's newest N checkpoints", minimum=1,
                                          group="logging and checkpoints", resumable=True)
    resume: Any = option(None, "continue from the newest checkpoint in --output-dir (or the one given); starts "
                         "fresh if there is none", const="latest", metavar="CHECKPOINT",
                         group="logging and checkpoints", resumable=True)
    overwrite_output_dir: bool = option(False, "delete an earlier run in --output-dir before starting",
                                        group="logging and checkpoints", resumable=True)
    progress: bool = option(True, "hide the progress bar", negative_flag="--no-progress",
                            group="logging and checkpoints", resumable=True)
    tensorboard: bool = option(True, "write no TensorBoard events (written when tensorboard is installed)",
                               negative_flag="--no-tensorboard", group="logging and checkpoints", resumable=True)

    def check(self) -> None:
        """Every setting's type and range, and the combinations, before any work (TrainError)."""
        if isinstance(self.beta, (int, float)) or _is_scalar_tensor(self.beta):
            self.beta = float(self.beta)
        options.check_ranges(self, TrainError)
        try:
            check_loss_args(self.loss_type, self.beta, self.label_smoothing)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if sum(x is not None and x is not False for x in (self.ref_cache, self.ref_model, self.reference_free or None)) > 1:
            raise TrainError("give one of --ref-cache, --ref-model and --reference-free, not several")
        if self.max_steps is not None and self.epochs is not None:
            raise TrainError("give --max-steps or --epochs, not both")
        if self.tp > 1 and self.fsdp:
            raise TrainError("--tp with --fsdp (FSDP2 on the data dimension) is not supported yet; the tp groups are "
                             "data-parallel replicas without it")
        if self.resume and self.overwrite_output_dir:
            raise TrainError("give --resume or --overwrite-output-dir, not both")
        if self.overwrite_output_dir:
            self._check_nothing_inside_output_dir()

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
