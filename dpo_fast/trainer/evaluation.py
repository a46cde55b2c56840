"""Evaluation of a policy against a reference on a whole data set: the trainer's evaluations
(before, every --eval-steps, after) and `dpo-fast eval` run this one loop, so the same model,
reference, data and batch size give the same metrics.

Every example counts once over all ranks; means are exact over the set (sums over examples, and
logits/* over scored tokens x vocabulary with their denominators).
"""

from __future__ import annotations

import math

import torch

from .. import hf
from ..data import batch_completion_tokens
from ..ranking import per_prompt_ranking_stats
from .metrics import Sums, eval_metrics

# Token-level means (over every scored token x vocabulary entry) rather than means over pairs.
_TOKEN_LEVEL = ("logits/chosen", "logits/rejected")


def rows(ds, indices: list[int]) -> list[dict]:
    """Examples of a tokenized data set as dicts (what the collator takes)."""
    cols = ds[indices]
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


class EvalSums:
    """Sums of the eval metrics of pairs (num_responses None) or rankings of K responses."""

    def __init__(self, num_responses: int | None, vocab_size: int, sft_weight: float, device):
        self.ranked = num_responses is not None
        self.names = eval_metrics(num_responses)
        self.count = "prompts" if self.ranked else "pairs"
        self.vocab_size, self.sft_weight = vocab_size, sft_weight
        extra = () if self.ranked else tuple(f"{k}/denominator" for k in _TOKEN_LEVEL)
        self.sums = Sums(self.names + extra + (self.count,), device)

    def add(self, out, batch: dict) -> None:
        """Add every example of a batch's output."""
        tokens = batch_completion_tokens(batch).to(torch.float64)
        per_example = self._ranked(out, tokens) if self.ranked else self._pairs(out, tokens)
        self.sums.add(**{k: v.double().sum() for k, v in per_example.items()},
                      **{self.count: len(batch["example_ids"])})

    def _pairs(self, out, tokens) -> dict:
        P = out.chosen_logps.shape[0]
        sft = -out.chosen_logps.double() / tokens[:P].to(out.chosen_logps.device).clamp(min=1)
        denom = {"logits/chosen": max(float(tokens[:P].sum()) * self.vocab_size, 1.0),
                 "logits/rejected": max(float(tokens[P:].sum()) * self.vocab_size, 1.0)}
        self.sums.add(**{k: out.metrics[k].double() * denom[k] for k in _TOKEN_LEVEL},
                      **{f"{k}/denominator": denom[k] for k in _TOKEN_LEVEL})
        cr, rr = out.chosen_rewards, out.rejected_rewards
        return {
            "loss": out.losses.double() + self.sft_weight * sft, "loss/preference": out.losses, "loss/sft": sft,
            "rewards/chosen": cr, "rewards/rejected": rr, "rewards/accuracies": cr > rr, "rewards/ties": cr == rr,
            "rewards/margins": cr - rr, "logps/chosen": out.chosen_logps, "logps/rejected": out.rejected_logps,
            "logps/accuracies": out.chosen_logps > out.rejected_logps,
        }

    def _ranked(self, out, tokens) -> dict:
        P, K = out.logps.shape
        sft = -out.logps[:, 0].double() / tokens[:P].to(out.logps.device).clamp(min=1)
        per = {"loss": out.losses.double() + self.sft_weight * sft, "loss/preference": out.losses, "loss/sft": sft}
        per.update({f"rewards/rank_{k}": out.rewards[:, k] for k in range(K)})
        per.update(per_prompt_ranking_stats(out.rewards))
        per.update({f"logps/rank_{k}": out.logps[:, k] for k in range(K)})
        per["logps/pairwise_accuracy"] = per_prompt_ranking_stats(out.logps)["rewards/pairwise_accuracy"]
        return per

    def result(self, distributed: bool, replicas: int = 1) -> dict:
        """Means over the whole set from the (all-reduced) sums; `replicas` ranks saw each example
        (the tensor-parallel ranks of a group)."""
        s = self.sums.reduced(distributed)
        count = max(s[self.count], 1.0)
        out = {name: s[name] / (s[f"{name}/denominator"] if name in _TOKEN_LEVEL else count) for name in self.names}
        return out | {self.count: int(s[self.count]) // replicas}


def evaluate(policy, model, ds, references, collator, *, batch_size: int, dist, device, vocab_size: int,
             num_responses: int | None) -> dict:
    """Metrics of the whole tokenized set `ds`: data rank r takes examples r, r + world, ... (the
    tensor-parallel ranks of a group take the same ones); every rank runs the same number of
    forwards (FSDP's and tensor parallelism's are collective): a rank out of examples runs one
    and counts nothing of it."""
    n = len(ds)
    mine = list(range(dist.data_rank, n, dist.data_world))
    n_batches = math.ceil(math.ceil(n / dist.data_world) / batch_size)
    sums = EvalSums(num_responses, vocab_size, policy.loss.settings.sft_weight, device)
    with hf.eval_mode(model), torch.no_grad(), torch.autocast(device.type, enabled=False):
        for b in range(n_batches):
            idx = mine[b * batch_size:(b + 1) * batch_size]
            batch = collator(rows(ds, idx or [0]))
            out = policy(batch, **references(batch, device))
            if idx:
                sums.add(out, batch)
    return sums.result(dist.enabled, replicas=dist.tp)
