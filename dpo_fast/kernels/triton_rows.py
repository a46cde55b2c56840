"""Triton kernels for the from-logits op (same contract as csrc/README.md).

token_stats: one program per row, one sweep over the vocabulary with a blocked online
log-sum-exp (one exp per element); unscored rows exit at once.
token_grad: a 2D grid (row, vocab block) so a long row spreads over the SMs; reads each logit
once and writes its gradient once, in the logits' dtype, possibly into the logits' storage.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting
from ..targets import acc_dtype

_STATS_BLOCK = 4096
_GRAD_BLOCK = 4096


@triton.jit
def _token_stats_kernel(
    logits_ptr, targets_ptr, lse_ptr, picked_ptr, lsum_ptr,
    T, V, stride_s, stride_t,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    base = logits_ptr + (row // T) * stride_s + (row % T) * stride_t
    m = tl.full((), float("-inf"), ACC)
    acc = tl.zeros((), ACC)
    lsum = tl.zeros((), ACC)
    picked = tl.zeros((), ACC)
    if target >= 0:
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=float("-inf")).to(ACC)
            m_new = tl.maximum(m, tl.max(x, 0))
            # A block of only -inf so far: shift by 0 so exp(-inf - shift) = 0, not NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
            acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
            lsum += tl.sum(tl.where(mask, x, 0.0), 0)
            m = m_new
        in_range = target < V
        picked = tl.load(base + tl.where(in_range, target, 0)).to(ACC)
        picked = tl.where(in_range, picked, float("nan")).to(ACC)
        acc = tl.log(acc) + tl.where(m == float("-inf"), 0.0, m).to(ACC)
    tl.store(lse_ptr + row, acc)
    tl.store(picked_ptr + row, picked)
    tl.store(lsum_ptr + row, lsum)


@triton.jit
def _round_bf16(x):
    """float32 -> bfloat16 rounding to nearest even, done in integer arithmetic. Used only under
    TRITON_INTERPRET, whose bf16 stores truncate (a GPU store rounds to nearest even itself)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _token_grad_kernel(
    logits_ptr, targets_ptr, lse_ptr, g_ptr, grad_ptr,
    T, V, stride_s, stride_t, gstride_s, gstride_t,
    ACC: tl.constexpr, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    s, t = row // T, row % T
    target = tl.load(targets_ptr + row)
    out = grad_ptr + s * gstride_s + t * gstride_t + offs
    if target >= 0:
        x = tl.load(logits_ptr + s * stride_s + t * stride_t + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + row).to(ACC)
        neg_gp = -g * tl.exp(x - tl.load(lse_ptr + row).to(ACC))
        grad = tl.where(offs == target, neg_gp + g, neg_gp)
        if ROUND_BF16:
            grad = _round_bf16(grad.to(tl.float32))
        tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out, tl.zeros((BLOCK,), grad_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype):
    acc = acc_dtype(dtype)
    return (tl.float64 if acc == torch.float64 else tl.float32), acc


KERNELS = {"token_stats": _token_stats_kernel, "token_grad": _token_grad_kernel}
NUM_WARPS = 8


def block_for(kernel: str, V: int) -> int:
    """The BLOCK constexpr `kernel` runs with for a vocabulary of V."""
    cap = _STATS_BLOCK if kernel == "token_stats" else _GRAD_BLOCK
    return min(cap, triton.next_power_of_2(max(V, 1)))


def token_stats(logits: torch.Tensor, targets: torch.Tensor):
    S, T, V = logits.shape
    acc_tl, acc_torch = _acc(logits.dtype)
    lse, picked, lsum = (torch.empty(S, T, dtype=acc_torch, device=logits.device) for _ in range(3))
    if S * T:
        _token_stats_kernel[(S * T,)](
            logits, targets, lse, picked, lsum, T, V, logits.stride(0), logits.stride(1),
            ACC=acc_tl, BLOCK=block_for("token_stats", V), num_warps=NUM_WARPS,
        )
    return lse, picked, lsum


def token_grad(logits, targets, lse, g_token, out: torch.Tensor | None = None) -> torch.Tensor:
    S, T, V = logits.shape
    if out is None:
        out = torch.empty((S, T, V), dtype=logits.dtype, device=logits.device)
    acc_tl, acc_torch = _acc(logits.dtype)
    block = block_for("token_grad", V)
    if S * T:
        _token_grad_kernel[(S * T, triton.cdiv(V, block))](
            logits, targets, lse, g_token.to(acc_torch).contiguous(), out, T, V,
            logits.stride(0), logits.stride(1), out.stride(0), out.stride(1),
            ACC=acc_tl, BLOCK=block, ROUND_BF16=out.dtype == torch.bfloat16 and triton_interpreting(),
            num_warps=NUM_WARPS,
        )
    return out
