"""Reference log-probs for training and evaluation: from a cache on disk (precomputed here from the
initial policy when the user gives none), from a reference model on the fly, or none."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import hf
from ..data import batch_completion_tokens
from ..refcache import (CacheError, MissingExamplesError, ReferenceCache, compute_fingerprint, fingerprint_digest,
                        precompute_tokenized)
from .config import TrainConfig, TrainError

logger = logging.getLogger(__name__)


def reference_kwargs(logps: torch.Tensor, batch: dict, ranked: bool) -> dict:
    """PolicyLoss's reference arguments from per-row log-probs (K*B,) of a collated batch."""
    K, B = batch["num_responses"], len(batch["example_ids"])
    if ranked:
        return {"ref_logps": logps.view(K, B).T}
    return {"ref_chosen": logps[:B], "ref_rejected": logps[B:]}


class References:
    """Reference log-probs of a collated batch as PolicyLoss's keyword arguments: ref_chosen and
    ref_rejected (B,), or ref_logps (B, K) for ranked data; {} without a reference (or when the
    policy computes it: LoRA's base model). A cache's token counts are checked against the
    batch's, so values of other token sequences are never used."""

    def __init__(self, cache: ReferenceCache | None = None, head: hf.LMHead | None = None,
                 compute_dtype: torch.dtype | None = None, backend: str = "auto", ranked: bool = False):
        self.cache, self.head, self.compute_dtype, self.backend = cache, head, compute_dtype, backend
        self.ranked = ranked

    def __call__(self, batch: dict, device) -> dict:
        if self.cache is not None:
            ref = self.cache.lookup(batch["example_ids"], dtype=torch.float32, device=device)
            self._check_tokens(ref, batch)
            if self.cache.ranked:
                return {"ref_logps": ref["ref_logps"]}
            return {"ref_chosen": ref["ref_chosen_logps"], "ref_rejected": ref["ref_rejected_logps"]}
        if self.head is not None:
            with torch.no_grad():
                lp = hf.sequence_logps(self.head, batch, compute_dtype=self.compute_dtype, backend=self.backend)
            return reference_kwargs(lp, batch, self.ranked)
        return {}

    def _check_tokens(self, ref: dict, batch: dict) -> None:
        cached = ref["tokens"].T.reshape(-1) if self.cache.ranked else \
            torch.cat([ref["chosen_tokens"], ref["rejected_tokens"]])
        here = batch_completion_tokens(batch).to(cached.device)
        bad = (cached != here).nonzero().flatten().tolist()
        if bad:
            B = len(batch["example_ids"])
            i = bad[0]
            raise TrainError(f"reference cache {self.cache.path}: example {batch['example_ids'][i % B]} was scored "
                             f"over {int(cached[i])} completion tokens there and {int(here[i])} here: the cache was "
                             "made with other tokenization settings (--max-length, --max-prompt-length, "
                             "--max-completion-length, --truncation-side) or another tokenizer")


def own_cache_dir(cfg: TrainConfig, out_dir: Path, for_eval: bool) -> Path:
    # Our own cache holds train and eval pairs; a user's cache is never written into.
    if not for_eval or cfg.ref_cache is None:
        return out_dir / "ref_cache"
    return out_dir / "ref_cache_eval"


def _covers(directory: Path, ids) -> bool:
    """Whether `directory` holds a complete cache with every id (the fingerprint is checked later)."""
    if not (directory / "manifest.json").exists():
        return False
    try:
        return not ReferenceCache.open(directory, check_files=False).missing(ids)
    except CacheError:
        return False  # incomplete or damaged: precompute resumes or repairs it


def ensure_caches(cfg: TrainConfig, out_dir: Path, tokenizer, settings, train: tuple, evaluation: tuple | None,
                  source, device, progress: bool) -> None:
    """Precompute what the run needs and no cache holds yet, from the initial policy (`source`: the
    --model path, or the module given), which is the reference; on the data already tokenized
    (`train` / `evaluation`: (tokenized, fmt)). Runs before the policy is loaded from a path, so
    two models are never in memory. Every rank calls it; the work is split over the ranks."""
    def compute(data, directory):
        logger.info("precomputing reference log-probs into %s", directory)
        precompute_tokenized(source, tokenizer, data[0], data[1], directory, settings=settings,
                             dtype="float32" if isinstance(source, (str, Path)) else None, device=device,
                             batch_size=cfg.eval_batch_size or 8, backend=cfg.backend, progress=progress, tp=cfg.tp,
                             check_head=not cfg.skip_head_check, prefix_sharing=cfg.prefix_sharing,
                             info={"model": str(source) if isinstance(source, (str, Path)) else type(source).__name__,
                                   "made_by": "dpo-fast train"})

    if cfg.ref_cache is None and not _covers(out_dir / "ref_cache", train[0]["example_id"]):
        compute(train, out_dir / "ref_cache")
    if evaluation is None:
        return
    ids = evaluation[0]["example_id"]
    if cfg.ref_cache is not None and _covers(Path(cfg.ref_cache), ids):
        return
    directory = own_cache_dir(cfg, out_dir, for_eval=True)
    if not _covers(directory, ids):
        compute(evaluation, directory)


def reference_fingerprint(model, tokenizer, cfg: TrainConfig, settings, data_kind: str = "paired") -> dict:
    """The fingerprint of the reference = the initial policy, before any adapter is added (its
    safetensors files for a local --model directory, else its state dict)."""
    local = Path(str(cfg.model)) if isinstance(cfg.model, (str, Path)) and Path(str(cfg.model)).is_dir() else None
    return compute_fingerprint(model, tokenizer, **settings.arguments(), dtype="float32", data_kind=data_kind,
                               model_path=local)


def open_caches(cfg: TrainConfig, out_dir: Path, fingerprint: dict, train_ids, eval_ids) -> tuple:
    """(train References, eval References) from caches checked against the reference's fingerprint."""
    def open_checked(path, ids, what):
        cache = ReferenceCache.open(path, expected_fingerprint=fingerprint, ignore=("dtype",))
        try:
            cache.check_covers(ids)
        except MissingExamplesError as e:
            raise TrainError(f"{what}: {e}") from None
        return cache

    train_path = Path(cfg.ref_cache) if cfg.ref_cache is not None else out_dir / "ref_cache"
    train_cache = open_checked(train_path, train_ids, "--ref-cache" if cfg.ref_cache is not None else "reference cache")
    eval_cache = train_cache
    if eval_ids is not None and train_cache.missing(eval_ids):
        eval_cache = open_checked(own_cache_dir(cfg, out_dir, for_eval=True), eval_ids, "reference cache (eval data)")
    logger.info("reference log-probs from %s (fingerprint %s, computed in %s)", train_cache.path,
                fingerprint_digest(train_cache.fingerprint)[:12], train_cache.fingerprint.get("dtype"))
    return References(cache=train_cache), References(cache=eval_cache)
