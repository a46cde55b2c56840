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

Mixtures (as TRL's loss_type list with loss_weights): sum_i w_i loss_i, the `parts` of a
dpo_fast.LossSettings (loss_settings.py reads every spelling of a loss). Each type is computed on
its own log-ratios: 'ipo' on per-token ones, the others on sums (TRL's rule), and the derivative
of the mixture is the weighted sum of the closed forms, so the fused paths stay fused.

Rankings (DPO appendix A.3): `plackett_luce_loss` on (P, K) log-probs, and `ranking_objective`,
its closed-form gradient for the fused path on K x P rows.

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

from .loss_settings import AVERAGED_LOSS_TYPES, LOSS_TYPES, LossSettings


def loss_dtype(t: Tensor) -> torch.dtype:
    """The dtype the objective computes in: float64 for float64 log-probs, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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
    """(losses, d losses / d a, d losses / d b), each (P,), of one loss type (a name of LOSS_TYPES)
    for log-ratios a (chosen), b (rejected)."""
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
                    ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, loss_type="sigmoid",
                    label_smoothing: float = 0.0, chosen_lengths: Tensor | None = None,
                    rejected_lengths: Tensor | None = None, reduction: str = "mean",
                    loss_weights=None) -> PreferenceLossOutput:
    """DPO-family loss from per-sequence log-probs (P,) of chosen and rejected responses.

    No reference log-probs means reference-free (zeros). `chosen_lengths` / `rejected_lengths`
    (scored tokens per response) are needed by 'sigmoid_norm', and by 'ipo', which is defined on
    per-token log-ratios here as in dpo_fast.loss (the log-ratios are divided by the lengths; the
    rewards returned are then per token too). `loss_type` may list several types, mixed with
    `loss_weights` (default 1 each), all on the log-probs given. See the module docstring.
    """
    settings = LossSettings.make(beta=beta, loss_type=loss_type, loss_weights=loss_weights,
                                 label_smoothing=label_smoothing)
    beta = settings.beta
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
    parts = settings.parts
    averaged = [c.loss_type in AVERAGED_LOSS_TYPES for c in parts]
    if any(averaged):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type={settings.spec!r} includes a type defined on per-token log-ratios (ipo, as in "
                             "dpo_fast.loss): pass chosen_lengths and rejected_lengths (scored tokens per response) "
                             "with the summed log-probs")
        a_tok, b_tok = a / chosen_lengths.to(a.dtype).clamp(min=1), b / rejected_lengths.to(b.dtype).clamp(min=1)
    losses = None
    for c, per_token in zip(parts, averaged):  # each type on its own kind of log-ratio, as sequence_objective
        x, y = (a_tok, b_tok) if per_token else (a, b)
        part = c.weight * _PairLoss.apply(x, y, chosen_lengths, rejected_lengths, beta, c.loss_type,
                                          settings.label_smoothing)
        losses = part if losses is None else losses + part
    if all(averaged):
        a, b = a_tok, b_tok
    return PreferenceLossOutput(_reduce(losses, reduction), losses, (beta * a).detach(), (beta * b).detach())


def plackett_luce_loss(logps: Tensor, ref_logps: Tensor | None = None, *, beta: float = 0.1,
                       reduction: str = "mean") -> Tensor:
    """Plackett-Luce ranking loss of DPO (appendix A.3) for K responses ranked best first.

    logps, ref_logps: (P, K). With r_k = beta (logps - ref_logps)_k, per prompt:
        -sum_{k=1..K} [ r_k - log sum_{j>=k} exp(r_j) ]
    (the last term is 0). K = 2 is the 'sigmoid' DPO loss.
    """
    beta = LossSettings(beta=beta).beta
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


def surrogate(value: Tensor, grad: Tensor, x: Tensor) -> Tensor:
    """A closed-form gradient entering autograd: a tensor whose value is `value` and whose
    derivative in x is grad (the formulas above); value itself when x needs no gradient."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return value
    return value + (grad * (x.to(grad.dtype) - x.detach().to(grad.dtype))).sum()


class SequenceObjective(NamedTuple):
    loss: Tensor  # scalar
    losses: Tensor  # (P,)
    grad_logps: Tensor  # (2P,) d loss / d logps
    grad_ref_logps: Tensor  # (2P,) d loss / d ref_logps: minus the preference part of grad_logps
    chosen_rewards: Tensor  # (P,)
    rejected_rewards: Tensor  # (P,)


def log_ratios(logps: Tensor, counts: Tensor, ref_logps: Tensor | None, average_log_prob: bool) -> Tensor:
    """log pi - log pi_ref per sequence (in loss_dtype(logps)), per token when average_log_prob."""
    dt = loss_dtype(logps)
    ratio = logps.to(dt) - (ref_logps.to(dt) if ref_logps is not None else 0.0)
    return ratio / counts.to(dt).clamp(min=1) if average_log_prob else ratio


def _sft(logps: Tensor, per_token: Tensor, P: int, sft_weight: float):
    """(value, d value / d logps) of sft_weight x the mean per-token NLL of the chosen rows (RPO)."""
    value = -sft_weight * (logps[:P].to(per_token.dtype) * per_token[:P]).mean()
    grad = -sft_weight * torch.cat([per_token[:P], torch.zeros_like(per_token[P:])]) / P
    return value, grad


def sequence_objective(logps: Tensor, counts: Tensor, ref_logps: Tensor | None,
                       settings: LossSettings) -> SequenceObjective:
    """The mean DPO loss of a batch of 2P summed log-probs (chosen rows, then rejected rows) and
    its gradients with respect to them and to the reference log-probs, in closed form: no
    autograd, so the fused kernel path can call it inside its forward. `counts` are scored tokens
    per sequence. Computed in float64 for float64 log-probs, else float32.

    settings.per_token: per-token log-ratios (IPO); a mixture computes each type on its own kind
    ('ipo' per token, the others summed) and per_token only decides the rewards. sft_weight: add
    sft_weight times the mean per-token NLL of the chosen responses (RPO), which no reference enters."""
    P = logps.shape[0] // 2
    per_token = 1.0 / counts.to(loss_dtype(logps)).clamp(min=1)
    parts = settings.parts
    losses = grad = None
    for c in parts:
        averaged = settings.per_token if len(parts) == 1 else c.loss_type in AVERAGED_LOSS_TYPES
        ratio = log_ratios(logps, counts, ref_logps, averaged)
        part, d_chosen, d_rejected = pair_losses_and_grads(
            ratio[:P], ratio[P:], beta=settings.beta, loss_type=c.loss_type, label_smoothing=settings.label_smoothing,
            chosen_lengths=counts[:P].to(ratio.dtype), rejected_lengths=counts[P:].to(ratio.dtype))
        g = torch.cat([d_chosen, d_rejected]) / P
        if averaged:
            g = g * per_token
        if c.weight != 1.0:
            part, g = c.weight * part, c.weight * g
        losses, grad = (part, g) if losses is None else (losses + part, grad + g)
    loss, grad_ref = losses.mean(), -grad
    if settings.sft_weight != 0.0:
        value, g = _sft(logps, per_token, P, settings.sft_weight)
        loss, grad = loss + value, grad + g
    beta = settings.beta
    ratio = log_ratios(logps, counts, ref_logps, settings.per_token)
    return SequenceObjective(loss, losses, grad, grad_ref, beta * ratio[:P], beta * ratio[P:])


class RankingObjective(NamedTuple):
    loss: Tensor  # scalar
    losses: Tensor  # (P,)
    grad_logps: Tensor  # (K*P,) d loss / d logps
    grad_ref_logps: Tensor  # (K*P,) d loss / d ref_logps
    rewards: Tensor  # (P, K) beta * log-ratio, best first


def ranking_objective(logps: Tensor, counts: Tensor, ref_logps: Tensor | None, *, num_responses: int, beta: float,
                      sft_weight: float = 0.0) -> RankingObjective:
    """The mean Plackett-Luce loss of K x P summed log-probs (row k*P + p: response k of prompt p,
    best first) and its gradient in closed form, as sequence_objective for pairs. With
    r = beta (logps - ref) (P, K) and L_k = log sum_{j>=k} exp(r_j):
        loss_p = -sum_k (r_k - L_k),   d loss_p / d r_j = -1 + sum_{k<=j} exp(r_j - L_k)
    (each exp(r_j - L_k) <= 1: the softmax of r over ranks k..K-1). K = 2 is the 'sigmoid' loss.
    sft_weight adds the best response's per-token NLL (RPO)."""
    K = num_responses
    P = logps.shape[0] // K
    r = beta * log_ratios(logps, counts, ref_logps, False).view(K, P).T  # (P, K)
    tail = torch.logcumsumexp(r.flip(1), dim=1).flip(1)  # L_k
    losses = -(r - tail).sum(1)
    upper = torch.ones(K, K, dtype=torch.bool, device=r.device).triu()  # [k, j]: k <= j
    soft = torch.exp(r.unsqueeze(1) - tail.unsqueeze(2)) * upper  # [p, k, j] = exp(r_j - L_k), k <= j
    grad_r = soft.sum(1) - 1.0
    grad = (beta * grad_r / P).T.reshape(-1)
    loss, grad_ref = losses.mean(), -grad
    if sft_weight != 0.0:
        per_token = 1.0 / counts.to(r.dtype).clamp(min=1)
        value, g = _sft(logps, per_token, P, sft_weight)
        loss, grad = loss + value, grad + g
    return RankingObjective(loss, losses, grad, grad_ref, r)
