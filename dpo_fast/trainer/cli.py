"""`dpo-fast train`: the options come from TrainConfig; errors a user can fix print one line."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from .. import options
from .config import TrainConfig, TrainError, TrainingInterrupted


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


def _resume_command() -> str:
    """This command again with --resume (and without --overwrite-output-dir)."""
    argv = sys.argv[1:]
    if "RANK" in os.environ or argv[:1] != ["train"]:  # torchrun, or called from Python
        return "the same command with --resume"
    argv = [a for a in argv if a != "--overwrite-output-dir"]
    if not any(a == "--resume" or a.startswith("--resume=") for a in argv):
        argv.append("--resume")
    return "dpo-fast " + shlex.join(argv)


def interrupted_line(e: TrainingInterrupted) -> str:
    """One line for Ctrl-C: the step reached, the last checkpoint, how to go on."""
    if e.step is None:
        return "interrupted before training began; nothing to resume (rerun the same command)"
    if e.checkpoint is None:
        return (f"interrupted at step {e.step}; no checkpoint was saved in {e.output_dir}, so start over: the same "
                "command with --overwrite-output-dir")
    return (f"interrupted at step {e.step}; last checkpoint {e.checkpoint} (steps after it are lost); resume with: "
            f"{_resume_command()}")


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
    except TrainingInterrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"dpo-fast train: {interrupted_line(e)}", file=sys.stderr)
        return 130
    if summary is not None and int(os.environ.get("RANK", "0")) == 0:
        print(_summary_line(summary))
    return 0
