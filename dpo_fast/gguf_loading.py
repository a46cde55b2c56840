"""GGUF checkpoints (llama.cpp's single-file format) as ordinary trainable models.

    model = load_gguf_model("gemma-3-270m-q4_k_m.gguf", dtype=torch.float32)  # dequantized, trainable
    tokenizer = load_gguf_tokenizer("gemma-3-270m-q4_k_m.gguf")                # same file, its chat template

Transformers' GGUF support (the `gguf` package: pip install -e ".[gguf]") reads the file; every weight is
dequantized to the training dtype and the quantizer transformers attaches is taken off again, so the
model trains, saves (plain safetensors, no quantization_config) and reloads like any other. Before the
weights are read, the file's architecture and tensor types are checked: a type that cannot be
dequantized or an architecture transformers does not map is a ValueError naming it (hf.py turns it
into a ModelError naming the model).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

GGUF_SUFFIX = ".gguf"
INSTALL_HINT = 'pip install -e ".[gguf]" (or pip install gguf)'
# the ggml types that hold plain floats rather than quantized blocks (F32, F16, BF16)
_FLOAT_TYPES = frozenset({0, 1, 30})


def is_gguf(source) -> bool:
    """Whether a model source names a GGUF file (by its suffix: the file may not exist yet)."""
    return isinstance(source, (str, Path)) and str(source).lower().endswith(GGUF_SUFFIX)


@dataclass(frozen=True)
class GgufSummary:
    """What the checks and the tokenizer need from a GGUF file's header."""

    architecture: str
    tensor_types: dict  # ggml type id -> (type name, number of tensors)
    chat_template: str | None


def _gguf_package():
    try:
        import gguf
    except ImportError:
        raise ValueError(f"reading GGUF files needs the gguf package: {INSTALL_HINT}") from None
    return gguf


@functools.lru_cache(maxsize=4)
def _read_summary(path: str, stamp: tuple) -> GgufSummary:
    # the key holds (mtime, size): a file rewritten in place is read again
    gguf = _gguf_package()
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError, IndexError) as e:
        raise ValueError(f"not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        raise ValueError("the GGUF file names no architecture (general.architecture)")
    types: dict = {}
    for tensor in reader.tensors:
        name, count = types.get(int(tensor.tensor_type), (tensor.tensor_type.name, 0))
        types[int(tensor.tensor_type)] = (name, count + 1)
    template = reader.get_field("tokenizer.chat_template")
    return GgufSummary(str(arch_field.contents()), types, None if template is None else str(template.contents()))


def read_summary(path) -> GgufSummary:
    """The architecture, tensor types and chat template of a GGUF file (read once per file version)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError("no such GGUF file")
    stat = path.stat()
    return _read_summary(str(path.resolve()), (stat.st_mtime_ns, stat.st_size))


def _mapped_architectures() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return {_plain_name(a) for a in GGUF_SUPPORTED_ARCHITECTURES}


def _plain_name(arch: str) -> str:
    # llama.cpp writes qwen2moe / gpt-oss where transformers' table says qwen2_moe / gpt_oss
    return arch.lower().replace("_", "").replace("-", "")


@functools.lru_cache(maxsize=None)
def can_dequantize(ggml_type: int) -> bool:
    """Whether the gguf package (which transformers' GGUF loading uses) dequantizes this type: tried on
    one all-zero block, so the answer follows the installed version."""
    gguf = _gguf_package()
    if ggml_type in _FLOAT_TYPES:
        return True
    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except (ValueError, KeyError, NotImplementedError):
        return False
    return True


def check_gguf(path) -> GgufSummary:
    """Refuse, before the weights are read, a GGUF file transformers cannot turn into a trainable model."""
    summary = read_summary(path)
    if _plain_name(summary.architecture) not in _mapped_architectures():
        raise ValueError(f"transformers {_transformers_version()} does not map the GGUF architecture "
                         f"{summary.architecture!r} to a model class (transformers.modeling_gguf_pytorch_utils."
                         "GGUF_SUPPORTED_ARCHITECTURES); convert the checkpoint to safetensors another way")
    bad = [f"{name} ({count} tensors)" for t, (name, count) in sorted(summary.tensor_types.items())
           if not can_dequantize(t)]
    if bad:
        raise ValueError(f"holds tensors of quantization type {', '.join(bad)}, which the installed gguf package "
                         "cannot dequantize; use a file quantized with another type (e.g. Q8_0, Q4_K_M, F16)")
    return summary


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _split(path) -> tuple[str, dict]:
    """transformers' way of naming a GGUF file: its directory, and gguf_file= its name."""
    path = Path(path).expanduser().resolve()
    return str(path.parent), {"gguf_file": path.name}


@functools.lru_cache(maxsize=4)
def _config(path: str, stamp: tuple):
    from transformers import AutoConfig

    directory, kwargs = _split(path)
    config = AutoConfig.from_pretrained(directory, **kwargs)
    config.dtype = None  # the file's own types are quantized: a save writes the training dtype
    return config


def load_gguf_config(path):
    """The model config a GGUF file maps to (checked first; read once per file version)."""
    check_gguf(path)
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return copy.deepcopy(_config(str(path), (stat.st_mtime_ns, stat.st_size)))


def load_gguf_model(path, *, dtype: torch.dtype, **kwargs) -> tuple[nn.Module, dict]:
    """AutoModelForCausalLM from a GGUF file, every weight dequantized to `dtype`, as a plain model;
    kwargs go to from_pretrained (e.g. attn_implementation). Returns (model, loading info)."""
    from transformers import AutoModelForCausalLM

    load_gguf_config(path)  # the checks, before the weights are read
    directory, where = _split(path)
    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, output_loading_info=True,
                                                       **where, **kwargs)
    make_plain(model)
    return model, info


def make_plain(model: nn.Module) -> None:
    """Take off what transformers attaches to a model it loaded from GGUF (a quantizer, a
    quantization_config): the weights are already dense, and with these left on, trainers refuse
    to train it and save_pretrained writes a config that asks for GGUF dequantization on reload."""
    model.hf_quantizer = None
    for obj, attrs in ((model, ("is_quantized", "quantization_method")),
                       (model.config, ("quantization_config", "_is_quantized"))):
        for attr in attrs:
            if attr in vars(obj):
                delattr(obj, attr)
    for p in model.parameters():
        p.requires_grad_(True)


def load_gguf_tokenizer(path):
    """The tokenizer stored in a GGUF file, with the file's chat template (tokenizer.chat_template)
    when transformers did not carry it over."""
    from transformers import AutoTokenizer

    summary = check_gguf(path)
    directory, where = _split(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, **where)
    if not getattr(tokenizer, "chat_template", None) and summary.chat_template:
        tokenizer.chat_template = summary.chat_template
    return tokenizer
