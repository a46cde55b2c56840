"""Double backward (create_graph=True: gradient penalties, Hessian-vector products) is refused in one
line by every op (issue 22, item 10), instead of PyTorch's internal "no autograd formula registered
for dpo_fast.linear_logprobs_backward" or, for the ops that save their gradient in the forward, a
second-order term that is silently zero."""

from __future__ import annotations

import pytest
import torch

import dpo_fast

S, T, V, H = 4, 6, 50, 8


def _inputs():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (S, T), generator=g)
    logits = torch.randn(S, T, V, generator=g, requires_grad=True)
    hidden = torch.randn(S, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    refs = dict(ref_chosen_logps=torch.randn(S // 2, generator=g), ref_rejected_logps=torch.randn(S // 2, generator=g))
    return labels, logits, hidden, weight, refs


CASES = {
    "sequence_logprobs": lambda lb, lg, h, w, r: (dpo_fast.sequence_logprobs(lg, lb).sum(), [lg]),
    "linear_sequence_logprobs": lambda lb, lg, h, w, r: (dpo_fast.linear_sequence_logprobs(h, w, lb).sum(), [h, w]),
    "loss from logits": lambda lb, lg, h, w, r: (dpo_fast.loss(lg, lb, **r).loss, [lg]),
    "loss from logits, inplace_backward": lambda lb, lg, h, w, r: (
        dpo_fast.loss(lg.detach().clone().requires_grad_(), lb, **r, inplace_backward=True).loss, None),
    "loss from hidden": lambda lb, lg, h, w, r: (dpo_fast.loss(hidden=h, weight=w, labels=lb, **r).loss, [h, w]),
    "loss from hidden, logits budget": lambda lb, lg, h, w, r: (
        dpo_fast.loss(hidden=h, weight=w, labels=lb, **r, logits_memory_mb=100).loss, [h, w]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_double_backward_is_refused_in_one_line(case):
    labels, logits, hidden, weight, refs = _inputs()
    out, inputs = CASES[case](labels, logits, hidden, weight, refs)
    with pytest.raises(RuntimeError, match=r"^dpo_fast: double backward \(create_graph=True\) is not supported") as e:
        if inputs is None:
            out.backward(create_graph=True)
        else:
            grads = torch.autograd.grad(out, inputs, create_graph=True)
            sum((g * g).sum() for g in grads).backward()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", list(CASES))
def test_first_order_gradients_still_work(case):
    labels, logits, hidden, weight, refs = _inputs()
    out, inputs = CASES[case](labels, logits, hidden, weight, refs)
    out.backward()
    for t in inputs or []:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
