"""`dpo-fast precompute-ref`: options (stated once, in PrecomputeConfig) and the command."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from .. import options
from ..backends import BACKENDS
from ..data import DEFAULT_MAX_LENGTH, TRUNCATION_SIDES
from ..options import option
from .fingerprint import DTYPES


@dataclasses.dataclass
class PrecomputeConfig:
    model: str = option(help="reference model: local directory or hub name", required=True, group="what")
    data: str = option(help="preference data: JSON/JSONL/Parquet/CSV file, save_to_disk directory, or hub name",
                       required=True, group="what")
    output_dir: str = option(help="cache directory (created; a rerun resumes and repairs it)", required=True,
                             group="what")
    split: str = option("train", "data split, e.g. train or 'train[:1000]'", group="what")
    tokenizer: str | None = option(None, "tokenizer directory or hub name; unset: the model's", group="what")
    batch_size: int = option(8, "examples per forward pass", minimum=1, group="how")
    max_length: int | None = option(DEFAULT_MAX_LENGTH, "max prompt + completion tokens (as dpo-fast train)",
                                    minimum=1, group="how")
    max_prompt_length: int | None = option(None, "max prompt tokens", minimum=1, group="how")
    max_completion_length: int | None = option(None, "max tokens per completion (as dpo-fast train)", minimum=1,
                                               group="how")
    truncation_side: str = option("keep_start", "which part of a too-long prompt to keep", choices=TRUNCATION_SIDES,
                                  group="how")
    dtype: str = option("float32", "dtype the reference model runs in", choices=DTYPES, group="how")
    revision: str | None = option(None, "hub revision of the model", flags=("--ref-model-revision",), group="what")
    data_revision: str | None = option(None, "hub revision of the data", group="what")
    device: str | None = option(None, "torch device; unset: cuda:LOCAL_RANK when CUDA is available, else cpu",
                                group="how")
    shard_size: int = option(1024, "examples per Parquet shard", minimum=1, group="how")
    verify: int = option(0, "afterwards, recompute N random cached examples and report the largest difference",
                         minimum=0, metavar="N", group="check")
    verify_tolerance: float | None = option(None, "relative difference above which --verify fails (unset: 1e-4 "
                                            "for float32/64, 5e-2 for 16-bit dtypes)", minimum=0.0, group="check")
    seed: int = option(0, "seed of the --verify sample", group="check")
    backend: str = option("auto", "kernel backend (dpo_fast.available_backends)", choices=("auto",) + BACKENDS,
                          group="how")
    tp: int = option(1, "under torchrun: tensor-parallel degree (the model sharded over groups of this many ranks "
                     "with transformers' plan for its family)", minimum=1, group="how")
    rank: int | None = option(None, "without torchrun: this process's part (0-based)", minimum=0, group="how")
    world_size: int | None = option(None, "without torchrun: number of parts", minimum=1, group="how")
    skip_head_check: bool = option(False, "do not compare the fused lm_head path with the model's own forward on a probe batch when the model "
                                "is loaded (default: compare, and refuse a model whose head it gets wrong)", group="check")
    prefix_sharing: bool = option(False, "run each prompt once for both responses (refused, with the reason, for a "
                                  "model family where it is not exact); same cache and fingerprint", group="how")
    progress: bool = option(True, "hide the progress bars (data loading and tokenizing, model loading, the reference "
                            "log-probs) (default: shown)", negative_flag="--no-progress", group="how")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_arguments(parser, PrecomputeConfig)


def run_cli(args) -> int:
    from ..data import DataFileError, MalformedRowError
    from ..hf import ModelError
    from .precompute import precompute_reference
    from .store import CacheError

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = options.from_args(PrecomputeConfig, args)
    try:
        options.check_ranges(cfg)
        kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                  if f.name not in ("model", "data", "output_dir", "verify_tolerance", "skip_head_check")}
        out, rep = precompute_reference(cfg.model, cfg.data, cfg.output_dir, return_report=True,
                                        check_head=not cfg.skip_head_check, **kwargs)
    except (CacheError, ModelError, DataFileError, MalformedRowError, ValueError, FileNotFoundError,
            FloatingPointError) as e:
        print(f"dpo-fast precompute-ref: error: {e}", file=sys.stderr)
        return 2
    print(f"reference cache: {out} ({'complete' if rep['complete'] else 'waiting for other ranks'}); "
          f"{rep['computed']} example(s) computed now; {rep['tokenization']}")
    v = rep["verify"]
    if v is not None:
        tol = cfg.verify_tolerance
        if tol is None:
            tol = 5e-2 if cfg.dtype in ("bfloat16", "float16") else 1e-4
        ok = v.ok(tol)
        print(f"{v} -> {'OK' if ok else 'MISMATCH'} (tolerance {tol:g} relative)")
        if not ok:
            return 1
    return 0
