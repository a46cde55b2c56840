"""`dpo_fast.loss`: the one call to swap into a DPO training step, and its nn.Module form.

From logits, the loss is fused end to end: one pass computes per-token log-sum-exp and target
logits, the loss and d loss / d logps follow in closed form on the device, and a second pass
writes d loss / d logits (into a buffer, or into the logits' storage with inplace_backward);
backward only scales by grad_output. From hidden states and the lm_head weight (hidden=,
weight=), logits never exist: see dpo_fast.ops.linear.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import ops, tensor_parallel
from .functional import linear_logprobs_with_stats, packed_token_seq, prepare_logits_call
from .objectives import (as_number, check_loss_args, default_average_log_prob, log_ratios, loss_spec, parse_spec,
                         sequence_objective)
from .ops.linear_loss import check_logits_memory_mb, linear_dpo_loss
from .targets import check_linear_inputs, prepare_targets


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
    P = logps.shape[0] // 2
    scored_logits = (counts * vocab).clamp(min=1)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/ties": (chosen_rewards == rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": logps[:P].mean(),
        "logps/rejected": logps[P:].mean(),
        "logits/chosen": logit_sums[:P].sum() / scored_logits[:P].sum(),
        "logits/rejected": logit_sums[P:].sum() / scored_logits[P:].sum(),
        "loss/preference": losses.float().mean(),
        "loss/sft": (-logps[:P] / counts[:P].float().clamp(min=1)).mean(),
    }
    assert tuple(metrics) == METRIC_NAMES
    return metrics


def _reference_logps(ref_chosen_logps, ref_rejected_logps, P: int, device) -> Tensor | None:
    if ref_chosen_logps is None and ref_rejected_logps is None:
        return None  # reference-free
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
        if tuple(t.shape) != (P,):
            raise ValueError(f"{name} must have shape ({P},) (one value per pair), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
    return torch.cat([ref_chosen_logps, ref_rejected_logps]).detach().float()


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
    reference-free loss. `sft_weight` adds the chosen responses' per-token NLL (RPO).
    `average_log_prob` (default: True for 'ipo' only) uses per-token log-ratios.
    Mixtures as TRL's: `loss_type=("sigmoid", "bco_pair"), loss_weights=(0.8, 0.2)` is the weighted
    sum of the types' losses (weights default to 1), each on its own log-ratios ('ipo' per token,
    the others summed; average_log_prob then stays unset), still fused end to end.
    `inplace_backward` (logits form, eager) overwrites the logits with their gradient during
    backward: the caller gives the logits up (a second backward, or another op that still needs
    them, raises rather than reading the gradient).
    Tensor parallelism: `weight` (and `bias`) a DTensor placed Shard(0) over the vocabulary, or a
    dpo_fast.VocabShard; `hidden` the same plain tensor on every rank (dpo_fast.tensor_parallel).

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
    loss_type = loss_spec(loss_type, loss_weights)
    beta, label_smoothing = check_loss_args(loss_type, beta, label_smoothing)
    if average_log_prob is not None and len(parse_spec(loss_type)) > 1:
        raise ValueError("average_log_prob applies to a single loss type; in a mixture each type uses its own "
                         "log-ratios (ipo per token, the others summed): leave it unset")
    sft_weight = as_number(sft_weight, "sft_weight")
    if not (sft_weight >= 0 and math.isfinite(sft_weight)):
        raise ValueError(f"sft_weight must be a finite number >= 0 (the weight of the chosen NLL), got {sft_weight!r}")
    check_logits_memory_mb(logits_memory_mb)
    if labels is None:
        raise ValueError("labels are required")
    if average_log_prob is None:
        average_log_prob = default_average_log_prob(loss_type)
    cfg = dict(beta=float(beta), loss_type=loss_type, label_smoothing=float(label_smoothing),
               sft_weight=float(sft_weight), average_log_prob=bool(average_log_prob))

    if (logits is None) == (hidden is None):
        raise ValueError("give either logits=... or hidden=... with weight=..., not both or neither")
    if logits is not None:
        if weight is not None or bias is not None or logit_softcap is not None:
            raise ValueError("weight, bias and logit_softcap go with hidden=..., not with logits")
        if logits_memory_mb is not None:
            raise ValueError("logits_memory_mb goes with hidden=..., weight=...: with logits=... the logits "
                             "already exist")
        return _loss_from_logits(logits, labels, ref_chosen_logps, ref_rejected_logps, cfg, ignore_index,
                                 shift, sequence_ids, num_sequences, inplace_backward, backend)
    if weight is None:
        raise ValueError("hidden=... needs the lm_head weight=... (V, H)")
    if inplace_backward:
        raise ValueError("inplace_backward=True applies to the logits form; with hidden= and weight= no logits "
                         "exist to give up (the hidden-state form is already O(tokens) in memory)")
    return _loss_from_hidden(hidden, weight, bias, logit_softcap, labels, ref_chosen_logps, ref_rejected_logps,
                             cfg, ignore_index, shift, sequence_ids, num_sequences, backend, logits_memory_mb)


def _loss_from_logits(logits, labels, ref_c, ref_r, cfg, ignore_index, shift, sequence_ids, num_sequences,
                      inplace_backward, backend) -> DPOOutput:
    logits, tg, backend = prepare_logits_call(logits, labels, ignore_index=ignore_index, shift=shift,
                                              sequence_ids=sequence_ids, num_sequences=num_sequences,
                                              backend=backend)
    P = _pairs(tg.num_sequences)
    ref = _reference_logps(ref_c, ref_r, P, logits.device)
    args = (tg.targets, packed_token_seq(tg, sequence_ids), tg.counts, ref, cfg["beta"], cfg["loss_type"],
            cfg["label_smoothing"], cfg["sft_weight"], cfg["average_log_prob"])
    needs_grad = logits.requires_grad and torch.is_grad_enabled()
    if inplace_backward and needs_grad and not torch.compiler.is_compiling():
        total, losses, logps, logit_sums = ops.dpo_loss.InplaceDPOLoss.apply(logits, *args, backend)
    else:
        total, losses, logps, logit_sums, _ = torch.ops.dpo_fast.dpo_loss(logits, *args, needs_grad, backend)
    return _output(total, losses, logps, tg.counts, ref, logit_sums, logits.shape[-1], cfg)


def _output(total, losses, logps, counts, ref, logit_sums, vocab, cfg) -> DPOOutput:
    """Rewards and metrics from the detached per-sequence values."""
    with torch.no_grad():
        logps = logps.detach().float()
        ratio = log_ratios(logps, counts, ref, cfg["average_log_prob"])
        P = logps.shape[0] // 2
        chosen_rewards, rejected_rewards = cfg["beta"] * ratio[:P], cfg["beta"] * ratio[P:]
        metrics = _metrics(logps, counts, logit_sums.float(), vocab, chosen_rewards, rejected_rewards, losses)
    return DPOOutput(total, losses.detach(), logps[:P], logps[P:], chosen_rewards, rejected_rewards, metrics)


def hidden_logprobs(hidden, weight, bias, logit_softcap, labels, prepare, *, sequence_ids, num_sequences,
                    backend) -> tuple[tuple, int, Tensor, Tensor]:
    """(prepare(), V, logps, logit_sums) of the hidden form: per-sequence log-probs (differentiable)
    through the fused lm_head op, vocabulary-sharded or not; prepare() -> (targets, ...) runs after
    the input checks (on every rank alike when sharded)."""
    if tensor_parallel.is_sharded(weight):  # checks and prepare() agreed on by every rank first
        return tensor_parallel.sharded_logprobs(hidden, weight, bias, labels, prepare, logit_softcap=logit_softcap,
                                                sequence_ids=sequence_ids, num_sequences=num_sequences,
                                                backend=backend)
    check_linear_inputs(hidden, weight, labels, bias=bias, logit_softcap=logit_softcap,
                        sequence_ids=sequence_ids, num_sequences=num_sequences)
    prepared = prepare()
    tg = prepared[0]
    logps, logit_sums = linear_logprobs_with_stats(hidden, weight, tg.targets, tg.token_seq, tg.num_sequences,
                                                   bias=bias, logit_softcap=logit_softcap, backend=backend)
    return prepared, weight.shape[0], logps, logit_sums


def surrogate(value: Tensor, grad_logps: Tensor, logps: Tensor) -> Tensor:
    """A closed-form gradient entering autograd: a tensor whose value is `value` and whose
    derivative in logps is grad_logps (one formula per objective, in objectives.py)."""
    return value + (grad_logps * (logps.float() - logps.detach().float())).sum()


def _loss_from_hidden(hidden, weight, bias, logit_softcap, labels, ref_c, ref_r, cfg, ignore_index, shift,
                      sequence_ids, num_sequences, backend, logits_memory_mb=None) -> DPOOutput:
    def prepare():
        tg = prepare_targets(labels, ignore_index=ignore_index, shift=shift,
                             sequence_ids=sequence_ids, num_sequences=num_sequences)
        return tg, _reference_logps(ref_c, ref_r, _pairs(tg.num_sequences), hidden.device)

    if logits_memory_mb is not None:  # 3 GEMM passes, logits of whole pairs held within the budget
        if tensor_parallel.is_sharded(weight):
            raise ValueError("logits_memory_mb is not supported with a vocabulary-sharded weight yet; leave it unset")
        check_linear_inputs(hidden, weight, labels, bias=bias, logit_softcap=logit_softcap,
                            sequence_ids=sequence_ids, num_sequences=num_sequences)
        tg, ref = prepare()
        total, losses, logps, logit_sums = linear_dpo_loss(hidden, weight, bias, logit_softcap, tg, ref, cfg,
                                                           logits_memory_mb, backend)
        return _output(total, losses, logps, tg.counts, ref, logit_sums, weight.shape[0], cfg)
    (tg, ref), vocab, logps, logit_sums = hidden_logprobs(hidden, weight, bias, logit_softcap, labels, prepare,
                                                          sequence_ids=sequence_ids, num_sequences=num_sequences,
                                                          backend=backend)
    obj = sequence_objective(logps.detach(), tg.counts, ref, **cfg)
    total = surrogate(obj.loss, obj.grad_logps, logps)
    return _output(total, obj.losses, logps, tg.counts, ref, logit_sums, vocab, cfg)


class DPOLoss(nn.Module):
    """nn.Module form of dpo_fast.loss; call it with logits=... or hidden=..., weight=....
    `logits_memory_mb` applies to the hidden form; a module given one refuses logits."""

    def __init__(self, beta: float = 0.1, loss_type="sigmoid", label_smoothing: float = 0.0,
                 sft_weight: float = 0.0, average_log_prob: bool | None = None, ignore_index: int = -100,
                 shift: bool = True, inplace_backward: bool = False, logits_memory_mb: float | None = None,
                 backend: str = "auto", loss_weights=None):
        super().__init__()
        loss_type = loss_spec(loss_type, loss_weights)
        check_loss_args(loss_type, beta, label_smoothing)
        check_logits_memory_mb(logits_memory_mb)
        self.options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, sft_weight=sft_weight,
                            average_log_prob=average_log_prob, ignore_index=ignore_index, shift=shift,
                            backend=backend)
        self.inplace_backward = inplace_backward
        self.logits_memory_mb = logits_memory_mb  # hidden form only (loss() refuses it with logits)

    def forward(self, logits=None, labels=None, ref_chosen_logps=None, ref_rejected_logps=None, *, hidden=None,
                weight=None, bias=None, logit_softcap=None, sequence_ids=None, num_sequences=None) -> DPOOutput:
        extra = {"logits_memory_mb": self.logits_memory_mb}
        if self.inplace_backward:
            extra["inplace_backward"] = True
        return loss(logits, labels, ref_chosen_logps, ref_rejected_logps, hidden=hidden, weight=weight, bias=bias,
                    logit_softcap=logit_softcap, sequence_ids=sequence_ids, num_sequences=num_sequences,
                    **extra, **self.options)

    def extra_repr(self) -> str:
        extra = {"logits_memory_mb": self.logits_memory_mb} if self.logits_memory_mb is not None else {}
        return ", ".join(f"{k}={v!r}" for k, v in {**self.options, **extra}.items())
