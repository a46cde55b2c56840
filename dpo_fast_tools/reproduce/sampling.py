"""Sampling completions, their log-probs under a model (the fused op, no logits), and the estimates
of reward and KL(pi || pi_ref) that every point of the frontier is made of.

Sampling is ancestral at temperature 1 with no top-k / top-p, so the samples come from pi itself
and the sequence-level KL estimator below is unbiased:

    KL(pi || pi_ref)(x) = E_{y ~ pi(.|x)} [ log pi(y|x) - log pi_ref(y|x) ]
    estimate: mean over samples of sum over completion tokens (EOS included) of
              log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)

A completion that reaches `max_new_tokens` without EOS is cut there; the estimate is then the KL
of that cut process (the cut is the same deterministic rule for both models). Standard errors
treat prompts as the independent units: the per-prompt means of the k samples of each prompt, their
standard deviation over the n prompts, divided by sqrt(n).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from dpo_fast import linear_sequence_logprobs

IGNORE_INDEX = -100


def encode_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> dict:
    """Right-padded (input_ids, attention_mask, labels) for prompt + completion rows; labels are the
    completion ids and IGNORE_INDEX elsewhere (Hugging Face shift convention: position t scores t+1)."""
    if len(prompts) != len(completions):
        raise ValueError(f"completions: expected one per prompt ({len(prompts)}), got {len(completions)}")
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, len(p):len(r)] = torch.tensor(r[len(p):], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of every scored token, shape (M,); the row each belongs to, (M,)), from the model's final
    hidden states and lm_head weight with dpo_fast.linear_sequence_logprobs: no logits are built.
    Differentiable w.r.t. the model's parameters. Each scored token is passed as its own packed
    sequence, so the fused op returns per-token values."""
    labels = batch["labels"]
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    rows = torch.nonzero(scored)[:, 0]
    h = hidden[:, :-1][scored].unsqueeze(0)          # (1, M, H): the position before each target
    t = targets[scored].unsqueeze(0)                  # (1, M)
    m = t.shape[1]
    if m == 0:
        return hidden.new_zeros(0), rows
    head = model.get_output_embeddings()
    logps = linear_sequence_logprobs(h, head.weight, t, bias=head.bias, shift=False,
                                     sequence_ids=torch.arange(m).unsqueeze(0), num_sequences=m)
    return logps, rows


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Sum of the completion tokens' log-probs per row, shape (S,)."""
    logps, rows = token_logprobs(model, batch)
    out = torch.zeros(batch["labels"].shape[0], dtype=logps.dtype)
    return out.index_add(0, rows, logps)


@torch.no_grad()
def sample_completions(model, prompts: Sequence[Sequence[int]], *, num_samples: int, max_new_tokens: int,
                       eos_id: int, seed: int, batch_size: int = 256) -> list[list[list[int]]]:
    """`num_samples` completions per prompt (token ids, ending in eos_id unless cut at
    max_new_tokens): result[i][j] is sample j of prompt i. Temperature 1, full vocabulary.

    Reproducible: the same model, prompts and arguments give the same samples (one seeded
    torch.Generator; rows are generated in a fixed order, grouped by prompt length so no padding
    is needed)."""
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples}, {max_new_tokens}")
    gen = torch.Generator().manual_seed(seed)
    by_len = defaultdict(list)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one token (e.g. BOS)")
        by_len[len(p)].extend((i, j) for j in range(num_samples))
    out = [[None] * num_samples for _ in prompts]
    was_training = model.training
    model.eval()
    for length in sorted(by_len):
        slots = by_len[length]
        for start in range(0, len(slots), batch_size):
            chunk = slots[start:start + batch_size]
            ids = torch.tensor([list(prompts[i]) for i, _ in chunk])
            for (i, j), c in zip(chunk, _sample_rows(model, ids, max_new_tokens, eos_id, gen)):
                out[i][j] = c
    model.train(was_training)
    return out


def _sample_rows(model, ids: torch.Tensor, max_new_tokens: int, eos_id: int, gen) -> list[list[int]]:
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool)
    steps = []
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    for _ in range(max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        steps.append(torch.where(done, -1, nxt))
        done |= nxt == eos_id
        if bool(done.all()):
            break
        out = model(input_ids=nxt.unsqueeze(1), cache=out.cache, use_cache=True)
    tokens = torch.stack(steps, dim=1).tolist()
    return [[t for t in row if t >= 0] for row in tokens]


def clustered_mean(values: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(mean, standard error) of values[i][j] (sample j of prompt i): the mean of per-prompt means and
    their standard deviation (n-1) over sqrt(n prompts); nan for the error with one prompt."""
    means = [sum(v) / len(v) for v in values]
    n = len(means)
    if n == 0:
        raise ValueError("values: no prompts")
    mu = sum(means) / n
    if n < 2:
        return mu, float("nan")
    var = sum((m - mu) ** 2 for m in means) / (n - 1)
    return mu, math.sqrt(var / n)


@torch.no_grad()
def kl_samples(policy, reference, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[Sequence[int]]],
               pad_id: int, batch_size: int = 256) -> list[list[float]]:
    """log pi(y|x) - log pi_ref(y|x) for every sample (same nesting as `completions`)."""
    flat = [(i, j) for i, cs in enumerate(completions) for j in range(len(cs))]
    out = [[0.0] * len(cs) for cs in completions]
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        batch = encode_batch([prompts[i] for i, _ in chunk], [completions[i][j] for i, j in chunk], pad_id)
        diff = sequence_logprobs(policy, batch) - sequence_logprobs(reference, batch)
        for (i, j), d in zip(chunk, diff.tolist()):
            out[i][j] = d
    return out


def completion_words(tokenizer, ids: Sequence[int]) -> list[str]:
    """The words of a completion, EOS (and anything after it) left out."""
    eos = tokenizer.eos_token_id
    ids = list(ids)
    if eos in ids:
        ids = ids[:ids.index(eos)]
    return tokenizer.convert_ids_to_tokens(ids)


def evaluate_policy(policy, reference, tokenizer, prompts: Sequence[Sequence[int]], *, num_samples: int,
                    max_new_tokens: int, seed: int, batch_size: int = 256) -> dict:
    """Sample `num_samples` completions per prompt from `policy`; return the mean ground-truth reward
    (task.reward) and the KL(policy || reference) estimate of the same samples, with their standard
    errors (module docstring), the sample counts, the share cut at max_new_tokens and the mean length."""
    from .task import reward

    samples = sample_completions(policy, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                 eos_id=tokenizer.eos_token_id, seed=seed, batch_size=batch_size)
    special = set(tokenizer.all_special_ids)
    words = [tokenizer.convert_ids_to_tokens([t for t in p if t not in special]) for p in prompts]  # BOS out
    rewards = [[reward(w, completion_words(tokenizer, c)) for c in cs] for w, cs in zip(words, samples)]
    kls = kl_samples(policy, reference, prompts, samples, tokenizer.pad_token_id, batch_size=batch_size)
    r, r_se = clustered_mean(rewards)
    kl, kl_se = clustered_mean(kls)
    flat = [c for cs in samples for c in cs]
    return {"reward": r, "reward_se": r_se, "kl": kl, "kl_se": kl_se, "prompts": len(prompts),
            "samples": len(flat), "cut_share": sum(tokenizer.eos_token_id not in c for c in flat) / len(flat),
            "mean_tokens": sum(len(c) for c in flat) / len(flat)}
