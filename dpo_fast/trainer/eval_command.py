"""`dpo-fast eval`: the eval metrics of any model against any reference, on any preference data.

    dpo-fast eval --model RUN_DIR --ref-cache RUN_DIR/ref_cache --data eval.jsonl [--split test]
    dpo-fast eval --model RUN_DIR --ref-model BASE --data eval.jsonl           # reference on the fly
    dpo-fast eval --model RUN_DIR --ref-model BASE --ref-cache CACHE ...       # cache checked against BASE

The reference is what the cache must match, not the evaluated model (training checks the cache
against the initial policy, which is the reference there). With --ref-model the cache's
fingerprint (weights, config, tokenizer, settings) is checked against it; with --ref-cache alone
the cache's weights are trusted, and everything else is still checked: the tokenizer and the
tokenization settings against the cache's, every example of the data must be in it (else
refused, naming the missing rows), and each example's token counts must equal the cached ones.
Settings not given come from the cache (tokenization), then from MODEL/run.json when MODEL is a
`dpo-fast train` output (loss settings), then the train defaults. The same evaluation loop as
the trainer's: the same model, reference, data and --batch-size give its final eval's metrics.
Prints the metrics and writes them, with what was evaluated against what, to --output-file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .. import options
from ..data import DataFileError, MalformedRowError
from ..hf import ModelError
from ..refcache import CacheError
from . import rundir
from .config import TrainError
from .eval_config import EvalConfig
from .eval_setup import run_evaluation

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_arguments(parser, EvalConfig)


def run_cli(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
        logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    cfg = options.from_args(EvalConfig, args)
    try:
        report = evaluate_model(cfg)
    except (TrainError, CacheError, ModelError, MalformedRowError, DataFileError, FileNotFoundError) as e:
        print(f"dpo-fast eval: error: {e}", file=sys.stderr)
        return 2
    if report is not None:
        width = max(map(len, report["metrics"]))
        print("\n".join(f"{k:<{width}}  {v:.6g}" for k, v in report["metrics"].items()))
        print(f"dpo-fast eval: written to {cfg.output_file}")
    return 0


def evaluate_model(cfg: EvalConfig) -> dict | None:
    """Evaluate as the command does; returns the report written to cfg.output_file (rank 0; None
    on the other ranks)."""
    options.check_ranges(cfg, TrainError)
    given = [n for n in ("ref_cache", "ref_model") if getattr(cfg, n) is not None]
    if cfg.reference_free and given:
        raise TrainError("--reference-free goes without --ref-cache and --ref-model")
    if not cfg.reference_free and not given:
        raise TrainError("give the reference: --ref-cache DIR (trusted), --ref-model PATH (on the fly, or to "
                         "check --ref-cache), or --reference-free")
    rundir.claim_output(Path(cfg.output_file), overwrite=cfg.overwrite_output_file, flag="--overwrite-output-file")
    report = run_evaluation(cfg)
    if report is not None:
        Path(cfg.output_file).write_text(json.dumps(report, indent=2) + "\n")
    return report
