"""Double backward (create_graph=True) is not supported by any dpo_fast op: their backward passes
are closed-form kernels (or a gradient saved in the forward) with no derivative of their own.
Autograd runs a backward with grad mode on exactly when create_graph=True, so each backward calls
`refuse_double_backward` first and the user gets one line instead of PyTorch's "no autograd formula
registered" or, worse, a second-order term that is silently zero. Traced backwards (torch.compile,
make_fx) are left alone: grad mode there says nothing about create_graph."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode


def refuse_double_backward(op: str) -> None:
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or get_proxy_mode() is not None:
        return
    raise RuntimeError(f"dpo_fast: double backward (create_graph=True) is not supported ({op}: its backward is a "
                       "closed-form kernel without a derivative of its own); compute gradients without "
                       "create_graph, or use the PyTorch reference for second-order terms")
