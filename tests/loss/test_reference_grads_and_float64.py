"""dpo_fast.loss / ranking_loss: reference log-probs that require grad get their gradient (as
dpo_fast.preference_loss gives it: the negative of the preference part of d loss / d logps), in
every form (logits, hidden, hidden under a logits budget); float64 inputs compute and return
float64, and pass torch.autograd.gradcheck."""

import pytest
import torch

import dpo_fast


def pair_batch(P=3, T=7, V=13, H=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * P, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    labels[:, :2] = -100  # the prompt
    labels[1, 5:] = -100  # padding
    ref = (torch.randn(2, P, generator=g, dtype=torch.float64) * 2 - 10).to(dtype)
    return hidden, weight, labels, ref[0], ref[1]


FORMS = ("logits", "hidden", "budget")


def call(form, hidden, weight, labels, rc, rr, **kw):
    if form == "logits":
        return dpo_fast.loss(hidden @ weight.T, labels, rc, rr, **kw)
    budget = {"logits_memory_mb": 1.0} if form == "budget" else {}
    return dpo_fast.loss(labels=labels, ref_chosen_logps=rc, ref_rejected_logps=rr, hidden=hidden, weight=weight,
                         **budget, **kw)


def lengths(labels):
    n = (labels[:, 1:] != -100).sum(1).double()
    P = n.shape[0] // 2
    return n[:P], n[P:]


SETTINGS = [dict(loss_type="sigmoid", beta=0.3), dict(loss_type="ipo", beta=0.5),
            dict(loss_type="robust", beta=0.2, label_smoothing=0.1, sft_weight=0.4),
            dict(loss_type=("sigmoid", "ipo"), loss_weights=(0.7, 0.3), beta=0.4)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: str(s["loss_type"]))
def test_reference_logps_get_the_gradient_preference_loss_gives(form, settings):
    hidden, weight, labels, rc, rr = pair_batch()
    rc, rr = rc.clone().requires_grad_(True), rr.clone().requires_grad_(True)
    out = call(form, hidden, weight, labels, rc, rr, **settings)
    out.loss.backward()
    assert rc.grad is not None and rr.grad is not None, "no gradient reached the reference log-probs"

    # The same loss from the (detached) per-sequence log-probs through preference_loss, autograd.
    pc, pr = out.chosen_logps.double().requires_grad_(True), out.rejected_logps.double().requires_grad_(True)
    qc, qr = rc.detach().double().requires_grad_(True), rr.detach().double().requires_grad_(True)
    lc, lr = lengths(labels)
    pref_settings = {k: v for k, v in settings.items() if k != "sft_weight"}
    pref = dpo_fast.preference_loss(pc, pr, qc, qr, chosen_lengths=lc, rejected_lengths=lr, **pref_settings)
    pref.loss.backward()
    torch.testing.assert_close(rc.grad.double(), qc.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rr.grad.double(), qr.grad, rtol=1e-4, atol=1e-6)
    # The closed form: minus the policy's d loss / d logps (the preference part).
    torch.testing.assert_close(qc.grad, -pc.grad)
    assert qc.grad.abs().max() > 0


@pytest.mark.parametrize("form", ("logits", "hidden"))
def test_ranking_reference_logps_get_their_gradient(form):
    K, P = 3, 2
    hidden, weight, labels, _, _ = pair_batch(P=3, seed=1)  # 6 rows = K x P
    ref = (torch.randn(P, K, generator=torch.Generator().manual_seed(2)) - 9).requires_grad_(True)
    kw = dict(num_responses=K, beta=0.3)
    if form == "logits":
        out = dpo_fast.ranking_loss(hidden @ weight.T, labels, ref, **kw)
    else:
        out = dpo_fast.ranking_loss(labels=labels, ref_logps=ref, hidden=hidden, weight=weight, **kw)
    out.loss.backward()
    assert ref.grad is not None, "no gradient reached ref_logps"
    lp = out.logps.double().requires_grad_(True)
    q = ref.detach().double().requires_grad_(True)
    dpo_fast.plackett_luce_loss(lp, q, beta=0.3).backward()
    torch.testing.assert_close(ref.grad.double(), q.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_float64_inputs_give_float64_loss_and_metrics(form):
    hidden, weight, labels, rc, rr = pair_batch(dtype=torch.float64)
    out = call(form, hidden, weight, labels, rc, rr, beta=0.3, sft_weight=0.2)
    assert out.loss.dtype == torch.float64
    for name in ("losses", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        assert getattr(out, name).dtype == torch.float64, name
    for name, value in out.metrics.items():
        assert value.dtype == torch.float64, name
    # float64 all the way: the loss agrees with preference_loss on float64 log-probs to 1e-12.
    lc, lr = lengths(labels)
    want = dpo_fast.preference_loss(out.chosen_logps, out.rejected_logps, rc, rr, beta=0.3).loss \
        - 0.2 * (out.chosen_logps / lc).mean()
    assert abs(out.loss.item() - want.item()) < 1e-12


def test_float64_ranking_loss():
    hidden, weight, labels, _, _ = pair_batch(P=3, dtype=torch.float64, seed=1)
    ref = torch.randn(2, 3, dtype=torch.float64) - 9
    out = dpo_fast.ranking_loss(labels=labels, ref_logps=ref, hidden=hidden, weight=weight, num_responses=3)
    assert out.loss.dtype == out.rewards.dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in out.metrics.values())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("loss_type", ("sigmoid", "ipo"))
def test_gradcheck(form, loss_type):
    hidden, weight, labels, rc, rr = pair_batch(P=2, T=5, V=7, H=3, dtype=torch.float64)
    kw = dict(beta=0.7, loss_type=loss_type, sft_weight=0.3)
    if form == "logits":
        logits = (hidden @ weight.T).requires_grad_(True)

        def f(x, a, b):
            return dpo_fast.loss(x, labels, a, b, **kw).loss

        inputs = (logits, rc.requires_grad_(True), rr.requires_grad_(True))
    else:
        def f(h, w, a, b):
            return call(form, h, w, labels, a, b, **kw).loss

        inputs = (hidden.requires_grad_(True), weight.requires_grad_(True), rc.requires_grad_(True),
                  rr.requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs)
