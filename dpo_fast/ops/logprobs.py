"""The from-logits log-prob ops, registered with torch.library: fake (meta) kernels, autograd.

Each op takes canonical targets (dpo_fast.targets) and a concrete backend name and routes the two
row kernels, token_stats and token_grad (dpo_fast.kernels), to Triton, the compiled extension or
the PyTorch reference. Everything vocabulary-sized happens inside those two kernels; what is left
here is O(tokens).

Ops (namespace dpo_fast):
  sequence_logprobs  per-sequence sums of log_softmax(logits)[target], with autograd
  token_grad         g_token * (onehot - softmax) into a new tensor   (used by backward)
  token_grad_        the same, written into the logits' own storage   (in-place backward)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import extension
from ..kernels import token_grad, token_stats
from ..targets import acc_dtype, check_targets, sum_per_sequence
from .double_backward import refuse_double_backward

# ---------------------------------------------------------------- shared by the from-logits ops


def per_token(g_seq: Tensor, token_seq: Tensor | None, shape) -> Tensor:
    """Broadcast a per-sequence gradient to its tokens (unscored tokens are zeroed by the kernel)."""
    if token_seq is None:
        return g_seq.unsqueeze(1).expand(shape).contiguous()
    return g_seq[token_seq]


def logits_stats(logits, targets, token_seq, num_sequences, backend):
    check_targets(targets, logits.shape[-1], token_seq, num_sequences)
    lse, picked, lsum = token_stats(logits, targets, backend)
    logps = sum_per_sequence(picked - lse, token_seq, num_sequences)
    logit_sums = sum_per_sequence(lsum, token_seq, num_sequences).float()
    return logps, lse, logit_sums


# ---------------------------------------------------------------- sequence_logprobs


@torch.library.custom_op("dpo_fast::sequence_logprobs", mutates_args=())
def sequence_logprobs_op(
    logits: Tensor, targets: Tensor, token_seq: Tensor | None, num_sequences: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(logps (num_sequences,), lse (S, T), logit_sums (num_sequences,) float32)."""
    return logits_stats(logits, targets, token_seq, num_sequences, backend)


@sequence_logprobs_op.register_fake
def _(logits, targets, token_seq, num_sequences, backend):
    acc = acc_dtype(logits.dtype)
    S, T, _ = logits.shape
    return (logits.new_empty(num_sequences, dtype=acc), logits.new_empty(S, T, dtype=acc),
            logits.new_empty(num_sequences, dtype=torch.float32))


def _seq_setup(ctx, inputs, output):
    logits, targets, token_seq, _, backend = inputs
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the unused lse / logit sums
    ctx.save_for_backward(logits, targets, token_seq, output[1])


def _seq_backward(ctx, g_logps, _g_lse, _g_lsum):
    refuse_double_backward("sequence_logprobs")
    if g_logps is None:  # grads are not materialised: None means zero
        return None, None, None, None, None
    logits, targets, token_seq, lse = ctx.saved_tensors
    g_token = per_token(g_logps, token_seq, targets.shape)
    return torch.ops.dpo_fast.token_grad(logits, targets, lse, g_token, ctx.backend), None, None, None, None


sequence_logprobs_op.register_autograd(_seq_backward, setup_context=_seq_setup)


@torch.library.custom_op("dpo_fast::token_grad", mutates_args=())
def token_grad_op(logits: Tensor, targets: Tensor, lse: Tensor, g_token: Tensor, backend: str) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return token_grad(logits, targets, lse, g_token, out, backend)


@token_grad_op.register_fake
def _(logits, targets, lse, g_token, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("dpo_fast::token_grad_", mutates_args=("logits",))
def token_grad_inplace_op(logits: Tensor, targets: Tensor, lse: Tensor, g_token: Tensor, backend: str) -> None:
    token_grad(logits, targets, lse, g_token, logits, backend)


def hold_for_inplace_backward(ctx, logits, targets, token_seq, lse, backend) -> None:
    """Keep what an in-place backward needs, as plain references (not save_for_backward: the
    backward mutates the logits), with the logits' version to detect changes made meanwhile."""
    ctx.logits, ctx.targets, ctx.token_seq, ctx.lse, ctx.backend = logits, targets, token_seq, lse, backend
    ctx.logits_version = logits._version


def inplace_backward(ctx, g_seq: Tensor) -> Tensor:
    """Write g_seq's per-token gradient over the logits' storage and return it (a detached alias:
    a leaf's AccumulateGrad adopts it rather than cloning). The write bumps the logits' version,
    so an op that saved the logits and backpropagates after this one raises instead of reading
    the gradient; a second backward, or logits changed in place since the forward, raise here."""
    logits = getattr(ctx, "logits", None)
    if logits is None:
        raise RuntimeError("inplace_backward=True: this graph was already backpropagated once and the logits' "
                           "storage now holds their gradient; use inplace_backward=False to call backward twice "
                           "(retain_graph=True)")
    if logits._version != ctx.logits_version:
        raise RuntimeError("inplace_backward=True: the logits were modified in place after the forward, so the "
                           "gradient written over them would be wrong; use inplace_backward=False, or do not modify "
                           "the logits")
    g_token = per_token(g_seq, ctx.token_seq, ctx.targets.shape)
    torch.ops.dpo_fast.token_grad_(logits, ctx.targets, ctx.lse, g_token, ctx.backend)
    del ctx.logits
    return logits.detach()


class InplaceSequenceLogprobs(torch.autograd.Function):
    """sequence_logprobs whose backward overwrites the logits with their gradient (eager only)."""

    @staticmethod
    def forward(ctx, logits, targets, token_seq, num_sequences, backend):
        logps, lse, logit_sums = torch.ops.dpo_fast.sequence_logprobs(
            logits, targets, token_seq, num_sequences, backend)
        hold_for_inplace_backward(ctx, logits, targets, token_seq, lse, backend)
        ctx.mark_non_differentiable(lse, logit_sums)
        return logps, lse, logit_sums

    @staticmethod
    def backward(ctx, g_logps, _g_lse, _g_lsum):
        return inplace_backward(ctx, g_logps), None, None, None, None


# ---------------------------------------------------------------- fake kernels of the extension


def register_extension_fakes() -> None:
    """Meta kernels for the compiled dpo_fast_C ops, so they trace under torch.compile."""
    if extension() is None or getattr(register_extension_fakes, "done", False):
        return

    @torch.library.register_fake("dpo_fast_C::token_stats")
    def _(logits, targets):
        S, T, _ = logits.shape
        acc = acc_dtype(logits.dtype)
        return tuple(logits.new_empty(S, T, dtype=acc) for _ in range(3))

    @torch.library.register_fake("dpo_fast_C::token_grad")
    def _(logits, targets, lse, g_token, grad):
        return None

    register_extension_fakes.done = True


register_extension_fakes()
