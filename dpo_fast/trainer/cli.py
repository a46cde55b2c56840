"""`dpo-fast train`: the options come from TrainConfig; errors a user can fix print one line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import options
from .config import TrainConfig, TrainError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_arguments(parser, TrainConfig)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return options.from_args(TrainConfig, args)


def _summary_line(summary: dict) -> str:
    parts = [f"steps {summary['train'].get('global_step')}"]
    for name in ("eval_before", "eval_after"):
        ev = summary.get(name) or {}
        if ev:
            acc = "rewards/accuracies" if "rewards/accuracies" in ev else "rewards/ranking_accuracy"
            parts.append(f"{name}: {acc} {ev[acc]:.3f} margins {ev['rewards/margins']:.3f} loss {ev['loss']:.4f}")
    return "dpo-fast train: done; " + "; ".join(parts)


def run_cli(args: argparse.Namespace) -> int:
    from ..data import DataFileError, MalformedRowError
    from ..hf import ModelError
    from ..refcache import CacheError
    from . import train

    if not logging.getLogger().handlers:
        # Under torchrun only rank 0 talks; the others report warnings and errors.
        level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
        logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        summary = train(config=config_from_args(args))
    except (TrainError, CacheError, ModelError, MalformedRowError, DataFileError, FileNotFoundError) as e:
        print(f"dpo-fast train: error: {e}", file=sys.stderr)
        return 2
    if summary is not None and int(os.environ.get("RANK", "0")) == 0:
        print(_summary_line(summary))
    return 0
