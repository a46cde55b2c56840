"""Float64 oracles written from the formulas, independent of the package's code paths."""

import math

import torch
import torch.nn.functional as F

import dpo_fast

cuda = torch.cuda.is_available()


def runnable_backends(device="cpu"):
    return [name for name, info in dpo_fast.available_backends(device).items() if info.available]


def token_logps64(logits, labels, ignore_index=-100, shift=True, sequence_ids=None):
    """(per-token log-probs, scored mask) in float64, from the formula."""
    x = logits.double()
    labels = labels.long()
    if shift:
        x, labels = x[:, :-1], labels[:, 1:]
        if sequence_ids is not None:
            same = (sequence_ids[:, :-1] == sequence_ids[:, 1:]) & (sequence_ids[:, :-1] >= 0)
    elif sequence_ids is not None:
        same = sequence_ids >= 0
    mask = labels != ignore_index
    if sequence_ids is not None:
        mask = mask & same
    lp = torch.log_softmax(x, -1).gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    return torch.where(mask, lp, 0.0), mask


def sequence_logps64(logits, labels, ignore_index=-100, shift=True, average=False):
    lp, mask = token_logps64(logits, labels, ignore_index, shift)
    total = lp.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def packed_logps64(logits, labels, sequence_ids, num_sequences, shift=True, ignore_index=-100):
    lp, _ = token_logps64(logits, labels, ignore_index, shift, sequence_ids)
    ids = (sequence_ids[:, :-1] if shift else sequence_ids).clamp(min=0).reshape(-1)
    return torch.zeros(num_sequences, dtype=torch.float64).index_add_(0, ids, lp.reshape(-1))


def pair_loss64(a, b, loss_type, beta, eps=0.0, lc=None, lr=None):
    """Per-pair losses of the DPO family from the published formulas (a, b: log-ratios)."""
    ls = F.logsigmoid
    h = a - b
    if loss_type == "sigmoid":
        return -(1 - eps) * ls(beta * h) - eps * ls(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * ls(beta * h) + eps * ls(-beta * h)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "exo_pair":
        e = eps or 1e-3
        p = torch.sigmoid(beta * h)
        # KL(p || (1-e, e)) of the two-way preference distribution.
        return p * (torch.log(p) - math.log(1 - e)) + (1 - p) * (torch.log(1 - p) - math.log(e))
    if loss_type == "nca_pair":
        return -ls(beta * a) - 0.5 * ls(-beta * a) - 0.5 * ls(-beta * b)
    if loss_type == "bco_pair":
        d = torch.cat([beta * a, beta * b]).mean().detach()
        return -ls(beta * a - d) - ls(-(beta * b - d))
    if loss_type == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * a) + torch.sigmoid(beta * b)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * a) + 1 - torch.sigmoid(beta * h)
    if loss_type == "sigmoid_norm":
        z = beta * (a / lc - b / lr)
        return -(1 - eps) * ls(z) - eps * ls(-z)
    raise AssertionError(loss_type)


def make(S, T, V, dtype=torch.float32, scale=3.0, seed=0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(S, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[torch.rand(S, T, generator=g) < ignore_frac] = -100
    return logits, labels


def check_against_oracle(logits, labels, backend, tol, **kw):
    """Forward and gradient (non-uniform upstream gradient per sequence) against float64."""
    x = logits.detach().clone().requires_grad_(True)
    out = dpo_fast.sequence_logprobs(x, labels, backend=backend, **kw)
    x64 = logits.detach().double().requires_grad_(True)
    ref = sequence_logps64(x64, labels, **kw)
    g = torch.linspace(-1.5, 2.0, ref.shape[0], dtype=torch.float64)
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    scale = 1 + ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref, atol=tol * scale, rtol=0)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=tol, rtol=0)
    return out, x.grad


def batch(P=3, T=9, V=61, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2 * P, T, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    labels[:, :3] = -100  # the prompt
    labels[1, 7:] = -100  # padding
    ref_c = torch.randn(P, generator=g) * 3 - 30
    ref_r = torch.randn(P, generator=g) * 3 - 30
    return logits, labels, ref_c, ref_r


def oracle(logits, labels, ref_c, ref_r, loss_type="sigmoid", beta=0.1, eps=0.0, sft_weight=0.0, average=None):
    """The whole DPO objective in float64 from its formula, with autograd for the gradient."""
    x = logits.detach().double().requires_grad_(True)
    lp, mask = token_logps64(x, labels)
    logps, n = lp.sum(-1), mask.sum(-1).double()
    P = logps.shape[0] // 2
    if average is None:
        average = loss_type == "ipo"
    ratio = logps - torch.cat([ref_c, ref_r]).double()
    if average:
        ratio = ratio / n
    losses = pair_loss64(ratio[:P], ratio[P:], loss_type, beta, eps, n[:P], n[P:])
    total = losses.mean() - sft_weight * (logps[:P] / n[:P]).mean()
    total.backward()
    return total.detach(), losses.detach(), logps.detach(), x.grad, beta * ratio.detach()
