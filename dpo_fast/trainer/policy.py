"""The trained module and how it is optimised: the policy loss as one nn.Module (decoder + fused
loss, so DDP / FSDP hooks see all of it), its distributed wrapping, the optimizer and the schedule."""

from __future__ import annotations

import contextlib
import inspect
import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from .. import hf
from ..loss import DPOLoss
from . import lora
from .references import reference_kwargs

logger = logging.getLogger(__name__)


class PolicyLoss(nn.Module):
    """forward(batch, **references) -> DPOOutput (pairs) or RankingOutput (ranked data, the
    Plackett-Luce loss): the decoder's hidden states and the lm_head weight go to `loss`, a
    DPOLoss holding the run's LossSettings; logits never exist. References: ref_chosen / ref_rejected (B,), ref_logps (B, K), or none; with
    base_reference (LoRA without a cache) the reference is the base model, the adapter disabled,
    run inside this forward (under FSDP the root's forward is where the weights are gathered)."""

    def __init__(self, model: nn.Module, loss: DPOLoss, compute_dtype: torch.dtype, *, ranked: bool = False,
                 base_reference: bool = False):
        super().__init__()
        self.model = model
        self.loss = loss
        self.compute_dtype = compute_dtype
        self.ranked = ranked
        self.base_reference = base_reference
        self._head = (hf.lm_head_parts(model),)  # a tuple: the parts stay registered once, under model

    @property
    def head(self) -> hf.LMHead:
        return self._head[0]

    def forward(self, batch: dict, ref_chosen=None, ref_rejected=None, ref_logps=None):
        refs = {"ref_chosen": ref_chosen, "ref_rejected": ref_rejected, "ref_logps": ref_logps}
        if self.base_reference:
            logps = lora.base_model_logps(self.model, self.head, batch, self.compute_dtype, self.loss.settings.backend)
            refs.update(reference_kwargs(logps, batch, self.ranked))
        inputs = hf.fused_inputs(self.head, batch, self.compute_dtype)
        with torch.autocast(inputs["hidden"].device.type, enabled=False):
            if self.ranked:
                return self.loss.ranking(**inputs, ref_logps=refs["ref_logps"], num_responses=batch["num_responses"])
            return self.loss(**inputs, ref_chosen_logps=refs["ref_chosen"], ref_rejected_logps=refs["ref_rejected"])


def fsdp_wrap(policy: PolicyLoss, compute_dtype: torch.dtype, world: int, device: torch.device) -> PolicyLoss:
    """FSDP2: each transformer block its own unit, the loss wrapper the root (its forward unshards
    the embeddings, final norm and lm_head that the fused loss uses outside the decoder)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = policy.model
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
        if compute_dtype != torch.float32 else MixedPrecisionPolicy()
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        logger.warning("FSDP: %s names no transformer block classes (_no_split_modules); sharding the whole "
                       "model as one unit", type(model).__name__)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    return policy


def ddp_wrap(policy: PolicyLoss, device: torch.device):
    from torch.nn.parallel import DistributedDataParallel as DDP

    # No buffer broadcast per forward: eval forwards run on the ranks independently.
    no_sync_buffers = {"forward_sync_buffers": False} \
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False}
    return DDP(policy, device_ids=[device.index] if device.type == "cuda" else None, **no_sync_buffers)


def grad_sync(wrapped, enabled: bool, fsdp: bool):
    """context(last_micro_step): skip the gradient all-reduce on all but the last micro-step."""
    if not enabled:
        return lambda last: contextlib.nullcontext()
    if fsdp:
        @contextlib.contextmanager
        def ctx(last):
            wrapped.set_requires_gradient_sync(last)
            yield
        return ctx
    return lambda last: contextlib.nullcontext() if last else wrapped.no_sync()


def average_gradients(params, group, world: int) -> None:
    """Average the gradients over the data-parallel replicas (tensor parallelism: each replica's
    parameters are DTensors over its own tp ranks, so DDP does not apply; one all-reduce each)."""
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(g, group=group)
            g.div_(world)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ for parameters that may mix DTensors (sharded: their norm reduces over their
    mesh) and plain tensors (replicated); returns the total norm before clipping."""
    norms = []
    for p in params:
        if p.grad is not None:
            n = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
            norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
    return total


def make_optimizer(name: str, params, lr: float, weight_decay: float, *, betas=(None, None),
                   eps: float | None = None) -> torch.optim.Optimizer:
    """The optimizer; betas / eps (adam, adamw only) where given, torch's defaults otherwise; Adam(W)
    fused where torch can (fused_update)."""
    params = list(params)
    cls = {"rmsprop": torch.optim.RMSprop, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam,
           "sgd": torch.optim.SGD}[name]
    extra = {}
    if name in ("adam", "adamw"):
        b1, b2 = betas
        if b1 is not None or b2 is not None:
            extra["betas"] = (0.9 if b1 is None else b1, 0.999 if b2 is None else b2)
        if eps is not None:
            extra["eps"] = eps
        if fused_update(params):
            extra["fused"] = True
    return cls(params, lr=lr, weight_decay=weight_decay, **extra)


def fused_update(params) -> bool:
    """Adam(W)'s fused kernel where torch has one for every parameter (plain float tensors on the CPU or
    CUDA): the same update without the per-parameter temporaries of the for-loop / foreach ones
    (measured here on Gemma 3 270M's 262144 x 640 float32 embedding: one for-loop AdamW step grows RSS by
    1280 MB, two copies of the parameter, in 4.9 s; the fused step by 0 MB in 1.9 s)."""
    return bool(params) and all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda")
                                and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): a linear warmup
    from 1/(warmup+1) to 1 over `warmup` steps, then constant or a linear/cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """Which pairs each step uses: a seeded permutation per epoch, `batch_size` pairs per step.
    A pure function of (seed, epoch, step), so a run resumes from its step number alone."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int):
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm

    def global_batch(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        return perm[pos * self.batch_size:(pos + 1) * self.batch_size]
