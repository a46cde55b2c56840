"""Loss mixtures (TRL's loss_type list + loss_weights) and the Plackett-Luce ranking loss through
the fused ops: against the single-type losses, autograd of plackett_luce_loss and K = 2 sigmoid."""

import pytest
import torch

import dpo_fast
from dpo_fast.objectives import ranking_objective
from oracles import runnable_backends
from oracles import batch, oracle

BACKENDS = runnable_backends("cpu")
MIX = (("sigmoid", "bco_pair"), (0.8, 0.2))


def _hidden_batch(S=6, T=7, H=16, V=70, seed=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[:, :2] = -100
    labels[1, 5:] = -100
    return hidden, weight, labels


# ----------------------------------------------------------------------------------------------
# Mixtures


@pytest.mark.parametrize("types,weights", [MIX, (("sigmoid", "ipo", "hinge"), (0.5, 1.5, 0.25)),
                                           (("sigmoid_norm", "apo_zero"), None)])
def test_mixture_is_the_weighted_sum_of_single_types_from_logits(types, weights):
    logits, labels, rc, rr = batch()
    weights_or_ones = weights or (1.0,) * len(types)
    x = logits.clone().requires_grad_(True)
    mixed = dpo_fast.loss(x, labels, rc, rr, loss_type=types, loss_weights=weights, sft_weight=0.1)
    mixed.loss.backward()
    total, grad = 0.0, 0.0
    for t, w in zip(types, weights_or_ones):
        y = logits.clone().requires_grad_(True)
        single = dpo_fast.loss(y, labels, rc, rr, loss_type=t)
        single.loss.backward()
        total, grad = total + w * single.loss.detach(), grad + w * y.grad
    sft = oracle(logits, labels, rc, rr, sft_weight=1.0)[0] - oracle(logits, labels, rc, rr)[0]  # -mean NLL
    torch.testing.assert_close(mixed.loss.double(), total.double() + 0.1 * sft, atol=1e-5, rtol=1e-5)
    y = logits.clone().requires_grad_(True)
    dpo_fast.loss(y, labels, rc, rr, loss_type="sigmoid", sft_weight=0.1).loss.backward()
    z = logits.clone().requires_grad_(True)
    dpo_fast.loss(z, labels, rc, rr, loss_type="sigmoid").loss.backward()
    torch.testing.assert_close(x.grad, grad + (y.grad - z.grad), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("budget", [None, 0.01])
def test_mixture_hidden_form_and_budget_match_single_types(budget):
    hidden, weight, labels = _hidden_batch()
    rc, rr = torch.randn(3) - 20, torch.randn(3) - 20
    h = hidden.clone().requires_grad_(True)
    mixed = dpo_fast.loss(hidden=h, weight=weight, labels=labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                          loss_type=MIX[0], loss_weights=MIX[1], logits_memory_mb=budget)
    mixed.loss.backward()
    total, grad = 0.0, 0.0
    for t, w in zip(*MIX):
        hs = hidden.clone().requires_grad_(True)
        out = dpo_fast.loss(hidden=hs, weight=weight, labels=labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                            loss_type=t)
        out.loss.backward()
        total, grad = total + w * out.loss.detach(), grad + w * hs.grad
    # float64 inputs: the objective runs in float64 too (objectives.loss_dtype)
    assert mixed.loss.dtype == mixed.metrics["loss/preference"].dtype == torch.float64
    torch.testing.assert_close(mixed.loss, total, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h.grad, grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(mixed.metrics["loss/preference"], total, atol=1e-12, rtol=1e-12)


def test_preference_loss_and_module_take_mixtures():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) - 10 for _ in range(4))
    mixed = dpo_fast.preference_loss(pc, pr, rc, rr, loss_type="sigmoid,hinge", loss_weights="0.7,0.3")
    parts = [dpo_fast.preference_loss(pc, pr, rc, rr, loss_type=t).loss for t in ("sigmoid", "hinge")]
    torch.testing.assert_close(mixed.loss, 0.7 * parts[0] + 0.3 * parts[1])
    logits, labels, c, r = batch()
    module = dpo_fast.DPOLoss(loss_type=MIX[0], loss_weights=MIX[1])
    torch.testing.assert_close(module(logits, labels, c, r).loss,
                               dpo_fast.loss(logits, labels, c, r, loss_type=MIX[0], loss_weights=MIX[1]).loss)
    assert dpo_fast.loss_spec(*MIX) == "sigmoid*0.8+bco_pair*0.2"
    assert dpo_fast.loss_spec("ipo") == "ipo" and dpo_fast.loss_spec(["ipo"], [1]) == "ipo"


def test_bad_mixtures_are_refused_before_any_work():
    logits, labels, rc, rr = batch()
    for kwargs, pattern in (
            (dict(loss_type=("sigmoid", "bco_pair"), loss_weights=(1.0,)), "1 weight.*for 2 loss type"),
            (dict(loss_type="sigmoid", loss_weights=(0.5, 0.5)), "2 weight.*for 1 loss type"),
            (dict(loss_type=("sigmoid", "hinge"), loss_weights=(1.0, -0.1)), ">= 0, got -0.1"),
            (dict(loss_type=("sigmoid", "dpo++")), "loss_type must be one of.*'dpo\\+\\+'"),
            (dict(loss_type=("sigmoid", "sigmoid")), "more than once"),
            (dict(loss_type=("sigmoid", "hinge"), loss_weights=(0, 0)), "all 0"),
            (dict(loss_type=("sigmoid", "ipo"), average_log_prob=True), "average_log_prob applies to a single")):
        with pytest.raises(ValueError, match=pattern):
            dpo_fast.loss(logits, labels, rc, rr, **kwargs)


def test_ties_are_counted_apart_from_wins():
    logits, labels, rc, rr = batch()
    out = dpo_fast.loss(logits, labels)  # no reference, as many wins as ties 0
    policy = dpo_fast.loss(logits, labels, out.chosen_logps, out.rejected_logps)  # reference = policy
    assert float(policy.metrics["rewards/ties"]) == 1.0
    assert float(policy.metrics["rewards/accuracies"]) == 0.0
    assert float(out.metrics["rewards/ties"]) == 0.0


# ----------------------------------------------------------------------------------------------
# Rankings


def _ranked(K, P=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = torch.randn(K * P, generator=g, dtype=torch.float64) * 3 - 20
    ref = torch.randn(K * P, generator=g, dtype=torch.float64) * 3 - 20
    counts = torch.randint(1, 9, (K * P,), generator=g)
    return logps, ref, counts


@pytest.mark.parametrize("K", [2, 3, 5])
def test_ranking_objective_gradient_is_the_autograd_of_plackett_luce(K):
    logps, ref, counts = _ranked(K)
    P = logps.shape[0] // K
    obj = ranking_objective(logps, counts, ref, num_responses=K, beta=0.7, sft_weight=0.3)
    x = logps.clone().requires_grad_(True)
    by_rank = lambda v: v.view(K, P).T
    expected = dpo_fast.plackett_luce_loss(by_rank(x), by_rank(ref), beta=0.7) \
        - 0.3 * (x[:P] / counts[:P].double()).mean()
    expected.backward()
    torch.testing.assert_close(obj.loss.double(), expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(obj.grad_logps.double(), x.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranking_loss_with_two_responses_is_sigmoid_dpo(backend):
    logits, labels, rc, rr = batch()
    x, y = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    pairs = dpo_fast.loss(x, labels, rc, rr, sft_weight=0.2, backend=backend)
    ranks = dpo_fast.ranking_loss(y, labels, torch.stack([rc, rr], 1), num_responses=2, sft_weight=0.2,
                                  backend=backend)
    (pairs.loss * 1.3).backward()
    (ranks.loss * 1.3).backward()
    torch.testing.assert_close(ranks.loss, pairs.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y.grad, x.grad, atol=1e-7, rtol=1e-5)
    m, p = ranks.metrics, pairs.metrics
    torch.testing.assert_close(m["rewards/pairwise_accuracy"], p["rewards/accuracies"])
    torch.testing.assert_close(m["rewards/ranking_accuracy"], p["rewards/accuracies"])
    torch.testing.assert_close(m["rewards/margins"], p["rewards/margins"])
    torch.testing.assert_close(m["rewards/rank_0"], p["rewards/chosen"])
    torch.testing.assert_close(m["loss/sft"], p["loss/sft"])


@pytest.mark.parametrize("packed", [False, True])
def test_ranking_loss_hidden_form_matches_plackett_luce_on_logits(packed):
    K, P = 3, 2
    hidden, weight, labels = _hidden_batch(S=K * P)
    ref = torch.randn(P, K, dtype=torch.float64) - 15
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    if packed:
        S, T, H = hidden.shape
        seq = torch.arange(S).repeat_interleave(T).unsqueeze(0)
        out = dpo_fast.ranking_loss(hidden=h1.reshape(1, S * T, H), weight=w1, labels=labels.reshape(1, S * T),
                                    ref_logps=ref, num_responses=K, sequence_ids=seq, num_sequences=S, beta=0.5)
    else:
        out = dpo_fast.ranking_loss(hidden=h1, weight=w1, labels=labels, ref_logps=ref, num_responses=K, beta=0.5)
    out.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logps = dpo_fast.sequence_logprobs(h2 @ w2.T, labels, backend="reference")
    expected = dpo_fast.plackett_luce_loss(logps.view(K, P).T, ref, beta=0.5)
    expected.backward()
    # float64 inputs: the objective runs in float64 too (objectives.loss_dtype)
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-12, rtol=1e-10)
    assert set(out.metrics) == set(dpo_fast.ranking_metric_names(K))
    r = out.rewards
    assert out.rewards.shape == (P, K)
    torch.testing.assert_close(out.metrics["rewards/ranking_accuracy"],
                               ((r[:, 0] > r[:, 1]) & (r[:, 1] > r[:, 2])).double().mean())


def test_ranking_metrics_count_order_pairs_and_ties():
    from dpo_fast.ranking import per_prompt_ranking_stats

    r = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [2.0, 2.0, 1.0]])
    s = per_prompt_ranking_stats(r)
    assert s["rewards/ranking_accuracy"].tolist() == [1.0, 0.0, 0.0]
    assert s["rewards/pairwise_accuracy"].tolist() == pytest.approx([1.0, 0.0, 2 / 3])
    assert s["rewards/ties"].tolist() == pytest.approx([0.0, 0.0, 1 / 3])
    assert s["rewards/margins"].tolist() == pytest.approx([1.0, -1.0, 0.5])


def test_ranking_loss_bad_input():
    logits, labels, rc, rr = batch()  # 6 rows
    with pytest.raises(ValueError, match="not a multiple of num_responses=4"):
        dpo_fast.ranking_loss(logits, labels, num_responses=4)
    with pytest.raises(ValueError, match=r"ref_logps must have shape \(2, 3\)"):
        dpo_fast.ranking_loss(logits, labels, torch.zeros(3, 2), num_responses=3)
    with pytest.raises(ValueError, match="num_responses must be an int >= 2"):
        dpo_fast.ranking_loss(logits, labels, num_responses=1)
