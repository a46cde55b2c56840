"""The fused DPO loss from logits, registered with torch.library.

  dpo_loss   stats pass, the loss and its gradient in closed form (dpo_fast.objectives), grad
             pass, all in the forward; backward only scales by grad_output
  InplaceDPOLoss  (eager, inplace_backward=True) the gradient written over the logits in backward
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from ..kernels import token_grad
from ..loss_settings import LossSettings
from ..objectives import loss_dtype, sequence_objective
from .double_backward import refuse_double_backward
from .logprobs import hold_for_inplace_backward, inplace_backward, logits_stats, per_token


def _fused_dpo(logits, targets, token_seq, counts, ref_logps, settings: LossSettings, grad_out, backend):
    """Forward of the fused loss; writes d(loss)/d(logits) into grad_out when it is given."""
    logps, lse, logit_sums = logits_stats(logits, targets, token_seq, counts.shape[0], backend)
    obj = sequence_objective(logps, counts, ref_logps, settings)
    if grad_out is not None:
        g_token = per_token(obj.grad_logps, token_seq, targets.shape)
        token_grad(logits, targets, lse, g_token, grad_out, backend)
    dt = loss_dtype(logps)
    return obj.loss, obj.losses, logps.to(dt), logit_sums.to(dt)


@torch.library.custom_op("dpo_fast::dpo_loss", mutates_args=())
def dpo_loss_op(
    logits: Tensor, targets: Tensor, token_seq: Tensor | None, counts: Tensor, ref_logps: Tensor | None,
    beta: float, loss_types: str, loss_weights: list[float], label_smoothing: float, sft_weight: float,
    per_token_ratios: bool, compute_grad: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, losses (P,), logps (2P,), logit_sums (2P,), grad (like logits, or empty)); the loss
    settings as LossSettings.op_args() flattens them. Float64 logits give float64 results, others float32."""
    settings = LossSettings.from_op_args(beta, loss_types, loss_weights, label_smoothing, sft_weight,
                                         per_token_ratios)
    grad = torch.empty(logits.shape if compute_grad else (0,), dtype=logits.dtype, device=logits.device)
    out = _fused_dpo(logits, targets, token_seq, counts, ref_logps, settings, grad if compute_grad else None,
                     backend)
    return (*out, grad)


@dpo_loss_op.register_fake
def _(logits, targets, token_seq, counts, ref_logps, beta, loss_types, loss_weights, label_smoothing, sft_weight,
      per_token_ratios, compute_grad, backend):
    n = counts.shape[0]
    f = dict(dtype=loss_dtype(logits), device=logits.device)
    grad = torch.empty(logits.shape if compute_grad else (0,), dtype=logits.dtype, device=logits.device)
    return torch.empty((), **f), torch.empty(n // 2, **f), torch.empty(n, **f), torch.empty(n, **f), grad


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
    refuse_double_backward("loss from logits")
    if g_loss is None:  # grads are not materialised: None means zero
        return (None,) * 13
    (grad,) = ctx.saved_tensors
    return (scale_grad(grad, g_loss),) + (None,) * 12


dpo_loss_op.register_autograd(_dpo_backward, setup_context=_dpo_setup)


class InplaceDPOLoss(torch.autograd.Function):
    """The fused loss for inplace_backward=True (eager): the forward takes the stats pass and the
    closed-form loss gradient per sequence; the backward writes g_loss * d(loss)/d(logits) over the
    logits' storage in one pass (inplace_backward in ops.logprobs: versions checked, so another op
    that still needs the logits raises rather than reading the gradient)."""

    @staticmethod
    def forward(ctx, logits, targets, token_seq, counts, ref_logps, settings, backend):
        logps, lse, logit_sums = torch.ops.dpo_fast.sequence_logprobs(logits, targets, token_seq, counts.shape[0],
                                                                      backend)
        obj = sequence_objective(logps, counts, ref_logps, settings)
        hold_for_inplace_backward(ctx, logits, targets, token_seq, lse, backend)
        ctx.grad_logps = obj.grad_logps
        dt = loss_dtype(logps)
        losses, logps, logit_sums = obj.losses, logps.to(dt), logit_sums.to(dt)
        ctx.mark_non_differentiable(losses, logps, logit_sums)
        return obj.loss, losses, logps, logit_sums

    @staticmethod
    def backward(ctx, g_loss, *_):
        refuse_double_backward("loss from logits, inplace_backward=True")
        return (inplace_backward(ctx, ctx.grad_logps * g_loss),) + (None,) * 6
