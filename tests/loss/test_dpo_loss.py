"""dpo_fast.loss (fused: the logits gradient is written during the forward) against float64."""

import pytest
import torch

import dpo_fast
from oracles import batch, oracle, pair_loss64, runnable_backends, token_logps64

BACKENDS = runnable_backends("cpu")


# Every loss type on every compiled/reference backend; the Triton interpreter is slow and runs
# the same row kernels for every type, so it gets a sample.
FUSED_CASES = [(b, t) for b in BACKENDS if b != "triton" for t in dpo_fast.LOSS_TYPES] + [
    ("triton", t) for t in ("sigmoid", "ipo", "sigmoid_norm") if "triton" in BACKENDS]


@pytest.mark.parametrize("backend,loss_type", FUSED_CASES)
def test_fused_loss_and_logits_gradient(backend, loss_type):
    logits, labels, rc, rr = batch()
    x = logits.clone().requires_grad_(True)
    out = dpo_fast.loss(x, labels, rc, rr, beta=0.2, loss_type=loss_type, sft_weight=0.3,
                        label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0, backend=backend)
    total, losses, logps, grad, rewards = oracle(
        logits, labels, rc, rr, loss_type, 0.2, 0.1 if loss_type in ("sigmoid", "robust") else 0.0, 0.3)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), total, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.losses.double(), losses, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([out.chosen_logps, out.rejected_logps]).double(), logps, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(torch.cat([out.chosen_rewards, out.rejected_rewards]).double(), rewards,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_have_trl_names_and_values(backend):
    logits, labels, rc, rr = batch()
    out = dpo_fast.loss(logits, labels, rc, rr, backend=backend)
    _, losses, logps, _, rewards = oracle(logits, labels, rc, rr)
    P = 3
    m = {k: float(v) for k, v in out.metrics.items()}
    cr, rj = rewards[:P], rewards[P:]
    mask = labels[:, 1:] != -100
    # TRL: mean logit over every vocabulary entry of every scored token
    mean_logit = lambda rows: logits[rows, :-1][mask[rows]].double().mean().item()
    expected = {
        "rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
        "rewards/accuracies": (cr > rj).double().mean(), "rewards/margins": (cr - rj).mean(),
        "rewards/ties": (cr == rj).double().mean(),  # beside the strict accuracy
        "logps/chosen": logps[:P].mean(), "logps/rejected": logps[P:].mean(),
        "logits/chosen": mean_logit(slice(0, P)), "logits/rejected": mean_logit(slice(P, 2 * P)),
        # the two parts of the loss: loss = loss/preference + sft_weight * loss/sft
        "loss/preference": losses.mean(), "loss/sft": (-logps[:P] / mask[:P].sum(-1)).mean(),
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert m[k] == pytest.approx(float(v), abs=1e-4), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_by_grad_output(backend):
    logits, labels, rc, rr = batch()
    x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    dpo_fast.loss(x1, labels, rc, rr, backend=backend).loss.backward()
    (dpo_fast.loss(x2, labels, rc, rr, backend=backend).loss * -2.5).backward()
    torch.testing.assert_close(x2.grad, -2.5 * x1.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_matches_and_reuses_storage(backend):
    logits, labels, rc, rr = batch()
    x1 = logits.clone().requires_grad_(True)
    dpo_fast.loss(x1, labels, rc, rr, backend=backend).loss.backward()
    leaf = logits.clone().requires_grad_(True)
    x2 = leaf * 1.0
    ptr = x2.data_ptr()
    out = dpo_fast.loss(x2, labels, rc, rr, backend=backend, inplace_backward=True)
    (out.loss * 2).backward()
    torch.testing.assert_close(leaf.grad, 2 * x1.grad)
    assert x2.data_ptr() == ptr


def test_no_grad_and_eval_give_the_same_loss():
    logits, labels, rc, rr = batch()
    with torch.no_grad():
        a = dpo_fast.loss(logits.clone().requires_grad_(True), labels, rc, rr)
    b = dpo_fast.loss(logits, labels, rc, rr)  # logits do not need grad
    c = dpo_fast.loss(logits.clone().requires_grad_(True), labels, rc, rr)
    assert a.loss.grad_fn is None and b.loss.grad_fn is None and c.loss.grad_fn is not None
    torch.testing.assert_close(a.loss, c.loss.detach())
    torch.testing.assert_close(b.loss, c.loss.detach())


def test_reference_free_and_ipo_averaging():
    logits, labels, rc, rr = batch()
    free = dpo_fast.loss(logits, labels)
    zero = dpo_fast.loss(logits, labels, torch.zeros(3), torch.zeros(3))
    torch.testing.assert_close(free.loss, zero.loss)
    ipo = dpo_fast.loss(logits, labels, rc, rr, loss_type="ipo")
    torch.testing.assert_close(ipo.loss.double(), oracle(logits, labels, rc, rr, "ipo")[0], atol=1e-5, rtol=1e-5)
    summed = dpo_fast.loss(logits, labels, rc, rr, loss_type="ipo", average_log_prob=False)
    torch.testing.assert_close(summed.loss.double(), oracle(logits, labels, rc, rr, "ipo", average=False)[0],
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_batch_equals_padded(backend):
    logits, labels, rc, rr = batch(P=2, T=6)
    x = logits.clone().requires_grad_(True)
    padded = dpo_fast.loss(x, labels, rc, rr, backend=backend)
    padded.loss.backward()
    # Concatenate the 4 rows into one packed row (sequence i = row i).
    packed = logits.reshape(1, 24, -1).clone().requires_grad_(True)
    seq = torch.arange(4).repeat_interleave(6).unsqueeze(0)
    out = dpo_fast.loss(packed, labels.reshape(1, 24), rc, rr, sequence_ids=seq, num_sequences=4, backend=backend)
    out.loss.backward()
    torch.testing.assert_close(out.loss, padded.loss)
    torch.testing.assert_close(packed.grad.view_as(x.grad), x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_fused_loss(backend):
    from dpo_fast.targets import prepare_targets

    logits, labels, rc, rr = batch(P=2, T=5, V=17, dtype=torch.float64)
    tg = prepare_targets(labels)
    for settings in (dpo_fast.LossSettings(beta=0.1), dpo_fast.LossSettings.make(loss_type="sigmoid,ipo",
                                                                                 loss_weights="0.7,0.3")):
        args = (logits.requires_grad_(True), tg.targets, None, tg.counts, torch.cat([rc, rr]).double(),
                *settings.op_args(), True, backend)
        torch.library.opcheck(torch.ops.dpo_fast.dpo_loss.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    logits, labels, rc, rr = batch()

    def step(x):
        out = dpo_fast.loss(x, labels, rc, rr, backend=backend, sft_weight=0.1)
        return out.loss * 1.5, out.metrics["rewards/margins"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    l1, m1 = step(x1)
    l2, m2 = compiled(x2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_module_form():
    logits, labels, rc, rr = batch()
    module = dpo_fast.DPOLoss(beta=0.2, loss_type="hinge")
    torch.testing.assert_close(module(logits, labels, rc, rr).loss,
                               dpo_fast.loss(logits, labels, rc, rr, beta=0.2, loss_type="hinge").loss)
    assert "hinge" in repr(module)


def test_bad_input():
    logits, labels, rc, rr = batch()
    with pytest.raises(ValueError, match="odd"):
        dpo_fast.loss(logits[:5], labels[:5])
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \(3,\)"):
        dpo_fast.loss(logits, labels, rc[:2], rr)
    with pytest.raises(ValueError, match="both ref_chosen_logps"):
        dpo_fast.loss(logits, labels, rc)
    with pytest.raises(ValueError, match="either logits"):
        dpo_fast.loss(logits, labels, hidden=torch.zeros(6, 9, 4), weight=torch.zeros(61, 4))
    with pytest.raises(ValueError, match="either logits"):
        dpo_fast.loss(labels=labels)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_fast.loss(logits, labels, loss_type="kto")
    with pytest.raises(ValueError, match="labels"):
        dpo_fast.loss(logits, labels + 100)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_hidden_form_equals_logits_form(softcap):
    """dpo_fast.loss(hidden=, weight=) gives the loss, metrics and gradients of the logits form."""
    g = torch.Generator().manual_seed(3)
    P, T, H, V = 2, 7, 24, 150
    hidden = torch.randn(2 * P, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    labels[:, :2] = -100
    rc, rr = torch.randn(P, generator=g) - 30, torch.randn(P, generator=g) - 30
    h1, w1, b1 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    out = dpo_fast.loss(hidden=h1, weight=w1, bias=b1, logit_softcap=softcap, labels=labels,
                        ref_chosen_logps=rc, ref_rejected_logps=rr, sft_weight=0.2, loss_type="apo_down")
    (out.loss * 1.7).backward()
    h2, w2, b2 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    z = h2 @ w2.T + b2
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    ref = dpo_fast.loss(z, labels, rc, rr, sft_weight=0.2, loss_type="apo_down", backend="reference")
    (ref.loss * 1.7).backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    for k in ref.metrics:
        torch.testing.assert_close(out.metrics[k], ref.metrics[k], atol=1e-5, rtol=1e-5, msg=k)
    for a, b in ((h1, h2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_hidden_form_packed_and_module():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(4, 6, 16, generator=g)
    weight = torch.randn(90, 16, generator=g) * 0.3
    labels = torch.randint(0, 90, (4, 6), generator=g)
    padded = dpo_fast.DPOLoss(beta=0.3)(hidden=hidden, weight=weight, labels=labels)
    seq = torch.arange(4).repeat_interleave(6).unsqueeze(0)
    packed = dpo_fast.loss(hidden=hidden.reshape(1, 24, 16), weight=weight, labels=labels.reshape(1, 24),
                           sequence_ids=seq, num_sequences=4, beta=0.3)
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        dpo_fast.loss(hidden=hidden, labels=labels)
    with pytest.raises(ValueError, match="weight must be \\(V, H\\)"):
        dpo_fast.loss(hidden=hidden, weight=weight.T, labels=labels)
