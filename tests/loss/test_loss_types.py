"""The DPO loss family and the Plackett-Luce loss against float64 formulas written apart."""

import pytest
import torch

import dpo_fast
from oracles import pair_loss64

SMOOTHED = ("sigmoid", "robust", "exo_pair", "sigmoid_norm")


def pairs(P=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(P, generator=g, dtype=torch.float64) * 5 - 20 for _ in range(4)]


CASES = [(t, 0.0) for t in dpo_fast.LOSS_TYPES] + [(t, 0.2) for t in SMOOTHED]


@pytest.mark.parametrize("loss_type,eps", CASES)
def test_loss_types_match_formulas(loss_type, eps):
    pc, pr, rc, rr = pairs()
    lc = torch.tensor([3.0, 5, 1, 2, 7, 4, 9], dtype=torch.float64)
    lr = torch.tensor([2.0, 5, 6, 2, 1, 4, 3], dtype=torch.float64)
    beta = 0.3
    a1, b1 = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    out = dpo_fast.preference_loss(a1, b1, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps,
                                   chosen_lengths=lc, rejected_lengths=lr, reduction="none")
    a2, b2 = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    # ipo is defined on per-token log-ratios (as dpo_fast.loss computes it from tokens)
    nc, nr = (lc, lr) if loss_type == "ipo" else (1.0, 1.0)
    ref = pair_loss64((a2 - rc) / nc, (b2 - rr) / nr, loss_type, beta, eps, lc, lr)
    w = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)  # non-uniform upstream gradient
    (out.loss * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(out.losses, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc) / nc)
    torch.testing.assert_close(out.rejected_rewards, beta * (pr - rr) / nr)


def test_ipo_on_summed_logps_needs_the_lengths():
    """preference_loss(ipo) on summed log-probs equals dpo_fast.loss(ipo), which is per token; without
    the lengths it would silently differ, so it is refused."""
    pc, pr, rc, rr = pairs()
    with pytest.raises(ValueError, match="per-token log-ratios.*chosen_lengths and rejected_lengths"):
        dpo_fast.preference_loss(pc, pr, rc, rr, loss_type="ipo")


def test_reductions_and_reference_free():
    pc, pr, _, _ = pairs()
    free = dpo_fast.preference_loss(pc, pr)
    zero = dpo_fast.preference_loss(pc, pr, torch.zeros_like(pc), torch.zeros_like(pr))
    torch.testing.assert_close(free.loss, zero.loss)
    torch.testing.assert_close(free.loss, free.losses.mean())
    torch.testing.assert_close(dpo_fast.preference_loss(pc, pr, reduction="sum").loss, free.losses.sum())


def test_default_is_the_dpo_paper_loss():
    pc, pr, rc, rr = pairs()
    out = dpo_fast.preference_loss(pc, pr, rc, rr)  # beta 0.1, sigmoid
    expected = -torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
    torch.testing.assert_close(out.loss, expected)


def plackett_luce64(logps, ref, beta):
    """-log prod_k exp(r_k) / sum_{j>=k} exp(r_j), term by term."""
    r = beta * (logps - ref)
    total = torch.zeros(r.shape[0], dtype=torch.float64)
    for k in range(r.shape[1]):
        total = total - (r[:, k] - torch.log(torch.exp(r[:, k:]).sum(1)))
    return total


@pytest.mark.parametrize("K", [2, 3, 5])
def test_plackett_luce_matches_product_formula(K):
    g = torch.Generator().manual_seed(K)
    logps = (torch.randn(6, K, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    ref = torch.randn(6, K, generator=g, dtype=torch.float64) * 4
    out = dpo_fast.plackett_luce_loss(logps, ref, beta=0.5, reduction="none")
    l2 = logps.detach().clone().requires_grad_(True)
    expected = plackett_luce64(l2, ref, 0.5)
    w = torch.linspace(1, 2, 6, dtype=torch.float64)
    (out * w).sum().backward()
    (expected * w).sum().backward()
    torch.testing.assert_close(out, expected.detach())
    torch.testing.assert_close(logps.grad, l2.grad)


def test_plackett_luce_with_two_responses_is_sigmoid_dpo():
    pc, pr, rc, rr = pairs()
    pl = dpo_fast.plackett_luce_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), beta=0.1)
    torch.testing.assert_close(pl, dpo_fast.preference_loss(pc, pr, rc, rr, beta=0.1).loss)


def test_plackett_luce_prefers_the_given_order():
    right = torch.tensor([[3.0, 2.0, 1.0]])
    assert dpo_fast.plackett_luce_loss(right, beta=1.0) < dpo_fast.plackett_luce_loss(right.flip(1), beta=1.0)


def test_bad_arguments():
    pc, pr, rc, rr = pairs()
    with pytest.raises(ValueError, match="loss_type must be one of sigmoid, robust, ipo"):
        dpo_fast.preference_loss(pc, pr, loss_type="dpo++")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_fast.preference_loss(pc, pr, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_fast.preference_loss(pc, pr, beta=0.0)
    with pytest.raises(ValueError, match="rejected_logps must have shape"):
        dpo_fast.preference_loss(pc, pr[:3])
    with pytest.raises(ValueError, match="both ref_chosen_logps and ref_rejected_logps"):
        dpo_fast.preference_loss(pc, pr, rc)
    with pytest.raises(ValueError, match="sigmoid_norm.*needs chosen_lengths"):
        dpo_fast.preference_loss(pc, pr, loss_type="sigmoid_norm")
    with pytest.raises(ValueError, match="reduction"):
        dpo_fast.preference_loss(pc, pr, reduction="avg")
    with pytest.raises(ValueError, match=r"\(P, K\)"):
        dpo_fast.plackett_luce_loss(pc)
