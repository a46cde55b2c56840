"""The SFT model (= the reference): a tiny Llama trained by plain maximum likelihood on reviews of
the task's language, and the small optimisation loop that the baselines share with it.

The loop mirrors the project trainer's defaults where they matter for a fair comparison: AdamW
without weight decay, gradient norm clipped to 1, a linear warmup then a constant learning rate
(optionally a linear decay, used for SFT from random weights), batches drawn from a seeded
permutation per epoch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from .sampling import encode_batch, token_logprobs
from .task import build_task_tokenizer


def optimize(model, num_examples: int, loss_fn: Callable[[list[int]], torch.Tensor], *, steps: int,
             batch_size: int, learning_rate: float, warmup_steps: int, seed: int, decay: bool = False,
             on_step: Callable[[int], None] | None = None) -> list[float]:
    """`steps` AdamW steps of `loss_fn(indices of a batch)`; returns the loss of every step.
    `on_step(step)` runs after each step (1-based), e.g. to evaluate checkpoints along the way."""
    if num_examples < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the data ({num_examples} examples)")
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)

    def factor(s: int) -> float:  # the trainer's warmup (lr_factor): (s + 1) / (warmup + 1)
        warm = (s + 1) / (warmup_steps + 1) if s < warmup_steps else 1.0
        return warm * (max(0.0, 1.0 - s / steps) if decay else 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    order: list[int] = []
    losses = []
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            perm = list(range(num_examples))
            rng.shuffle(perm)
            order = perm
        indices, order = order[:batch_size], order[batch_size:]
        loss = loss_fn(indices)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step)
    model.eval()
    return losses


def mean_nll(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Mean negative log-likelihood per completion token of the batch (the fused op, no logits)."""
    logps, _ = token_logprobs(model, encode_batch(prompts, completions, pad_id))
    return -logps.mean()


def review_ids(tokenizer, reviews: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, completions) for language modelling whole reviews: prompt = [BOS], completion = the
    review's ids + EOS (the same framing the trainer gives a prompt + completion)."""
    ids = tokenizer(list(reviews), add_special_tokens=False)["input_ids"]
    return [[tokenizer.bos_token_id]] * len(ids), [list(r) + [tokenizer.eos_token_id] for r in ids]


def train_sft(reviews: Sequence[str], held_out: Sequence[str], *, steps: int, batch_size: int = 64,
              learning_rate: float = 3e-3, seed: int = 0, hidden_size: int = 64, layers: int = 2, heads: int = 4):
    """Build the tokenizer and a tiny Llama and fit it to `reviews` by maximum likelihood.
    Returns (model, tokenizer, {"train_nll", "held_out_nll"} per token)."""
    from ..tiny import build_tiny_model

    tokenizer = build_task_tokenizer()
    model = build_tiny_model(len(tokenizer), hidden_size=hidden_size, layers=layers, heads=heads,
                             tokenizer=tokenizer, seed=seed)
    prompts, completions = review_ids(tokenizer, reviews)
    pad = tokenizer.pad_token_id
    losses = optimize(model, len(completions),
                      lambda idx: mean_nll(model, [prompts[i] for i in idx], [completions[i] for i in idx], pad),
                      steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                      warmup_steps=max(1, steps // 20), seed=seed, decay=True)
    hp, hc = review_ids(tokenizer, held_out)
    with torch.no_grad():
        held = float(mean_nll(model, hp, hc, pad))
    tail = losses[-max(1, steps // 10):]
    return model, tokenizer, {"train_nll": sum(tail) / len(tail), "held_out_nll": held}
