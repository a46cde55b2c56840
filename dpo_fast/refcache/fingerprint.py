"""What cached reference log-probs depend on: the fingerprint of weights, config, tokenizer,
tokenization settings, dtype and format, its digest, and readable differences between two."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .. import __version__
from ..data import TokenizationSettings, tokenizer_fingerprint

CACHE_FORMAT_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16", "float64")
# Config entries that do not change the values (runtime switches, bookkeeping).
_CONFIG_IGNORED = {
    "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache", "_commit_hash",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "architectures",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "pruned_heads",
}


def _sha256_file(path: Path, h=None, chunk: int = 1 << 23):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def canonical_json(obj) -> str:
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
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if hasattr(t, "full_tensor"):  # a sharded parameter (every rank calls this: a collective)
            t = t.full_tensor()
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
    return hashlib.sha256(canonical_json(d).encode()).hexdigest()


def dtype_name(dtype) -> str:
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
                        truncation_side="keep_start", max_completion_length=None, dtype=None, data_kind="paired",
                        model_path=None, weights=None) -> dict:
    """What cached reference log-probs depend on, as a JSON-able dict.

    model: the reference model (a loaded module); model_path: the local directory it was loaded
    from, if any (its safetensors files are hashed instead of the tensors: pass the same kind
    of source as `precompute-ref` got). dtype defaults to the model's parameter dtype.
    data_kind: "paired" or "ranked". `weights` may pass a precomputed `weights_fingerprint`.
    """
    if data_kind not in ("paired", "ranked"):
        raise ValueError(f"data_kind: expected 'paired' or 'ranked', got {data_kind!r}")
    if dtype is None:
        dtype = next(model.parameters()).dtype
    settings = TokenizationSettings(max_length, max_prompt_length, truncation_side, max_completion_length)
    return {
        "weights": weights or weights_fingerprint(model, model_path),
        "model_config": config_fingerprint(model.config),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenization": settings.as_dict(),
        "data_kind": data_kind,
        "dtype": dtype_name(dtype),
        "dpo_fast_version": __version__,
        "cache_format_version": CACHE_FORMAT_VERSION,
    }


def fingerprint_digest(fingerprint: dict) -> str:
    return hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest()


def _short(v) -> str:
    s = v if isinstance(v, str) else canonical_json(v)
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
