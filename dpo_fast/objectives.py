"""The DPO loss family on per-sequence log-probabilities.

Notation: a = log pi(y_w|x) - log pi_ref(y_w|x) (chosen log-ratio), b = the same for y_l,
h = a - b, beta > 0, eps = label_smoothing, s(x) = sigmoid(x). Per pair:

  sigmoid       -(1-eps) log s(beta h) - eps log s(-beta h)            (DPO; eps>0: conservative DPO)
  robust        (-(1-eps) log s(beta h) + eps log s(-beta h)) / (1-2eps)  (Chowdhury et al. 2024)
  ipo           (h - 1/(2 beta))^2                                     (Azar et al. 2023; on per-token log-ratios)
  hinge         max(0, 1 - beta h)                                     (SLiC)
  exo_pair      s(z)(log s(z) - log(1-e)) + s(-z)(log s(-z) - log e),  z = beta h, e = eps or 1e-3
  nca_pair      -log s(beta a) - 0.5 log s(-beta a) - 0.5 log s(-beta b)
  bco_pair      -log s(beta a - d) - log s(-(beta b - d)),  d = mean of all beta a, beta b (detached)
  sppo_hard     (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2
  apo_zero      (1 - s(beta a)) + s(beta b)
  apo_down      s(beta a) + (1 - s(beta h))
  sigmoid_norm  sigmoid on length-normalised ratios: h = a / |y_w| - b / |y_l|

Each type is written once, with its closed-form derivatives d loss / d a and d loss / d b:
`preference_loss` wraps them in an autograd.Function, and the fused kernel path
(dpo_fast.ops) uses the same derivatives to write d loss / d logits during the forward.
The tests check the derivatives against float64 autograd of formulas written apart.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "exo_pair", "nca_pair", "bco_pair",
              "sppo_hard", "apo_zero", "apo_down", "sigmoid_norm")
# Loss types defined on per-token (length-averaged) log-ratios when computed from tokens.
AVERAGED_LOSS_TYPES = ("ipo",)


def as_number(value, name: str) -> float:
    """A Python number, or a 0-dim tensor (e.g. beta=torch.tensor(0.1)) as a float; else a ValueError."""
    if isinstance(value, Tensor) and value.ndim == 0 and (value.is_floating_point() or not value.dtype.is_complex):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number (or a 0-dim tensor), got {value!r}")
    return float(value)


def check_loss_args(loss_type: str, beta, label_smoothing) -> tuple[float, float]:
    """Validate the loss settings; returns (beta, label_smoothing) as floats."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    beta, label_smoothing = as_number(beta, "beta"), as_number(label_smoothing, "label_smoothing")
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    return beta, label_smoothing


def _sigmoid_family(h, beta, eps, robust):
    """-(1-eps) log s(bh) -/+ eps log s(-bh), and its derivative in h."""
    z = beta * h
    if robust:
        losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        dh = beta * (-(1 - eps) * torch.sigmoid(-z) - eps * torch.sigmoid(z)) / (1 - 2 * eps)
    else:
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        dh = beta * (-(1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z))
    return losses, dh


def pair_losses_and_grads(a: Tensor, b: Tensor, *, beta: float, loss_type: str, label_smoothing: float = 0.0,
                          chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """(losses, d losses / d a, d losses / d b), each (P,), for log-ratios a (chosen), b (rejected)."""
    eps = label_smoothing
    h = a - b
    if loss_type in ("sigmoid", "robust"):
        losses, dh = _sigmoid_family(h, beta, eps, robust=loss_type == "robust")
        return losses, dh, -dh
    if loss_type == "sigmoid_norm":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='sigmoid_norm' needs chosen_lengths and rejected_lengths")
        inv_c, inv_r = 1.0 / chosen_lengths.clamp(min=1), 1.0 / rejected_lengths.clamp(min=1)
        losses, dh = _sigmoid_family(a * inv_c - b * inv_r, beta, eps, robust=False)
        return losses, dh * inv_c, -dh * inv_r
    if loss_type == "ipo":
        d = h - 1 / (2 * beta)
        return d * d, 2 * d, -2 * d
    if loss_type == "hinge":
        active = (beta * h < 1).to(h.dtype)
        return torch.relu(1 - beta * h), -beta * active, beta * active
    if loss_type == "exo_pair":
        e = eps if eps > 0 else 1e-3
        z = beta * h
        sp, sn = torch.sigmoid(z), torch.sigmoid(-z)
        losses = sp * (F.logsigmoid(z) - math.log(1 - e)) + sn * (F.logsigmoid(-z) - math.log(e))
        dh = beta * sp * sn * (z - math.log((1 - e) / e))
        return losses, dh, -dh
    if loss_type == "nca_pair":
        ca, rb = beta * a, beta * b
        losses = -F.logsigmoid(ca) - 0.5 * F.logsigmoid(-ca) - 0.5 * F.logsigmoid(-rb)
        return losses, beta * (-torch.sigmoid(-ca) + 0.5 * torch.sigmoid(ca)), 0.5 * beta * torch.sigmoid(rb)
    if loss_type == "bco_pair":
        ca, rb = beta * a, beta * b
        delta = torch.cat([ca, rb]).mean().detach()
        losses = -F.logsigmoid(ca - delta) - F.logsigmoid(-(rb - delta))
        return losses, -beta * torch.sigmoid(delta - ca), beta * torch.sigmoid(rb - delta)
    if loss_type == "sppo_hard":
        da, db = a - 1 / (2 * beta), b + 1 / (2 * beta)
        return da * da + db * db, 2 * da, 2 * db
    if loss_type == "apo_zero":
        sa, sb = torch.sigmoid(beta * a), torch.sigmoid(beta * b)
        return (1 - sa) + sb, -beta * sa * (1 - sa), beta * sb * (1 - sb)
    if loss_type == "apo_down":
        sa, sh = torch.sigmoid(beta * a), torch.sigmoid(beta * h)
        dh = beta * sh * (1 - sh)
        return sa + (1 - sh), beta * sa * (1 - sa) - dh, dh
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")


class _PairLoss(torch.autograd.Function):
    """Per-pair losses with the closed-form derivatives above as backward."""

    @staticmethod
    def forward(ctx, a, b, chosen_lengths, rejected_lengths, beta, loss_type, label_smoothing):
        losses, da, db = pair_losses_and_grads(
            a, b, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        ctx.save_for_backward(da, db)
        return losses

    @staticmethod
    def backward(ctx, g):
        da, db = ctx.saved_tensors
        return g * da, g * db, None, None, None, None, None


class PreferenceLossOutput(NamedTuple):
    loss: Tensor  # reduced loss (differentiable)
    losses: Tensor  # per pair (differentiable)
    chosen_rewards: Tensor  # beta * (log pi - log pi_ref) of the chosen responses, detached
    rejected_rewards: Tensor


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_logps(name: str, t: Tensor, like: Tensor | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if like is not None and (t.shape != like.shape or t.device != like.device):
        raise ValueError(f"{name} must have shape {tuple(like.shape)} on {like.device}, "
                         f"got {tuple(t.shape)} on {t.device}")


def preference_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
                    ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0, chosen_lengths: Tensor | None = None,
                    rejected_lengths: Tensor | None = None, reduction: str = "mean") -> PreferenceLossOutput:
    """DPO-family loss from per-sequence log-probs (P,) of chosen and rejected responses.

    No reference log-probs means reference-free (zeros). `chosen_lengths` / `rejected_lengths`
    (scored tokens per response) are needed by 'sigmoid_norm', and by 'ipo', which is defined on
    per-token log-ratios here as in dpo_fast.loss (the log-ratios are divided by the lengths; the
    rewards returned are then per token too). See the module docstring for formulas.
    """
    beta, label_smoothing = check_loss_args(loss_type, beta, label_smoothing)
    _check_logps("chosen_logps", chosen_logps)
    if chosen_logps.dim() != 1 or chosen_logps.numel() == 0:
        raise ValueError(f"chosen_logps must be a non-empty 1-D tensor (P,), got shape {tuple(chosen_logps.shape)}")
    _check_logps("rejected_logps", rejected_logps, chosen_logps)
    a, b = chosen_logps, rejected_logps
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    if ref_chosen_logps is not None:
        _check_logps("ref_chosen_logps", ref_chosen_logps, chosen_logps)
        _check_logps("ref_rejected_logps", ref_rejected_logps, chosen_logps)
        a, b = a - ref_chosen_logps.to(a.dtype), b - ref_rejected_logps.to(b.dtype)
    if loss_type in AVERAGED_LOSS_TYPES:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type={loss_type!r} is defined on per-token log-ratios (as in dpo_fast.loss): pass "
                             "chosen_lengths and rejected_lengths (scored tokens per response) with the summed "
                             "log-probs")
        a, b = a / chosen_lengths.to(a.dtype).clamp(min=1), b / rejected_lengths.to(b.dtype).clamp(min=1)
    losses = _PairLoss.apply(a, b, chosen_lengths, rejected_lengths, float(beta), loss_type, float(label_smoothing))
    return PreferenceLossOutput(_reduce(losses, reduction), losses, (beta * a).detach(), (beta * b).detach())


def plackett_luce_loss(logps: Tensor, ref_logps: Tensor | None = None, *, beta: float = 0.1,
                       reduction: str = "mean") -> Tensor:
    """Plackett-Luce ranking loss of DPO (appendix A.3) for K responses ranked best first.

    logps, ref_logps: (P, K). With r_k = beta (logps - ref_logps)_k, per prompt:
        -sum_{k=1..K} [ r_k - log sum_{j>=k} exp(r_j) ]
    (the last term is 0). K = 2 is the 'sigmoid' DPO loss.
    """
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    _check_logps("logps", logps)
    if logps.dim() != 2 or logps.shape[0] == 0 or logps.shape[1] < 2:
        raise ValueError(f"logps must be (P, K) with P >= 1 and K >= 2, ranked best first; got {tuple(logps.shape)}")
    r = logps
    if ref_logps is not None:
        _check_logps("ref_logps", ref_logps, logps)
        r = r - ref_logps.to(r.dtype)
    r = beta * r
    # log sum_{j>=k} exp(r_j): a cumulative logsumexp from the worst response back to the best.
    tail_lse = torch.logcumsumexp(r.flip(1), dim=1).flip(1)
    return _reduce(-(r - tail_lse).sum(1), reduction)


class SequenceObjective(NamedTuple):
    loss: Tensor  # scalar
    losses: Tensor  # (P,)
    grad_logps: Tensor  # (2P,) d loss / d logps
    chosen_rewards: Tensor  # (P,)
    rejected_rewards: Tensor  # (P,)


def log_ratios(logps: Tensor, counts: Tensor, ref_logps: Tensor | None, average_log_prob: bool) -> Tensor:
    """log pi - log pi_ref per sequence (float32), per token when average_log_prob."""
    ratio = logps.float() - (ref_logps.float() if ref_logps is not None else 0.0)
    return ratio / counts.float().clamp(min=1) if average_log_prob else ratio


def sequence_objective(logps: Tensor, counts: Tensor, ref_logps: Tensor | None, *, beta: float, loss_type: str,
                       label_smoothing: float, sft_weight: float, average_log_prob: bool) -> SequenceObjective:
    """The mean DPO loss of a batch of 2P summed log-probs (chosen rows, then rejected rows) and
    its gradient with respect to them, in closed form: no autograd, so the fused kernel path can
    call it inside its forward. `counts` are scored tokens per sequence.

    average_log_prob: use per-token log-ratios (IPO). sft_weight: add sft_weight times the mean
    per-token NLL of the chosen responses (RPO)."""
    P = logps.shape[0] // 2
    per_token = 1.0 / counts.float().clamp(min=1)
    ratio = log_ratios(logps, counts, ref_logps, average_log_prob)
    losses, d_chosen, d_rejected = pair_losses_and_grads(
        ratio[:P], ratio[P:], beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        chosen_lengths=counts[:P].float(), rejected_lengths=counts[P:].float())
    loss = losses.mean()
    grad = torch.cat([d_chosen, d_rejected]) / P
    if average_log_prob:
        grad = grad * per_token
    if sft_weight != 0.0:
        loss = loss - sft_weight * (logps[:P].float() * per_token[:P]).mean()
        grad = grad - sft_weight * torch.cat([per_token[:P], torch.zeros_like(per_token[P:])]) / P
    return SequenceObjective(loss, losses, grad, beta * ratio[:P], beta * ratio[P:])
