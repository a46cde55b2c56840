"""The compute dtype of a run (--dtype) and, for fp16, loss scaling: float16 gradients underflow
without it. bf16 and fp32 need no scaler; the helper is then a pass-through."""

from __future__ import annotations

import torch

from .config import TrainConfig


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype the decoder's autocast and the fused loss run in: bf16 / fp16 as asked; auto:
    bf16 on CUDA devices that support it, else float32."""
    if cfg.dtype == "fp16":
        return torch.float16
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def dtype_label(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


class LossScaling:
    """backward / unscale / step through a torch.amp.GradScaler for fp16, plain calls otherwise.
    Its state goes into checkpoints (scaler.pt) so a resumed fp16 run continues with the same scale."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    @property
    def enabled(self) -> bool:
        return self.scaler is not None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer) -> None:
        """Before clipping: the gradients in their true scale."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        """optimizer.step(), skipped by the scaler when a gradient is inf/nan (then the scale drops)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
