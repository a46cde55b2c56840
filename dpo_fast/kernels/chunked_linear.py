"""The fused lm_head + log-probs for every backend but Triton: matmul tiles through the row kernels.

The vocabulary is walked in chunks of C columns. Each chunk's logits z = h @ W_c^T (+ bias,
soft-cap) are built by one GEMM into a reused buffer, in the inputs' dtype (bf16 GEMMs stay bf16,
as PyTorch's own lm_head does; the row kernels accumulate in float32), and handed to the
backend's row kernels (`kernels.token_stats` / `kernels.token_grad`):

  stats  per chunk, the chunk's log-sum-exp, target logit and logit sum; chunks merge with
         logaddexp. 1 GEMM pass (2NHV FLOPs).
  grads  per chunk, recompute z, Q = softmax(z) - onehot written over z by token_grad (g = -1),
         then dh += Q @ W_c (float32 products: see _accumulate_product), dW_c = Q^T @ (-g h),
         db_c = -Q^T g; the per-row scale g is applied to h and dh outside the vocabulary loop.
         3 GEMM passes (6NHV).

Targets may lie outside [0, V): such a row is scored against a vocabulary this weight does not
hold (another vocab-parallel shard) and contributes its softmax terms only: target logit 0, no
onehot. Extra memory: one (rows x C) buffer (two with a soft-cap) and the gradients themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..targets import acc_dtype
from . import token_grad, token_stats

# Elements of one chunk of logits: 2^23 = 32 MiB of float32, e.g. 2048 tokens x 4096 vocab
# entries. Tests lower it to force several chunks on tiny vocabularies.
CHUNK_ELEMENTS = 1 << 23


def chunk_columns(rows: int, vocab: int) -> int:
    c = max(1, CHUNK_ELEMENTS // max(rows, 1))
    if c >= 256:
        c -= c % 256
    return min(c, vocab)


def logits_block(h: Tensor, weight: Tensor, bias: Tensor | None, v0: int, v1: int, softcap: float | None,
                 buf: Tensor) -> Tensor:
    """Logits of the rows `h` for vocabulary entries [v0, v1), in h's dtype, written into the
    front of the flat buffer `buf`: one GEMM, then bias and soft-cap in place."""
    z = buf[: h.shape[0] * (v1 - v0)].view(h.shape[0], v1 - v0)
    torch.mm(h, weight[v0:v1].t(), out=z)
    if bias is not None:
        z.add_(bias[v0:v1])
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _local_targets(tgt: Tensor, v0: int, v1: int) -> tuple[Tensor, Tensor]:
    """(targets inside [v0, v1) as chunk columns, clamped elsewhere so the row kernels score every
    row; whether each row's target is really inside)."""
    inside = (tgt >= v0) & (tgt < v1)
    return (tgt - v0).clamp(0, v1 - v0 - 1).unsqueeze(0), inside


def stats(h: Tensor, weight: Tensor, bias: Tensor | None, tgt: Tensor, softcap: float | None, backend: str):
    """Per row of h (M, H): (log-sum-exp, target logit, sum of logits) over the weight's
    vocabulary, in the accumulation dtype. tgt (M,) int64."""
    M = h.shape[0]
    V = weight.shape[0]
    acc = acc_dtype(h.dtype)
    C = chunk_columns(M, V)
    buf = torch.empty(M * C, dtype=h.dtype, device=h.device)
    lse = torch.full((M,), -torch.inf, dtype=acc, device=h.device)
    picked = torch.zeros(M, dtype=acc, device=h.device)
    lsum = torch.zeros(M, dtype=acc, device=h.device)
    for v0 in range(0, V, C):
        v1 = min(v0 + C, V)
        z = logits_block(h, weight, bias, v0, v1, softcap, buf)
        local, inside = _local_targets(tgt, v0, v1)
        lse_c, picked_c, lsum_c = token_stats(z.unsqueeze(0), local, backend)
        lse = torch.logaddexp(lse, lse_c[0])
        picked += torch.where(inside, picked_c[0], 0.0)
        lsum += lsum_c[0]
    return lse, picked, lsum


def _accumulate_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b without rounding the product to a's low precision first: the sum over vocabulary
    chunks of dh can cancel (as PyTorch's one GEMM over the whole vocabulary sums in float32), so
    each chunk's product must stay in float32. CUDA has a float32-output bf16 GEMM; the CPU (torch
    2.13) has none, so there this one of the four GEMM passes runs in float32."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        acc += torch.mm(a, b, out_dtype=acc.dtype)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def grads(h: Tensor, weight: Tensor, bias: Tensor | None, tgt: Tensor, lse: Tensor, g: Tensor,
          softcap: float | None, need_dh: bool, need_dw: bool, need_db: bool, backend: str):
    """Gradients of sum_rows g * logp(target) for the rows h (M, H): (dh (M, H) accumulation
    dtype, dW (V, H) weight dtype, db (V,) accumulation dtype); None where not needed. lse (M,)
    from `stats` (the whole vocabulary's, under vocab parallelism), g (M,)."""
    M, H = h.shape
    V = weight.shape[0]
    acc = acc_dtype(h.dtype)
    dev = h.device
    C = chunk_columns(M, V)
    buf = torch.empty(M * C, dtype=h.dtype, device=dev)
    dbuf = torch.empty(M * C, dtype=h.dtype, device=dev) if softcap is not None else None
    A = torch.zeros(M, H, dtype=acc, device=dev) if need_dh else None
    dW = torch.empty(V, H, dtype=weight.dtype, device=dev) if need_dw else None
    db = torch.empty(V, dtype=acc, device=dev) if need_db else None
    neg_gh = (h.to(acc) * (-g).unsqueeze(1)).to(h.dtype) if need_dw else None
    g_low = g.to(h.dtype) if need_db else None
    minus_one = torch.full((1, M), -1.0, dtype=acc, device=dev)
    lse_row = lse.to(acc).unsqueeze(0)
    rows = torch.arange(M, device=dev)
    for v0 in range(0, V, C):
        v1 = min(v0 + C, V)
        z = logits_block(h, weight, bias, v0, v1, softcap, buf)
        local, inside = _local_targets(tgt, v0, v1)
        if softcap is not None:  # d capped / d uncapped = 1 - (z / c)^2, from the capped logits
            d = dbuf[: z.numel()].view_as(z)
            torch.mul(z, z, out=d).mul_(-1.0 / (softcap * softcap)).add_(1.0)
        at = (rows, local[0])
        z_at = z[at].to(acc)  # read before token_grad overwrites z
        Q = token_grad(z.unsqueeze(0), local, lse_row, minus_one, z.unsqueeze(0), backend)[0]
        # Rows whose target is not in this chunk got a onehot at their clamped column: put the
        # plain softmax back there (no host sync, exact).
        Q[at] = torch.where(inside, Q[at].to(acc), torch.exp(z_at - lse_row[0])).to(Q.dtype)
        if softcap is not None:
            Q.mul_(d)
        if need_dh:
            _accumulate_product(A, Q, weight[v0:v1])
        if need_dw:
            torch.mm(Q.t(), neg_gh, out=dW[v0:v1])
        if need_db:
            db[v0:v1] = (Q.t() @ g_low).to(acc).neg_()
    dh = A.mul_((-g).unsqueeze(1)) if need_dh else None
    return dh, dW, db
