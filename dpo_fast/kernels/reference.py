"""Plain-PyTorch implementations: the oracle of the tests and the fallback on any device.

`token_stats` / `token_grad` are the reference form of the kernel contract (see csrc/README.md):
row-chunked so the float32 temporaries stay bounded. `naive_sequence_logprobs` is what every
DPO trainer does today (full float32 log_softmax, gather, masked sum); the benchmarks time it.
"""

from __future__ import annotations

import torch

from ..targets import acc_dtype

# Rows per chunk in the fallback: bounds its float32 temporaries to about this many elements.
_CHUNK_ELEMENTS = 1 << 25


def _chunks(S: int, T: int, V: int):
    """(s, time slice) pieces of at most ~_CHUNK_ELEMENTS logits; each is a view for any strides."""
    step = max(1, _CHUNK_ELEMENTS // max(V, 1))
    for s in range(S):
        for start in range(0, T, step):
            yield s, slice(start, min(start + step, T))


def token_stats(logits: torch.Tensor, targets: torch.Tensor):
    """Per row: (log-sum-exp, target logit, sum of logits); zeros where targets < 0."""
    S, T, V = logits.shape
    acc = acc_dtype(logits.dtype)
    lse = torch.zeros(S, T, dtype=acc, device=logits.device)
    picked = torch.zeros_like(lse)
    lsum = torch.zeros_like(lse)
    for s, ts in _chunks(S, T, V):
        x = logits[s, ts].to(acc)
        t = targets[s, ts]
        scored = t >= 0
        lse[s, ts] = torch.where(scored, torch.logsumexp(x, dim=-1), 0)
        picked[s, ts] = torch.where(scored, x.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1), 0)
        lsum[s, ts] = torch.where(scored, x.sum(-1), 0)
    return lse, picked, lsum


def token_grad(logits, targets, lse, g_token, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[s, t] = g_token[s, t] * (onehot(target) - softmax(logits[s, t])); 0 where targets < 0.

    `out` may be `logits` itself (in-place backward)."""
    S, T, V = logits.shape
    acc = acc_dtype(logits.dtype)
    if out is None:
        out = torch.empty((S, T, V), dtype=logits.dtype, device=logits.device)
    for s, ts in _chunks(S, T, V):
        t = targets[s, ts]
        scored = t >= 0
        g = torch.where(scored, g_token[s, ts].to(acc), 0).unsqueeze(1)
        grad = -g * torch.exp(logits[s, ts].to(acc) - lse[s, ts].to(acc).unsqueeze(1))
        grad.scatter_add_(1, t.clamp(min=0).unsqueeze(1), g)
        out[s, ts] = torch.where(scored.unsqueeze(1), grad, 0).to(out.dtype)
    return out


def naive_sequence_logprobs(logits, labels, *, ignore_index=-100, shift=True, average=False):
    """The usual DPO trainer code: float32 log_softmax over the whole batch, gather, masked sum."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = torch.gather(logp, 2, labels.clamp(min=0).long().unsqueeze(2)).squeeze(2)
    total = (picked * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total
