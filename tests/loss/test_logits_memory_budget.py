"""dpo_fast.loss(hidden=, weight=, logits_memory_mb=...): the 3-GEMM path in chunks of whole pairs
gives the loss, metrics and gradients of the O(tokens) path (no budget) for every loss type,
padded and packed, soft-capped, under budgets of one pair, three pairs, all pairs and less than
one pair (the O(tokens) fallback), on every backend runnable here."""

import math

import pytest
import torch

import dpo_fast
from dpo_fast.kernels import chunked_linear
from dpo_fast.ops import linear_loss
from dpo_fast.targets import prepare_targets
from oracles import runnable_backends

BACKENDS = runnable_backends("cpu")
# Every loss type on the compiled and reference backends; the Triton interpreter is slow: a sample.
CASES = [(b, t) for b in BACKENDS if b != "triton" for t in dpo_fast.LOSS_TYPES] + [
    ("triton", t) for t in ("sigmoid", "sigmoid_norm", "nca_pair", "bco_pair") if "triton" in BACKENDS]
SHAPE = {"triton": dict(P=5, T=6, H=16, V=70)}
DEFAULT_SHAPE = dict(P=5, T=7, H=24, V=150)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Several vocabulary chunks on the O(tokens) path and several soft-cap scratch blocks here."""
    monkeypatch.setattr(chunked_linear, "CHUNK_ELEMENTS", 1500)
    monkeypatch.setattr(linear_loss, "SCRATCH_ELEMENTS", 700)


def padded(P, T, H, V, dtype=torch.float32, seed=0):
    """(2P, T) rows with a 2-token prompt: every sequence scores T - 2 tokens (uniform pairs)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * P, T, H, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    labels[:, :2] = -100
    return hidden, labels, {}, g


def packed(P, T, H, V, dtype=torch.float32, seed=0):
    """2P sequences of uneven lengths packed into (1, N) in shuffled order, with padding between;
    pair P - 1 scores nothing."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (2 * P,), generator=g).tolist()
    ids = []
    for s in torch.randperm(2 * P, generator=g).tolist():
        ids += [s] * lengths[s] + [-1]
    ids = torch.tensor(ids).unsqueeze(0)
    N = ids.shape[1]
    hidden = torch.randn(1, N, H, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (1, N), generator=g)
    first = torch.cat([torch.tensor([True]), ids[0, 1:] != ids[0, :-1]])
    labels[0, first] = -100  # a 1-token prompt per sequence
    labels[0, (ids[0] == P - 1) | (ids[0] == 2 * P - 1)] = -100
    return hidden, labels, dict(sequence_ids=ids, num_sequences=2 * P), g


def lm_head(H, V, dtype, g):
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H ** 0.5)).to(dtype)
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    return weight, bias


def pair_rows(labels, P, pack):
    tg = prepare_targets(labels, **pack)
    c = tg.counts.long()
    return (c[:P] + c[P:]).tolist()


def mb_for(rows, V, dtype):
    """The budget that holds exactly `rows` rows of logits (half an element to spare against rounding)."""
    elem = dtype.itemsize
    return (rows * V * elem + elem / 2) / 1e6


def budgets(rows, V, dtype):
    """name -> (logits_memory_mb, expected chunks as (p0, p1, fits), or None for any plan)."""
    P, top = len(rows), max(rows)
    out = {
        "one pair": mb_for(top, V, dtype),
        "three pairs": mb_for(3 * top, V, dtype),
        "all pairs": mb_for(sum(rows), V, dtype),
        "below one pair": mb_for(min(r for r in rows if r) - 1, V, dtype),
    }
    if len(set(r for r in rows if r)) > 1:
        out["some pairs fall back"] = mb_for(sorted(set(rows))[-2], V, dtype)
    return out


def run(hidden, weight, bias, labels, rc, rr, backend, scale=1.7, **kw):
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
    out = dpo_fast.loss(hidden=h, weight=w, bias=b, labels=labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                        backend=backend, **kw)
    (out.loss * scale).backward()  # a non-unit upstream gradient
    return out, (h.grad, w.grad, b.grad)


def close(got, want, tol):
    torch.testing.assert_close(got, want, atol=tol * (1 + want.abs().max().item()), rtol=tol)


def assert_same(a, b, tol):
    (out, grads), (ref, rgrads) = a, b
    for name in ("loss", "losses", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        close(getattr(out, name), getattr(ref, name), tol)
    assert set(out.metrics) == set(ref.metrics)
    for k in ref.metrics:
        close(out.metrics[k], ref.metrics[k], tol)
    for got, want in zip(grads, rgrads):
        assert got.dtype == want.dtype and got.shape == want.shape
        close(got, want, tol)


def count_fallbacks(monkeypatch):
    calls = []
    real = linear_loss.row_stats
    monkeypatch.setattr(linear_loss, "row_stats", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("layout", [padded, packed])
@pytest.mark.parametrize("backend,loss_type", CASES)
def test_every_budget_equals_the_otokens_path(backend, loss_type, layout, monkeypatch):
    shape = SHAPE.get(backend, DEFAULT_SHAPE)
    P, V = shape["P"], shape["V"]
    hidden, labels, pack, g = layout(**shape)
    weight, bias = lm_head(shape["H"], V, torch.float32, g)
    rc, rr = torch.randn(P, generator=g) - 30, torch.randn(P, generator=g) - 30
    kw = dict(loss_type=loss_type, beta=0.2, sft_weight=0.3, logit_softcap=5.0,
              label_smoothing=0.1 if loss_type in ("sigmoid", "robust", "exo_pair") else 0.0, **pack)
    ref = run(hidden, weight, bias, labels, rc, rr, backend, **kw)
    rows = pair_rows(labels, P, pack)
    fallbacks = count_fallbacks(monkeypatch)
    for name, mb in budgets(rows, V, torch.float32).items():
        fallbacks.clear()
        plan = linear_loss.plan_chunks(rows, linear_loss.budget_rows(mb, V, torch.float32))
        if layout is padded:  # uniform pairs: the plan is known
            expected = {"one pair": [(p, p + 1, True) for p in range(P)],
                        "three pairs": [(0, 3, True), (3, P, True)],
                        "all pairs": [(0, P, True)], "below one pair": [(0, P, False)]}[name]
            assert plan == expected, name
        assert any(fits for *_, fits in plan) == (name != "below one pair"), name
        assert all(sum(rows[p0:p1]) <= linear_loss.budget_rows(mb, V, torch.float32)
                   for p0, p1, fits in plan if fits), name
        out = run(hidden, weight, bias, labels, rc, rr, backend, logits_memory_mb=mb, **kw)
        assert_same(out, ref, 2e-5)
        if loss_type == "bco_pair":
            assert len(fallbacks) == 1, name  # one O(tokens) chunk, whatever the budget
        else:
            assert len(fallbacks) == sum(1 for p0, p1, fits in plan if not fits and sum(rows[p0:p1])), name


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("bias_on,cap", [(False, None), (True, None), (False, 30.0)])
def test_float64_no_bias_no_cap_and_averaged(backend, bias_on, cap):
    """float64: the two paths agree to float64 rounding; without bias, without soft-cap; per-token
    log-ratios (average_log_prob) on a loss type that does not default to them."""
    P, T, H, V = 4, 6, 20, 90
    hidden, labels, _, g = padded(P, T, H, V, torch.float64)
    weight, bias = lm_head(H, V, torch.float64, g)
    rc, rr = torch.randn(P, generator=g).double() - 30, torch.randn(P, generator=g).double() - 30
    kw = dict(logit_softcap=cap, average_log_prob=True, label_smoothing=0.2, sft_weight=0.1)
    b = bias if bias_on else None
    outs = []
    for mb in (None, mb_for(2 * (T - 2) * 3, V, torch.float64)):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        bb = None if b is None else b.clone().requires_grad_(True)
        out = dpo_fast.loss(hidden=h, weight=w, bias=bb, labels=labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                            backend=backend, logits_memory_mb=mb, **kw)
        (out.loss * -0.6).backward()
        outs.append((out, h.grad, w.grad, None if bb is None else bb.grad))
    (a, *ga), (r, *gr) = outs
    torch.testing.assert_close(a.loss, r.loss, atol=1e-6, rtol=1e-6)  # the objective runs in float32
    for x, y in zip(ga, gr):
        if y is not None:
            torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-6)
    assert (ga[2] is None) == (b is None)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_bfloat16_error_within_twice_the_otokens_path(backend):
    """bf16, three chunks (dW accumulates in bf16 across them): the budgeted path's error against
    the same loss in float64 is at most ~2x that of the O(tokens) path in bf16."""
    P, T, H, V = 5, 7, 40, 300
    hidden, labels, _, g = padded(P, T, H, V, torch.bfloat16, seed=2)
    weight, bias = lm_head(H, V, torch.bfloat16, g)
    rc, rr = torch.randn(P, generator=g) - 30, torch.randn(P, generator=g) - 30
    kw = dict(logit_softcap=30.0, sft_weight=0.2)
    truth = run(hidden.double(), weight.double(), bias.double(), labels, rc, rr, "reference", **kw)
    ours = run(hidden, weight, bias, labels, rc, rr, backend, logits_memory_mb=mb_for(2 * (T - 2) * 2, V,
                                                                                       torch.bfloat16), **kw)
    base = run(hidden, weight, bias, labels, rc, rr, backend, **kw)
    assert all(x.dtype == torch.bfloat16 for x in ours[1])

    def err(x, y):
        return (x.double() - y.double()).abs().max().item()

    assert err(ours[0].loss, truth[0].loss) <= 2 * err(base[0].loss, truth[0].loss) + 1e-5
    for got, mine, want in zip(ours[1], base[1], truth[1]):
        assert err(got, want) <= 2 * err(mine, want) + 1e-3 * want.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_no_grad_and_frozen_weight(backend):
    shape = SHAPE.get(backend, DEFAULT_SHAPE)
    P, T, V = shape["P"], shape["T"], shape["V"]
    hidden, labels, _, g = padded(**shape)
    weight, bias = lm_head(shape["H"], V, torch.float32, g)
    mb = mb_for(2 * (T - 2) * 2, V, torch.float32)
    one = run(hidden, weight, bias, labels, None, None, backend, scale=1.0, logits_memory_mb=mb)
    neg = run(hidden, weight, bias, labels, None, None, backend, scale=-2.5, logits_memory_mb=mb)
    for a, b in zip(neg[1], one[1]):
        torch.testing.assert_close(a, -2.5 * b)
    with torch.no_grad():
        quiet = dpo_fast.loss(hidden=hidden.clone().requires_grad_(True), weight=weight, labels=labels,
                              bias=bias, backend=backend, logits_memory_mb=mb)
    assert quiet.loss.grad_fn is None
    torch.testing.assert_close(quiet.loss, one[0].loss.detach())
    h = hidden.clone().requires_grad_(True)
    out = dpo_fast.loss(hidden=h, weight=weight, bias=bias, labels=labels, backend=backend, logits_memory_mb=mb)
    out.loss.backward()
    assert weight.grad is None and bias.grad is None
    torch.testing.assert_close(h.grad, one[1][0])


def test_module_form_and_bad_inputs():
    P, T, H, V = 2, 5, 8, 40
    hidden, labels, _, g = padded(P, T, H, V)
    weight, bias = lm_head(H, V, torch.float32, g)
    module = dpo_fast.DPOLoss(beta=0.3, loss_type="ipo", logits_memory_mb=0.01)
    torch.testing.assert_close(module(hidden=hidden, weight=weight, labels=labels).loss,
                               dpo_fast.loss(hidden=hidden, weight=weight, labels=labels, beta=0.3, loss_type="ipo").loss)
    assert "logits_memory_mb=0.01" in repr(module)
    logits = hidden @ weight.T
    with pytest.raises(ValueError, match="logits_memory_mb goes with hidden"):
        module(logits, labels)
    with pytest.raises(ValueError, match="logits_memory_mb goes with hidden"):
        dpo_fast.loss(logits, labels, logits_memory_mb=100)
    for bad in (0, 0.0, -1, -0.5, True, False, "100", None.__class__, math.nan, math.inf, -math.inf,
                torch.tensor(5.0), [100]):
        with pytest.raises(ValueError, match="logits_memory_mb"):
            dpo_fast.loss(hidden=hidden, weight=weight, labels=labels, logits_memory_mb=bad)
        with pytest.raises(ValueError, match="logits_memory_mb"):
            dpo_fast.DPOLoss(logits_memory_mb=bad)
    with pytest.raises(ValueError, match="labels"):  # the op's own range check
        dpo_fast.loss(hidden=hidden, weight=weight, labels=labels + V, logits_memory_mb=1)


def test_plan_chunks():
    plan = linear_loss.plan_chunks
    assert plan([4, 4, 4, 4, 4], 12) == [(0, 3, True), (3, 5, True)]
    assert plan([4, 20, 0, 20, 4, 4], 8) == [(0, 1, True), (1, 4, False), (4, 6, True)]
    assert plan([0, 3, 0], 0) == [(0, 1, True), (1, 3, False)]
    assert plan([5, 5], 1000) == [(0, 2, True)]
    assert linear_loss.budget_rows(525.336576, 128256, torch.float32) == 1024  # one pair of 2 x 512 tokens
    assert linear_loss.budget_rows(525.336575, 128256, torch.float32) == 1023


def _op_args(backend, dtype, mb, need=True):
    P, T, H, V = 3, 5, 12, 40
    hidden, labels, _, g = padded(P, T, H, V, dtype)
    weight, bias = lm_head(H, V, dtype, g)
    tg = prepare_targets(labels)
    ref = torch.randn(2 * P, generator=g).float() - 20
    return (hidden.reshape(-1, H).requires_grad_(need), weight.requires_grad_(need), bias.requires_grad_(need),
            tg.targets.reshape(-1), tg.token_seq.reshape(-1), tg.counts, ref,
            *dpo_fast.LossSettings(beta=0.1, sft_weight=0.2).op_args(), 5.0, mb, need, need, need, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    for dtype in (torch.float32, torch.float64):
        for mb in (mb_for(2 * 3, 40, dtype), mb_for(2 * 3 * 2, 40, dtype), 1e-6):
            torch.library.opcheck(torch.ops.dpo_fast.linear_dpo_loss.default, _op_args(backend, dtype, mb))
    torch.library.opcheck(torch.ops.dpo_fast.linear_dpo_loss.default, _op_args(backend, torch.float32, 1.0, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    P, T, H, V = 3, 5, 12, 40
    hidden, labels, _, g = padded(P, T, H, V)
    weight, bias = lm_head(H, V, torch.float32, g)

    def step(h, w, b):
        out = dpo_fast.loss(hidden=h, weight=w, bias=b, labels=labels, logit_softcap=5.0, backend=backend,
                            logits_memory_mb=mb_for(2 * (T - 2) * 2, V, torch.float32))
        return out.loss * 1.5, out.metrics["rewards/margins"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    c = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    l1, m1 = step(*a)
    l2, m2 = compiled(*c)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(m2, m1)
    for x, y in zip(a, c):
        torch.testing.assert_close(y.grad, x.grad)
