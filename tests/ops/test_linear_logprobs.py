"""linear_sequence_logprobs (fused lm_head + log-probs) on every backend runnable here,
against a float64 oracle built from the formula: hidden @ weight.T + bias, soft-cap, log_softmax."""

import pytest
import torch

from dpo_fast.functional import linear_logprobs_with_stats, linear_sequence_logprobs
from dpo_fast.kernels import chunked_linear
from dpo_fast.kernels.reference import naive_sequence_logprobs
from dpo_fast.targets import prepare_targets
from oracles import packed_logps64, runnable_backends, sequence_logps64, token_logps64

BACKENDS = runnable_backends("cpu")
TOL = {torch.float64: 1e-10, torch.float32: 3e-5}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Several (uneven) vocab chunks / dW slices even at test sizes."""
    monkeypatch.setattr(chunked_linear, "CHUNK_ELEMENTS", 1500)
    try:
        from dpo_fast.kernels import triton_linear
    except ImportError:
        return
    monkeypatch.setattr(triton_linear, "_DW_SLICE_BYTES", 128 * 72 * 4)


def make(S, T, H, V, dtype=torch.float32, bias=False, seed=0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H ** 0.5)).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[torch.rand(S, T, generator=g) < ignore_frac] = -100
    return hidden, weight, b, labels


def logits64(hidden, weight, bias=None, cap=None):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return cap * torch.tanh(z / cap) if cap is not None else z


def leaves(hidden, weight, bias, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in (hidden, weight, bias)]


def run(hidden, weight, bias, labels, g, fn, **kw):
    """fn(...) with a non-uniform upstream gradient g; returns (out, grads)."""
    ins = leaves(hidden, weight, bias)
    out = fn(ins[0], ins[1], labels, bias=ins[2], **kw)
    (out.double() * g).sum().backward()
    return out, [None if t is None else t.grad for t in ins]


def oracle(hidden, weight, bias, labels, g, cap=None, **kw):
    def fn(h, w, lab, bias=None, **kw):
        return sequence_logps64(logits64(h, w, bias, cap), lab, **kw)
    return run(hidden.double(), weight.double(), None if bias is None else bias.double(), labels, g, fn, **kw)


def upstream(S):
    return torch.linspace(-1.5, 2.0, S, dtype=torch.float64)


def assert_matches(hidden, weight, bias, labels, backend, cap=None, tol=None, **kw):
    g = upstream(labels.shape[0] if "num_sequences" not in kw else kw["num_sequences"])
    out, grads = run(hidden, weight, bias, labels, g, linear_sequence_logprobs, backend=backend,
                     logit_softcap=cap, **kw)
    ref, rgrads = oracle(hidden, weight, bias, labels, g, cap=cap, **kw)
    tol = tol or TOL[hidden.dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol * (1 + ref.abs().max().item()), rtol=0)
    for got, want in zip(grads, rgrads):
        if want is not None:
            torch.testing.assert_close(got.double(), want, atol=tol * (1 + want.abs().max().item()), rtol=0)
    return out, grads


# (S, T, H, V): H not a multiple of 16, V not a multiple of any tile or chunk.
CHUNKED_SHAPES = [(3, 11, 40, 1000), (2, 7, 72, 4099)]
SHAPES = {"cpu": CHUNKED_SHAPES, "reference": CHUNKED_SHAPES, "triton": [(3, 9, 40, 300), (2, 6, 72, 257)]}
CAPS = [(False, None), (True, None), (False, 5.0), (True, 30.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [0, 1])
@pytest.mark.parametrize("bias,cap", CAPS)
def test_matches_oracle_float32(backend, shape, bias, cap):
    S, T, H, V = SHAPES[backend][shape]
    hidden, weight, b, labels = make(S, T, H, V, bias=bias, seed=shape)
    out, _ = assert_matches(hidden, weight, b, labels, backend, cap=cap)
    assert out.dtype == torch.float32 and out.shape == (S,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,cap", [(False, None), (True, 5.0)])
def test_bfloat16_error_within_twice_pytorch(backend, bias, cap):
    """bf16 inputs: our error against float64 is at most ~2x that of PyTorch computing the
    same thing in bf16 (logits and their gradient in bf16, log_softmax in float32)."""
    S, T, H, V = SHAPES[backend][0]
    hidden, weight, b, labels = make(S, T, H, V, torch.bfloat16, bias=bias)
    g = upstream(S)

    def naive(h, w, lab, bias=None):
        z = h @ w.T + (bias if bias is not None else 0)
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        return naive_sequence_logprobs(z, lab)

    out, grads = run(hidden, weight, b, labels, g, linear_sequence_logprobs, backend=backend, logit_softcap=cap)
    pt, pgrads = run(hidden, weight, b, labels, g, naive)
    ref, rgrads = oracle(hidden, weight, b, labels, g, cap=cap)
    assert out.dtype == torch.float32
    assert all(x.dtype == torch.bfloat16 for x in grads if x is not None)

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert err(out, ref) <= 2 * err(pt, ref) + 1e-5
    for got, mine, want in zip(grads, pgrads, rgrads):
        if want is not None:
            assert err(got, want) <= 2 * err(mine, want) + 1e-6 * want.abs().max().item()


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in BACKENDS])
def test_bfloat16_many_chunks_error_within_twice_pytorch(backend, monkeypatch):
    """Many vocabulary chunks in bf16 (as at V = 128k): the hidden-state gradient sums one product
    per chunk; the onehot's -W[target] must not be rounded inside one of them (it dominates it)."""
    monkeypatch.setattr(chunked_linear, "CHUNK_ELEMENTS", 96 * 256)  # 32 chunks of 256 columns
    S, T, H, V = 2, 48, 128, 8192
    hidden, weight, _, labels = make(S, T, H, V, torch.bfloat16, ignore_frac=0.1)
    g = upstream(S)

    def naive(h, w, lab, bias=None):
        return naive_sequence_logprobs(h @ w.T, lab)

    _, grads = run(hidden, weight, None, labels, g, linear_sequence_logprobs, backend=backend)
    _, pgrads = run(hidden, weight, None, labels, g, naive)
    _, rgrads = oracle(hidden, weight, None, labels, g)
    for got, mine, want in zip(grads[:2], pgrads[:2], rgrads[:2]):
        err, pt_err = (got.double() - want).abs().max().item(), (mine.double() - want).abs().max().item()
        assert err <= 2 * pt_err, (err, pt_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_average_noncontiguous(backend):
    hidden, weight, b, labels = make(3, 6, 24, 200, torch.float64, bias=True)
    hidden = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous (S, T, H) view
    weight = weight.t().contiguous().t()  # (V, H) with column-major strides
    out, _ = assert_matches(hidden, weight, b, labels, backend, cap=7.0, average=True)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token(backend):
    hidden, weight, b, labels = make(1, 1, 40, 300, bias=True, ignore_frac=0.0)
    assert_matches(hidden, weight, b, labels.int(), backend, shift=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [True, False])
def test_all_tokens_ignored(backend, shift):
    hidden, weight, b, labels = make(2, 5, 40, 300, bias=True)
    if shift:
        labels = labels[:, :1]  # T = 1: the shift leaves nothing to score
        hidden = hidden[:, :1]
    else:
        labels = torch.full_like(labels, -100)
    out, grads = run(hidden, weight, b, labels, upstream(2), linear_sequence_logprobs, backend=backend,
                     shift=shift, logit_softcap=5.0, average=True)
    assert torch.equal(out, torch.zeros(2))
    for x in grads:
        assert not x.isnan().any() and not x.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_padded(backend):
    """Three sequences of lengths 5, 3, 6 packed into (1, 16) with -1 padding."""
    lengths = [5, 3, 6]
    H, V = 40, 300
    hidden, weight, b, labels = make(3, 6, H, V, bias=True, ignore_frac=0.2)
    ph = torch.zeros(1, 16, H)
    pl = torch.full((1, 16), -100)
    ids = torch.full((1, 16), -1)
    pos = 0
    for s, n in enumerate(lengths):
        ph[0, pos:pos + n], pl[0, pos:pos + n], ids[0, pos:pos + n] = hidden[s, :n], labels[s, :n], s
        pos += n
    padded_labels = labels.clone()
    for s, n in enumerate(lengths):
        padded_labels[s, n:] = -100
    g = upstream(3)
    kw = dict(backend=backend, logit_softcap=30.0)
    out_pad, gr_pad = run(hidden, weight, b, padded_labels, g, linear_sequence_logprobs, **kw)
    out_pk, gr_pk = run(ph, weight, b, pl, g, linear_sequence_logprobs, sequence_ids=ids, num_sequences=3, **kw)
    torch.testing.assert_close(out_pk, out_pad, atol=1e-5, rtol=0)
    torch.testing.assert_close(gr_pk[1], gr_pad[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(gr_pk[2], gr_pad[2], atol=1e-5, rtol=0)
    pos = 0
    for s, n in enumerate(lengths):
        torch.testing.assert_close(gr_pk[0][0, pos:pos + n], gr_pad[0][s, :n], atol=1e-5, rtol=0)
        pos += n
    # and against the oracle directly
    ref = packed_logps64(logits64(ph, weight, b, 30.0), pl, ids, 3)
    torch.testing.assert_close(out_pk.double(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_logit_sums(backend):
    """Only the gradients asked for are computed (frozen lm_head, trainable bias); logit_sums
    match the oracle."""
    hidden, weight, b, labels = make(2, 7, 40, 300, bias=True)
    h, bb = hidden.clone().requires_grad_(True), b.clone().requires_grad_(True)
    tg = prepare_targets(labels, ignore_index=-100, shift=True)
    logps, sums = linear_logprobs_with_stats(h, weight, tg.targets, tg.token_seq, tg.num_sequences, bias=bb,
                                             logit_softcap=5.0, backend=backend)
    assert not sums.requires_grad and sums.dtype == torch.float32
    z = logits64(hidden, weight, b, 5.0)
    _, mask = token_logps64(z, labels)
    ref_sums = (z[:, :-1].sum(-1) * mask).sum(-1)
    torch.testing.assert_close(sums.double(), ref_sums, atol=1e-4 * ref_sums.abs().max().item(), rtol=0)
    (logps * upstream(2)).sum().backward()
    h64, b64 = hidden.double().requires_grad_(True), b.double().requires_grad_(True)
    (sequence_logps64(logits64(h64, weight, b64, 5.0), labels) * upstream(2)).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(bb.grad.double(), b64.grad, atol=1e-5, rtol=0)
    assert weight.grad is None


@pytest.mark.parametrize("V", [50257, 151936])
def test_chunked_large_vocab(V, monkeypatch):
    hidden, weight, b, labels = make(1, 3, 8, V, bias=True, ignore_frac=0.0)
    labels[0, -1] = V - 1
    for backend in ("cpu", "reference"):
        if backend in BACKENDS:
            assert_matches(hidden, weight, b, labels, backend, cap=30.0)  # ~40 chunks of 1500 / 2 columns
    monkeypatch.setattr(chunked_linear, "CHUNK_ELEMENTS", 1 << 23)  # the default: one chunk here
    assert_matches(hidden, weight, b, labels, "reference")


def _op_samples(backend):
    out = []
    for dtype, bias, cap in [(torch.float32, True, 5.0), (torch.float64, False, None)]:
        hidden, weight, b, labels = make(2, 5, 24, 100, dtype, bias=bias)
        tg = prepare_targets(labels, ignore_index=-100, shift=True)
        out.append((hidden.reshape(-1, 24).requires_grad_(True), weight.requires_grad_(True),
                    None if b is None else b.requires_grad_(True), tg.targets.reshape(-1),
                    tg.token_seq.reshape(-1), 2, cap, backend))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    for args in _op_samples(backend):
        torch.library.opcheck(torch.ops.dpo_fast.linear_logprobs.default, args)
        hidden, weight, b, targets, token_seq, S, cap, _ = args
        _, _, lse = torch.ops.dpo_fast.linear_logprobs(*args)
        bw = (torch.randn(S, dtype=lse.dtype), hidden.detach(), weight.detach(),
              None if b is None else b.detach(), targets, token_seq, lse.detach(), cap, backend, True, True, True)
        torch.library.opcheck(torch.ops.dpo_fast.linear_logprobs_backward.default, bw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    hidden, weight, b, labels = make(2, 3, 5, 7, torch.float64, bias=True, ignore_frac=0.0)
    labels[1, 1] = -100

    def f(h, w, bias):
        return linear_sequence_logprobs(h, w, labels, bias=bias, logit_softcap=3.0, backend=backend)

    assert torch.autograd.gradcheck(f, tuple(leaves(hidden, weight, b)), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    hidden, weight, b, labels = make(2, 6, 24, 100, bias=True)

    def step(h, w, bias, lab):
        return (linear_sequence_logprobs(h, w, lab, bias=bias, logit_softcap=5.0, backend=backend)
                * torch.tensor([1.0, -2.0])).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, c = leaves(hidden, weight, b), leaves(hidden, weight, b)
    step(*a, labels).backward()
    compiled(*c, labels).backward()
    for x, y in zip(a, c):
        torch.testing.assert_close(y.grad, x.grad, atol=1e-6, rtol=0)


def test_bad_inputs():
    hidden, weight, b, labels = make(2, 4, 8, 30, bias=True)
    f = linear_sequence_logprobs
    with pytest.raises(ValueError, match="weight"):
        f(hidden, weight[:, :6], labels)
    with pytest.raises(ValueError, match="weight"):
        f(hidden, weight.t().contiguous(), labels)
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, torch.where(labels == 5, 30, labels).index_fill_(1, torch.tensor([2]), 30))
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, labels.index_fill(1, torch.tensor([1]), -3))
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, labels[:, :3])
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="hidden"):
        f(hidden.long(), weight, labels)
    with pytest.raises(ValueError, match="hidden"):
        f(hidden[:0], weight, labels[:0])
    with pytest.raises(ValueError, match="hidden"):
        f(hidden[0], weight, labels)
    with pytest.raises(ValueError, match="weight"):
        f(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="weight"):
        f(hidden, weight.to("meta"), labels)
    with pytest.raises(ValueError, match="bias"):
        f(hidden, weight, labels, bias=b[:-1])
    with pytest.raises(ValueError, match="logit_softcap"):
        f(hidden, weight, labels, logit_softcap=-1.0)
    with pytest.raises(ValueError, match="backend"):
        f(hidden, weight, labels, backend="chunked")
    with pytest.raises(ValueError, match="backend 'cuda' is not available on cpu"):
        f(hidden, weight, labels, backend="cuda")
    with pytest.raises(ValueError, match="sequence_ids"):
        f(hidden[:1], weight, labels[:1], sequence_ids=torch.full((1, 4), 3), num_sequences=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_chunked(dtype):
    hidden, weight, b, labels = make(4, 300, 136, 5003, dtype, bias=True)
    hidden, weight, b, labels = (x.cuda() for x in (hidden, weight, b, labels))
    g = upstream(4).cuda()
    outs = [run(hidden, weight, b, labels, g, linear_sequence_logprobs, backend=k, logit_softcap=30.0)
            for k in ("triton", "reference")]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=tol * outs[1][0].abs().max().item(), rtol=0)
    for x, y in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(x.float(), y.float(), atol=tol * y.abs().max().item(), rtol=0)
