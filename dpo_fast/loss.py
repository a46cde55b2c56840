"""`dpo_fast.loss`: the one call to swap into a DPO training step, and its nn.Module form `DPOLoss`.

From logits, the loss is fused end to end: one pass computes per-token log-sum-exp and target
logits, the loss and d loss / d logps follow in closed form on the device, and a second pass
writes d loss / d logits (into a buffer, or into the logits' storage with inplace_backward);
backward only scales by grad_output. From hidden states and the lm_head weight (hidden=,
weight=), logits never exist: see dpo_fast.ops.linear.

The settings (beta, loss type or mixture, ...) are one LossSettings, made once: `loss(...)` makes it
from its keywords, `DPOLoss` holds one; both end in `loss_with_settings`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import ops, ranking, tensor_parallel
from .functional import hidden_logprobs, packed_token_seq, prepare_logits_call
from .loss_settings import LossSettings
from .objectives import log_ratios, loss_dtype, sequence_objective, surrogate
from .ops.linear_loss import linear_dpo_loss
from .targets import Layout, check_form, check_linear_inputs


class DPOOutput(NamedTuple):
    loss: Tensor  # scalar, differentiable
    losses: Tensor  # (P,) per pair, detached
    chosen_logps: Tensor  # (P,) summed log-probs of the policy, detached
    rejected_logps: Tensor
    chosen_rewards: Tensor  # (P,) beta * log-ratio, detached
    rejected_rewards: Tensor
    metrics: dict  # TRL names -> detached 0-dim tensors


# The metrics of dpo_fast.loss, with TRL's names where TRL has one; the trainer logs ("loss",) +
# METRIC_NAMES. loss = loss/preference + sft_weight * loss/sft. rewards/accuracies counts strict
# wins (as TRL); rewards/ties the pairs whose rewards are exactly equal (at step 0 a reference
# computed in the same forward as the policy ties every pair).
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/ties", "rewards/margins",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "loss/preference", "loss/sft")


def _metrics(logps, counts, logit_sums, vocab, chosen_rewards, rejected_rewards, losses) -> dict:
    """In the dtype of logps (float64 for float64 inputs, else float32)."""
    P = logps.shape[0] // 2
    dt = logps.dtype
    scored_logits = (counts * vocab).clamp(min=1).to(dt)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(dt).mean(),
        "rewards/ties": (chosen_rewards == rejected_rewards).to(dt).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": logps[:P].mean(),
        "logps/rejected": logps[P:].mean(),
        "logits/chosen": logit_sums[:P].sum() / scored_logits[:P].sum(),
        "logits/rejected": logit_sums[P:].sum() / scored_logits[P:].sum(),
        "loss/preference": losses.to(dt).mean(),
        "loss/sft": (-logps[:P] / counts[:P].to(dt).clamp(min=1)).mean(),
    }
    assert tuple(metrics) == METRIC_NAMES
    return metrics


def _reference_logps(ref_chosen_logps, ref_rejected_logps, P: int, like: Tensor) -> Tensor | None:
    """(2P,) reference log-probs in the loss dtype, still attached to autograd (their gradient is
    the negative of the preference part of the policy's), or None (reference-free)."""
    if ref_chosen_logps is None and ref_rejected_logps is None:
        return None
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
        if tuple(t.shape) != (P,):
            raise ValueError(f"{name} must have shape ({P},) (one value per pair), got {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the inputs are on {like.device}")
    return torch.cat([ref_chosen_logps, ref_rejected_logps]).to(loss_dtype(like))


def _pairs(num_sequences: int) -> int:
    if num_sequences % 2:
        raise ValueError(f"the batch must hold 2P sequences, chosen rows first then rejected rows; "
                         f"got an odd number ({num_sequences})")
    return num_sequences // 2


def loss(
    logits: Tensor | None = None,
    labels: Tensor | None = None,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    hidden: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    logit_softcap: float | None = None,
    beta: float = 0.1,
    loss_type="sigmoid",
    loss_weights=None,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    average_log_prob: bool | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
    inplace_backward: bool = False,
    logits_memory_mb: float | None = None,
    backend: str = "auto",
) -> DPOOutput:
    """DPO-family loss of a batch of 2P sequences: P chosen rows, then P rejected rows.

    Give either `logits` (2P, T, V), or `hidden` (2P, T, H) with the lm_head `weight` (V, H)
    (and `bias`, `logit_softcap`): then logits are never built. `labels` (2P, T), with
    ignore_index on prompt and padding; `shift` as in Hugging Face models. Packed batches:
    (1, N, ...) inputs with `sequence_ids` numbering chosen sequences 0..P-1 and rejected ones
    P..2P-1, and `num_sequences` = 2P. Reference log-probs (P,) each, or none for a
    reference-free loss; reference log-probs that require grad get their gradient (as
    dpo_fast.preference_loss gives it). `sft_weight` adds the chosen responses' per-token NLL (RPO).
    `average_log_prob` (default: True for 'ipo' only) uses per-token log-ratios.
    Mixtures as TRL's: `loss_type=("sigmoid", "bco_pair"), loss_weights=(0.8, 0.2)` is the weighted
    sum of the types' losses (weights default to 1), each on its own log-ratios ('ipo' per token,
    the others summed; average_log_prob then stays unset), still fused end to end.
    `inplace_backward` (logits form, eager) overwrites the logits with their gradient during
    backward: the caller gives the logits up (a second backward, or another op that still needs
    them, raises rather than reading the gradient).
    Tensor parallelism: `weight` (and `bias`) a DTensor placed Shard(0) over the vocabulary, or a
    dpo_fast.VocabShard; `hidden` the same plain tensor on every rank (dpo_fast.tensor_parallel).
    Float64 inputs compute and return float64 (loss, log-probs, rewards, metrics); others float32.

    `logits_memory_mb` (hidden form; None = never hold logits): megabytes (10^6 bytes) the loss
    may spend on logits to skip their recompute: 3 GEMM passes instead of 4, the gradients computed
    in the forward (dpo_fast.ops.linear_loss). The batch is walked in chunks of whole pairs (chosen
    and rejected together); one pair costs its scored tokens x V x the element size of `hidden`, at
    most 2 x T x V x that (padded; 2 x 512 x 128256 float32 logits are 525 MB). A pair that does not
    fit takes the O(tokens) path, with no error; 'bco_pair' (its batch mean couples the pairs)
    always does. Results equal those without a budget to float rounding. Besides the budget: the
    gradients (dH, dW, db), computed in the forward and held until backward, and with a soft-cap a
    scratch of at most 32 MiB. A budget larger than the device can hold is the caller's call: it is
    allocated, not checked.
    """
    settings = LossSettings.make(beta=beta, loss_type=loss_type, loss_weights=loss_weights,
                                 label_smoothing=label_smoothing, sft_weight=sft_weight,
                                 average_log_prob=average_log_prob, logits_memory_mb=logits_memory_mb, backend=backend)
    return loss_with_settings(settings, logits, labels, ref_chosen_logps, ref_rejected_logps, hidden=hidden,
                              weight=weight, bias=bias, logit_softcap=logit_softcap,
                              layout=Layout(ignore_index, shift, sequence_ids, num_sequences),
                              inplace_backward=inplace_backward)


def loss_with_settings(settings: LossSettings, logits, labels, ref_chosen_logps=None, ref_rejected_logps=None, *,
                       hidden=None, weight=None, bias=None, logit_softcap=None, layout: Layout = Layout(),
                       inplace_backward: bool = False) -> DPOOutput:
    """dpo_fast.loss with its settings made: what DPOLoss and dpo_fast.loss both call."""
    check_form(logits, labels, hidden, weight, bias, logit_softcap)
    refs = (ref_chosen_logps, ref_rejected_logps)
    if logits is not None:
        if settings.logits_memory_mb is not None:
            raise ValueError("logits_memory_mb goes with hidden=..., weight=...: with logits=... the logits "
                             "already exist")
        return _loss_from_logits(settings, logits, labels, refs, layout, inplace_backward)
    if inplace_backward:
        raise ValueError("inplace_backward=True applies to the logits form; with hidden= and weight= no logits "
                         "exist to give up (the hidden-state form is already O(tokens) in memory)")
    if settings.logits_memory_mb is not None:
        return _loss_under_budget(settings, hidden, weight, bias, logit_softcap, labels, refs, layout)
    return _loss_from_hidden(settings, hidden, weight, bias, logit_softcap, labels, refs, layout)


def _loss_from_logits(settings, logits, labels, refs, layout, inplace_backward) -> DPOOutput:
    logits, tg, backend = prepare_logits_call(logits, labels, backend=settings.backend, **layout._asdict())
    ref = _reference_logps(*refs, _pairs(tg.num_sequences), logits)
    detached = None if ref is None else ref.detach()
    args = (tg.targets, packed_token_seq(tg, layout.sequence_ids), tg.counts, detached)
    needs_grad = logits.requires_grad and torch.is_grad_enabled()
    if inplace_backward and needs_grad and not torch.compiler.is_compiling():
        total, losses, logps, logit_sums = ops.dpo_loss.InplaceDPOLoss.apply(logits, *args, settings, backend)
    else:
        total, losses, logps, logit_sums, _ = torch.ops.dpo_fast.dpo_loss(logits, *args, *settings.op_args(),
                                                                          needs_grad, backend)
    return _output(settings, total, losses, logps, tg.counts, ref, logit_sums, logits.shape[-1])


def _loss_under_budget(settings, hidden, weight, bias, logit_softcap, labels, refs, layout) -> DPOOutput:
    """3 GEMM passes, logits of whole pairs held within settings.logits_memory_mb."""
    if tensor_parallel.is_sharded(weight):
        raise ValueError("logits_memory_mb is not supported with a vocabulary-sharded weight yet; leave it unset")
    check_linear_inputs(hidden, weight, labels, bias=bias, logit_softcap=logit_softcap,
                        sequence_ids=layout.sequence_ids, num_sequences=layout.num_sequences)
    tg = layout.targets(labels)
    ref = _reference_logps(*refs, _pairs(tg.num_sequences), hidden)
    total, losses, logps, logit_sums = linear_dpo_loss(hidden, weight, bias, logit_softcap, tg,
                                                       None if ref is None else ref.detach(), settings)
    return _output(settings, total, losses, logps, tg.counts, ref, logit_sums, weight.shape[0])


def _loss_from_hidden(settings, hidden, weight, bias, logit_softcap, labels, refs, layout) -> DPOOutput:
    def prepare():
        tg = layout.targets(labels)
        return tg, _reference_logps(*refs, _pairs(tg.num_sequences), hidden)

    (tg, ref), vocab, logps, logit_sums = hidden_logprobs(
        hidden, weight, bias, logit_softcap, labels, prepare, sequence_ids=layout.sequence_ids,
        num_sequences=layout.num_sequences, backend=settings.backend)
    obj = sequence_objective(logps.detach(), tg.counts, None if ref is None else ref.detach(), settings)
    total = surrogate(obj.loss, obj.grad_logps, logps)
    return _output(settings, total, obj.losses, logps, tg.counts, ref, logit_sums, vocab, obj)


def _output(settings, total, losses, logps, counts, ref, logit_sums, vocab, obj=None) -> DPOOutput:
    """Rewards and metrics from the detached per-sequence values; the reference's gradient
    (closed form) joins the loss when the reference log-probs require grad."""
    if ref is not None and ref.requires_grad and torch.is_grad_enabled():
        if obj is None:
            obj = sequence_objective(logps.detach(), counts, ref.detach(), settings)
        total = surrogate(total, obj.grad_ref_logps, ref)
    with torch.no_grad():
        logps = logps.detach().to(loss_dtype(logps))
        ratio = log_ratios(logps, counts, None if ref is None else ref.detach(), settings.per_token)
        P = logps.shape[0] // 2
        chosen_rewards, rejected_rewards = settings.beta * ratio[:P], settings.beta * ratio[P:]
        metrics = _metrics(logps, counts, logit_sums.to(logps.dtype), vocab, chosen_rewards, rejected_rewards,
                           losses)
    return DPOOutput(total, losses.detach(), logps[:P], logps[P:], chosen_rewards, rejected_rewards, metrics)


class DPOLoss(nn.Module):
    """nn.Module form of dpo_fast.loss, holding one LossSettings: DPOLoss(settings) or
    DPOLoss(beta=..., loss_type=..., ...) with dpo_fast.loss's keywords. Call it with logits=... or
    hidden=..., weight=... (and the reference log-probs); `ranking(...)` computes ranking_loss
    with the same settings. A module whose settings hold logits_memory_mb refuses logits."""

    def __init__(self, settings: LossSettings | None = None, *, ignore_index: int = -100, shift: bool = True,
                 inplace_backward: bool = False, **keywords):
        super().__init__()
        if settings is None:
            settings = LossSettings.make(**keywords)
        elif not isinstance(settings, LossSettings):
            raise TypeError(f"settings must be a dpo_fast.LossSettings, got {type(settings).__name__}; pass the "
                            "loss options as keywords (beta=..., loss_type=...)")
        elif keywords:
            raise ValueError(f"give settings or keywords ({', '.join(sorted(keywords))}), not both")
        self.settings = settings
        self.ignore_index, self.shift, self.inplace_backward = ignore_index, shift, inplace_backward

    def forward(self, logits=None, labels=None, ref_chosen_logps=None, ref_rejected_logps=None, *, hidden=None,
                weight=None, bias=None, logit_softcap=None, sequence_ids=None, num_sequences=None) -> DPOOutput:
        return loss_with_settings(self.settings, logits, labels, ref_chosen_logps, ref_rejected_logps, hidden=hidden,
                                  weight=weight, bias=bias, logit_softcap=logit_softcap,
                                  layout=Layout(self.ignore_index, self.shift, sequence_ids, num_sequences),
                                  inplace_backward=self.inplace_backward)

    def ranking(self, logits=None, labels=None, ref_logps=None, *, num_responses: int, hidden=None, weight=None,
                bias=None, logit_softcap=None, sequence_ids=None, num_sequences=None) -> ranking.RankingOutput:
        """ranking_loss (Plackett-Luce over K ranked responses) with this module's settings."""
        return ranking.ranking_with_settings(
            self.settings, logits, labels, ref_logps, num_responses=num_responses, hidden=hidden, weight=weight,
            bias=bias, logit_softcap=logit_softcap,
            layout=Layout(self.ignore_index, self.shift, sequence_ids, num_sequences))

    def extra_repr(self) -> str:
        defaults = LossSettings()
        shown = {"beta": self.settings.beta, "loss_type": self.settings.spec}
        for name in ("label_smoothing", "sft_weight", "average_log_prob", "logits_memory_mb", "backend"):
            if getattr(self.settings, name) != getattr(defaults, name):
                shown[name] = getattr(self.settings, name)
        if self.inplace_backward:
            shown["inplace_backward"] = True
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())
