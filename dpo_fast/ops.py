"""The from-logits ops, registered with torch.library: fake (meta) kernels, autograd, dispatch.

Layering: each op takes canonical targets (dpo_fast.tokens) and a concrete backend name and
routes the two row kernels, token_stats and token_grad, to Triton, the compiled extension or
the PyTorch reference. Everything vocabulary-sized happens inside those two kernels; what is
left here is O(tokens).

Ops (namespace dpo_fast):
  sequence_logprobs  per-sequence sums of log_softmax(logits)[target], with autograd
  token_grad         g_token * (onehot - softmax) into a new tensor   (used by backward)
  token_grad_        the same, written into the logits' own storage   (in-place backward)
  dpo_loss           the fused DPO loss: stats pass, loss + its gradient, grad pass, in the
                     forward; backward only scales by grad_output
  dpo_loss_          dpo_loss writing the gradient into the logits' storage
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from . import reference
from .backends import extension
from .losses import sequence_objective
from .tokens import acc_dtype, check_targets, sum_per_sequence

# ---------------------------------------------------------------- the two row kernels


def _token_stats(logits: Tensor, targets: Tensor, backend: str):
    if backend == "triton":
        from . import triton_logprobs
        return triton_logprobs.token_stats(logits, targets)
    if backend in ("cpu", "cuda"):  # the dpo_fast_C ops, registered when backends loaded _C
        return torch.ops.dpo_fast_C.token_stats(logits, targets)
    return reference.token_stats(logits, targets)


def _token_grad(logits: Tensor, targets: Tensor, lse: Tensor, g_token: Tensor, out: Tensor, backend: str):
    g_token = g_token.to(lse.dtype).contiguous()
    if backend == "triton":
        from . import triton_logprobs
        triton_logprobs.token_grad(logits, targets, lse, g_token, out)
    elif backend in ("cpu", "cuda"):
        torch.ops.dpo_fast_C.token_grad(logits, targets, lse, g_token, out)
    else:
        reference.token_grad(logits, targets, lse, g_token, out)
    return out


def _per_token(g_seq: Tensor, token_seq: Tensor | None, shape) -> Tensor:
    """Broadcast a per-sequence gradient to its tokens (unscored tokens are zeroed by the kernel)."""
    if token_seq is None:
        return g_seq.unsqueeze(1).expand(shape).contiguous()
    return g_seq[token_seq]


def _stats(logits, targets, token_seq, num_sequences, backend):
    check_targets(targets, logits.shape[-1], token_seq, num_sequences)
    lse, picked, lsum = _token_stats(logits, targets, backend)
    logps = sum_per_sequence(picked - lse, token_seq, num_sequences)
    logit_sums = sum_per_sequence(lsum, token_seq, num_sequences).float()
    return logps, lse, logit_sums


# ---------------------------------------------------------------- sequence_logprobs


@torch.library.custom_op("dpo_fast::sequence_logprobs", mutates_args=())
def sequence_logprobs_op(
    logits: Tensor, targets: Tensor, token_seq: Tensor | None, num_sequences: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(logps (num_sequences,), lse (S, T), logit_sums (num_sequences,) float32)."""
    return _stats(logits, targets, token_seq, num_sequences, backend)


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
    if g_logps is None:  # grads are not materialised: None means zero
        return None, None, None, None, None
    logits, targets, token_seq, lse = ctx.saved_tensors
    g_token = _per_token(g_logps, token_seq, targets.shape)
    return torch.ops.dpo_fast.token_grad(logits, targets, lse, g_token, ctx.backend), None, None, None, None


sequence_logprobs_op.register_autograd(_seq_backward, setup_context=_seq_setup)


@torch.library.custom_op("dpo_fast::token_grad", mutates_args=())
def token_grad_op(logits: Tensor, targets: Tensor, lse: Tensor, g_token: Tensor, backend: str) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return _token_grad(logits, targets, lse, g_token, out, backend)


@token_grad_op.register_fake
def _(logits, targets, lse, g_token, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("dpo_fast::token_grad_", mutates_args=("logits",))
def token_grad_inplace_op(logits: Tensor, targets: Tensor, lse: Tensor, g_token: Tensor, backend: str) -> None:
    _token_grad(logits, targets, lse, g_token, logits, backend)


class InplaceSequenceLogprobs(torch.autograd.Function):
    """sequence_logprobs whose backward overwrites the logits with their gradient (eager only)."""

    @staticmethod
    def forward(ctx, logits, targets, token_seq, num_sequences, backend):
        logps, lse, logit_sums = torch.ops.dpo_fast.sequence_logprobs(
            logits, targets, token_seq, num_sequences, backend)
        # Held as plain references, not save_for_backward: the backward mutates the logits.
        ctx.logits, ctx.targets, ctx.token_seq, ctx.lse, ctx.backend = logits, targets, token_seq, lse, backend
        ctx.mark_non_differentiable(lse, logit_sums)
        return logps, lse, logit_sums

    @staticmethod
    def backward(ctx, g_logps, _g_lse, _g_lsum):
        logits = ctx.logits
        g_token = _per_token(g_logps, ctx.token_seq, ctx.targets.shape)
        torch.ops.dpo_fast.token_grad_(logits, ctx.targets, ctx.lse, g_token, ctx.backend)
        del ctx.logits
        # A detached alias: a leaf's AccumulateGrad adopts it rather than cloning the leaf itself.
        return logits.detach(), None, None, None, None


# ---------------------------------------------------------------- the fused DPO loss


def _fused_dpo(logits, targets, token_seq, counts, ref_logps, beta, loss_type, label_smoothing,
               sft_weight, average_log_prob, grad_out, backend):
    """Forward of the fused loss; writes d(loss)/d(logits) into grad_out when it is given."""
    logps, lse, logit_sums = _stats(logits, targets, token_seq, counts.shape[0], backend)
    obj = sequence_objective(logps, counts, ref_logps, beta=beta, loss_type=loss_type,
                             label_smoothing=label_smoothing, sft_weight=sft_weight,
                             average_log_prob=average_log_prob)
    if grad_out is not None:
        g_token = _per_token(obj.grad_logps, token_seq, targets.shape)
        _token_grad(logits, targets, lse, g_token, grad_out, backend)
    return obj.loss, obj.losses, logps.float(), logit_sums


@torch.library.custom_op("dpo_fast::dpo_loss", mutates_args=())
def dpo_loss_op(
    logits: Tensor, targets: Tensor, token_seq: Tensor | None, counts: Tensor, ref_logps: Tensor | None,
    beta: float, loss_type: str, label_smoothing: float, sft_weight: float, average_log_prob: bool,
    compute_grad: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, losses (P,), logps (2P,), logit_sums (2P,), grad (like logits, or empty))."""
    grad = torch.empty(logits.shape if compute_grad else (0,), dtype=logits.dtype, device=logits.device)
    out = _fused_dpo(logits, targets, token_seq, counts, ref_logps, beta, loss_type, label_smoothing,
                     sft_weight, average_log_prob, grad if compute_grad else None, backend)
    return (*out, grad)


@dpo_loss_op.register_fake
def _(logits, targets, token_seq, counts, ref_logps, beta, loss_type, label_smoothing, sft_weight,
      average_log_prob, compute_grad, backend):
    n = counts.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    grad = torch.empty(logits.shape if compute_grad else (0,), dtype=logits.dtype, device=logits.device)
    return torch.empty((), **f32), torch.empty(n // 2, **f32), torch.empty(n, **f32), torch.empty(n, **f32), grad


def _dpo_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    # Without this, autograd allocates a zero "gradient" for every unused output before calling
    # backward: for the gradient buffer itself that is a second logits-sized tensor.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[4])


def scale_grad(grad: Tensor, g_loss: Tensor) -> Tensor:
    """grad * g_loss, skipping the multiply (a full pass) when g_loss is 1, as it is for
    loss.backward(). The check costs one sync in eager; traced graphs always multiply."""
    traced = (torch.compiler.is_compiling() or type(g_loss) is not torch.Tensor
              or get_proxy_mode() is not None)
    if traced:
        return grad * g_loss.to(grad.dtype)
    if bool(g_loss == 1):
        return grad
    return grad * g_loss.to(grad.dtype)


def _dpo_backward(ctx, g_loss, *_):
    if g_loss is None:  # grads are not materialised: None means zero
        return (None,) * 12
    (grad,) = ctx.saved_tensors
    return (scale_grad(grad, g_loss),) + (None,) * 11


dpo_loss_op.register_autograd(_dpo_backward, setup_context=_dpo_setup)


@torch.library.custom_op("dpo_fast::dpo_loss_", mutates_args=("logits",))
def dpo_loss_inplace_op(
    logits: Tensor, targets: Tensor, token_seq: Tensor | None, counts: Tensor, ref_logps: Tensor | None,
    beta: float, loss_type: str, label_smoothing: float, sft_weight: float, average_log_prob: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dpo_loss that overwrites the logits with d(loss)/d(logits) (the caller gives them up)."""
    return _fused_dpo(logits, targets, token_seq, counts, ref_logps, beta, loss_type, label_smoothing,
                      sft_weight, average_log_prob, logits, backend)


class InplaceDPOLoss(torch.autograd.Function):
    """Eager autograd around dpo_loss_: the gradient already sits in the logits' storage."""

    @staticmethod
    def forward(ctx, logits, *args):
        loss, losses, logps, logit_sums = torch.ops.dpo_fast.dpo_loss_(logits, *args)
        ctx.grad_storage = logits  # now holds the gradient; a plain reference, see above
        ctx.n_args = len(args)
        ctx.mark_non_differentiable(losses, logps, logit_sums)
        return loss, losses, logps, logit_sums

    @staticmethod
    def backward(ctx, g_loss, *_):
        grad = scale_grad(ctx.grad_storage.detach(), g_loss)  # detached: see InplaceSequenceLogprobs
        del ctx.grad_storage
        return (grad,) + (None,) * ctx.n_args


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
