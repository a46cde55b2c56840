"""The paper's two supervised baselines, trained from the SFT model on the same preference pairs:

  Preferred-FT   maximum likelihood on the chosen completions only:
                 loss = mean over chosen tokens of -log pi(y_w,t | x, y_w,<t)
  Unlikelihood   the same, plus a term that pushes every rejected token down (Welleck et al.'s
                 token-level unlikelihood, weighted by alpha):
                 loss = mean over chosen tokens of -log pi(y_w,t | ...)
                        + alpha * mean over rejected tokens of -log(1 - pi(y_l,t | x, y_l,<t))

Both use sft.optimize (AdamW, clipping, warmup, constant rate: the DPO runs' settings), and the
log-probs come from the fused op (sampling.token_logprobs). With a constant rate after warmup, one
trajectory evaluated after s steps is the run with max_steps = s, so each grid of step counts is
one training run, checkpointed in memory by `on_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .sampling import encode_batch, token_logprobs
from .sft import optimize

METHODS = ("preferred_ft", "unlikelihood")
# 1 - p is clamped here before the log, as in the unlikelihood paper's code: a rejected token the
# model is sure of would otherwise give an infinite loss.
MIN_ONE_MINUS_P = 1e-5


def unlikelihood_term(logps: torch.Tensor) -> torch.Tensor:
    """-log(1 - p) per token from log p, with 1 - p clamped at MIN_ONE_MINUS_P."""
    return -torch.log((-torch.expm1(logps)).clamp(min=MIN_ONE_MINUS_P))


def baseline_loss(model, method: str, pairs: Sequence[dict], pad_id: int, alpha: float = 0.0) -> torch.Tensor:
    """The loss of `method` on a batch of tokenized pairs {prompt_ids, chosen_ids, rejected_ids}."""
    prompts = [p["prompt_ids"] for p in pairs]
    chosen, _ = token_logprobs(model, encode_batch(prompts, [p["chosen_ids"] for p in pairs], pad_id))
    loss = -chosen.mean()
    if method == "unlikelihood":
        rejected, _ = token_logprobs(model, encode_batch(prompts, [p["rejected_ids"] for p in pairs], pad_id))
        loss = loss + alpha * unlikelihood_term(rejected).mean()
    elif method != "preferred_ft":
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return loss


def train_baseline(model, method: str, pairs: Sequence[dict], pad_id: int, *, steps: int, batch_size: int,
                   learning_rate: float, warmup_steps: int, seed: int, alpha: float = 0.0,
                   checkpoints: Sequence[int] = (), on_checkpoint: Callable[[int], None] | None = None) -> list[float]:
    """Train `model` in place with `method`; `on_checkpoint(step)` runs at each step in `checkpoints`."""
    if method == "unlikelihood" and not alpha > 0:
        raise ValueError(f"alpha: unlikelihood needs alpha > 0, got {alpha}")
    if any(not 1 <= s <= steps for s in checkpoints):
        raise ValueError(f"checkpoints: expected steps in [1, {steps}], got {list(checkpoints)}")
    marks = set(checkpoints)

    def on_step(step: int) -> None:
        if step in marks and on_checkpoint is not None:
            model.eval()
            on_checkpoint(step)
            model.train()

    return optimize(model, len(pairs), lambda idx: baseline_loss(model, method, [pairs[i] for i in idx], pad_id, alpha),
                    steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=warmup_steps,
                    seed=seed, on_step=on_step)
