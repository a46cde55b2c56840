"""The cache on disk: manifest, Parquet shards (written atomically, each with its SHA-256 beside it),
locks, verification and repair of what a rerun finds, and `ReferenceCache`, the reader."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .fingerprint import CACHE_FORMAT_VERSION, canonical_json, diff_fingerprints, fingerprint_digest

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
DAMAGED_DIR = "damaged"
CACHE_FORMAT = "dpo_fast.refcache"
PAIRED_COLUMNS = ("example_id", "ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens")
RANKED_COLUMNS = ("example_id", "ref_logps", "tokens")
_META_KEY = b"dpo_fast.fingerprint_sha256"


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


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_manifest(directory: Path, manifest: dict) -> None:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    body["manifest_sha256"] = hashlib.sha256(canonical_json(body).encode()).hexdigest()
    atomic_write(directory / MANIFEST, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(directory) -> dict:
    """The parsed manifest; CacheCorruptError if it is unreadable or was edited after writing."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise CacheError(f"reference cache {directory}: the directory does not exist (dpo-fast precompute-ref "
                         "writes it)")
    if not path.exists():
        raise CacheError(f"{directory} is not a reference cache: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheCorruptError(f"reference cache {directory}: {MANIFEST} is unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise CacheCorruptError(f"reference cache {directory}: {MANIFEST} is not a dpo_fast reference-cache manifest")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if hashlib.sha256(canonical_json(body).encode()).hexdigest() != manifest.get("manifest_sha256"):
        raise CacheCorruptError(f"reference cache {directory}: {MANIFEST} was modified after it was written "
                                "(its checksum does not match)")
    return manifest


def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:05d}-{index:06d}.parquet"


def list_shards(directory: Path) -> list[Path]:
    d = directory / SHARD_DIR
    return sorted(d.glob("shard-r*-*.parquet")) if d.is_dir() else []


def _read_shard(path: Path, digest: str, *, expect_sha256: str | None = None, columns=None):
    """The shard as a pyarrow Table; checks its checksum (if given) and fingerprint metadata."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CacheCorruptError(f"reference cache shard {path} cannot be read ({e})") from e
    if expect_sha256 is not None and hashlib.sha256(data).hexdigest() != expect_sha256:
        raise CacheCorruptError(f"reference cache shard {path} was modified after it was written "
                                "(its SHA-256 differs from the one recorded when it was written)")
    try:
        table = pq.read_table(pa.BufferReader(data), columns=columns)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise CacheCorruptError(f"reference cache shard {path} is not a readable Parquet file ({e})") from e
    meta = table.schema.metadata or {}
    if meta.get(_META_KEY, b"").decode() != digest:
        raise CacheMismatchError(path, ["this shard was computed for another fingerprint than the manifest's"])
    return table, hashlib.sha256(data).hexdigest()


def write_shard(directory: Path, name: str, columns: dict, ranked: bool, digest: str) -> tuple[str, int]:
    """Write one shard atomically; returns (sha256, rows)."""
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
    sha = hashlib.sha256(data).hexdigest()
    # The checksum goes down first: a shard file on disk always has its recorded SHA-256, so a
    # rerun can tell a shard edited or damaged after writing from a good one.
    atomic_write(_checksum_path(directory / SHARD_DIR / name), (sha + "\n").encode())
    atomic_write(directory / SHARD_DIR / name, data)
    return sha, table.num_rows


@contextlib.contextmanager
def file_lock(path: Path, what: str):
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"another process is {what} ({path} is locked); wait for it or stop it") from None
        yield
    finally:
        f.close()  # closing releases the lock (so does the process dying)


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
        path = Path(path)
        manifest = read_manifest(path)
        if not manifest.get("complete"):
            raise CacheError(_incomplete(path, manifest))
        fp = manifest["fingerprint"]
        if fingerprint_digest(fp) != manifest.get("fingerprint_sha256"):
            raise CacheCorruptError(f"reference cache {path}: the manifest's fingerprint was edited")
        if expected_fingerprint is not None:
            diffs = diff_fingerprints(fp, expected_fingerprint, ignore)
            if diffs:
                raise CacheMismatchError(path, diffs)
            if "dtype" in ignore and fp.get("dtype") != expected_fingerprint.get("dtype"):
                logger.warning("reference cache %s was computed in %s, not %s as a cache of this run would be: "
                               "accepted (the same reference model, rounded to %s; step-0 rewards are therefore not "
                               "exactly 0); precompute-ref --dtype %s gives exact agreement", path, fp.get("dtype"),
                               expected_fingerprint.get("dtype"), fp.get("dtype"), expected_fingerprint.get("dtype"))
        digest = manifest["fingerprint_sha256"]
        listed = {s["file"] for s in manifest["shards"]}
        extra = [p for p in list_shards(path) if f"{SHARD_DIR}/{p.name}" not in listed]
        if extra:
            logger.warning("reference cache %s: %d shard file(s) not in the manifest are ignored (an unfinished "
                           "precompute-ref run? rerun it to add them)", path, len(extra))
        tables = _listed_shards(path, manifest, digest, check_files)
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
        return pd.DataFrame({"example_id": list(self._index), **{k: list(v) if self.ranked else v
                                                                  for k, v in self._values.items()}})


def _checksum_path(shard: Path) -> Path:
    # A dot file: Parquet readers skip it when reading the shards directory as one data set.
    return shard.with_name(f".{shard.name}.sha256")


def _recorded_sha256(shard: Path, manifest: dict | None) -> str | None:
    """The SHA-256 recorded when the shard was written: the manifest's entry, else the file beside it."""
    for entry in (manifest or {}).get("shards", []):
        if entry.get("file") == f"{SHARD_DIR}/{shard.name}":
            return entry.get("sha256")
    try:
        return _checksum_path(shard).read_text().strip() or None
    except OSError:
        return None


def move_aside(directory: Path, shard: Path, reason: str) -> None:
    """Move a damaged shard (and its checksum) to DIR/damaged/, never deleting it; log why."""
    target_dir = directory / DAMAGED_DIR
    target_dir.mkdir(exist_ok=True)
    target = target_dir / shard.name
    n = 1
    while target.exists():
        target = target_dir / f"{shard.stem}.{n}{shard.suffix}"
        n += 1
    with contextlib.suppress(FileNotFoundError):  # another rank may have moved it already
        os.replace(shard, target)
        logger.warning("reference cache %s: %s %s; moved to %s, its examples are recomputed", directory,
                       shard.name, reason, target)
    with contextlib.suppress(FileNotFoundError):
        os.replace(_checksum_path(shard), _checksum_path(target))


def scan_shards(directory: Path, digest: str, manifest: dict | None = None) -> list[tuple[Path, list[str], str]]:
    """(path, example ids, sha256) of every good shard on disk, in name order. A shard whose bytes
    differ from its recorded SHA-256 (edited, truncated), that has none, cannot be read, or was
    computed for another fingerprint is moved aside; so is a shard repeating example ids that an
    earlier shard holds. Their examples are then missing, and precompute recomputes them."""
    good, seen = [], set()
    for path in list_shards(directory):
        recorded = _recorded_sha256(path, manifest)
        if recorded is None:
            move_aside(directory, path, "has no recorded checksum")
            continue
        try:
            table, sha = _read_shard(path, digest, expect_sha256=recorded)
        except CacheMismatchError:
            move_aside(directory, path, "was computed for another fingerprint than the manifest's")
            continue
        except CacheCorruptError as e:
            move_aside(directory, path, str(e).split(": ", 1)[-1] if ": " in str(e) else str(e))
            continue
        except FileNotFoundError:
            continue
        ids = table.column("example_id").to_pylist()
        if len(set(ids)) != len(ids) or seen.intersection(ids):
            move_aside(directory, path, "repeats example ids another shard holds")
            continue
        seen.update(ids)
        good.append((path, ids, sha))
    return good


def _incomplete(path: Path, manifest: dict) -> str:
    """Why an unfinished cache cannot be used, naming the parts of a multi-part precompute that
    have written nothing yet."""
    world = int((manifest.get("info") or {}).get("world_size") or 1)
    started = {int(p.name[len("shard-r"):len("shard-r") + 5]) for p in list_shards(path)}
    absent = [r for r in range(world) if r not in started]
    if world > 1 and absent:
        parts = ", ".join(f"--rank {r}" for r in absent)
        return (f"reference cache {path} is incomplete: it is precomputed in {world} parts (--world-size {world}) and "
                f"part(s) {parts} have written nothing yet; run precompute-ref with the same settings and {parts} "
                f"--world-size {world} (the last part to finish completes the cache), or rerun it as one process")
    return f"reference cache {path} is incomplete (precompute-ref did not finish): rerun the same command to resume it"


def _listed_shards(path: Path, manifest: dict, digest: str, check_files: bool) -> list:
    """The manifest's shards as tables; a missing, damaged or changed one is an error saying how the
    cache is repaired."""
    tables = []
    try:
        for s in manifest["shards"]:
            f = path / s["file"]
            if not f.exists():
                raise CacheCorruptError(f"reference cache {path}: shard {s['file']} listed in the manifest is missing")
            table, _ = _read_shard(f, digest, expect_sha256=s["sha256"] if check_files else None)
            if table.num_rows != s["rows"]:
                raise CacheCorruptError(f"reference cache {path}: shard {s['file']} has {table.num_rows} rows, "
                                        f"the manifest says {s['rows']}")
            tables.append(table)
    except CacheCorruptError as e:
        raise CacheCorruptError(f"{e}; rerunning the precompute-ref command that wrote the cache repairs it (damaged "
                                f"shards are moved to {path}/damaged/ and their examples recomputed)") from None
    return tables


def finalize(directory: Path, manifest: dict, wanted_ids: set, digest: str) -> bool:
    """Write the complete manifest if the good shards cover every wanted id; returns whether it did."""
    shards = scan_shards(directory, digest, manifest)
    have = set().union(*(ids for _, ids, _ in shards))
    missing = wanted_ids - have
    if missing:
        logger.info("reference cache %s: %d example(s) still to compute; not finalised yet", directory, len(missing))
        return False
    entries = [{"file": f"{SHARD_DIR}/{p.name}", "rows": len(ids), "sha256": sha} for p, ids, sha in shards]
    manifest = dict(manifest, complete=True, shards=entries, num_examples=len(have))
    manifest["info"] = dict(manifest.get("info", {}), updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_manifest(directory, manifest)
    return True
