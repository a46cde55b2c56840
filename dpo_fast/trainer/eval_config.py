"""The options of `dpo-fast eval` (eval_command.py) and the settings they resolve to: given, else the
cache's tokenization, else the run's (MODEL/run.json), else the train defaults."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..backends import BACKENDS
from ..data import TRUNCATION_SIDES
from ..options import option
from .config import DTYPES, TrainConfig

_TOKENIZATION = ("max_length", "max_prompt_length", "max_completion_length", "truncation_side")
_LOSS = ("beta", "loss_type", "loss_weights", "label_smoothing", "sft_weight")


@dataclasses.dataclass
class EvalConfig:
    model: Any = option(help="the model to evaluate: a directory (a `dpo-fast train` output, LoRA adapters "
                        "included) or hub name", required=True, group="what")
    data: Any = option(help="preference pairs or rankings (as dpo-fast train takes them)", required=True,
                       group="what")
    split: str = option("test", "split of --data (a single file loads whatever the name)", group="what")
    ref_cache: str | None = option(None, "reference log-probs (dpo-fast precompute-ref, or a run's ref_cache); "
                                   "checked against --ref-model when given, else its weights are trusted",
                                   metavar="DIR", group="reference")
    ref_model: str | None = option(None, "the reference model: checks --ref-cache, or computes the reference on "
                                   "the fly without one", metavar="PATH", group="reference")
    reference_free: bool = option(False, "no reference (log-ratios against 0)", group="reference")
    tokenizer: str | None = option(None, "tokenizer; unset: the model's", group="what")
    output_file: str = option("eval_metrics.json", "where the metrics are written (JSON); an existing file is "
                              "refused unless --overwrite-output-file", group="what")
    overwrite_output_file: bool = option(False, "replace an existing --output-file", group="what")
    beta: float | None = option(None, "unset: the run's (MODEL/run.json), else 0.1",
                                group="loss (unset: the run's, else the train default)")
    loss_type: str | None = option(None, "unset: the run's, else sigmoid", metavar="TYPE[,TYPE...]",
                                   group="loss (unset: the run's, else the train default)")
    loss_weights: str | None = option(None, "unset: the run's, else 1 each", metavar="W[,W...]",
                                      group="loss (unset: the run's, else the train default)")
    label_smoothing: float | None = option(None, "unset: the run's, else 0",
                                           group="loss (unset: the run's, else the train default)")
    sft_weight: float | None = option(None, "unset: the run's, else 0",
                                      group="loss (unset: the run's, else the train default)")
    max_length: int | None = option(None, "unset: the cache's, else the run's, else 512", minimum=1,
                                    group="tokenization (unset: the cache's, else the run's)")
    max_prompt_length: int | None = option(None, "unset: the cache's, else the run's", minimum=1,
                                           group="tokenization (unset: the cache's, else the run's)")
    max_completion_length: int | None = option(None, "unset: the cache's, else the run's", minimum=1,
                                               group="tokenization (unset: the cache's, else the run's)")
    truncation_side: str | None = option(None, "unset: the cache's, else the run's, else keep_start",
                                         choices=TRUNCATION_SIDES,
                                         group="tokenization (unset: the cache's, else the run's)")
    batch_size: int = option(8, "examples per forward (the trainer's --eval-batch-size gives its numbers)",
                             minimum=1, group="how")
    dtype: str = option("auto", "as dpo-fast train --dtype", choices=DTYPES, group="how")
    device: str | None = option(None, "unset: cuda:LOCAL_RANK when CUDA is available, else cpu", group="how")
    backend: str = option("auto", "kernel backend", choices=("auto",) + BACKENDS, group="how")
    packing: bool | None = option(None, "padding-free packed batches; default: on with flash-attention 2",
                                  group="how")
    attn_implementation: str | None = option(None, "as dpo-fast train", group="how")
    skip_head_check: bool = option(False, "as dpo-fast train", group="how")
    prefix_sharing: bool = option(False, "as dpo-fast train --prefix-sharing", group="how")


def _run_settings(model) -> dict:
    """The settings of the `dpo-fast train` run that wrote MODEL (or a checkpoint of it), or {}."""
    if not isinstance(model, (str, Path)):
        return {}
    for d in (Path(str(model)), Path(str(model)).parent):
        try:
            return json.loads((d / "run.json").read_text()).get("settings") or {}
        except (OSError, ValueError):
            continue
    return {}


def resolve(cfg: EvalConfig, cache_settings: dict | None) -> TrainConfig:
    """The settings evaluated with, as a TrainConfig (checked as the trainer checks them): given,
    else the cache's tokenization, else the run's, else the train defaults."""
    run = _run_settings(cfg.model)
    chosen = {}
    for name in _TOKENIZATION + _LOSS:
        given = getattr(cfg, name)
        if given is not None:
            chosen[name] = given
        elif cache_settings is not None and name in _TOKENIZATION:
            chosen[name] = cache_settings[name]  # None included: the cache's own setting
        elif name in run:
            chosen[name] = run[name]
    train_cfg = TrainConfig(model=cfg.model, data=cfg.data, output_dir=".", tokenizer=cfg.tokenizer,
                            dtype=cfg.dtype, device=cfg.device, backend=cfg.backend, report_to="none",
                            progress=False, **chosen)
    train_cfg.check()
    return train_cfg
