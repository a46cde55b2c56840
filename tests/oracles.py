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
