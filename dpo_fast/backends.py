"""The one backend registry: which kernels can run on which device, and the pick for "auto".

One vocabulary for every op (`backend=` of sequence_logprobs, linear_sequence_logprobs,
dpo_fast.loss, precompute-ref and train); each name serves both op families:

  name       from logits (S, T, V)                   from hidden states + lm_head weight
  triton     Triton row kernels                       fused Triton GEMM kernels (no logits tiles)
  cuda       the extension's CUDA row kernels         cuBLAS tiles through the CUDA row kernels
  cpu        the extension's CPU row kernels          GEMM tiles through the CPU row kernels
  reference  plain PyTorch, row-chunked               GEMM tiles through the PyTorch row kernels

Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests). "reference" is
the oracle's twin and the fallback on any device. A new backend adds its row kernels to
dpo_fast.kernels and its availability here.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")


class BackendInfo(NamedTuple):
    available: bool
    reason: str  # why it is (not) usable on the device


def _load_extension():
    try:
        from dpo_fast import _C  # importing registers the dpo_fast_C ops
    except ImportError as e:
        return None, f"the extension dpo_fast._C is not built ({e}); pip install --no-build-isolation -e ."
    return _C, ""


# Loaded once at import, so that nothing below imports while torch.compile traces a call.
_EXTENSION, _EXTENSION_ERROR = _load_extension()


def extension():
    """The compiled extension module `dpo_fast._C`, or None (see extension_error())."""
    return _EXTENSION


def extension_error() -> str:
    return _EXTENSION_ERROR


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cpu_capability_ok(built: str) -> tuple[bool, str]:
    """The CPU kernels are compiled for the build host's vector ISA; the running CPU needs it."""
    have = torch.backends.cpu.get_cpu_capability().lower()  # "avx512", "avx2", "default", ...
    order = {"default": 0, "avx2": 1, "avx512": 2}
    if order.get(built, 0) > order.get(have, 0):
        return False, f"the extension was built for {built} but this CPU offers {have}; rebuild it here"
    return True, f"compiled extension ({built})"


def available_backends(device: torch.device | str = "cpu") -> dict[str, BackendInfo]:
    """For each backend, whether it can run on `device` and why (not)."""
    device = torch.device(device)
    ext = extension()
    out: dict[str, BackendInfo] = {}

    if not triton_importable():
        out["triton"] = BackendInfo(False, "triton is not installed")
    elif device.type == "cuda":
        out["triton"] = BackendInfo(True, "Triton kernels on CUDA")
    elif device.type == "cpu" and triton_interpreting():
        out["triton"] = BackendInfo(True, "Triton interpreter (TRITON_INTERPRET=1): slow, for tests")
    else:
        out["triton"] = BackendInfo(False, f"Triton needs a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device.type}")

    if device.type != "cuda":
        out["cuda"] = BackendInfo(False, f"the cuda backend needs a CUDA device, got {device.type}")
    elif ext is None:
        out["cuda"] = BackendInfo(False, extension_error())
    elif not ext.cuda_built():
        out["cuda"] = BackendInfo(False, "the extension was built without CUDA kernels (CPU-only torch or no nvcc)")
    else:
        out["cuda"] = BackendInfo(True, "compiled extension (CUDA)")

    if device.type != "cpu":
        out["cpu"] = BackendInfo(False, f"the cpu backend needs CPU tensors, got {device.type}")
    elif ext is None:
        out["cpu"] = BackendInfo(False, extension_error())
    else:
        out["cpu"] = BackendInfo(*_cpu_capability_ok(ext.cpu_capability()))

    out["reference"] = BackendInfo(True, "plain PyTorch (always available)")
    return out


# For "auto": Triton before the csrc CUDA kernels on CUDA (see README: measured choice pending
# a GPU benchmark), the compiled CPU kernels before the reference on CPU. The Triton
# interpreter is never picked automatically: it is a test vehicle.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def _resolve(backend: str, device_type: str) -> str:
    status = available_backends(device_type)
    if backend == "auto":
        return next((n for n in _AUTO_ORDER.get(device_type, ()) if status[n].available), "reference")
    if not status[backend].available:
        return f"error: backend {backend!r} is not available on {device_type}: {status[backend].reason}"
    return backend


# Every (backend, device type) answer, computed at import (so TRITON_INTERPRET must be set
# before dpo_fast is imported, as Triton itself needs): inside a torch.compile trace,
# resolve_backend is then a dictionary lookup that folds to a constant.
_RESOLVED = {(b, d): _resolve(b, d) for d in ("cpu", "cuda") for b in BACKENDS + ("auto",)}


def check_backend_name(backend) -> None:
    """A clear error for a name outside the vocabulary (before any work is done)."""
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {', '.join(('auto',) + BACKENDS)}, got {backend!r}")


def check_backend(backend: str, device) -> None:
    """A clear ValueError, before any work, for a name outside the vocabulary or not usable on `device`."""
    check_backend_name(backend)
    if backend != "auto":
        info = available_backends(device)[backend]
        if not info.available:
            raise ValueError(f"backend {backend!r} is not available on {torch.device(device).type}: {info.reason}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for a call: validate an explicit name, or pick for "auto"."""
    check_backend_name(backend)
    name = _RESOLVED.get((backend, device.type))
    if name is None:  # another device type (mps, xpu, meta, ...): not precomputed
        name = _resolve(backend, device.type)
    if name.startswith("error: "):
        raise ValueError(name[len("error: "):])
    return name
