"""The inputs of one case, built from one seed: identical for every implementation."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .cases import SEED, Shape


def _fill_(out, gen, scale: float = 1.0) -> None:
    """Fill `out` (rows x cols, any float dtype) with pseudo-random values without temporaries
    the size of `out`: a random block of up to 64 rows, repeated down the tensor with a random
    scale and shift per repetition (the kernels' cost does not depend on the values)."""
    rows = out.shape[0]
    cols = out.shape[-1]
    flat = out.view(rows, cols)
    R = min(rows, 64)
    block = torch.randn(R, cols, generator=gen, dtype=torch.float32).mul_(scale)
    if out.device.type != "cpu":
        block = block.to(out.device)
    nrep = (rows + R - 1) // R
    ab = torch.rand(nrep, 2, generator=gen, dtype=torch.float32)
    for k in range(nrep):
        r0, r1 = k * R, min(rows, (k + 1) * R)
        a, b = 0.75 + 0.5 * float(ab[k, 0]), (float(ab[k, 1]) - 0.5) * scale
        flat[r0:r1].copy_(block[: r1 - r0]).mul_(a).add_(b)


def make_inputs(shape: Shape, device: str, pristine: bool = False, dtype: str | None = None) -> dict:
    """The inputs of one shape, identical for every implementation (fixed seed).

    pristine: also keep a copy of the logits, to restore them before each run of an
    implementation that overwrites them (inplace_backward)."""
    dt = getattr(torch, dtype or shape.dtype)
    gen = torch.Generator().manual_seed(SEED)
    S, T, V, H = shape.batch, shape.seqlen, shape.vocab, shape.hidden
    P = S // 2
    inp: dict[str, Any] = {"labels": torch.randint(0, V, (S, T), generator=gen).to(device)}
    if shape.op == "linear":
        h = torch.empty(S * T, H, dtype=dt, device=device)
        _fill_(h, gen, 1.0)
        w = torch.empty(V, H, dtype=dt, device=device)
        _fill_(w, gen, 1.0 / math.sqrt(H))
        inp["hidden"] = h.view(S, T, H).requires_grad_(True)
        inp["weight"] = w.requires_grad_(True)
        # Equal within each pair: DPO only uses their difference, so reference-free
        # implementations compute the same loss (see impls._build_liger).
        ref = (-(T - 1) * math.log(V) + 5 * torch.randn(P, generator=gen)).to(device)
        inp["ref_c"], inp["ref_r"] = ref, ref.clone()
    else:
        x = torch.empty(S * T, V, dtype=dt, device=device)
        _fill_(x, gen, 1.0)
        x = x.view(S, T, V)
        if pristine:
            inp["pristine"] = x.clone()
        inp["logits"] = x.requires_grad_(True)
        inp["gout"] = torch.randn(S, generator=gen).to(device)
        base = -(T - 1) * (math.log(V) + 0.5)
        inp["ref_c"] = (base + 10 * torch.randn(P, generator=gen)).to(device)
        inp["ref_r"] = (base + 10 * torch.randn(P, generator=gen)).to(device)
    return inp


def tiny_shape(shape: Shape) -> Shape:
    """The warm-up shape of a case: loads libraries and thread pools at almost no cost."""
    return dataclasses.replace(shape, batch=2, seqlen=8, vocab=64, hidden=16 if shape.op == "linear" else 0)
