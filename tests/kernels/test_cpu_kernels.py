"""Direct tests of the compiled operators torch.ops.dpo_fast_C.token_stats / token_grad (CPU).

Each result is compared with a float64 oracle written from the formulas:
    lse = logsumexp(x), target_logit = x[target], logit_sum = sum(x)        (scored rows; else 0)
    grad = g * (onehot(target) - exp(x - lse))                               (scored rows; else 0)
bf16/f16 gradients are compared with the error PyTorch itself makes when the oracle is rounded
to that dtype. The CUDA kernels are compile-checked by scripts/check_cuda_compile.sh; their
runtime tests live with the Python layer's CUDA lane.
"""

from __future__ import annotations

import math

import pytest
import torch

_C = pytest.importorskip("dpo_fast._C", reason="the extension dpo_fast._C is not built")
OPS = torch.ops.dpo_fast_C

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
IGNORE = -100


# ------------------------------------------------------------------------------------------------
# helpers


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_case(S, T, V, dtype, *, scale=2.0, seed=0, frac_ignored=0.25):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(S, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, V, (S, T), generator=g)
    ignore = torch.rand(S, T, generator=g) < frac_ignored
    targets[ignore] = IGNORE
    # the vocabulary edges are scored somewhere when there is room
    if S * T >= 3:
        targets.view(-1)[0] = 0
        targets.view(-1)[1] = V - 1
        targets.view(-1)[2] = IGNORE
    g_tok = torch.randn(S, T, generator=g, dtype=torch.float64).to(stats_dtype(dtype))
    return x, targets, g_tok


def oracle(x, targets, g_tok):
    """float64 formulas. Returns lse, target_logit, logit_sum, grad (all float64)."""
    xd = x.double()
    scored = targets >= 0
    idx = targets.clamp(min=0, max=max(x.shape[-1] - 1, 0))
    lse = torch.logsumexp(xd, -1)
    tl = xd.gather(-1, idx[..., None]).squeeze(-1)
    ls = xd.sum(-1)
    onehot = torch.zeros_like(xd).scatter_(-1, idx[..., None], 1.0)
    grad = g_tok.double()[..., None] * (onehot - torch.exp(xd - lse[..., None]))
    zero = torch.zeros((), dtype=torch.float64)
    lse, tl, ls = (torch.where(scored, v, zero) for v in (lse, tl, ls))
    grad = torch.where(scored[..., None], grad, zero)
    return lse, tl, ls, grad


def run_ops(x, targets, g_tok, grad_out=None):
    lse, tl, ls = OPS.token_stats(x, targets)
    grad = torch.full_like(x, float("nan")) if grad_out is None else grad_out
    OPS.token_grad(x, targets, lse, g_tok, grad)
    return lse, tl, ls, grad


def stats_tol(dtype):
    # stats are computed from the exact (upcast) inputs: float32-level error except float64
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)


def check_grad(grad, ref, dtype, what=""):
    assert grad.dtype == dtype
    got = grad.double()
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14, equal_nan=True, msg=what)
    elif dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-7, equal_nan=True, msg=what)
    else:
        # At most 2x PyTorch's own error when it stores the exact result in this dtype.
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), what
        own = (ref.to(dtype).double() - ref)[finite].abs().max().item() if finite.any() else 0.0
        err = (got - ref)[finite].abs().max().item() if finite.any() else 0.0
        assert err <= 2 * own + 1e-7, f"{what}: max error {err} > 2 x PyTorch's {own}"


def check_all(x, targets, g_tok, out, what=""):
    lse, tl, ls, grad = out
    r_lse, r_tl, r_ls, r_grad = oracle(x, targets, g_tok)
    sd = stats_dtype(x.dtype)
    for name, got, ref in (("lse", lse, r_lse), ("target_logit", tl, r_tl)):
        assert got.dtype == sd and got.shape == targets.shape and got.is_contiguous()
        torch.testing.assert_close(got.double(), ref, equal_nan=True, msg=f"{what} {name}",
                                   **stats_tol(x.dtype))
    # logit_sum: a sum of V terms, its float32 error scales with sum |x|
    assert ls.dtype == sd
    scale = x.double().abs().sum(-1).clamp(min=1.0)
    tol = 1e-12 if x.dtype == torch.float64 else 2e-6
    bad = ((ls.double() - r_ls).abs() > tol * scale) & ~(torch.isnan(ls) & torch.isnan(r_ls))
    assert not bad.any(), f"{what} logit_sum"
    # the log-probability itself, relative error (the number DPO uses)
    lp, r_lp = (tl.double() - lse.double()), (r_tl - r_lse)
    scored = (targets >= 0) & torch.isfinite(r_lp)
    if scored.any():
        rel = ((lp - r_lp).abs() / r_lp.abs().clamp(min=1.0))[scored].max().item()
        assert rel <= (1e-12 if x.dtype == torch.float64 else 1e-6), f"{what} log-prob rel err {rel}"
    check_grad(grad, r_grad, x.dtype, what)


# ------------------------------------------------------------------------------------------------
# module surface


def test_module_surface():
    assert _C.cpu_capability() in ("avx512", "avx2", "default")
    assert isinstance(_C.cuda_built(), bool)
    assert hasattr(OPS, "token_stats") and hasattr(OPS, "token_grad")


# ------------------------------------------------------------------------------------------------
# values against the oracle


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,S,T", [(1, 2, 5), (7, 3, 11), (1000, 2, 13), (4099, 2, 5),
                                   (50257, 1, 3), (151936, 1, 2)])
def test_against_oracle(V, S, T, dtype):
    x, targets, g_tok = make_case(S, T, V, dtype, seed=V)
    check_all(x, targets, g_tok, run_ops(x, targets, g_tok), f"V={V} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unscored_rows_are_exact_zeros(dtype):
    S, T, V = 2, 6, 300
    x, targets, g_tok = make_case(S, T, V, dtype)
    targets[0] = IGNORE  # a whole sequence of prompt tokens
    targets[1, 1:3] = -1  # any negative value means "not scored"
    lse, tl, ls, grad = run_ops(x, targets, g_tok)  # grad buffer starts as NaN
    un = targets < 0
    for v in (lse, tl, ls):
        assert torch.equal(v[un], torch.zeros_like(v[un]))
    assert torch.equal(grad[un], torch.zeros_like(grad[un]))
    assert (grad[un].view(torch.uint8) == 0).all()  # +0.0 bits
    check_all(x, targets, g_tok, (lse, tl, ls, grad), f"{dtype}")


def test_unscored_rows_are_not_read():
    # NaN everywhere but in the scored row: unscored rows must stay exactly 0 (never read)
    x = torch.full((1, 3, 50), float("nan"))
    x[0, 1] = torch.randn(50)
    targets = torch.tensor([[IGNORE, 4, IGNORE]])
    g_tok = torch.ones(1, 3)
    lse, tl, ls, grad = run_ops(x, targets, g_tok)
    assert torch.equal(lse[0, [0, 2]], torch.zeros(2)) and torch.isfinite(lse[0, 1])
    assert torch.equal(grad[0, 0], torch.zeros(50)) and torch.isfinite(grad[0, 1]).all()


def test_all_rows_unscored_and_empty():
    x = torch.randn(2, 3, 17)
    t = torch.full((2, 3), IGNORE)
    lse, tl, ls, grad = run_ops(x, t, torch.ones(2, 3))
    assert not lse.any() and not tl.any() and not ls.any() and not grad.any()
    e = torch.randn(0, 4, 9)
    lse, tl, ls = OPS.token_stats(e, torch.zeros(0, 4, dtype=torch.long))
    assert lse.shape == (0, 4)
    OPS.token_grad(e, torch.zeros(0, 4, dtype=torch.long), lse, lse, torch.empty_like(e))


# ------------------------------------------------------------------------------------------------
# robustness


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_neg_inf_logits(dtype):
    S, T, V = 1, 4, 4099
    x, _, g_tok = make_case(S, T, V, dtype)
    targets = torch.tensor([[5, 17, 3000, 9]])
    x[0, 0, :] = float("-inf")
    x[0, 0, 5] = 1.5  # only the target is finite: log-prob 0, gradient 0
    x[0, 1, ::3] = float("-inf")  # some -inf off-target
    x[0, 2, :] = float("-inf")  # all -inf: lse = -inf, no NaN in the stats scheme
    lse, tl, ls, grad = run_ops(x, targets, g_tok)
    assert lse[0, 0].item() == 1.5 and tl[0, 0].item() == 1.5
    assert lse[0, 2].item() == float("-inf") and tl[0, 2].item() == float("-inf")
    assert ls[0, 2].item() == float("-inf")
    assert torch.equal(grad[0, 0].double().abs(), torch.zeros(V, dtype=torch.float64))
    assert not torch.isnan(lse).any() and not torch.isnan(ls).any()
    check_all(x, targets, g_tok, (lse, tl, ls, grad), f"{dtype}")  # row 2 grad: NaN like the formula


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_huge_logits(dtype):
    S, T, V = 2, 3, 5003
    x, targets, g_tok = make_case(S, T, V, dtype, scale=1e4, frac_ignored=0.0)
    x[0, 0, 7] = 3e4  # one dominant logit
    lse, tl, ls, grad = out = run_ops(x, targets, g_tok)
    assert torch.isfinite(lse).all() and torch.isfinite(grad).all()
    check_all(x, targets, g_tok, out, f"{dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_only_poisons_its_row(dtype):
    S, T, V = 2, 3, 2100
    x, targets, g_tok = make_case(S, T, V, dtype, frac_ignored=0.0)
    x[1, 2, 2077] = float("nan")  # in the last, partial chunk
    x[0, 1, 3] = float("nan")
    lse, tl, ls, grad = out = run_ops(x, targets, g_tok)
    bad = torch.zeros(S, T, dtype=torch.bool)
    bad[1, 2] = bad[0, 1] = True
    assert torch.isnan(lse[bad]).all() and torch.isnan(ls[bad]).all()
    assert torch.isnan(grad[bad]).all()
    assert torch.isfinite(lse[~bad]).all() and torch.isfinite(grad[~bad]).all()
    check_all(x, targets, g_tok, out, f"{dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_target_out_of_range_gives_nan(dtype):
    S, T, V = 1, 4, 64
    x, _, g_tok = make_case(S, T, V, dtype)
    targets = torch.tensor([[3, V, 10**12, IGNORE]])
    lse, tl, ls, grad = run_ops(x, targets, g_tok)
    for v in (lse, tl, ls):
        assert torch.isnan(v[0, 1:3]).all() and torch.isfinite(v[0, 0]) and v[0, 3] == 0
    assert torch.isnan(grad[0, 1:3]).all() and torch.isfinite(grad[0, 0]).all()
    assert not grad[0, 3].any()


# ------------------------------------------------------------------------------------------------
# layouts, aliasing, determinism


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_views(dtype):
    S, T, V = 2, 5, 1031
    g = torch.Generator().manual_seed(3)
    big = torch.randn(S, T + 1, V + 3, generator=g).to(dtype)
    views = {
        "shifted": big[:, :-1, :V],  # x[:, :-1] of a padded buffer: rows start misaligned
        "offset": big[:, 1:, 3:],  # odd element offset
        "transposed": torch.randn(T, S, V, generator=g).to(dtype).transpose(0, 1),
    }
    targets = torch.randint(0, V, (S, T), generator=g)
    targets[0, 0] = IGNORE
    g_tok = torch.randn(S, T, generator=g).to(stats_dtype(dtype))
    for name, x in views.items():
        assert x.stride(2) == 1 and not x.is_contiguous()
        out = run_ops(x, targets, g_tok)
        check_all(x, targets, g_tok, out, f"{name} {dtype}")
        # same numbers as the contiguous copy, bitwise
        ref = run_ops(x.contiguous(), targets, g_tok)
        for a, b in zip(out, ref):
            assert torch.equal(a, b), name
        # a strided grad buffer (slice of a bigger one, different alignment than the logits)
        gbuf = torch.full((S, T + 2, V + 5), 7.0, dtype=dtype)[:, 1:-1, 1:V + 1]
        OPS.token_grad(x, targets, out[0], g_tok, gbuf)
        assert torch.equal(gbuf, out[3]), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_grad_equals_out_of_place(dtype):
    S, T, V = 2, 4, 4099
    x, targets, g_tok = make_case(S, T, V, dtype)
    lse, tl, ls, grad = run_ops(x, targets, g_tok)
    y = x.clone()
    OPS.token_grad(y, targets, lse, g_tok, y)  # grad written into the logits' storage
    assert torch.equal(y, grad)
    # in place into a non-contiguous view as well
    big = torch.zeros(S, T + 1, V, dtype=dtype)
    big[:, :-1] = x
    view = big[:, :-1]
    OPS.token_grad(view, targets, lse, g_tok, view)
    assert torch.equal(view, grad)
    assert not big[:, -1].any()  # the row outside the view is untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_out_of_place_grad_matches_in_place(dtype):
    # >= 64 MiB of gradient: the out-of-place CPU path uses streaming stores (in-place does not);
    # both must give the same bits, also into a misaligned destination view
    V = 128256
    T = (64 << 20) // (V * dtype.itemsize) + 3
    x, targets, g_tok = make_case(1, T, V, dtype, seed=5)
    lse, _, _ = OPS.token_stats(x, targets)
    y = x.clone()
    OPS.token_grad(y, targets, lse, g_tok, y)
    out = torch.empty_like(x)
    OPS.token_grad(x, targets, lse, g_tok, out)
    assert torch.equal(out, y)
    buf = torch.full((x.numel() + 64,), 3.0, dtype=dtype)
    view = buf[5:5 + x.numel()].view(x.shape)  # destination rows start at an odd element offset
    OPS.token_grad(x, targets, lse, g_tok, view)
    assert torch.equal(view, y)
    assert (buf[:5] == 3).all() and (buf[5 + x.numel():] == 3).all()
    r = slice(0, 4)  # a few rows against the oracle
    check_grad(out[:, r], oracle(x[:, r], targets[:, r], g_tok[:, r])[3], dtype, "large")


def test_partial_overlap_is_rejected():
    x = torch.randn(2, 3, 64)
    t = torch.zeros(2, 3, dtype=torch.long)
    lse, _, _ = OPS.token_stats(x, t)
    buf = torch.randn(2 * 3 * 64 + 1)
    a = buf[:-1].view(2, 3, 64)
    b = buf[1:].view(2, 3, 64)
    with pytest.raises(RuntimeError, match="overlap"):
        OPS.token_grad(a, t, lse, torch.ones(2, 3), b)
    with pytest.raises(RuntimeError, match="overlap"):
        OPS.token_grad(x, t, lse, torch.ones(2, 3), x[:1].expand(2, 3, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_and_thread_count_independent(dtype):
    S, T, V = 4, 16, 3001
    x, targets, g_tok = make_case(S, T, V, dtype)
    a = run_ops(x, targets, g_tok)
    b = run_ops(x, targets, g_tok)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = run_ops(x, targets, g_tok)
    finally:
        torch.set_num_threads(n)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)


# ------------------------------------------------------------------------------------------------
# argument checks (clear errors, never a crash)


def test_bad_arguments_raise():
    x = torch.randn(2, 3, 8)
    t = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="3-D"):
        OPS.token_stats(x[0], t)
    with pytest.raises(RuntimeError, match="stride"):
        OPS.token_stats(x.transpose(1, 2).contiguous().transpose(1, 2), t)
    with pytest.raises(RuntimeError, match="targets"):
        OPS.token_stats(x, t.int())
    with pytest.raises(RuntimeError, match="targets"):
        OPS.token_stats(x, t[:, :2])
    with pytest.raises(RuntimeError, match="dtype|float32"):
        OPS.token_stats(x.int(), t)
    lse, _, _ = OPS.token_stats(x, t)
    with pytest.raises(RuntimeError, match="g_token"):
        OPS.token_grad(x, t, lse, lse.double(), torch.empty_like(x))
    with pytest.raises(RuntimeError, match="grad"):
        OPS.token_grad(x, t, lse, lse, torch.empty_like(x).double())
    with pytest.raises(RuntimeError, match="grad"):
        OPS.token_grad(x, t, lse, lse, torch.empty(2, 3, 9)[..., :8].transpose(0, 1))


def test_float32_logprob_accuracy_large_vocab():
    # exp_u20-based sum-exp vs the float64 oracle: relative error of the log-prob <= 1e-6
    S, T, V = 1, 4, 128256
    x, targets, g_tok = make_case(S, T, V, torch.float32, scale=4.0, frac_ignored=0.0)
    lse, tl, _ = OPS.token_stats(x, targets)
    r_lse, r_tl, _, _ = oracle(x, targets, g_tok)
    scored = targets >= 0
    assert scored.sum() >= 3
    rel = ((tl.double() - lse.double()) - (r_tl - r_lse)).abs() / (r_tl - r_lse).abs()
    assert rel[scored].max().item() <= 1e-6
    assert math.isfinite(lse.sum().item())
