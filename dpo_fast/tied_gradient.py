"""A tied input embedding / lm_head weight's gradient in one dense buffer instead of three.

With tied weights (Gemma, SmolLM, ...) one (vocab, hidden) parameter gets a gradient from the lm_head
and one from the embedding lookup. Left to autograd, both are dense: the head's (vocab x hidden)
gradient waits in the engine's input buffer through the whole decoder backward, then the embedding's
backward writes a second dense (vocab x hidden) gradient of which only the looked-up rows are not
zero, and the two are summed. For Gemma 3 270M (vocabulary 262,144) each copy is 671 MB in float32.

Here, during a training forward (grad enabled, one process):
- the head gets an alias of the weight, a leaf of its own: its gradient lands in the alias's .grad
  as soon as the head's backward ends (no copy) and is moved into the weight's .grad at once (or
  added in place, for gradient accumulation);
- the embedding runs with sparse=True for that forward: its gradient is the looked-up rows only
  (tokens x hidden), which autograd adds in place into the dense .grad the head left.
The values are the same as autograd's (a sum of the same two terms); the peak holds one dense copy.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor, nn


def tied_embedding(decoder: nn.Module, weight: Tensor) -> nn.Embedding | None:
    """The decoder's input embedding when it shares `weight` with the head and the fold applies now:
    grad enabled, a trainable plain tensor, one process (DDP / FSDP / tensor parallelism hook the
    parameter's own gradient, which the fold would bypass)."""
    if not torch.is_grad_enabled() or not weight.requires_grad or type(weight.data) is not Tensor:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    emb = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding) or emb.weight is not weight or emb.max_norm is not None:
        return None
    return emb


def _fold_into(weight: Tensor, alias: Tensor) -> None:
    if weight.grad is None:
        weight.grad = alias.grad
    else:
        weight.grad.add_(alias.grad)
    alias.grad = None


@contextlib.contextmanager
def head_weight(decoder: nn.Module, weight: Tensor):
    """Yields the tensor the head should multiply by: `weight` itself, or (tied, training) an alias
    whose gradient is folded into weight.grad, with the embedding sparse for the block's forward."""
    emb = tied_embedding(decoder, weight)
    if emb is None:
        yield weight
        return
    alias = weight.detach().requires_grad_(True)
    alias.register_post_accumulate_grad_hook(functools.partial(_fold_into, weight))
    was = emb.sparse
    emb.sparse = True
    try:
        yield alias
    finally:
        emb.sparse = was
