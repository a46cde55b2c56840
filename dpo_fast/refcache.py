"""The reference model's log-probs, computed once and stored on disk (`dpo-fast precompute-ref`).

    dpo-fast precompute-ref --model PATH_OR_NAME --data PATH_OR_NAME --output-dir DIR \\
        [--split train] [--batch-size 8] [--max-length N] [--dtype float32] [--verify 16]

Layout of DIR (readable with pandas / pyarrow: `pandas.read_parquet("DIR/shards")`):

    manifest.json                     what the values depend on (the fingerprint), the list of
                                      shards with their row counts and SHA-256, a checksum
    shards/shard-rRRRRR-NNNNNN.parquet  rank RRRRR's NNNNNN-th shard; columns
        example_id          string   content hash of the example (`dpo_fast.data.example_id`)
        ref_chosen_logps    float64  sum over the chosen completion tokens of log p_ref
        ref_rejected_logps  float64  same for the rejected completion
        chosen_tokens       int64    scored completion tokens (after truncation)
        rejected_tokens     int64
      ranked data instead: ref_logps list<float64>, tokens list<int64> (responses best first)

The values are the float32 results of the fused op (`dpo_fast.sequence_logprobs`) widened to
float64. Nothing here uses pickle: JSON and Parquet only.

Crash safety: a shard is written to `shards/.NAME.tmp`, fsynced, then renamed; the manifest
likewise. Before the first shard, a manifest with `"complete": false` records the fingerprint,
so a rerun resumes only a cache made for the same model/tokenizer/settings. A rerun with the
same command skips the examples already in complete shards; because shards complete in order
and each shard's batches depend only on its examples, the resumed run computes the same
batches as an uninterrupted run and ends with the same values. Each process (torchrun rank, or
`--rank/--world-size`) takes the examples whose id hashes to it and writes only its own shards;
the manifest is finalised once every example is covered.

In a trainer (the same tokenization settings as the cache, and the same kind of model source):

    fp = compute_fingerprint(ref_model, tokenizer, max_length=..., max_prompt_length=...,
                             data_kind="paired", model_path=MODEL_DIR)
    cache = ReferenceCache.open(CACHE_DIR, expected_fingerprint=fp)   # refuses a mismatch
    cache.check_covers(tokenized["example_id"])                       # counts missing examples
    ref = cache.lookup(batch["example_ids"])   # ref_chosen_logps, ref_rejected_logps: (B,) float64
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
CACHE_FORMAT = "dpo_fast.refcache"
CACHE_FORMAT_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16", "float64")
PAIRED_COLUMNS = ("example_id", "ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens")
RANKED_COLUMNS = ("example_id", "ref_logps", "tokens")
_META_KEY = b"dpo_fast.fingerprint_sha256"
# Config entries that do not change the values (runtime switches, bookkeeping).
_CONFIG_IGNORED = {
    "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache", "_commit_hash",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "architectures",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "pruned_heads",
}


class CacheError(RuntimeError):
    """Base class of the reference-cache errors."""


class CacheMismatchError(CacheError):
    """The cache was made for another model, tokenizer, settings or dpo_fast version."""

    def __init__(self, path, differences: list[str]):
        self.path, self.differences = str(path), differences
        super().__init__(f"reference cache {path} does not match this run: " + "; ".join(differences)
                         + ". Recompute it (dpo-fast precompute-ref) into a new directory.")


class CacheCorruptError(CacheError):
    """The cache's files were changed, removed or damaged after they were written."""


class MissingExamplesError(CacheError, KeyError):
    """Some examples asked for are not in the cache."""

    def __init__(self, path, missing: list[str], total: int):
        self.path, self.missing, self.total = str(path), missing, total
        head = ", ".join(missing[:3])
        super().__init__(
            f"{len(missing)} of {total} example(s) are missing from reference cache {path} "
            f"(e.g. {head}{', ...' if len(missing) > 3 else ''}); run dpo-fast precompute-ref on this data "
            "with the same settings to add them")

    def __str__(self):  # KeyError would quote the message
        return self.args[0]


# ----------------------------------------------------------------------------------------------
# Fingerprints


def _version() -> str:
    from . import __version__
    return __version__


def _sha256_file(path: Path, h=None, chunk: int = 1 << 23):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def safetensors_fingerprint(directory) -> str | None:
    """SHA-256 over the names and bytes of a directory's *.safetensors files (streamed), or None."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        _sha256_file(f, h)
    return h.hexdigest()


def state_dict_fingerprint(model) -> str:
    """SHA-256 over the names, shapes and values of a module's state dict.

    Floating-point tensors are hashed as float32, so a checkpoint loaded losslessly in two
    dtypes (a bfloat16 checkpoint loaded in bfloat16 and in float32) hashes the same; the
    dtype the values were computed in is a separate fingerprint entry."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.float()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(model=None, model_path=None) -> dict:
    """{"method", "sha256"}: the safetensors files of `model_path` when it is a local directory
    holding them (fast, streamed), else the loaded module's state dict."""
    if model_path is not None and Path(model_path).is_dir():
        digest = safetensors_fingerprint(model_path)
        if digest is not None:
            return {"method": "safetensors-sha256", "sha256": digest}
    if model is None:
        raise ValueError("weights_fingerprint: no safetensors files at model_path, and no model given")
    return {"method": "state-dict-sha256", "sha256": state_dict_fingerprint(model)}


def config_fingerprint(config) -> str:
    """SHA-256 of the model config entries that change the outputs."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in _CONFIG_IGNORED and not k.startswith("_")}
    return hashlib.sha256(_canonical_json(d).encode()).hexdigest()


def _dtype_name(dtype) -> str:
    import torch

    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    name = str(dtype).removeprefix("torch.")
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32",
               "fp64": "float64", "double": "float64"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    return name


def compute_fingerprint(model, tokenizer, *, max_length=None, max_prompt_length=None,
                        truncation_side="keep_start", dtype=None, data_kind="paired", model_path=None,
                        weights=None) -> dict:
    """What cached reference log-probs depend on, as a JSON-able dict.

    model: the reference model (a loaded module); model_path: the local directory it was loaded
    from, if any (its safetensors files are hashed instead of the tensors: pass the same kind
    of source as `precompute-ref` got). dtype defaults to the model's parameter dtype.
    data_kind: "paired" or "ranked". `weights` may pass a precomputed `weights_fingerprint`.
    """
    from .data import TokenizationSettings, tokenizer_fingerprint

    if data_kind not in ("paired", "ranked"):
        raise ValueError(f"data_kind: expected 'paired' or 'ranked', got {data_kind!r}")
    if dtype is None:
        dtype = next(model.parameters()).dtype
    settings = TokenizationSettings(max_length, max_prompt_length, truncation_side)
    return {
        "weights": weights or weights_fingerprint(model, model_path),
        "model_config": config_fingerprint(model.config),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenization": settings.as_dict(),
        "data_kind": data_kind,
        "dtype": _dtype_name(dtype),
        "dpo_fast_version": _version(),
        "cache_format_version": CACHE_FORMAT_VERSION,
    }


def fingerprint_digest(fingerprint: dict) -> str:
    return hashlib.sha256(_canonical_json(fingerprint).encode()).hexdigest()


def _short(v) -> str:
    s = v if isinstance(v, str) else _canonical_json(v)
    return s[:12] + "..." if isinstance(v, str) and len(s) > 16 else s


def diff_fingerprints(cached: dict, current: dict, ignore=()) -> list[str]:
    """Human-readable differences, e.g. ["reference weights differ (cache ..., now ...)"]; [] if
    equal. `ignore` names top-level keys not to compare (e.g. ("dtype",) to accept a cache
    computed in another dtype than the one the trainer runs in)."""
    labels = {"weights": "reference weights", "model_config": "model config", "tokenizer": "tokenizer",
              "dtype": "dtype", "data_kind": "data kind (paired/ranked)", "dpo_fast_version": "dpo_fast version",
              "cache_format_version": "cache format version"}
    out = []
    for key in sorted(set(cached) | set(current)):
        if key in ignore:
            continue
        a, b = cached.get(key), current.get(key)
        if a == b:
            continue
        if key == "weights" and isinstance(a, dict) and isinstance(b, dict) and a.get("method") != b.get("method"):
            out.append(f"reference weights were fingerprinted differently (cache: {a.get('method')}, now: "
                       f"{b.get('method')}): load the model from the same kind of source (a local directory "
                       "with safetensors files, or a module)")
        elif key == "weights" and isinstance(a, dict) and isinstance(b, dict):
            out.append(f"reference weights differ (cache {_short(a.get('sha256'))}, now {_short(b.get('sha256'))})")
        elif key == "tokenization" and isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    out.append(f"{k} differs (cache {a.get(k)!r}, now {b.get(k)!r})")
        else:
            out.append(f"{labels.get(key, key)} differs (cache {_short(a)}, now {_short(b)})")
    return out


# ----------------------------------------------------------------------------------------------
# Files


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_manifest(directory: Path, manifest: dict) -> None:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    body["manifest_sha256"] = hashlib.sha256(_canonical_json(body).encode()).hexdigest()
    _atomic_write(directory / MANIFEST, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(directory) -> dict:
    """The parsed manifest; CacheCorruptError if it is unreadable or was edited after writing."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise CacheError(f"{directory} is not a reference cache: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheCorruptError(f"reference cache {directory}: {MANIFEST} is unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise CacheCorruptError(f"reference cache {directory}: {MANIFEST} is not a dpo_fast reference-cache manifest")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if hashlib.sha256(_canonical_json(body).encode()).hexdigest() != manifest.get("manifest_sha256"):
        raise CacheCorruptError(f"reference cache {directory}: {MANIFEST} was modified after it was written "
                                "(its checksum does not match)")
    return manifest


def _shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:05d}-{index:06d}.parquet"


def _list_shards(directory: Path) -> list[Path]:
    d = directory / SHARD_DIR
    return sorted(d.glob("shard-r*-*.parquet")) if d.is_dir() else []


def _read_shard(path: Path, digest: str, *, expect_sha256: str | None = None, columns=None):
    """The shard as a pyarrow Table; checks its checksum (if given) and fingerprint metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        data = path.read_bytes()
    except OSError as e:
        raise CacheCorruptError(f"reference cache shard {path} cannot be read ({e})") from e
    if expect_sha256 is not None and hashlib.sha256(data).hexdigest() != expect_sha256:
        raise CacheCorruptError(f"reference cache shard {path} was modified after it was written "
                                "(its SHA-256 differs from the manifest)")
    try:
        table = pq.read_table(pa.BufferReader(data), columns=columns)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise CacheCorruptError(f"reference cache shard {path} is not a readable Parquet file ({e})") from e
    meta = table.schema.metadata or {}
    if meta.get(_META_KEY, b"").decode() != digest:
        raise CacheMismatchError(path, ["this shard was computed for another fingerprint than the manifest's"])
    return table, hashlib.sha256(data).hexdigest()


def _write_shard(directory: Path, name: str, columns: dict, ranked: bool, digest: str) -> tuple[str, int]:
    """Write one shard atomically; returns (sha256, rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if ranked:
        schema = pa.schema([("example_id", pa.string()), ("ref_logps", pa.list_(pa.float64())),
                            ("tokens", pa.list_(pa.int64()))])
    else:
        schema = pa.schema([("example_id", pa.string()), ("ref_chosen_logps", pa.float64()),
                            ("ref_rejected_logps", pa.float64()), ("chosen_tokens", pa.int64()),
                            ("rejected_tokens", pa.int64())])
    schema = schema.with_metadata({_META_KEY: digest.encode(), b"dpo_fast.cache_format_version":
                                   str(CACHE_FORMAT_VERSION).encode()})
    table = pa.table({k: columns[k] for k in schema.names}, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    _atomic_write(directory / SHARD_DIR / name, data)
    return hashlib.sha256(data).hexdigest(), table.num_rows


@contextlib.contextmanager
def _file_lock(path: Path, what: str):
    import fcntl

    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"another process is {what} ({path} is locked); wait for it or stop it") from None
        yield
    finally:
        f.close()  # closing releases the lock (so does the process dying)


# ----------------------------------------------------------------------------------------------
# Reading


class ReferenceCache:
    """A complete, verified reference cache in memory, looked up by example id.

    cache = ReferenceCache.open(DIR, expected_fingerprint=compute_fingerprint(...))
    ref = cache.lookup(batch["example_ids"])   # {"ref_chosen_logps": (B,), "ref_rejected_logps": (B,), ...}
    """

    def __init__(self, path: Path, manifest: dict, ids, values: dict):
        self.path, self.manifest = path, manifest
        self.fingerprint = manifest["fingerprint"]
        self.ranked = self.fingerprint.get("data_kind") == "ranked"
        self._index = ids  # pandas.Index of example ids
        self._values = values  # column -> numpy array (ranked: object arrays of lists)

    @classmethod
    def open(cls, path, expected_fingerprint: dict | None = None, *, ignore=(),
             check_files: bool = True) -> "ReferenceCache":
        """Load and check a cache. Raises CacheMismatchError when `expected_fingerprint` (from
        `compute_fingerprint`) differs, naming the cache and what differs (`ignore`: keys not to
        compare, e.g. ("dtype",)); CacheCorruptError when files were changed, removed or
        damaged; CacheError when the cache is incomplete. check_files=False skips the shard
        checksums (not the fingerprint check)."""
        import numpy as np
        import pandas as pd
        import pyarrow as pa

        path = Path(path)
        manifest = read_manifest(path)
        if not manifest.get("complete"):
            raise CacheError(f"reference cache {path} is incomplete (precompute-ref did not finish): rerun the "
                             "same command to resume it")
        fp = manifest["fingerprint"]
        if fingerprint_digest(fp) != manifest.get("fingerprint_sha256"):
            raise CacheCorruptError(f"reference cache {path}: the manifest's fingerprint was edited")
        if expected_fingerprint is not None:
            diffs = diff_fingerprints(fp, expected_fingerprint, ignore)
            if diffs:
                raise CacheMismatchError(path, diffs)
        digest = manifest["fingerprint_sha256"]
        listed = {s["file"] for s in manifest["shards"]}
        extra = [p for p in _list_shards(path) if f"{SHARD_DIR}/{p.name}" not in listed]
        if extra:
            logger.warning("reference cache %s: %d shard file(s) not in the manifest are ignored (an unfinished "
                           "precompute-ref run? rerun it to add them)", path, len(extra))
        tables = []
        for s in manifest["shards"]:
            f = path / s["file"]
            if not f.exists():
                raise CacheCorruptError(f"reference cache {path}: shard {s['file']} listed in the manifest is missing")
            table, _ = _read_shard(f, digest, expect_sha256=s["sha256"] if check_files else None)
            if table.num_rows != s["rows"]:
                raise CacheCorruptError(f"reference cache {path}: shard {s['file']} has {table.num_rows} rows, "
                                        f"the manifest says {s['rows']}")
            tables.append(table)
        names = RANKED_COLUMNS if fp.get("data_kind") == "ranked" else PAIRED_COLUMNS
        if tables:
            table = pa.concat_tables(tables)
            if tuple(table.column_names) != names:
                raise CacheCorruptError(f"reference cache {path}: columns {table.column_names}, expected {list(names)}")
            ids = pd.Index(table.column("example_id").to_pylist())
            values = {n: (table.column(n).to_numpy(zero_copy_only=False) if fp.get("data_kind") != "ranked"
                          else np.array(table.column(n).to_pylist() + [None], dtype=object)[:-1]) for n in names[1:]}
        else:
            ids = pd.Index([], dtype=object)
            values = {n: np.zeros(0) for n in names[1:]}
        if not ids.is_unique:
            raise CacheCorruptError(f"reference cache {path}: {int(ids.duplicated().sum())} example id(s) appear "
                                    "more than once")
        if len(ids) != manifest.get("num_examples"):
            raise CacheCorruptError(f"reference cache {path}: {len(ids)} rows, the manifest says "
                                    f"{manifest.get('num_examples')}")
        return cls(path, manifest, ids, values)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._index

    def missing(self, example_ids) -> list[str]:
        """The ids (in order, without repeats) that the cache does not hold."""
        ids = list(dict.fromkeys(example_ids))
        pos = self._index.get_indexer(ids)
        return [i for i, p in zip(ids, pos) if p < 0]

    def check_covers(self, example_ids) -> None:
        """Raise MissingExamplesError (with the count) unless every id is cached; use before training."""
        ids = list(example_ids)
        miss = self.missing(ids)
        if miss:
            raise MissingExamplesError(self.path, miss, len(set(ids)))

    def lookup(self, example_ids, *, dtype=None, device=None) -> dict:
        """Reference values for these ids, in order, as tensors.

        Paired data: ref_chosen_logps, ref_rejected_logps (B,) float64 (or `dtype`), chosen_tokens,
        rejected_tokens (B,) int64. Ranked data: ref_logps (B, K), tokens (B, K) (all ids must
        have the same K). Raises MissingExamplesError with the count of missing ids.
        """
        import numpy as np
        import torch

        ids = list(example_ids)
        pos = self._index.get_indexer(ids)
        if (pos < 0).any():
            raise MissingExamplesError(self.path, [i for i, p in zip(ids, pos) if p < 0], len(ids))
        dtype = dtype or torch.float64
        out = {}
        for name, arr in self._values.items():
            picked = arr[pos]
            if self.ranked:
                lengths = {len(x) for x in picked}
                if len(lengths) > 1:
                    raise ValueError(f"lookup: ranked examples with different numbers of responses "
                                     f"{sorted(lengths)}")
                kind = np.float64 if name == "ref_logps" else np.int64
                picked = np.array(list(picked), dtype=kind).reshape(len(ids), -1)
            t = torch.from_numpy(np.ascontiguousarray(picked))
            t = t.to(dtype) if t.is_floating_point() else t.long()
            out[name] = t.to(device) if device is not None else t
        return out

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame({"example_id": list(self._index), **{k: list(v) if self.ranked else v
                                                                  for k, v in self._values.items()}})


# ----------------------------------------------------------------------------------------------
# Computing


def compute_logps(model, batch: dict, *, backend: str = "auto"):
    """Per-row summed completion log-probs of a collated batch (`PreferenceCollator`, padded
    or packed) under `model`, with the fused op. Returns (rows,) float32 (float64 for a float64
    model). Call under torch.inference_mode() / no_grad for reference values."""
    from . import sequence_logprobs

    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    if "sequence_ids" in batch:
        logits = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                       use_cache=False).logits
        return sequence_logprobs(logits, labels, sequence_ids=batch["sequence_ids"].to(device),
                                 num_sequences=int(batch["num_sequences"]), backend=backend)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   use_cache=False).logits
    return sequence_logprobs(logits, labels, backend=backend)


def _dist_info(rank, world_size):
    """(rank, world, use_dist, initialised_here): explicit values, an initialised process group, or torchrun env."""
    import torch.distributed as dist

    if rank is not None or world_size is not None:
        rank, world_size = int(rank or 0), int(world_size or 1)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        return rank, world_size, False, False
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True, False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size(), True, True
    return 0, 1, False, False


def _barrier(use_dist: bool) -> None:
    if use_dist:
        import torch.distributed as dist

        dist.barrier()


def _owner(example_id: str, world: int) -> int:
    return int(example_id[:8], 16) % world


def _load_model(model, dtype: str | None, revision, device):
    """(module, local_dir or None, dtype name)."""
    import torch

    if isinstance(model, (str, Path)):
        from transformers import AutoModelForCausalLM

        name = dtype or "float32"
        module = AutoModelForCausalLM.from_pretrained(str(model), revision=revision or "main",
                                                      dtype=getattr(torch, name))
        local = Path(model) if Path(model).is_dir() else None
        return module.to(device).eval(), local, name
    have = _dtype_name(next(model.parameters()).dtype)
    if dtype is not None and _dtype_name(dtype) != have:
        raise ValueError(f"dtype={dtype!r} but the model given is {have}: cast it first or leave dtype unset")
    return model.eval(), None, have


def _load_tokenizer(tokenizer, model, revision):
    if tokenizer is None:
        if not isinstance(model, (str, Path)):
            raise ValueError("tokenizer: required when the model is given as a module")
        tokenizer = model
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer), revision=revision or "main")
    return tokenizer


class _Progress:
    def __init__(self, total, enabled, desc):
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="ex", desc=desc, dynamic_ncols=True, smoothing=0.1)

    def update(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _compute_examples(model, tokenized, indices, collator, batch_size, ranked, backend, on_batch=None):
    """Values for the examples at `indices` of the tokenized data (batches sorted by length),
    returned in the order of `indices` as column lists."""
    import torch

    from .data import batch_completion_tokens

    rows = tokenized.select(list(indices)).to_list()
    lengths = [len(r["prompt_input_ids"]) + max(len(c) for c in (r["responses_input_ids"] if ranked else
               (r["chosen_input_ids"], r["rejected_input_ids"]))) for r in rows]
    order = sorted(range(len(rows)), key=lambda j: (-lengths[j], j))
    logps = [None] * len(rows)
    tokens = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        part = order[start:start + batch_size]
        batch = collator([rows[j] for j in part])
        with torch.inference_mode():
            lp = compute_logps(model, batch, backend=backend).double().cpu()
        nt = batch_completion_tokens(batch).cpu()
        K, B = batch["num_responses"], len(part)
        lp, nt = lp.view(K, B).T, nt.view(K, B).T
        bad = ~torch.isfinite(lp).all(dim=1)
        if bad.any():
            which = [rows[part[b]]["example_id"] for b in bad.nonzero().flatten().tolist()]
            raise FloatingPointError(f"non-finite reference log-probs for example(s) {which}: the model output "
                                     "overflowed (try --dtype float32)")
        for b, j in enumerate(part):
            logps[j] = lp[b].tolist()
            tokens[j] = nt[b].tolist()
        if on_batch is not None:
            on_batch(len(part))
    ids = [r["example_id"] for r in rows]
    if ranked:
        cols = {"example_id": ids, "ref_logps": logps, "tokens": tokens}
    else:
        cols = {"example_id": ids, "ref_chosen_logps": [v[0] for v in logps],
                "ref_rejected_logps": [v[1] for v in logps], "chosen_tokens": [t[0] for t in tokens],
                "rejected_tokens": [t[1] for t in tokens]}
    return cols


def _scan_shards(directory: Path, digest: str):
    """(ids per shard file, sha256 per file) of the complete shards on disk."""
    out = {}
    for p in _list_shards(directory):
        table, sha = _read_shard(p, digest)
        out[p] = (table.column("example_id").to_pylist(), sha)
    return out


def _finalize(directory: Path, manifest: dict, wanted_ids: set, digest: str) -> bool:
    """Write the complete manifest if the shards cover every wanted id; returns whether it did."""
    shards = _scan_shards(directory, digest)
    have, entries = set(), []
    for p, (ids, sha) in sorted(shards.items()):
        dup = have.intersection(ids)
        if dup:
            raise CacheCorruptError(f"reference cache {directory}: example id {next(iter(dup))} is in more than "
                                    f"one shard ({p.name} and another); were two runs writing the same rank?")
        have.update(ids)
        entries.append({"file": f"{SHARD_DIR}/{p.name}", "rows": len(ids), "sha256": sha})
    missing = wanted_ids - have
    if missing:
        logger.info("reference cache %s: %d example(s) still to compute by other ranks; not finalised yet",
                    directory, len(missing))
        return False
    manifest = dict(manifest, complete=True, shards=entries, num_examples=len(have))
    manifest["info"] = dict(manifest.get("info", {}), updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _write_manifest(directory, manifest)
    return True


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


def _verify(cache_dir, model, tokenized, collator, n, seed, batch_size, ranked, backend) -> VerifyReport:
    cache = ReferenceCache.open(cache_dir)
    all_ids = tokenized["example_id"]
    first = {}
    for i, e in enumerate(all_ids):
        first.setdefault(e, i)
    candidates = [e for e in first if e in cache]
    picked = random.Random(seed).sample(candidates, min(n, len(candidates)))
    max_abs, max_rel, worst_id, mismatches = 0.0, 0.0, None, 0
    # One example per batch: other batch shapes than the precompute, so it checks more than the file.
    for e in picked:
        cols = _compute_examples(model, tokenized, [first[e]], collator, 1, ranked, backend)
        ref = cache.lookup([e])
        if ranked:
            new, new_tok = cols["ref_logps"][0], cols["tokens"][0]
            old, old_tok = ref["ref_logps"][0].tolist(), ref["tokens"][0].tolist()
        else:
            new = [cols["ref_chosen_logps"][0], cols["ref_rejected_logps"][0]]
            new_tok = [cols["chosen_tokens"][0], cols["rejected_tokens"][0]]
            old = [float(ref["ref_chosen_logps"][0]), float(ref["ref_rejected_logps"][0])]
            old_tok = [int(ref["chosen_tokens"][0]), int(ref["rejected_tokens"][0])]
        mismatches += int(new_tok != old_tok)
        for a, b in zip(new, old):
            d = abs(a - b)
            if worst_id is None or d > max_abs or not math.isfinite(d):
                max_abs, worst_id = d, e
            max_rel = max(max_rel, d / max(abs(b), 1e-12))
    return VerifyReport(len(picked), max_abs, max_rel, worst_id, mismatches)


def precompute_reference(
    model,
    data,
    output_dir,
    *,
    tokenizer=None,
    split: str = "train",
    batch_size: int = 8,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_side: str = "keep_start",
    dtype: str | None = None,
    revision: str | None = None,
    data_revision: str | None = None,
    verify: int = 0,
    shard_size: int = 1024,
    device=None,
    backend: str = "auto",
    progress: bool = True,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    return_report: bool = False,
):
    """Compute the reference model's log-probs of every example of `data` into `output_dir`.

    model: a local directory or hub name (loaded with AutoModelForCausalLM in `dtype`, default
        float32, at `revision`), or a loaded module (then `tokenizer` is required and `dtype`
        must be left unset or match it).
    data: anything `dpo_fast.data.load_preference_data` takes; `split` picks the split.
    max_length / max_prompt_length / truncation_side: the tokenization settings; the trainer
        must use the same (they are in the fingerprint).
    verify: after computing, recompute this many random cached examples and report the largest
        difference (logged, and returned with return_report=True).
    shard_size: examples per Parquet shard (the work lost to a crash is at most one shard).
    rank / world_size: this process's part when running several without torch.distributed;
        by default they come from torch.distributed or the torchrun environment.
    Reruns resume: see the module docstring. Returns the output directory (and a dict with the
    tokenization report, the number of examples computed now and the verify report when
    return_report=True).
    """
    import torch

    from .data import PreferenceCollator, load_and_tokenize

    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be positive")
    out_dir = Path(output_dir)
    rank, world, use_dist, init_here = _dist_info(rank, world_size)
    try:
        if device is None:
            device = (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
        t0 = time.time()
        module, local_dir, dtype_name = _load_model(model, dtype, revision, device)
        tok = _load_tokenizer(tokenizer, model, revision)
        tokenized, report, fmt = load_and_tokenize(
            data, tok, split=split, revision=data_revision, max_length=max_length,
            max_prompt_length=max_prompt_length, truncation_side=truncation_side)
        ranked = fmt == "ranked"
        fingerprint = compute_fingerprint(
            module, tok, max_length=max_length, max_prompt_length=max_prompt_length,
            truncation_side=truncation_side, dtype=dtype_name, data_kind="ranked" if ranked else "paired",
            model_path=local_dir)
        digest = fingerprint_digest(fingerprint)

        # The manifest (complete: false) goes down before any shard: a rerun then knows what
        # the shards were computed for.
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / SHARD_DIR).mkdir(exist_ok=True)
            with _file_lock(out_dir / ".lock-manifest", "writing this cache's manifest"):
                if (out_dir / MANIFEST).exists():
                    existing = read_manifest(out_dir)
                    diffs = diff_fingerprints(existing["fingerprint"], fingerprint)
                    if diffs:
                        raise CacheMismatchError(out_dir, diffs)
                else:
                    if _list_shards(out_dir):
                        raise CacheError(f"{out_dir} holds reference-cache shards but no {MANIFEST}: not a cache "
                                         "this command can resume; use an empty directory")
                    _write_manifest(out_dir, {
                        "format": CACHE_FORMAT, "cache_format_version": CACHE_FORMAT_VERSION, "complete": False,
                        "fingerprint": fingerprint, "fingerprint_sha256": digest, "shards": [], "num_examples": 0,
                        "data_kind": fingerprint["data_kind"],
                        "columns": list(RANKED_COLUMNS if ranked else PAIRED_COLUMNS),
                        "info": _run_info(model, revision, data, split, world),
                    })
        _barrier(use_dist)
        if rank != 0:
            if not (out_dir / MANIFEST).exists():
                raise CacheError(f"{out_dir}: no {MANIFEST} yet; start rank 0 first (or use torchrun)")
            diffs = diff_fingerprints(read_manifest(out_dir)["fingerprint"], fingerprint)
            if diffs:
                raise CacheMismatchError(out_dir, diffs)

        all_ids = tokenized["example_id"]
        first: dict[str, int] = {}
        for i, e in enumerate(all_ids):
            first.setdefault(e, i)
        duplicates = len(all_ids) - len(first)
        if duplicates:
            logger.info("preference data: %d duplicate example(s) (same content) are cached once", duplicates)

        collator = PreferenceCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        computed = 0
        with _file_lock(out_dir / f".lock-r{rank:05d}", f"writing rank {rank}'s shards of {out_dir}"):
            for stale in (out_dir / SHARD_DIR).glob(f".shard-r{rank:05d}-*.tmp"):
                stale.unlink()  # a shard a killed run did not finish
            done = set()
            next_index = 0
            for p, (ids, _) in _scan_shards(out_dir, digest).items():
                done.update(ids)
                if p.name.startswith(f"shard-r{rank:05d}-"):
                    next_index = max(next_index, int(p.stem.rsplit("-", 1)[1]) + 1)
            todo = [i for e, i in first.items() if _owner(e, world) == rank and e not in done]
            mine = sum(1 for e in first if _owner(e, world) == rank)
            logger.info("precompute-ref rank %d/%d: %d example(s) to compute, %d already cached",
                        rank, world, len(todo), mine - len(todo))
            bar = _Progress(len(todo), progress and rank == 0, "reference log-probs")
            try:
                for start in range(0, len(todo), shard_size):
                    chunk = todo[start:start + shard_size]
                    cols = _compute_examples(module, tokenized, chunk, collator, batch_size, ranked, backend,
                                             on_batch=bar.update)
                    _write_shard(out_dir, _shard_name(rank, next_index), cols, ranked, digest)
                    next_index += 1
                    computed += len(chunk)
            finally:
                bar.close()

        _barrier(use_dist)
        finished = False
        if rank == 0 or not use_dist:
            with _file_lock(out_dir / ".lock-manifest", "writing this cache's manifest") if not use_dist \
                    else contextlib.nullcontext():
                manifest = read_manifest(out_dir)
                manifest["info"] = dict(manifest.get("info", {}), skipped_examples=report.skipped,
                                        duplicate_examples=duplicates)
                finished = _finalize(out_dir, manifest, set(first), digest)
        _barrier(use_dist)
        if use_dist and rank != 0:
            finished = bool(read_manifest(out_dir).get("complete"))
        if finished:
            logger.info("reference cache %s: %d example(s) (%d computed now, %d skipped as too long) in %.1fs",
                        out_dir, len(first), computed, report.skipped, time.time() - t0)
        vreport = None
        if verify and finished and rank == 0:
            vreport = _verify(out_dir, module, tokenized, collator, verify, seed, batch_size, ranked, backend)
            logger.info("%s", vreport)
        if return_report:
            return out_dir, {"tokenization": report, "computed": computed, "complete": finished, "verify": vreport}
        return out_dir
    finally:
        if init_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def verify_reference_cache(cache_dir, model, data, n: int = 16, *, tokenizer=None, split="train", dtype=None,
                           revision=None, seed: int = 0, device="cpu", backend="auto") -> VerifyReport:
    """Recompute `n` random cached examples of `data` (one per batch) and report the largest
    difference from the cached values. The cache's own settings are used for tokenization."""
    from .data import PreferenceCollator, load_and_tokenize

    manifest = read_manifest(cache_dir)
    fp = manifest["fingerprint"]
    module, local_dir, dtype_name = _load_model(model, dtype or fp["dtype"], revision, device)
    tok = _load_tokenizer(tokenizer, model, revision)
    t = fp["tokenization"]
    tokenized, _, fmt = load_and_tokenize(data, tok, split=split, max_length=t["max_length"],
                                          max_prompt_length=t["max_prompt_length"],
                                          truncation_side=t["truncation_side"])
    current = compute_fingerprint(module, tok, max_length=t["max_length"], max_prompt_length=t["max_prompt_length"],
                                  truncation_side=t["truncation_side"], dtype=dtype_name,
                                  data_kind="ranked" if fmt == "ranked" else "paired", model_path=local_dir)
    diffs = diff_fingerprints(fp, current)
    if diffs:
        raise CacheMismatchError(cache_dir, diffs)
    collator = PreferenceCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return _verify(Path(cache_dir), module, tokenized, collator, n, seed, 1, fmt == "ranked", backend)


def _run_info(model, revision, data, split, world) -> dict:
    import torch

    try:
        import transformers
        tv = transformers.__version__
    except Exception:  # pragma: no cover
        tv = None
    return {"model": str(model) if isinstance(model, (str, Path)) else type(model).__name__,
            "revision": revision, "data": str(data) if isinstance(data, (str, Path)) else type(data).__name__,
            "split": split, "world_size": world, "torch_version": torch.__version__, "transformers_version": tv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="reference model: local directory or hub name")
    parser.add_argument("--data", required=True, help="preference data: JSON/JSONL/Parquet/CSV file, "
                        "save_to_disk directory, or hub name")
    parser.add_argument("--output-dir", required=True, help="cache directory (created; a rerun resumes it)")
    parser.add_argument("--split", default="train", help="data split, e.g. train or 'train[:1000]'")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or hub name; unset: the model's")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    parser.add_argument("--max-length", type=int, default=None, help="max prompt + completion tokens")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="max prompt tokens")
    parser.add_argument("--truncation-side", choices=("keep_start", "keep_end"), default="keep_start",
                        help="which part of a too-long prompt to keep")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype the reference model runs in")
    parser.add_argument("--ref-model-revision", default=None, help="hub revision of the model")
    parser.add_argument("--data-revision", default=None, help="hub revision of the data")
    parser.add_argument("--device", default=None,
                        help="torch device; unset: cuda:LOCAL_RANK when CUDA is available, else cpu")
    parser.add_argument("--shard-size", type=int, default=1024, help="examples per Parquet shard")
    parser.add_argument("--verify", type=int, default=0, metavar="N",
                        help="afterwards, recompute N random cached examples and report the largest difference")
    parser.add_argument("--verify-tolerance", type=float, default=None,
                        help="relative difference above which --verify fails (default: 1e-4 for float32/64, "
                             "5e-2 for 16-bit dtypes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --verify sample")
    parser.add_argument("--backend", default="auto", help="log-prob op backend")
    parser.add_argument("--rank", type=int, default=None, help="without torchrun: this process's part (0-based)")
    parser.add_argument("--world-size", type=int, default=None, help="without torchrun: number of parts")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        out, rep = precompute_reference(
            args.model, args.data, args.output_dir, tokenizer=args.tokenizer, split=args.split,
            batch_size=args.batch_size, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
            truncation_side=args.truncation_side, dtype=args.dtype, revision=args.ref_model_revision,
            data_revision=args.data_revision, verify=args.verify, shard_size=args.shard_size, device=args.device,
            backend=args.backend, progress=not args.no_progress, seed=args.seed, rank=args.rank,
            world_size=args.world_size, return_report=True)
    except (CacheError, ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"dpo-fast precompute-ref: error: {e}", file=sys.stderr)
        return 2
    tok = rep["tokenization"]
    print(f"reference cache: {out} ({'complete' if rep['complete'] else 'waiting for other ranks'}); "
          f"{rep['computed']} example(s) computed now; {tok}")
    v = rep["verify"]
    if v is not None:
        tol = args.verify_tolerance
        if tol is None:
            tol = 5e-2 if args.dtype in ("bfloat16", "float16") else 1e-4
        ok = v.token_count_mismatches == 0 and v.max_rel_diff <= tol and math.isfinite(v.max_abs_diff)
        print(f"{v} -> {'OK' if ok else 'MISMATCH'} (tolerance {tol:g} relative)")
        if not ok:
            return 1
    return 0
