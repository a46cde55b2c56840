"""The CUDA lane: the same oracles on CUDA tensors for the triton and cuda backends.
Skipped on machines without a GPU (CI); run on a GPU machine with `pytest tests/kernels/test_cuda.py`."""

import pytest
import torch

import dpo_fast
from oracles import check_against_oracle, make, runnable_backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = runnable_backends("cuda") if torch.cuda.is_available() else []


def on_gpu(*tensors):
    return [t.cuda() for t in tensors]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("S,T,V", [(3, 5, 1), (3, 6, 7), (2, 9, 1000), (2, 33, 4099), (2, 17, 50257), (1, 9, 151936)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_oracle(backend, S, T, V, dtype):
    logits, labels = on_gpu(*make(S, T, V, dtype))
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    check_against_oracle(logits, labels, backend, tol)
    big = torch.zeros(S, T + 3, V + 5, dtype=dtype, device="cuda")
    view = big[:, 1:T + 1, :V]  # misaligned rows with batch/time strides
    view.copy_(logits)
    check_against_oracle(view, labels, backend, tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    logits, labels = on_gpu(*make(4, 16, 32003, dtype, scale=2.0))
    x = logits.clone().requires_grad_(True)
    out = dpo_fast.sequence_logprobs(x, labels, backend=backend)
    ref = dpo_fast.sequence_logprobs(logits.double(), labels, backend="reference")
    assert (out.double() - ref).abs().max() < 1e-3 * (1 + ref.abs().max())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bad_labels_raise_without_killing_the_context(backend):
    logits, labels = on_gpu(*make(2, 4, 10))
    labels[0, 2] = 10
    with pytest.raises(ValueError, match="labels"):
        dpo_fast.sequence_logprobs(logits, labels, backend=backend)
    torch.cuda.synchronize()  # the context is still usable
    assert torch.ones(1, device="cuda").item() == 1.0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fused_loss_matches_reference_backend(backend):
    from oracles import batch

    logits, labels, rc, rr = on_gpu(*batch(P=4, T=33, V=5003))
    grads = []
    for be in (backend, "reference"):
        x = logits.clone().requires_grad_(True)
        out = dpo_fast.loss(x, labels, rc, rr, backend=be, sft_weight=0.2)
        out.loss.backward()
        grads.append((out.loss, x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_inductor(backend):
    from oracles import batch

    logits, labels, rc, rr = on_gpu(*batch())
    step = lambda x: dpo_fast.loss(x, labels, rc, rr, backend=backend).loss
    x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    step(x1).backward()
    torch.compile(step, fullgraph=True)(x2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
