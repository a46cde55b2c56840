"""`dpo_fast.ranking_loss`: the Plackett-Luce loss of DPO (appendix A.3) for prompts with K ranked
responses, through the fused ops over all K x P rows.

The per-sequence log-probs come from the same fused ops as dpo_fast.loss (from logits: one stats
pass, the gradient pass in backward; from hidden states and the lm_head weight: logits never
exist). The loss and its gradient in the K x P log-probs are closed-form
(objectives.ranking_objective) and enter autograd through a surrogate, so nothing vocabulary-sized
is kept beyond what the log-prob op keeps.

Rows: row k*P + p holds prompt p with its response k, best first (what
dpo_fast.data.PreferenceCollator gives for ranked data); reference log-probs are (P, K).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .functional import hidden_logprobs, packed_token_seq, prepare_logits_call
from .loss_settings import LossSettings
from .objectives import loss_dtype, ranking_objective, surrogate
from .targets import Layout, check_form


class RankingOutput(NamedTuple):
    loss: Tensor  # scalar, differentiable
    losses: Tensor  # (P,) per prompt, detached
    logps: Tensor  # (P, K) summed log-probs of the policy, best first, detached
    rewards: Tensor  # (P, K) beta * log-ratio, detached
    metrics: dict  # ranking_metric_names(K) -> detached 0-dim tensors


def ranking_metric_names(num_responses: int) -> tuple[str, ...]:
    """The metrics of ranking_loss for K responses: mean reward and log-prob per rank, ranking
    accuracy (prompts whose rewards are strictly in the labelled order), pairwise accuracy (share
    of the K(K-1)/2 ordered pairs of a prompt whose rewards are strictly in order), ties (share
    of pairs with exactly equal rewards), the mean margin between adjacent ranks, the loss parts."""
    ranks = range(num_responses)
    return (*(f"rewards/rank_{k}" for k in ranks), "rewards/ranking_accuracy", "rewards/pairwise_accuracy",
            "rewards/ties", "rewards/margins", *(f"logps/rank_{k}" for k in ranks), "loss/preference", "loss/sft")


def per_prompt_ranking_stats(rewards: Tensor) -> dict[str, Tensor]:
    """(P,) per-prompt values of the rank metrics for rewards (P, K), best first."""
    P, K = rewards.shape
    i, j = torch.triu_indices(K, K, offset=1, device=rewards.device)
    pairs = K * (K - 1) / 2
    dt = rewards.dtype
    wins = (rewards[:, i] > rewards[:, j]).to(dt)
    return {
        "rewards/ranking_accuracy": (rewards[:, :-1] > rewards[:, 1:]).all(1).to(dt),
        "rewards/pairwise_accuracy": wins.sum(1) / pairs,
        "rewards/ties": (rewards[:, i] == rewards[:, j]).to(dt).sum(1) / pairs,
        "rewards/margins": (rewards[:, 0] - rewards[:, -1]) / (K - 1),
    }


def _metrics(logps: Tensor, rewards: Tensor, counts_best: Tensor, losses: Tensor) -> dict:
    K = logps.shape[1]
    metrics = {f"rewards/rank_{k}": rewards[:, k].mean() for k in range(K)}
    metrics.update({k: v.mean() for k, v in per_prompt_ranking_stats(rewards).items()})
    metrics.update({f"logps/rank_{k}": logps[:, k].mean() for k in range(K)})
    metrics["loss/preference"] = losses.mean()
    metrics["loss/sft"] = (-logps[:, 0] / counts_best.to(logps.dtype).clamp(min=1)).mean()
    assert tuple(metrics) == ranking_metric_names(K)
    return metrics


def _check(num_responses, num_sequences: int, ref_logps, device) -> int:
    if isinstance(num_responses, bool) or not isinstance(num_responses, int) or num_responses < 2:
        raise ValueError(f"num_responses must be an int >= 2 (responses per prompt), got {num_responses!r}")
    if num_sequences % num_responses:
        raise ValueError(f"the batch holds {num_sequences} sequences, not a multiple of num_responses="
                         f"{num_responses} (K x P rows: response k of prompt p at row k*P + p)")
    P = num_sequences // num_responses
    if ref_logps is not None:
        if not isinstance(ref_logps, Tensor) or not ref_logps.is_floating_point():
            raise ValueError("ref_logps must be a floating-point tensor (P, K)")
        if tuple(ref_logps.shape) != (P, num_responses):
            raise ValueError(f"ref_logps must have shape ({P}, {num_responses}) (prompts x responses, best first), "
                             f"got {tuple(ref_logps.shape)}")
        if ref_logps.device != device:
            raise ValueError(f"ref_logps is on {ref_logps.device} but the inputs are on {device}")
    return P


def ranking_loss(
    logits: Tensor | None = None,
    labels: Tensor | None = None,
    ref_logps: Tensor | None = None,
    *,
    num_responses: int,
    hidden: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    logit_softcap: float | None = None,
    beta: float = 0.1,
    sft_weight: float = 0.0,
    ignore_index: int = -100,
    shift: bool = True,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
    backend: str = "auto",
) -> RankingOutput:
    """Plackett-Luce loss of a batch of K x P sequences: row k*P + p is prompt p with its k-th best
    response. Give `logits` (K*P, T, V), or `hidden` (K*P, T, H) with the lm_head `weight` (and
    `bias`, `logit_softcap`; also vocabulary-sharded, as dpo_fast.loss). `labels`, `shift`,
    `ignore_index` and packed batches (`sequence_ids`, `num_sequences`) as dpo_fast.loss.
    `ref_logps` (P, K) or None (reference-free). With r = beta (logps - ref) per prompt:
        loss = -sum_k [r_k - log sum_{j>=k} exp(r_j)]   (mean over prompts)
    K = 2 is dpo_fast.loss with loss_type='sigmoid'. `sft_weight` adds the best responses'
    per-token NLL (RPO)."""
    settings = LossSettings(beta=beta, sft_weight=sft_weight, backend=backend)
    return ranking_with_settings(settings, logits, labels, ref_logps, num_responses=num_responses, hidden=hidden,
                                 weight=weight, bias=bias, logit_softcap=logit_softcap,
                                 layout=Layout(ignore_index, shift, sequence_ids, num_sequences))


def ranking_with_settings(settings: LossSettings, logits, labels, ref_logps=None, *, num_responses: int, hidden=None,
                          weight=None, bias=None, logit_softcap=None, layout: Layout = Layout()) -> RankingOutput:
    """ranking_loss with its settings made (DPOLoss.ranking): beta, sft_weight and backend apply;
    the pair-loss settings (a loss type other than sigmoid, label smoothing, a logits budget) are refused."""
    if settings.spec != "sigmoid" or settings.label_smoothing or settings.average_log_prob is not None:
        raise ValueError(f"ranking_loss is the Plackett-Luce loss (sigmoid generalised to K responses): loss_type "
                         f"{settings.spec!r}, label_smoothing and average_log_prob do not apply; leave them unset")
    if settings.logits_memory_mb is not None:
        raise ValueError("logits_memory_mb is not supported by ranking_loss yet; leave it unset")
    check_form(logits, labels, hidden, weight, bias, logit_softcap)
    if logits is not None:
        logits, tg, backend = prepare_logits_call(logits, labels, backend=settings.backend, **layout._asdict())
        P = _check(num_responses, tg.num_sequences, ref_logps, logits.device)
        logps, _, logit_sums = torch.ops.dpo_fast.sequence_logprobs(
            logits, tg.targets, packed_token_seq(tg, layout.sequence_ids), tg.num_sequences, backend)
    else:
        def prepare():
            tg = layout.targets(labels)
            return tg, _check(num_responses, tg.num_sequences, ref_logps, hidden.device)

        (tg, P), _, logps, logit_sums = hidden_logprobs(
            hidden, weight, bias, logit_softcap, labels, prepare, sequence_ids=layout.sequence_ids,
            num_sequences=layout.num_sequences, backend=settings.backend)
    dt = loss_dtype(logps)
    ref = None if ref_logps is None else ref_logps.to(dt).T.reshape(-1)
    obj = ranking_objective(logps.detach(), tg.counts, None if ref is None else ref.detach(),
                            num_responses=num_responses, beta=settings.beta, sft_weight=settings.sft_weight)
    total = surrogate(obj.loss, obj.grad_logps, logps)
    if ref is not None:
        total = surrogate(total, obj.grad_ref_logps, ref)
    with torch.no_grad():
        by_rank = logps.detach().to(dt).view(num_responses, P).T
        metrics = _metrics(by_rank, obj.rewards, tg.counts[:P], obj.losses)
    return RankingOutput(total, obj.losses.detach(), by_rank, obj.rewards.detach(), metrics)
