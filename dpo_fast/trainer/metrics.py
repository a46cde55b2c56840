"""What a run reports: the metric names (from the loss module), sums by name over a logging window
and over the eval set, and where they go (metrics.jsonl, TensorBoard, the progress bar)."""

from __future__ import annotations

import importlib.util
import json
import logging
import resource
from pathlib import Path

import torch
import torch.distributed as dist

from ..data import batch_completion_tokens
from ..loss import METRIC_NAMES
from ..progress import Progress
from .rundir import METRICS_FILE

logger = logging.getLogger(__name__)

# Per-step metrics: the loss and dpo_fast.loss's metrics. Eval adds the policy's own preference,
# logp(chosen) > logp(rejected), which unlike the reward accuracy is informative at step 0.
LOSS_METRICS = ("loss",) + METRIC_NAMES
EVAL_METRICS = LOSS_METRICS + ("logps/accuracies",)
# Token-level means (over every scored token x vocabulary entry) rather than means over pairs.
_TOKEN_LEVEL = ("logits/chosen", "logits/rejected")


class Sums:
    """Named float64 sums on a device, reducible across ranks in one collective."""

    def __init__(self, names, device, values=None):
        self.names = tuple(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.values = torch.zeros(len(self.names), dtype=torch.float64, device=device) if values is None else \
            torch.tensor(values, dtype=torch.float64, device=device)

    def add(self, **named) -> None:
        for name, v in named.items():
            self.values[self.index[name]] += v.double() if isinstance(v, torch.Tensor) else float(v)

    def __getitem__(self, name: str) -> float:
        return float(self.values[self.index[name]])

    def reduced(self, enabled: bool) -> "Sums":
        out = Sums(self.names, self.values.device)
        out.values = self.values.clone()
        if enabled:
            dist.all_reduce(out.values)
        return out

    def zero_(self) -> None:
        self.values.zero_()

    def tolist(self) -> list[float]:
        return self.values.tolist()


def peak_memory_gb(device) -> float:
    """CUDA: max allocated by torch on this device; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsWriter:
    """metrics.jsonl, TensorBoard (when installed) and the progress bar; only rank 0 writes."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, progress: bool, total: int, start: int):
        self.enabled = enabled
        self.path = out_dir / METRICS_FILE
        self.tb = None
        self.bar = Progress(total, enabled and progress, "dpo train", unit="step", initial=start)
        if not enabled or not tensorboard:
            return
        if importlib.util.find_spec("tensorboard") is None:
            logger.warning("TensorBoard events are not written: the tensorboard package is not installed "
                           "(pip install tensorboard, or pass --no-tensorboard)")
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "runs"), purge_step=start or None)
        except Exception as e:  # a broken tensorboard install must not stop training
            logger.warning("TensorBoard disabled: %s", e)

    def truncate_after(self, step: int) -> None:
        """Drop lines of a killed run past the checkpoint being resumed (they are recomputed)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if rec.get("step", 0) <= step and not (rec.get("step") == step and rec.get("phase") == "eval_after"):
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k not in ("step", "phase") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def progress(self, n: int = 1, postfix: dict | None = None) -> None:
        self.bar.update(n, postfix)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def eval_batch_sums(out, batch, pairs: int, vocab_size: int, sft_weight: float, sums: Sums) -> None:
    """Add one eval batch: per-pair metrics as sums over pairs, logits/* as sums over scored
    tokens x vocabulary (with their denominators), so the whole set's means are exact."""
    tokens = batch_completion_tokens(batch).to(torch.float64)
    P = pairs
    sft = -out.chosen_logps.double() / tokens[:P].to(out.chosen_logps.device).clamp(min=1)
    per_pair = {
        "loss": out.losses.double() + sft_weight * sft, "loss/preference": out.losses,
        "loss/sft": sft, "rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards),
        "rewards/margins": out.chosen_rewards - out.rejected_rewards,
        "logps/chosen": out.chosen_logps, "logps/rejected": out.rejected_logps,
        "logps/accuracies": (out.chosen_logps > out.rejected_logps),
    }
    denom = {"logits/chosen": max(float(tokens[:P].sum()) * vocab_size, 1.0),
             "logits/rejected": max(float(tokens[P:].sum()) * vocab_size, 1.0)}
    sums.add(**{k: v.double().sum() for k, v in per_pair.items()})
    sums.add(**{k: out.metrics[k].double() * denom[k] for k in _TOKEN_LEVEL})
    sums.add(**{f"{k}/denominator": denom[k] for k in _TOKEN_LEVEL}, pairs=P)


def eval_sums(device) -> Sums:
    return Sums(EVAL_METRICS + tuple(f"{k}/denominator" for k in _TOKEN_LEVEL) + ("pairs",), device)


def eval_result(sums: Sums, replicas: int = 1) -> dict:
    """Means over the whole eval set from (all-reduced) sums; `replicas` ranks saw each pair
    (the tensor-parallel ranks of a group)."""
    count = max(sums["pairs"], 1.0)
    result = {}
    for name in EVAL_METRICS:
        if name in _TOKEN_LEVEL:
            result[name] = sums[name] / sums[f"{name}/denominator"]
        else:
            result[name] = sums[name] / count
    return result | {"pairs": int(sums["pairs"]) // replicas}
