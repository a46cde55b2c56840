"""The kernels behind the ops, one contract per family (see csrc/README.md).

Row kernels (every backend): `token_stats(logits, targets)` and `token_grad(..., out)`, on
logits rows; the Triton ones (triton_rows), the compiled extension's (torch.ops.dpo_fast_C, cpu
and cuda) and plain PyTorch (reference). The fused lm_head family is built on them: the Triton
backend has its own fused GEMM kernels (triton_linear); every other backend runs matmul tiles of
logits through its row kernels (chunked_linear).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference


def token_stats(logits: Tensor, targets: Tensor, backend: str):
    """Per row of (S, T, V) logits: (log-sum-exp, target logit, sum of logits); 0 where targets < 0."""
    if backend == "triton":
        from . import triton_rows
        return triton_rows.token_stats(logits, targets)
    if backend in ("cpu", "cuda"):  # the dpo_fast_C ops, registered when backends loaded _C
        return torch.ops.dpo_fast_C.token_stats(logits, targets)
    return reference.token_stats(logits, targets)


def token_grad(logits: Tensor, targets: Tensor, lse: Tensor, g_token: Tensor, out: Tensor, backend: str) -> Tensor:
    """out = g_token * (onehot(target) - softmax(logits)) per row, 0 where targets < 0; `out` may be `logits`."""
    g_token = g_token.to(lse.dtype).contiguous()
    if backend == "triton":
        from . import triton_rows
        triton_rows.token_grad(logits, targets, lse, g_token, out)
    elif backend in ("cpu", "cuda"):
        torch.ops.dpo_fast_C.token_grad(logits, targets, lse, g_token, out)
    else:
        reference.token_grad(logits, targets, lse, g_token, out)
    return out
