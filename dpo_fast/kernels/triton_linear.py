"""Triton kernels of the fused lm_head + log-probs (see dpo_fast.ops.linear for the op layer).

Every kernel works on compacted scored rows: `rows` (M,) indexes the rows of hidden (N, H) that
score a token, so prompt and padding rows cost nothing and hidden is never copied. A logits
tile (BLOCK_N tokens x BLOCK_V vocab entries) is built with tl.dot over H in BLOCK_H steps,
plus bias and the soft-cap, and lives only in registers:

  _fwd_kernel     grid (token tiles, vocab splits): online log-sum-exp across the split's vocab
                  tiles, the target logit (picked out of the tile that holds it, so it is
                  rounded exactly like the log-sum-exp terms) and the sum of the logits. Each
                  split writes (max, scaled sum, logit sum, target logit) per token; the host
                  combines the splits (O(tokens x splits) floats).
  _bwd_dh_kernel  grid (token tiles, vocab splits): per vocab tile, recompute the logits,
                  G = g * (onehot - softmax) (times 1 - (z/c)^2 under a cap), dH += G @ W_tile.
                  Each program owns its rows of a per-split float32 accumulator: no atomics.
  _bwd_dw_kernel  grid (vocab tiles of one vocab slice): per token tile, recompute the logits
                  and G, dW_tile += G^T @ H_rows and db += sum(G). Each program owns its dW rows:
                  no atomics, deterministic. float32/float64 weights accumulate straight into
                  the gradient; bf16/fp16 weights go through a float32 scratch of one vocab
                  slice at a time (at most _DW_SLICE_BYTES), cast into the gradient after it.

FLOPs: 2NHV (forward) + 4NHV (dH: recompute + product) + 4NHV (dW: recompute + product) =
10NHV for a deterministic backward without atomics. No tokens x vocab buffer exists anywhere;
the kernels keep the per-token float32 log-sum-exp from the forward.

Precision: bf16/fp16 tiles go to tl.dot as they are (tensor cores) with float32 accumulation;
G is rounded to the input dtype before its products (as PyTorch's bf16 autograd does). float32
uses exact IEEE products unless torch.backends.cuda.matmul.allow_tf32 is set. Under the
interpreter (TRITON_INTERPRET=1, CPU tensors) every tile is upcast first, because the
interpreter computes bf16 arithmetic wrongly.

Tile configs are fixed per (GPU generation, dtype) in _CONFIGS; DPO_FAST_AUTOTUNE=1 switches
to triton.autotune over AUTOTUNE_CONFIGS (keyed on V, H and dtypes).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting

# ---------------------------------------------------------------- kernels


@triton.jit
def _tanh(x):
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _logits_tile(h_ptr, rows, mask_n, stride_hn, stride_hh, w_ptr, offs_v, mask_v, stride_wv, stride_wh,
                 b_ptr, HD, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                 ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """(BLOCK_N, BLOCK_V) logits of rows x vocab entries offs_v, capped, in ACC. Entries outside
    mask_n x mask_v hold finite garbage (the padded rows read row 0 of hidden, the padded vocab
    entries row 0 of the weight): callers discard them with tl.where. Only the H edge is masked
    in the loop, which keeps 2D masks out of the registers of the hot loop."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    offs_k = tl.arange(0, BLOCK_H)
    h_base = h_ptr + rows[:, None] * stride_hn  # padded rows were loaded as row 0
    w_base = w_ptr + tl.where(mask_v, offs_v, 0).to(tl.int64)[None, :] * stride_wv
    for h0 in range(0, HD, BLOCK_H):
        k = h0 + offs_k
        mask_k = k < HD
        a = tl.load(h_base + k[None, :] * stride_hh, mask=mask_k[None, :], other=0.0)
        # W^T tile (BLOCK_H, BLOCK_V) read straight from the (V, H) weight.
        w = tl.load(w_base + k[:, None] * stride_wh, mask=mask_k[:, None], other=0.0)
        if UPCAST:
            a = a.to(ACC)
            w = w.to(ACC)
        acc = tl.dot(a, w, acc, input_precision=PREC, out_dtype=ACC)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(ACC)
        acc += b[None, :]
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _grad_tile(z, lse, g, tgt, offs_v, mask_n, mask_v, softcap, HAS_SOFTCAP: tl.constexpr):
    """g * (onehot(tgt) - softmax(z)), chained through the soft-cap; 0 outside the masks."""
    p = tl.exp(z - lse[:, None])
    onehot = offs_v[None, :] == tgt[:, None]
    G = g[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
    if HAS_SOFTCAP:
        r = z / softcap
        G = G * (1.0 - r * r)
    # where, not a product: padded rows may hold exp overflow (inf * 0 would give NaN).
    return tl.where(mask_n[:, None] & mask_v[None, :], G, 0.0)


@triton.jit
def _fwd_kernel(h_ptr, rows_ptr, tgt_ptr, w_ptr, b_ptr, m_ptr, s_ptr, lsum_ptr, tz_ptr,
                M, V, HD, v_per_split, stride_hn, stride_hh, stride_wv, stride_wh, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < M
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), ACC)
    s = tl.zeros((BLOCK_N,), ACC)
    lsum = tl.zeros((BLOCK_N,), ACC)
    tz = tl.zeros((BLOCK_N,), ACC)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z = _logits_tile(h_ptr, rows, mask_n, stride_hn, stride_hh, w_ptr, offs_v, mask_v, stride_wv, stride_wh,
                         b_ptr, HD, softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, ACC, PREC, BLOCK_N, BLOCK_V, BLOCK_H)
        lsum += tl.sum(tl.where(mask_v[None, :], z, 0.0), 1)
        hit = (offs_v[None, :] == tgt[:, None]) & mask_v[None, :]  # z is garbage outside mask_v
        tz += tl.sum(tl.where(hit, z, 0.0), 1)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
    out = pid_s * M + offs_n
    tl.store(m_ptr + out, m, mask=mask_n)
    tl.store(s_ptr + out, s, mask=mask_n)
    tl.store(lsum_ptr + out, lsum, mask=mask_n)
    tl.store(tz_ptr + out, tz, mask=mask_n)


@triton.jit
def _bwd_dh_kernel(h_ptr, rows_ptr, tgt_ptr, g_ptr, lse_ptr, w_ptr, b_ptr, dh_ptr,
                   M, V, HD, v_per_split, stride_hn, stride_hh, stride_wv, stride_wh, softcap,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < M
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    offs_k = tl.arange(0, BLOCK_H)
    # This split's (M, HD) slice of the float accumulator, which only this program's rows touch.
    dh_rows = dh_ptr + pid_s.to(tl.int64) * M * HD + offs_n.to(tl.int64)[:, None] * HD
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z = _logits_tile(h_ptr, rows, mask_n, stride_hn, stride_hh, w_ptr, offs_v, mask_v, stride_wv, stride_wh,
                         b_ptr, HD, softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, ACC, PREC, BLOCK_N, BLOCK_V, BLOCK_H)
        G = _grad_tile(z, lse, g, tgt, offs_v, mask_n, mask_v, softcap, HAS_SOFTCAP)
        if not UPCAST:
            G = G.to(w_ptr.dtype.element_ty)
        w_base = w_ptr + offs_v.to(tl.int64)[:, None] * stride_wv
        for h0 in range(0, HD, BLOCK_H):
            k = h0 + offs_k
            mask_k = k < HD
            w = tl.load(w_base + k[None, :] * stride_wh, mask=mask_v[:, None] & mask_k[None, :], other=0.0)
            if UPCAST:
                w = w.to(ACC)
            mask_out = mask_n[:, None] & mask_k[None, :]
            ptrs = dh_rows + k[None, :]
            prev = tl.load(ptrs, mask=mask_out, other=0.0)
            tl.store(ptrs, tl.dot(G, w, prev, input_precision=PREC, out_dtype=ACC), mask=mask_out)


@triton.jit
def _bwd_dw_kernel(h_ptr, rows_ptr, tgt_ptr, g_ptr, lse_ptr, w_ptr, b_ptr, dw_ptr, db_ptr,
                   M, V_END, HD, v_lo, stride_hn, stride_hh, stride_wv, stride_wh, stride_dwv, stride_dwh, softcap,
                   NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    offs_v = v_lo + pid * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V_END
    offs_k = tl.arange(0, BLOCK_H)
    # dw_ptr points at the gradient rows of vocab entry v_lo onwards.
    dw_rows = dw_ptr + (offs_v - v_lo).to(tl.int64)[:, None] * stride_dwv
    db = tl.zeros((BLOCK_V,), ACC)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < M
        rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
        g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
        z = _logits_tile(h_ptr, rows, mask_n, stride_hn, stride_hh, w_ptr, offs_v, mask_v, stride_wv, stride_wh,
                         b_ptr, HD, softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, ACC, PREC, BLOCK_N, BLOCK_V, BLOCK_H)
        G = _grad_tile(z, lse, g, tgt, offs_v, mask_n, mask_v, softcap, HAS_SOFTCAP)
        if NEED_DB:
            db += tl.sum(G, 0)
        if NEED_DW:
            Gt = tl.trans(G)
            if not UPCAST:
                Gt = Gt.to(h_ptr.dtype.element_ty)
            h_base = h_ptr + rows[:, None] * stride_hn
            for h0 in range(0, HD, BLOCK_H):
                k = h0 + offs_k
                mask_k = k < HD
                a = tl.load(h_base + k[None, :] * stride_hh, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                if UPCAST:
                    a = a.to(ACC)
                mask_out = mask_v[:, None] & mask_k[None, :]
                ptrs = dw_rows + k[None, :] * stride_dwh
                prev = tl.load(ptrs, mask=mask_out, other=0.0).to(ACC)
                acc = tl.dot(Gt, a, prev, input_precision=PREC, out_dtype=ACC)
                tl.store(ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_out)
    if NEED_DB:
        tl.store(db_ptr + offs_v, db, mask=mask_v)


KERNELS = {"fwd": _fwd_kernel, "dh": _bwd_dh_kernel, "dw": _bwd_dw_kernel}

# ---------------------------------------------------------------- configs


class TileConfig(NamedTuple):
    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


# (kernel, GPU generation, operand bytes) -> tiles. Each compiles spill-free, within the shared
# memory of its GPUs (H100 228 KB, A100 164 KB, sm_86/89 100 KB per SM) and with >= 8 warps per
# SM: scripts/check_gpu_compile.py compiles every variant for sm_80/86/90/100 and fails otherwise.
# float32 with IEEE products runs tl.dot on FMAs, whose operands hold the whole K extent per
# thread: dW (K = BLOCK_N) keeps BLOCK_N at 16-32 there. Not yet timed on a GPU.
_CONFIGS = {
    ("fwd", "sm90", 2): TileConfig(128, 128, 64, 8, 4),
    ("dh", "sm90", 2): TileConfig(128, 128, 64, 8, 3),
    ("dw", "sm90", 2): TileConfig(128, 64, 64, 8, 3),
    ("fwd", "sm90", 4): TileConfig(128, 64, 32, 8, 3),
    ("dh", "sm90", 4): TileConfig(64, 128, 32, 8, 3),
    ("dw", "sm90", 4): TileConfig(32, 128, 32, 8, 2),
    ("fwd", "sm80", 2): TileConfig(128, 128, 64, 8, 3),
    ("dh", "sm80", 2): TileConfig(64, 128, 64, 8, 3),
    ("dw", "sm80", 2): TileConfig(128, 64, 64, 8, 3),
    ("fwd", "sm80", 4): TileConfig(128, 64, 32, 8, 3),
    ("dh", "sm80", 4): TileConfig(64, 64, 32, 8, 3),
    ("dw", "sm80", 4): TileConfig(16, 128, 32, 8, 2),
    ("fwd", "small", 2): TileConfig(64, 64, 64, 4, 2),
    ("dh", "small", 2): TileConfig(64, 64, 32, 4, 2),
    ("dw", "small", 2): TileConfig(64, 64, 32, 4, 2),
    ("fwd", "small", 4): TileConfig(64, 64, 32, 4, 2),
    ("dh", "small", 4): TileConfig(32, 64, 32, 4, 2),
    ("dw", "small", 4): TileConfig(32, 64, 32, 8, 2),
}
_FP64_CONFIG = TileConfig(32, 32, 16, 8, 2)
_INTERPRET_CONFIG = TileConfig(16, 64, 32, 1, 1)

AUTOTUNE_CONFIGS = [
    TileConfig(128, 128, 64, 8, 3), TileConfig(128, 128, 64, 8, 4), TileConfig(128, 128, 32, 8, 4),
    TileConfig(64, 128, 64, 4, 3), TileConfig(128, 64, 64, 4, 3), TileConfig(64, 64, 64, 4, 4),
    TileConfig(64, 128, 32, 4, 4), TileConfig(128, 256, 32, 8, 3),
]

# Autotune configs that fail on a GPU class for an operand size (python scripts/check_gpu_compile.py
# names them): {(gpu_class, operand bytes): configs}.
# From the audit of 2026-12-05: each of these needs more shared memory per block than the class has
# (sm_80: 163 KB, the "small" class: 99 KB) for at least one of fwd / dh / dw.
_AUTOTUNE_PRUNED: dict[tuple[str, int], frozenset] = {
    ("sm80", 4): frozenset({TileConfig(128, 128, 64, 8, 4), TileConfig(128, 256, 32, 8, 3)}),
    ("small", 2): frozenset({TileConfig(128, 128, 64, 8, 4), TileConfig(128, 256, 32, 8, 3)}),
    ("small", 4): frozenset({TileConfig(128, 128, 32, 8, 4), TileConfig(128, 128, 64, 8, 3),
                             TileConfig(128, 128, 64, 8, 4), TileConfig(128, 256, 32, 8, 3),
                             TileConfig(128, 64, 64, 4, 3), TileConfig(64, 128, 64, 4, 3)}),
}

# Upper bound on the float32 scratch the backward may allocate for dH splits or a dW slice.
_DH_SPLIT_BYTES = 256 << 20
_DW_SLICE_BYTES = 512 << 20


def gpu_class(capability: tuple[int, int]) -> str:
    """The _CONFIGS generation of a CUDA compute capability (major, minor)."""
    major, minor = capability
    if major >= 9:
        return "sm90"
    if (major, minor) == (8, 0):
        return "sm80"
    return "small"


def config_for(kernel: str, dtype: torch.dtype, capability: tuple[int, int]) -> TileConfig:
    """The fixed tile config of `kernel` for `dtype` on a GPU of this compute capability."""
    if dtype == torch.float64:
        return _FP64_CONFIG
    return _CONFIGS[(kernel, gpu_class(capability), _operand_bytes(dtype))]


def tile_config(kernel: str, dtype: torch.dtype, device: torch.device) -> TileConfig:
    if device.type != "cuda":
        return _INTERPRET_CONFIG
    return config_for(kernel, dtype, torch.cuda.get_device_capability(device))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: still split the vocabulary so the tests cover the combine step


def _autotune(dtype: torch.dtype) -> bool:
    """DPO_FAST_AUTOTUNE=1, on a GPU, for 16- and 32-bit inputs (float64 keeps its one small
    config: its tiles are register- and shared-memory-bound at any size the candidates have)."""
    return (os.environ.get("DPO_FAST_AUTOTUNE", "0") == "1" and not triton_interpreting()
            and dtype != torch.float64)


def _operand_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def autotune_configs(dtype: torch.dtype, capability: tuple[int, int], pruned: bool = True) -> list[TileConfig]:
    """The DPO_FAST_AUTOTUNE candidates for `dtype` on this compute capability (pruned: less those
    that do not compile or fit there)."""
    drop = _AUTOTUNE_PRUNED.get((gpu_class(capability), _operand_bytes(dtype)), frozenset()) if pruned else ()
    return [c for c in AUTOTUNE_CONFIGS if c not in drop]


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str, dtype: torch.dtype, capability: tuple[int, int]):
    fn = KERNELS[kernel]
    configs = [triton.Config({"BLOCK_N": c.block_n, "BLOCK_V": c.block_v, "BLOCK_H": c.block_h},
                             num_warps=c.num_warps, num_stages=c.num_stages)
               for c in autotune_configs(dtype, capability)]
    reset = {"fwd": [], "dh": ["dh_ptr"], "dw": ["dw_ptr"]}[kernel]
    # The dW kernel runs once per vocab slice (V_END differs): key it on H alone, tune once.
    key = {"fwd": ["V", "HD"], "dh": ["V", "HD"], "dw": ["HD"]}[kernel]
    return triton.autotune(configs=configs, key=key, reset_to_zero=reset or None)(fn)


def _launch(kernel: str, cfg: TileConfig, grid, *args, **consts):
    """Run `kernel` with the fixed config, or through the autotuner when DPO_FAST_AUTOTUNE=1.
    args[0] is the hidden states (their dtype and device pick the autotune candidates)."""
    if _autotune(args[0].dtype):
        _tuned(kernel, args[0].dtype, torch.cuda.get_device_capability(args[0].device))[lambda meta: grid(meta["BLOCK_N"], meta["BLOCK_V"])](*args, **consts)
        return
    fn = KERNELS[kernel]
    fn[grid(cfg.block_n, cfg.block_v)](*args, **consts, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
                                       BLOCK_H=cfg.block_h, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def kernel_constants(dtype: torch.dtype, has_bias: bool, has_softcap: bool, on_gpu: bool, tf32: bool) -> dict:
    """The constexpr arguments every kernel here gets for inputs of `dtype`."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    return dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap,
                UPCAST=not on_gpu or dtype in (torch.float32, torch.float64), ACC=acc,
                PREC="tf32" if dtype == torch.float32 and on_gpu and tf32 else "ieee")


def _common(hidden: torch.Tensor, bias, softcap):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    consts = kernel_constants(hidden.dtype, bias is not None, softcap is not None, hidden.device.type == "cuda",
                              torch.backends.cuda.matmul.allow_tf32)
    return acc, consts


def _vocab_splits(n_tiles: int, V: int, block_v: int, device: torch.device, max_splits: int) -> tuple[int, int]:
    """(splits, vocab entries per split): enough programs for two waves, each split >= 4 tiles."""
    want = max(1, -(-2 * _num_sms(device) // n_tiles))
    splits = max(1, min(want, max_splits, V // (4 * block_v) if device.type == "cuda" else V // block_v))
    per = -(-V // splits)
    per = -(-per // 256) * 256 if device.type == "cuda" else per
    return -(-V // per), per


# ---------------------------------------------------------------- host functions


def forward(hidden, weight, bias, rows, tgt, softcap):
    """Per compacted row: (log-sum-exp, target logit, sum of logits), float32 (float64).

    hidden (N, H) any strides, weight (V, H), bias (V,) or None, rows (M,) int64 indices into
    hidden's rows, tgt (M,) their targets in [0, V)."""
    M = rows.numel()
    V, HD = weight.shape
    acc, consts = _common(hidden, bias, softcap)
    cfg = tile_config("fwd", hidden.dtype, hidden.device)
    n_tiles = -(-M // cfg.block_n)
    splits, per = _vocab_splits(n_tiles, V, cfg.block_v, hidden.device, max_splits=64)
    part = torch.empty(4, splits, M, dtype=acc, device=hidden.device)
    b = bias if bias is not None else weight
    _launch("fwd", cfg, lambda bn, bv: (triton.cdiv(M, bn), splits),
            hidden, rows, tgt, weight, b, part[0], part[1], part[2], part[3],
            M, V, HD, per, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            float(softcap or 1.0), **consts)
    m, s, lsum, tz = part
    m_all = m.max(0).values
    lse = m_all + torch.log((s * torch.exp(m - m_all)).sum(0))
    return lse, tz.sum(0), lsum.sum(0)


def backward(hidden, weight, bias, rows, tgt, lse, g, softcap, need_dh, need_dw, need_db):
    """(dh (M, H) float32/64 for the compacted rows, dW (V, H) in weight's dtype, db (V,) float32/64);
    None for what is not needed. lse and g are (M,) per compacted row."""
    M = rows.numel()
    V, HD = weight.shape
    dev = hidden.device
    acc, consts = _common(hidden, bias, softcap)
    b = bias if bias is not None else weight
    cap = float(softcap or 1.0)
    lse = lse.to(acc).contiguous()
    g = g.to(acc).contiguous()
    common = (M,)
    dh = dW = db = None

    if need_dh:
        cfg = tile_config("dh", hidden.dtype, dev)
        n_tiles = -(-M // cfg.block_n)
        max_splits = max(1, _DH_SPLIT_BYTES // max(1, M * HD * torch.finfo(acc).bits // 8))
        splits, per = _vocab_splits(n_tiles, V, cfg.block_v, dev, max_splits)
        part = torch.zeros(splits, M, HD, dtype=acc, device=dev)
        _launch("dh", cfg, lambda bn, bv: (triton.cdiv(M, bn), splits),
                hidden, rows, tgt, g, lse, weight, b, part, *common, V, HD, per,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), cap, **consts)
        dh = part[0] if splits == 1 else part.sum(0)

    if need_dw or need_db:
        cfg = tile_config("dw", hidden.dtype, dev)
        if need_dw:
            dW = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        db = torch.empty(V, dtype=acc, device=dev) if need_db else None
        direct = need_dw and weight.dtype == acc
        if direct or not need_dw:
            slice_rows = V
        else:
            slice_rows = max(cfg.block_v, _DW_SLICE_BYTES // (HD * torch.finfo(acc).bits // 8))
            slice_rows = min(V, slice_rows - slice_rows % cfg.block_v)
        scratch = None
        if need_dw and not direct:
            scratch = torch.empty(slice_rows, HD, dtype=acc, device=dev)
        for v_lo in range(0, V, slice_rows):
            v_hi = min(V, v_lo + slice_rows)
            if not need_dw:
                # Unused (NEED_DW is off), but never the weight: the autotuner zeroes dw_ptr.
                out = torch.zeros(1, 1, dtype=acc, device=dev)
            elif direct:
                out = dW
            else:
                out = scratch[: v_hi - v_lo]
                out.zero_()
            _launch("dw", cfg, lambda bn, bv, n=v_hi - v_lo: (triton.cdiv(n, bv),),
                    hidden, rows, tgt, g, lse, weight, b, out, db if need_db else lse,
                    M, v_hi, HD, v_lo, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                    out.stride(0), out.stride(1), cap, NEED_DW=need_dw, NEED_DB=need_db, **consts)
            if need_dw and not direct:
                dW[v_lo:v_hi] = out
    return dh, dW, db
