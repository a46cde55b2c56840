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

Mixtures (as TRL's loss_type list with loss_weights): sum_i w_i loss_i, written as a canonical
spec string "sigmoid*0.8+bco_pair*0.2" (`loss_spec`) that every path, the custom ops included,
takes as its `loss_type`; a single type with weight 1 is just its name. Each type is computed on
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


class Component(NamedTuple):
    loss_type: str
    weight: float


def _names(loss_type) -> list[str]:
    if isinstance(loss_type, str):
        return [t.strip() for t in loss_type.split(",")] if "," in loss_type else [loss_type]
    if isinstance(loss_type, (list, tuple)) and loss_type and all(isinstance(t, str) for t in loss_type):
        return [t.strip() for t in loss_type]
    raise ValueError(f"loss_type must be a loss type name or a non-empty list of them, got {loss_type!r}")


def _weights(loss_weights, n: int) -> list[float]:
    if loss_weights is None:
        return [1.0] * n
    if isinstance(loss_weights, str):
        try:
            loss_weights = [float(w) for w in loss_weights.split(",")]
        except ValueError:
            raise ValueError(f"loss_weights must be numbers separated by commas, got {loss_weights!r}") from None
    elif isinstance(loss_weights, (int, float)) and not isinstance(loss_weights, bool):
        loss_weights = [loss_weights]
    elif not isinstance(loss_weights, (list, tuple)):
        raise ValueError(f"loss_weights must be a list of numbers, one per loss type, got {loss_weights!r}")
    weights = [as_number(w, "loss_weights") for w in loss_weights]
    if len(weights) != n:
        raise ValueError(f"loss_weights has {len(weights)} weight(s) for {n} loss type(s): give one weight per "
                         "type of loss_type, in the same order")
    bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"loss_weights must be finite numbers >= 0, got {bad[0]!r}")
    if not any(weights):
        raise ValueError("loss_weights are all 0: the loss would be 0")
    return weights


def loss_spec(loss_type, loss_weights=None) -> str:
    """The canonical spec of a loss: a type name, or a list of them (or "a,b") with loss_weights
    (default 1 each) -> "sigmoid" or "sigmoid*0.8+bco_pair*0.2". ValueError on an unknown or
    repeated type, a weight count that differs from the types', or a negative weight. A spec
    comes back as it is (checked)."""
    if isinstance(loss_type, str) and ("*" in loss_type or "+" in loss_type):
        if loss_weights is not None:
            raise ValueError(f"loss_type {loss_type!r} already carries its weights; leave loss_weights unset")
        parts = parse_spec(loss_type)
        loss_type, loss_weights = [c.loss_type for c in parts], [c.weight for c in parts]
    names = _names(loss_type)
    unknown = [t for t in names if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {unknown[0]!r}")
    repeated = sorted({t for t in names if names.count(t) > 1})
    if repeated:
        raise ValueError(f"loss_type lists {repeated[0]!r} more than once")
    weights = _weights(loss_weights, len(names))
    if len(names) == 1 and weights[0] == 1.0:
        return names[0]
    return "+".join(f"{t}*{w!r}" for t, w in zip(names, weights))


def parse_spec(spec: str) -> tuple[Component, ...]:
    """The (type, weight) components of a spec from `loss_spec` (or a plain type name)."""
    if not isinstance(spec, str):
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {spec!r}")
    parts = []
    for item in spec.split("+"):
        name, _, weight = item.partition("*")
        if name not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {name!r}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"loss_type spec {spec!r}: bad weight {weight!r}") from None
        parts.append(Component(name, w))
    return tuple(parts)


def spec_types(spec: str) -> tuple[str, ...]:
    return tuple(c.loss_type for c in parse_spec(spec))


def default_average_log_prob(spec: str) -> bool:
    """Per-token log-ratios by default when every component is defined on them (ipo)."""
    return all(t in AVERAGED_LOSS_TYPES for t in spec_types(spec))


def check_loss_args(loss_type: str, beta, label_smoothing) -> tuple[float, float]:
    """Validate the loss settings (loss_type: a name or a spec from `loss_spec`); returns (beta,
    label_smoothing) as floats."""
    parse_spec(loss_type)
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
    """(losses, d losses / d a, d losses / d b), each (P,), for log-ratios a (chosen), b (rejected);
    a mixture spec gives the weighted sums of its types' (all on the same a, b)."""
    parts = parse_spec(loss_type)
    if len(parts) == 1 and parts[0].weight == 1.0:
        return _type_losses_and_grads(a, b, beta, parts[0].loss_type, label_smoothing, chosen_lengths,
                                      rejected_lengths)
    total = None
    for c in parts:
        out = _type_losses_and_grads(a, b, beta, c.loss_type, label_smoothing, chosen_lengths, rejected_lengths)
        total = [c.weight * x for x in out] if total is None else [t + c.weight * x for t, x in zip(total, out)]
    return tuple(total)


def _type_losses_and_grads(a, b, beta, loss_type, label_smoothing, chosen_lengths, rejected_lengths):
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
    loss_type = loss_spec(loss_type, loss_weights)
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
    parts = parse_spec(loss_type)
    averaged = [c.loss_type in AVERAGED_LOSS_TYPES for c in parts]
    if any(averaged):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type={loss_type!r} includes a type defined on per-token log-ratios (ipo, as in "
                             "dpo_fast.loss): pass chosen_lengths and rejected_lengths (scored tokens per response) "
                             "with the summed log-probs")
        a_tok, b_tok = a / chosen_lengths.to(a.dtype).clamp(min=1), b / rejected_lengths.to(b.dtype).clamp(min=1)
    losses = None
    for c, per_token in zip(parts, averaged):  # each type on its own kind of log-ratio, as sequence_objective
        x, y = (a_tok, b_tok) if per_token else (a, b)
        part = c.weight * _PairLoss.apply(x, y, chosen_lengths, rejected_lengths, float(beta), c.loss_type,
                                          float(label_smoothing))
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

    average_log_prob: use per-token log-ratios (IPO); a mixture spec (several types) computes
    each type on its own kind ('ipo' per token, the others summed) and average_log_prob only
    decides the rewards. sft_weight: add sft_weight times the mean per-token NLL of the chosen
    responses (RPO)."""
    P = logps.shape[0] // 2
    per_token = 1.0 / counts.float().clamp(min=1)
    parts = parse_spec(loss_type)
    losses = grad = None
    for c in parts:
        averaged = average_log_prob if len(parts) == 1 else c.loss_type in AVERAGED_LOSS_TYPES
        ratio = log_ratios(logps, counts, ref_logps, averaged)
        part, d_chosen, d_rejected = pair_losses_and_grads(
            ratio[:P], ratio[P:], beta=beta, loss_type=c.loss_type, label_smoothing=label_smoothing,
            chosen_lengths=counts[:P].float(), rejected_lengths=counts[P:].float())
        g = torch.cat([d_chosen, d_rejected]) / P
        if averaged:
            g = g * per_token
        if c.weight != 1.0:
            part, g = c.weight * part, c.weight * g
        losses, grad = (part, g) if losses is None else (losses + part, grad + g)
    loss = losses.mean()
    if sft_weight != 0.0:
        loss = loss - sft_weight * (logps[:P].float() * per_token[:P]).mean()
        grad = grad - sft_weight * torch.cat([per_token[:P], torch.zeros_like(per_token[P:])]) / P
    ratio = log_ratios(logps, counts, ref_logps, average_log_prob)
    return SequenceObjective(loss, losses, grad, beta * ratio[:P], beta * ratio[P:])


class RankingObjective(NamedTuple):
    loss: Tensor  # scalar
    losses: Tensor  # (P,)
    grad_logps: Tensor  # (K*P,) d loss / d logps
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
    loss = losses.mean()
    if sft_weight != 0.0:
        per_token = 1.0 / counts[:P].float().clamp(min=1)
        loss = loss - sft_weight * (logps[:P].float() * per_token).mean()
        grad = grad - sft_weight * torch.cat([per_token, torch.zeros_like(grad[P:])]) / P
    return RankingObjective(loss, losses, grad, r)
