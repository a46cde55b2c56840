"""sequence_logprobs on every backend runnable here, against the float64 oracle."""

import pytest
import torch

import dpo_fast
from oracles import check_against_oracle, make, packed_logps64, runnable_backends, sequence_logps64

BACKENDS = runnable_backends("cpu")
# Per float dtype: forward / gradient tolerance against the float64 oracle.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


# V covers 1, a small prime, non-multiples of every block size, GPT-2's and Qwen's vocabularies.
SHAPES = [(3, 5, 1), (3, 6, 7), (2, 9, 1000), (2, 3, 4099), (1, 3, 50257), (1, 2, 151936)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S,T,V", SHAPES)
def test_matches_oracle_float32(backend, S, T, V):
    check_against_oracle(*make(S, T, V), backend, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average", [False, True])
def test_matches_oracle_float64(backend, average):
    logits, labels = make(3, 7, 300, torch.float64)
    out, _ = check_against_oracle(logits, labels, backend, TOL[torch.float64], average=average)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_pytorch(backend, dtype):
    """The kernels read bf16/f16 and accumulate in float32: their error against float64 must be
    at most ~2x what PyTorch's own computation in that dtype makes."""
    logits, labels = make(4, 16, 2003, dtype, scale=2.0)
    g = torch.linspace(-1, 1, 4, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    out = dpo_fast.sequence_logprobs(x, labels, backend=backend)
    (out.double() * g).sum().backward()
    x64 = logits.double().requires_grad_(True)
    ref = sequence_logps64(x64, labels)
    (ref * g).sum().backward()
    xt = logits.clone().requires_grad_(True)  # PyTorch in the low precision
    lp = torch.log_softmax(xt[:, :-1], -1).gather(2, labels[:, 1:].clamp(min=0).unsqueeze(2)).squeeze(2)
    own = (lp * (labels[:, 1:] != -100)).sum(-1)
    (own.double() * g).sum().backward()
    assert (out.double() - ref).abs().max() <= 2 * (own.double() - ref).abs().max() + 1e-6
    assert (x.grad.double() - x64.grad).abs().max() <= 2 * (xt.grad.double() - x64.grad).abs().max() + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend):
    tol = TOL[torch.float32]
    # T = 1 with shift: nothing is scored, output 0, gradient 0.
    logits, labels = make(2, 1, 11)
    out, grad = check_against_oracle(logits, labels, backend, tol)
    assert torch.equal(out, torch.zeros(2)) and torch.equal(grad, torch.zeros_like(grad))
    # A sequence with every token ignored gives exactly 0 (and 0, not NaN, when averaged).
    logits, labels = make(3, 6, 40)
    labels[1] = -100
    for average in (False, True):
        out, grad = check_against_oracle(logits, labels, backend, tol, average=average)
        assert out[1] == 0 and torch.all(grad[1] == 0)
    # -inf everywhere off-target, and huge logits, stay finite.
    logits, labels = make(2, 5, 64, ignore_frac=0.0)
    nxt = labels[:, 1:]
    logits[:, :-1] = float("-inf")
    logits[:, :-1].scatter_(2, nxt.unsqueeze(2), 1e4)
    logits[:, :-1, 0] = torch.where(nxt == 0, 1e4, -1e4)
    out, grad = check_against_oracle(logits, labels, backend, tol)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    check_against_oracle(make(2, 5, 64, scale=1e4)[0], labels, backend, tol * 100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_sequence(backend):
    logits, labels = make(3, 5, 30, ignore_frac=0.0)
    logits[1, 2, 7] = float("nan")
    x = logits.clone().requires_grad_(True)
    out = dpo_fast.sequence_logprobs(x, labels, backend=backend)
    out.sum().backward()
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    assert torch.isfinite(x.grad[[0, 2]]).all() and torch.isnan(x.grad[1, 2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_are_read_in_place(backend):
    """Batch/time strides of views are honoured, and the inputs are not copied."""
    big, labels = make(4, 9, 130)
    cases = [big[:, 1:], big[::2], big.transpose(0, 1)[2:5].transpose(0, 1), big[..., :127]]
    for view in cases:
        lab = labels[: view.shape[0], : view.shape[1]].clone()
        lab[lab >= view.shape[2]] = 0
        if view.stride(2) == 1:
            check_against_oracle(view, lab, backend, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels_and_no_shift(backend):
    logits, labels = make(2, 6, 50)
    a = dpo_fast.sequence_logprobs(logits, labels.int(), backend=backend, shift=False)
    torch.testing.assert_close(a.double(), sequence_logps64(logits, labels, shift=False), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [True, False])
def test_packed_matches_oracle_and_padded(backend, shift):
    logits, labels = make(1, 14, 33, ignore_frac=0.2)
    seq = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, -1, -1]])
    x = logits.clone().requires_grad_(True)
    out = dpo_fast.sequence_logprobs(x, labels, sequence_ids=seq, num_sequences=4, shift=shift, backend=backend)
    x64 = logits.double().requires_grad_(True)
    ref = packed_logps64(x64, labels, seq, 4, shift=shift)
    g = torch.tensor([0.5, -2.0, 1.0, 3.0], dtype=torch.float64)
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=0)
    assert out[3] == 0  # sequence 3 has no tokens
    # The same sequences padded one per row give the same log-probs.
    for s, (lo, hi) in enumerate([(0, 4), (4, 7), (7, 12)]):
        row = dpo_fast.sequence_logprobs(logits[:, lo:hi], labels[:, lo:hi], shift=shift, backend=backend)
        torch.testing.assert_close(row[0], out[s], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_gradient_into_logits(backend):
    logits, labels = make(3, 6, 77)
    _, expected = check_against_oracle(logits, labels, backend, TOL[torch.float32])
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0  # a non-leaf, like a model's output
    storage = x.data_ptr()
    g = torch.linspace(-1.5, 2.0, 3)
    out = dpo_fast.sequence_logprobs(x, labels, backend=backend, inplace_backward=True)
    (out * g).sum().backward()
    torch.testing.assert_close(leaf.grad, expected.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(x.detach(), expected.float(), atol=1e-6, rtol=0)  # logits now hold it
    assert x.data_ptr() == storage
    # On a leaf, the gradient is the leaf's own storage, not a copy of it.
    leaf = logits.clone().requires_grad_(True)
    (dpo_fast.sequence_logprobs(leaf, labels, backend=backend, inplace_backward=True) * g).sum().backward()
    assert leaf.grad.data_ptr() == leaf.data_ptr()
    torch.testing.assert_close(leaf.grad, expected.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    logits, labels = make(3, 8, 999)
    runs = []
    for _ in range(2):
        x = logits.clone().requires_grad_(True)
        out = dpo_fast.sequence_logprobs(x, labels, backend=backend)
        out.sum().backward()
        runs.append((out, x.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    logits, labels = make(2, 4, 9, torch.float64)
    x = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: dpo_fast.sequence_logprobs(t, labels, backend=backend), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    from dpo_fast.targets import prepare_targets

    for dtype in (torch.float32, torch.float64):
        logits, labels = make(2, 5, 21, dtype)
        tg = prepare_targets(labels)
        args = (logits.requires_grad_(True), tg.targets, None, 2, backend)
        torch.library.opcheck(torch.ops.dpo_fast.sequence_logprobs.default, args)
        seq = torch.tensor([[0, 0, 1, 1, 1]])
        tg = prepare_targets(labels[:1], sequence_ids=seq, num_sequences=2)
        torch.library.opcheck(torch.ops.dpo_fast.sequence_logprobs.default,
                              (logits[:1].detach().requires_grad_(True), tg.targets, tg.token_seq, 2, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    logits, labels = make(2, 5, 37)
    g = torch.tensor([1.0, -2.0])

    def step(x, lab):
        return (dpo_fast.sequence_logprobs(x, lab, backend=backend, average=True) * g).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    step(x1, labels).backward()
    compiled(x2, labels).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_bad_input_raises_clear_errors():
    logits, labels = make(2, 4, 10)
    bad = labels.clone()
    bad[0, 2] = 10
    with pytest.raises(ValueError, match="labels.*outside \\[0, 10\\)"):
        dpo_fast.sequence_logprobs(logits, bad)
    bad[0, 2] = -5
    with pytest.raises(ValueError, match="labels"):
        dpo_fast.sequence_logprobs(logits, bad, backend="reference")
    for backend in BACKENDS:  # every backend checks inside the op
        with pytest.raises(ValueError, match="labels"):
            dpo_fast.sequence_logprobs(logits, bad, backend=backend)
    with pytest.raises(ValueError, match="labels must have shape"):
        dpo_fast.sequence_logprobs(logits, labels[:, :3])
    with pytest.raises(ValueError, match="logits must be float"):
        dpo_fast.sequence_logprobs(logits.long(), labels)
    with pytest.raises(ValueError, match="labels must be int64 or int32"):
        dpo_fast.sequence_logprobs(logits, labels.float())
    with pytest.raises(ValueError, match="empty batch"):
        dpo_fast.sequence_logprobs(logits[:0], labels[:0])
    with pytest.raises(ValueError, match="V is 0"):
        dpo_fast.sequence_logprobs(logits[..., :0], labels)
    with pytest.raises(ValueError, match="backend must be one of"):
        dpo_fast.sequence_logprobs(logits, labels, backend="fast")
    with pytest.raises(ValueError, match="not available"):
        dpo_fast.sequence_logprobs(logits, labels, backend="cuda")
    with pytest.raises(ValueError, match="sequence_ids and num_sequences"):
        dpo_fast.sequence_logprobs(logits[:1], labels[:1], sequence_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_sequences"):
        dpo_fast.sequence_logprobs(logits[:1], labels[:1], sequence_ids=torch.tensor([[0, 0, 3, 3]]), num_sequences=2)
    # a labels device mismatch is caught before any kernel runs
    with pytest.raises(ValueError, match="labels are on"):
        dpo_fast.sequence_logprobs(logits, labels.to("meta"))


def test_available_backends_says_why():
    status = dpo_fast.available_backends("cpu")
    assert set(status) == set(dpo_fast.BACKENDS)
    assert status["reference"].available
    assert not status["cuda"].available and "CUDA" in status["cuda"].reason
    assert all(isinstance(info.reason, str) and info.reason for info in status.values())
