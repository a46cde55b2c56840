"""The DPO loss from hidden states and the lm_head weight under a memory budget for logits:
three GEMM passes instead of four.

The O(tokens) path (ops.linear) never holds logits, so its backward recomputes them: 8NHV FLOPs.
When the user grants `logits_memory_mb`, this op walks the batch in chunks of whole preference
pairs (sequence p and P + p; every scored token of both) whose logits fit the budget:

  z = h_c @ W^T (+ bias, soft-cap)          one GEMM into a buffer reused by every chunk
  lse, target logit, logit sum per row      the backend's row kernel token_stats, on z
  d loss / d logps of the chunk's pairs     closed form (objectives.sequence_objective)
  G = g * (onehot - softmax) over z         the backend's row kernel token_grad, in place
                                            (times 1 - (z/c)^2 under a soft-cap)
  dH_c = G @ W,  dW += G^T @ h_c,  db += sum G

6NHV FLOPs, no recompute; the gradients are ready after the forward, whose backward only scales
them by grad_output (as the from-logits dpo_loss op). The loss gradient of a pair depends only on
that pair, so a chunk's d loss / d logps is the batch's (mean over all P pairs) restricted to the
chunk: nothing about the batch mean depends on the chunking. `bco_pair` couples pairs through
the batch mean of the rewards: it runs the whole batch as one O(tokens) chunk (a first pass for
the mean would itself be a GEMM pass: no gain over four).

A run of pairs whose logits alone exceed the budget is one chunk on the O(tokens) path (stats,
then gradients with recompute: ops.linear's row_stats / row_grads), with no error.

GEMMs are torch.mm in the inputs' dtype (bf16 stays bf16, as in kernels.chunked_linear); the row
kernels accumulate in float32. dW accumulates across chunks in the weight's dtype (one rounding
per chunk for bf16/fp16, as gradient accumulation over micro-batches), db in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import resolve_backend
from ..kernels import token_grad, token_stats
from ..kernels.chunked_linear import logits_block
from ..loss_settings import LossSettings
from ..objectives import loss_dtype, sequence_objective
from ..targets import acc_dtype, check_softcap, check_targets
from .double_backward import refuse_double_backward
from .dpo_loss import scale_grad
from .linear import row_grads, row_stats, scored_rows

# One megabyte of budget: 10^6 bytes (one pair of 2 x 512 tokens at V = 128256 in float32 is 525 MB).
MB = 1_000_000
# Elements of the soft-cap derivative scratch (one per chunk, on top of the budget): 32 MiB of float32.
SCRATCH_ELEMENTS = 1 << 23


def budget_rows(logits_memory_mb: float, vocab: int, dtype: torch.dtype) -> int:
    """Rows of logits (vocab entries each, in dtype) that fit the budget."""
    return int(logits_memory_mb * MB) // (vocab * dtype.itemsize)


def plan_chunks(pair_rows: list[int], max_rows: int) -> list[tuple[int, int, bool]]:
    """Chunks of consecutive pairs [p0, p1) and whether they fit: pairs are added while their rows
    fit max_rows; a run of pairs that do not fit alone is one O(tokens) chunk (fits = False);
    pairs that score nothing join the current chunk."""
    chunks: list[list] = []
    for p, rows in enumerate(pair_rows):
        fits = rows <= max_rows
        if chunks:
            last = chunks[-1]
            if rows == 0 or (last[2] == fits and (not fits or last[3] + rows <= max_rows)):
                last[1], last[3] = p + 1, last[3] + rows
                continue
        chunks.append([p, p + 1, fits, rows])
    return [(p0, p1, fits) for p0, p1, fits, _ in chunks]


class _Walk:
    """One forward: per-sequence sums, the loss settings and the gradients so far."""

    def __init__(self, hidden, weight, bias, counts, ref_logps, settings, softcap, need, scored, backend):
        self.hidden, self.weight, self.bias, self.softcap, self.backend = hidden, weight, bias, softcap, backend
        self.counts, self.ref_logps, self.settings = counts, ref_logps, settings
        self.need_h, self.need_w, self.need_b = need
        self.acc = acc_dtype(hidden.dtype)
        dev = hidden.device
        self.logps = torch.zeros(counts.shape[0], dtype=self.acc, device=dev)
        self.logit_sums = torch.zeros_like(self.logps)
        # Every scored row of dH is written once; the others stay 0.
        new = torch.empty if scored == hidden.shape[0] else torch.zeros
        self.dH = new(hidden.shape, dtype=hidden.dtype, device=dev) if self.need_h else None
        self.dW = None  # the first chunk's product, then accumulated into
        self.db = torch.zeros(weight.shape[0], dtype=self.acc, device=dev) if self.need_b else None

    def objective_grad(self, seq: Tensor, lse: Tensor, picked: Tensor, lsum: Tensor) -> Tensor | None:
        """Add a chunk's tokens to their sequences (complete now: chunks hold whole pairs); the
        batch's d loss / d logps at each token, or None when no gradient is needed. Pairs of later
        chunks are still 0, which changes nothing for this chunk's pairs (the losses are pair-local;
        bco_pair runs as one chunk)."""
        self.logps.index_add_(0, seq, picked - lse)
        self.logit_sums.index_add_(0, seq, lsum)
        if not (self.need_h or self.need_w or self.need_b):
            return None
        return sequence_objective(self.logps, self.counts, self.ref_logps, self.settings).grad_logps[seq]

    def in_budget(self, rows: Tensor, tgt: Tensor, seq: Tensor, buf: Tensor) -> None:
        """A chunk that fits: its logits in buf, the row kernels on them in place, 3 GEMMs in all."""
        h = self.hidden.index_select(0, rows)
        z = logits_block(h, self.weight, self.bias, 0, self.weight.shape[0], self.softcap, buf)
        lse, picked, lsum = (x[0] for x in token_stats(z.unsqueeze(0), tgt.unsqueeze(0), self.backend))
        g = self.objective_grad(seq, lse, picked, lsum)
        if g is None:
            return
        G = _grad_in_place(z, tgt, lse, g, self.softcap, self.backend)
        if self.need_h:
            self.dH.index_copy_(0, rows, torch.mm(G, self.weight))
        if self.need_w:
            self.dW = torch.mm(G.t(), h) if self.dW is None else self.dW.addmm_(G.t(), h)
        if self.need_b:
            self.db += G.sum(0, dtype=self.acc)

    def fallback(self, rows: Tensor, tgt: Tensor, seq: Tensor) -> None:
        """A chunk on the O(tokens) path: stats, then the gradients with the logits recomputed."""
        h = self.hidden.index_select(0, rows)
        local = torch.arange(rows.numel(), device=rows.device)
        lse, picked, lsum = row_stats(h, self.weight, self.bias, local, tgt, self.softcap, self.backend)
        g = self.objective_grad(seq, lse, picked, lsum)
        if g is None:
            return
        dh, dW, db = row_grads(h, self.weight, self.bias, local, tgt, lse, g, self.softcap, self.need_h,
                               self.need_w, self.need_b, self.backend)
        if self.need_h:
            self.dH.index_copy_(0, rows, dh.to(self.hidden.dtype))
        if self.need_w:
            self.dW = dW if self.dW is None else self.dW.add_(dW)
        if self.need_b:
            self.db += db

    def outputs(self):
        obj = sequence_objective(self.logps, self.counts, self.ref_logps, self.settings)
        empty = self.hidden.new_empty(0)
        dW = self.dW
        if self.need_w and dW is None:  # nothing scored
            dW = torch.zeros(self.weight.shape, dtype=self.weight.dtype, device=self.weight.device)
        dt = loss_dtype(self.logps)
        return (obj.loss, obj.losses, self.logps.to(dt), self.logit_sums.to(dt),
                self.dH if self.need_h else empty, dW if self.need_w else empty.clone(),
                self.db.to(self.bias.dtype) if self.need_b else empty.clone())


def _grad_in_place(z: Tensor, tgt: Tensor, lse: Tensor, g: Tensor, softcap: float | None, backend: str) -> Tensor:
    """Logits z (M, V), soft-capped if softcap -> g * (onehot - softmax) in place, times
    d capped / d uncapped = 1 - (z/c)^2 (read from z, a row block at a time, before token_grad
    overwrites it)."""
    M, V = z.shape
    step = M if softcap is None else max(1, min(M, SCRATCH_ELEMENTS // V))
    scratch = None if softcap is None else z.new_empty(step * V)
    for r0 in range(0, M, step):
        zb, sl = z[r0:r0 + step], slice(r0, r0 + step)
        if softcap is not None:
            d = scratch[: zb.numel()].view_as(zb)
            torch.mul(zb, zb, out=d).mul_(-1.0 / (softcap * softcap)).add_(1.0)
        token_grad(zb.unsqueeze(0), tgt[sl].unsqueeze(0), lse[sl].unsqueeze(0).contiguous(), g[sl].unsqueeze(0),
                   zb.unsqueeze(0), backend)
        if softcap is not None:
            zb.mul_(d)
    return z


# ---------------------------------------------------------------- the op


@torch.library.custom_op("dpo_fast::linear_dpo_loss", mutates_args=())
def linear_dpo_loss_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, token_seq: Tensor, counts: Tensor,
    ref_logps: Tensor | None, beta: float, loss_types: str, loss_weights: list[float], label_smoothing: float,
    sft_weight: float, per_token_ratios: bool, logit_softcap: float | None, logits_memory_mb: float,
    need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden (N, H), targets / token_seq (N,) canonical (dpo_fast.targets), counts (2P,), the loss
    settings as LossSettings.op_args() flattens them -> (loss, losses (P,), logps (2P,),
    logit_sums (2P,), dH (N, H), dW (V, H), db (V,)): the gradients of the loss, or (0,) tensors
    where need_* is False. Float64 inputs give float64 results, others float32."""
    S, V = counts.shape[0], weight.shape[0]
    P = S // 2
    check_targets(targets, V, token_seq, S)
    settings = LossSettings.from_op_args(beta, loss_types, loss_weights, label_smoothing, sft_weight,
                                         per_token_ratios)
    idx, M = scored_rows(targets)
    need = (need_hidden, need_weight, need_bias and bias is not None)
    walk = _Walk(hidden, weight, bias, counts, ref_logps, settings, logit_softcap, need, M, backend)
    # Scored rows grouped by pair (stable: each sequence's tokens keep their order).
    seq = token_seq.index_select(0, idx)
    order = torch.sort(seq % P, stable=True).indices
    idx, seq = idx[order], seq[order]
    pair_rows = torch.bincount(seq % P, minlength=P).tolist()  # the one host sync of the plan
    if "bco_pair" in settings.types:  # pairs coupled through the batch mean: one O(tokens) chunk
        chunks = [(0, P, False)]
    else:
        chunks = plan_chunks(pair_rows, budget_rows(logits_memory_mb, V, hidden.dtype))
    widest = max([sum(pair_rows[p0:p1]) for p0, p1, fits in chunks if fits], default=0)
    buf = hidden.new_empty(widest * V)
    start = 0
    for p0, p1, fits in chunks:
        n = sum(pair_rows[p0:p1])
        if n == 0:  # pairs that score nothing: logps 0, no gradient
            continue
        rows, sq = idx[start:start + n], seq[start:start + n]
        start += n
        tgt = targets.index_select(0, rows)
        if fits:
            walk.in_budget(rows, tgt, sq, buf)
        else:
            walk.fallback(rows, tgt, sq)
    return walk.outputs()


@linear_dpo_loss_op.register_fake
def _(hidden, weight, bias, targets, token_seq, counts, ref_logps, beta, loss_types, loss_weights, label_smoothing,
      sft_weight, per_token_ratios, logit_softcap, logits_memory_mb, need_hidden, need_weight, need_bias, backend):
    S = counts.shape[0]
    f32 = dict(dtype=loss_dtype(hidden), device=hidden.device)
    empty = hidden.new_empty(0)
    return (torch.empty((), **f32), torch.empty(S // 2, **f32), torch.empty(S, **f32), torch.empty(S, **f32),
            torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else empty,
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_weight else empty.clone(),
            torch.empty_like(bias) if (need_bias and bias is not None) else empty.clone())


def _setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the unused outputs
    ctx.save_for_backward(*output[4:])


def _backward(ctx, g_loss, *_):
    refuse_double_backward("loss from hidden states with logits_memory_mb")
    if g_loss is None:  # grads are not materialised: None means zero
        return (None,) * 19
    grads = [scale_grad(t, g_loss) if need else None for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
    return (*grads, *(None,) * 16)


linear_dpo_loss_op.register_autograd(_backward, setup_context=_setup)


def linear_dpo_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, logit_softcap: float | None, tg,
                    ref_logps: Tensor | None, settings: LossSettings):
    """(loss, losses, logps, logit_sums) of dpo_fast.loss's hidden form under settings.logits_memory_mb,
    from checked inputs and canonical targets tg (dpo_fast.targets.Targets)."""
    check_softcap(logit_softcap)
    backend = resolve_backend(settings.backend, hidden.device)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    H = hidden.shape[-1]
    out = torch.ops.dpo_fast.linear_dpo_loss(
        hidden.reshape(-1, H), weight, bias, tg.targets.reshape(-1), tg.token_seq.reshape(-1), tg.counts, ref_logps,
        *settings.op_args(), None if logit_softcap is None else float(logit_softcap), settings.logits_memory_mb,
        *need, backend)
    return out[:4]
