"""Computing the cache: the reference model's per-sequence log-probs through the fused op (no
logits: peak memory does not grow with batch x vocabulary), shard by shard, resumable, split over
ranks; and recomputing samples of it to verify."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed, hf
from ..backends import check_backend
from ..data import DEFAULT_MAX_LENGTH, PreferenceCollator, TokenizationSettings, batch_completion_tokens, \
    load_and_tokenize
from ..prefix_sharing import check_prefix_sharing
from ..progress import Progress, quiet_hf_progress_bars
from .fingerprint import CACHE_FORMAT_VERSION, DTYPES, compute_fingerprint, dtype_name, diff_fingerprints, \
    fingerprint_digest
from .store import (MANIFEST, PAIRED_COLUMNS, RANKED_COLUMNS, SHARD_DIR, CACHE_FORMAT, CacheError,
                    CacheMismatchError, ReferenceCache, file_lock, finalize, list_shards, read_manifest, scan_shards,
                    shard_name, write_manifest, write_shard)

logger = logging.getLogger(__name__)


@dataclass
class Reference:
    """A loaded reference model: its fused-op parts, where it came from and the dtype it runs in."""

    module: torch.nn.Module
    head: hf.LMHead
    local_dir: Path | None
    dtype: str


def load_reference(model, dtype: str | None, revision, device, tp_mesh=None, check_head: bool = True) -> Reference:
    """A model path (loaded in `dtype`, default float32; sharded on `tp_mesh` when given) or a loaded
    module (dtype must match it). check_head: the lm_head self-check (dpo_fast.heads)."""
    if isinstance(model, (str, Path)):
        name = dtype_name(dtype or "float32")
        module = hf.load_causal_lm(model, dtype=getattr(torch, name), device=device, revision=revision,
                                   tp_mesh=tp_mesh, check_head=check_head).eval()
        local = Path(str(model)) if Path(str(model)).is_dir() else None
        return Reference(module, hf.lm_head_parts(module, check=check_head), local, name)
    have = dtype_name(next(model.parameters()).dtype)
    if dtype is not None and dtype_name(dtype) != have:
        raise ValueError(f"dtype={dtype!r} but the model given is {have}: cast it first or leave dtype unset")
    return Reference(model, hf.lm_head_parts(model, check=check_head), None, have)


def owner(example_id: str, world: int) -> int:
    """The rank that computes an example: a pure function of its content id."""
    return int(example_id[:8], 16) % world


def compute_examples(head: hf.LMHead, tokenized, indices, collator, batch_size: int, ranked: bool, backend: str,
                     on_batch=None) -> dict:
    """Values for the examples at `indices` of the tokenized data (batches sorted by length), in the
    order of `indices`, as the cache's column lists."""
    rows = tokenized.select(list(indices)).to_list()
    key = "responses_input_ids" if ranked else None
    lengths = [len(r["prompt_input_ids"]) + max(len(c) for c in (r[key] if ranked else
               (r["chosen_input_ids"], r["rejected_input_ids"]))) for r in rows]
    order = sorted(range(len(rows)), key=lambda j: (-lengths[j], j))
    logps, tokens = [None] * len(rows), [None] * len(rows)
    for start in range(0, len(order), batch_size):
        part = order[start:start + batch_size]
        batch = collator([rows[j] for j in part])
        with torch.inference_mode():
            lp = hf.sequence_logps(head, batch, backend=backend).double().cpu()
        nt = batch_completion_tokens(batch).cpu()
        K, B = batch["num_responses"], len(part)
        lp, nt = lp.view(K, B).T, nt.view(K, B).T
        bad = ~torch.isfinite(lp).all(dim=1)
        if bad.any():
            which = [rows[part[b]]["example_id"] for b in bad.nonzero().flatten().tolist()]
            raise FloatingPointError(f"non-finite reference log-probs for example(s) {which}: the model output "
                                     "overflowed (try --dtype float32)")
        for b, j in enumerate(part):
            logps[j], tokens[j] = lp[b].tolist(), nt[b].tolist()
        if on_batch is not None:
            on_batch(len(part))
    ids = [r["example_id"] for r in rows]
    if ranked:
        return {"example_id": ids, "ref_logps": logps, "tokens": tokens}
    return {"example_id": ids, "ref_chosen_logps": [v[0] for v in logps], "ref_rejected_logps": [v[1] for v in logps],
            "chosen_tokens": [t[0] for t in tokens], "rejected_tokens": [t[1] for t in tokens]}


def _first_rows(tokenized) -> dict[str, int]:
    first: dict[str, int] = {}
    for i, e in enumerate(tokenized["example_id"]):
        first.setdefault(e, i)
    return first


def _open_or_create(out_dir: Path, fingerprint: dict, digest: str, ranked: bool, info: dict, dist) -> None:
    """The manifest (complete: false) goes down before any shard, so a rerun knows what the shards
    were computed for; an existing cache must have the same fingerprint."""
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / SHARD_DIR).mkdir(exist_ok=True)
        with file_lock(out_dir / ".lock-manifest", "writing this cache's manifest"):
            if (out_dir / MANIFEST).exists():
                diffs = diff_fingerprints(read_manifest(out_dir)["fingerprint"], fingerprint)
                if diffs:
                    raise CacheMismatchError(out_dir, diffs)
            elif list_shards(out_dir):
                raise CacheError(f"{out_dir} holds reference-cache shards but no {MANIFEST}: not a cache this "
                                 "command can resume; use an empty directory")
            else:
                write_manifest(out_dir, {
                    "format": CACHE_FORMAT, "cache_format_version": CACHE_FORMAT_VERSION, "complete": False,
                    "fingerprint": fingerprint, "fingerprint_sha256": digest, "shards": [], "num_examples": 0,
                    "data_kind": fingerprint["data_kind"], "columns": list(RANKED_COLUMNS if ranked else PAIRED_COLUMNS),
                    "info": info})
    distributed.barrier(dist)
    if not dist.main:
        if not (out_dir / MANIFEST).exists():
            raise CacheError(f"{out_dir}: no {MANIFEST} yet; start rank 0 first (or use torchrun)")
        diffs = diff_fingerprints(read_manifest(out_dir)["fingerprint"], fingerprint)
        if diffs:
            raise CacheMismatchError(out_dir, diffs)


def _compute_my_shards(out_dir, ref, tokenized, first, collator, digest, ranked, batch_size, shard_size, backend,
                       progress, dist) -> int:
    """This data rank's missing examples, shard by shard; returns how many it computed. Under
    tensor parallelism every tp rank of the group computes (the forward is collective) and the
    first one writes."""
    computed, rank, world = 0, dist.data_rank, dist.data_world
    lock = file_lock(out_dir / f".lock-r{rank:05d}", f"writing rank {rank}'s shards of {out_dir}") \
        if dist.writer else contextlib.nullcontext()
    with lock:
        if dist.writer:
            for stale in (out_dir / SHARD_DIR).glob(f".shard-r{rank:05d}-*.tmp"):
                stale.unlink()  # a shard a killed run did not finish
        manifest = read_manifest(out_dir)
        done, next_index = set(), 0
        for path, ids, _ in scan_shards(out_dir, digest, manifest):
            done.update(ids)
            if path.name.startswith(f"shard-r{rank:05d}-"):
                next_index = max(next_index, int(path.stem.rsplit("-", 1)[1]) + 1)
        distributed.barrier(dist)  # every rank has its list before any rank writes a new shard
        todo = [i for e, i in first.items() if owner(e, world) == rank and e not in done]
        mine = sum(1 for e in first if owner(e, world) == rank)
        logger.info("precompute-ref rank %d/%d: %d example(s) to compute, %d already cached", rank, world,
                    len(todo), mine - len(todo))
        with Progress(len(todo), progress and dist.main, "reference log-probs") as bar:
            for start in range(0, len(todo), shard_size):
                chunk = todo[start:start + shard_size]
                cols = compute_examples(ref.head, tokenized, chunk, collator, batch_size, ranked, backend,
                                        on_batch=bar.update)
                if dist.writer:
                    write_shard(out_dir, shard_name(rank, next_index), cols, ranked, digest)
                next_index += 1
                computed += len(chunk)
    return computed


def precompute_tokenized(model, tokenizer, tokenized, fmt: str, output_dir, *, settings: TokenizationSettings,
                         dtype: str | None = None, revision: str | None = None, device=None, batch_size: int = 8,
                         shard_size: int = 1024, backend: str = "auto", progress: bool = True, verify: int = 0,
                         seed: int = 0, rank: int | None = None, world_size: int | None = None, tp: int = 1,
                         info: dict | None = None, check_head: bool = True,
                         prefix_sharing: bool = False) -> dict:
    """precompute_reference on data already tokenized with `settings` (the trainer's path: the data
    is tokenized once). Returns {"computed", "complete", "verify", "reference"}."""
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be positive")
    device = hf.resolve_device(device)
    check_backend(backend, device)
    dist = distributed.setup(device, rank=rank, world_size=world_size, tp=tp)
    out_dir = Path(output_dir)
    t0 = time.time()
    ref = load_reference(model, dtype, revision, device, tp_mesh=dist.tp_mesh, check_head=check_head)
    if prefix_sharing:  # the same values as unshared (the probe says so), so the fingerprint is unchanged
        check_prefix_sharing(ref.module)
    ranked = fmt == "ranked"
    fingerprint = compute_fingerprint(ref.module, tokenizer, **settings.arguments(), dtype=ref.dtype,
                                      data_kind="ranked" if ranked else "paired", model_path=ref.local_dir)
    digest = fingerprint_digest(fingerprint)
    _open_or_create(out_dir, fingerprint, digest, ranked, dict(info or {}, world_size=dist.world), dist)
    first = _first_rows(tokenized)
    duplicates = len(tokenized) - len(first)
    if duplicates:
        logger.info("preference data: %d duplicate example(s) (same content) are cached once", duplicates)
    collator = PreferenceCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                  else tokenizer.eos_token_id, prefix_sharing=prefix_sharing)
    computed = _compute_my_shards(out_dir, ref, tokenized, first, collator, digest, ranked, batch_size, shard_size,
                                  backend, progress, dist)
    distributed.barrier(dist)
    finished = False
    if dist.main or not dist.enabled:
        with file_lock(out_dir / ".lock-manifest", "writing this cache's manifest"):
            manifest = read_manifest(out_dir)
            manifest["info"] = dict(manifest.get("info", {}), duplicate_examples=duplicates)
            finished = finalize(out_dir, manifest, set(first), digest)
    distributed.barrier(dist)
    if dist.enabled and not dist.main:
        finished = bool(read_manifest(out_dir).get("complete"))
    if finished:
        logger.info("reference cache %s: %d example(s) (%d computed now) in %.1fs", out_dir, len(first), computed,
                    time.time() - t0)
    report = None
    if verify and finished and dist.data_rank == 0:  # the tp ranks of one group: its forwards are collective
        report = _verify(out_dir, ref.head, tokenized, collator, verify, seed, ranked, backend)
        if dist.main:
            logger.info("%s", report)
    return {"computed": computed, "complete": finished, "verify": report, "reference": ref}


def precompute_reference(model, data, output_dir, *, tokenizer=None, split: str = "train", batch_size: int = 8,
                         max_length: int | None = DEFAULT_MAX_LENGTH, max_prompt_length: int | None = None,
                         truncation_side: str = "keep_start", max_completion_length: int | None = None,
                         dtype: str | None = None, revision: str | None = None,
                         data_revision: str | None = None, verify: int = 0, shard_size: int = 1024, device=None,
                         backend: str = "auto", progress: bool = True, seed: int = 0, rank: int | None = None,
                         world_size: int | None = None, tp: int = 1, check_head: bool = True,
                         prefix_sharing: bool = False,
                         return_report: bool = False):
    """Compute the reference model's log-probs of every example of `data` into `output_dir`.

    model: a local directory or hub name (loaded in `dtype`, default float32, at `revision`), or a
        loaded module (then `tokenizer` is required and `dtype` must be left unset or match it).
    data: anything `dpo_fast.data.load_preference_data` takes; `split` picks the split.
    max_length / max_prompt_length / truncation_side / max_completion_length: the tokenization
        settings; the trainer must use the same (they are in the fingerprint; the defaults are the trainer's).
    verify: after computing, recompute this many random cached examples and report the largest
        difference (logged, and returned with return_report=True).
    check_head: compare the fused path with the model's own forward on a probe batch first, and
        refuse a model whose lm_head it gets wrong (False: the explicit opt-out, --skip-head-check).
    shard_size: examples per Parquet shard (the work lost to a crash is at most one shard).
    rank / world_size: this process's part when running several without torch.distributed;
        by default they come from torch.distributed or the torchrun environment.
    tp: under torchrun, shard the model over groups of tp ranks (transformers' plan for its
        family); the groups split the examples, the first rank of each writes its shards.
    prefix_sharing: run each prompt once for both responses (dpo_fast.prefix_sharing; refused with
        the reason for a family where it is not exact); the cache and its fingerprint are the same.
    Reruns resume, and repair: every shard kept is checked against the SHA-256 recorded when it was
    written; a damaged or duplicating shard is moved to DIR/damaged/ and its examples recomputed.
    Returns the output directory (and a dict with the tokenization report, the number of examples
    computed now and the verify report when return_report=True).
    """
    from .. import __version__

    settings = TokenizationSettings(max_length, max_prompt_length, truncation_side, max_completion_length)
    if isinstance(model, (str, Path)):  # a bad model source is named before anything else is loaded
        config = hf.load_config(model, revision)
        hf.check_causal_lm(model, config)
        if tp > 1:
            hf.check_tp_plan(model, config)
    elif tp > 1:
        raise ValueError("tp: give the model as a path (it is loaded sharded), not as a module")
    elif tokenizer is None:
        raise ValueError("tokenizer: required when the model is given as a module")
    tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, Path)) else \
        hf.load_tokenizer(tokenizer if tokenizer is not None else model, revision)
    with quiet_hf_progress_bars(not progress):
        tokenized, report, fmt = load_and_tokenize(data, tok, split=split, revision=data_revision,
                                                   **settings.arguments())
    info = {"model": str(model) if isinstance(model, (str, Path)) else type(model).__name__, "revision": revision,
            "data": str(data) if isinstance(data, (str, Path)) else type(data).__name__, "split": split,
            "skipped_examples": report.skipped, "dpo_fast_version": __version__, "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with quiet_hf_progress_bars(not progress):
        result = precompute_tokenized(model, tok, tokenized, fmt, output_dir, settings=settings, dtype=dtype,
                                      revision=revision, device=device, batch_size=batch_size,
                                      shard_size=shard_size, backend=backend, progress=progress, verify=verify,
                                      seed=seed, rank=rank, world_size=world_size, tp=tp, info=info,
                                      check_head=check_head, prefix_sharing=prefix_sharing)
    if return_report:
        return Path(output_dir), {"tokenization": report, "computed": result["computed"],
                                  "complete": result["complete"], "verify": result["verify"]}
    return Path(output_dir)


# ----------------------------------------------------------------------------------------------
# Verification


@dataclass
class VerifyReport:
    """Result of recomputing cached examples: the largest differences found."""

    checked: int
    max_abs_diff: float
    max_rel_diff: float
    worst_example_id: str | None
    token_count_mismatches: int

    def __str__(self):
        return (f"verified {self.checked} cached example(s): largest |difference| {self.max_abs_diff:.3g} "
                f"(relative {self.max_rel_diff:.3g}, example {self.worst_example_id}); "
                f"{self.token_count_mismatches} token-count mismatch(es)")

    def ok(self, tolerance: float) -> bool:
        return self.token_count_mismatches == 0 and self.max_rel_diff <= tolerance and math.isfinite(self.max_abs_diff)


def _cached_values(cache: ReferenceCache, example_id: str, ranked: bool) -> tuple[list, list]:
    ref = cache.lookup([example_id])
    if ranked:
        return ref["ref_logps"][0].tolist(), ref["tokens"][0].tolist()
    return ([float(ref["ref_chosen_logps"][0]), float(ref["ref_rejected_logps"][0])],
            [int(ref["chosen_tokens"][0]), int(ref["rejected_tokens"][0])])


def _verify(cache_dir, head, tokenized, collator, n, seed, ranked, backend) -> VerifyReport:
    cache = ReferenceCache.open(cache_dir)
    first = _first_rows(tokenized)
    candidates = [e for e in first if e in cache]
    picked = random.Random(seed).sample(candidates, min(n, len(candidates)))
    max_abs, max_rel, worst_id, mismatches = 0.0, 0.0, None, 0
    # One example per batch: other batch shapes than the precompute, so it checks more than the file.
    for e in picked:
        cols = compute_examples(head, tokenized, [first[e]], collator, 1, ranked, backend)
        if ranked:
            new, new_tok = cols["ref_logps"][0], cols["tokens"][0]
        else:
            new = [cols["ref_chosen_logps"][0], cols["ref_rejected_logps"][0]]
            new_tok = [cols["chosen_tokens"][0], cols["rejected_tokens"][0]]
        old, old_tok = _cached_values(cache, e, ranked)
        mismatches += int(new_tok != old_tok)
        for a, b in zip(new, old):
            d = abs(a - b)
            if worst_id is None or d > max_abs or not math.isfinite(d):
                max_abs, worst_id = d, e
            max_rel = max(max_rel, d / max(abs(b), 1e-12))
    return VerifyReport(len(picked), max_abs, max_rel, worst_id, mismatches)


def verify_reference_cache(cache_dir, model, data, n: int = 16, *, tokenizer=None, split="train", dtype=None,
                           revision=None, seed: int = 0, device="cpu", backend="auto") -> VerifyReport:
    """Recompute `n` random cached examples of `data` (one per batch) and report the largest
    difference from the cached values. The cache's own settings are used for tokenization."""
    fp = read_manifest(cache_dir)["fingerprint"]
    ref = load_reference(model, dtype or fp["dtype"], revision, device)
    tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, Path)) else \
        hf.load_tokenizer(tokenizer if tokenizer is not None else model, revision)
    settings = TokenizationSettings.from_dict(fp["tokenization"])
    tokenized, _, fmt = load_and_tokenize(data, tok, split=split, **settings.arguments())
    current = compute_fingerprint(ref.module, tok, **settings.arguments(), dtype=ref.dtype,
                                  data_kind="ranked" if fmt == "ranked" else "paired", model_path=ref.local_dir)
    diffs = diff_fingerprints(fp, current)
    if diffs:
        raise CacheMismatchError(cache_dir, diffs)
    collator = PreferenceCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return _verify(Path(cache_dir), ref.head, tokenized, collator, n, seed, fmt == "ranked", backend)


__all__ = ["DTYPES", "Reference", "VerifyReport", "compute_examples", "load_reference", "owner",
           "precompute_reference", "precompute_tokenized", "verify_reference_cache"]
