"""What a run reports: the metric names (from the loss module), sums by name over a logging window
and over the eval set, and where they go (metrics.jsonl, TensorBoard, the progress bar)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import resource
from pathlib import Path

import torch
import torch.distributed as dist

from ..loss import METRIC_NAMES
from ..progress import Progress
from ..ranking import ranking_metric_names
from .rundir import METRICS_FILE

logger = logging.getLogger(__name__)

# Per-step metrics: the loss and dpo_fast.loss's metrics. Eval adds the policy's own preference,
# logp(chosen) > logp(rejected), which unlike the reward accuracy is informative at step 0.
LOSS_METRICS = ("loss",) + METRIC_NAMES
EVAL_METRICS = LOSS_METRICS + ("logps/accuracies",)


def loss_metrics(num_responses: int | None = None) -> tuple[str, ...]:
    """What a training step logs: pairs (None), or rankings of K responses (dpo_fast.ranking_loss)."""
    return LOSS_METRICS if num_responses is None else ("loss",) + ranking_metric_names(num_responses)


def eval_metrics(num_responses: int | None = None) -> tuple[str, ...]:
    """What an evaluation reports: the step metrics and the policy's own preference (logps/...)."""
    if num_responses is None:
        return EVAL_METRICS
    return loss_metrics(num_responses) + ("logps/pairwise_accuracy",)


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
    """metrics.jsonl, the --report-to targets (TensorBoard when installed, wandb) and the progress
    bar; only rank 0 writes."""

    def __init__(self, out_dir: Path, enabled: bool, targets, progress: bool, total: int, start: int, *,
                 run_id: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.path = out_dir / METRICS_FILE
        self.tb = self.wandb = None
        self.bar = Progress(total, enabled and progress, "dpo train", unit="step", initial=start)
        if not enabled:
            return
        if "tensorboard" in targets:
            self.tb = _tensorboard(out_dir, start)
        if "wandb" in targets:
            self.wandb = _wandb(out_dir, run_id, config)

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
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if k not in ("step", "phase") and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def progress(self, n: int = 1, postfix: dict | None = None) -> None:
        self.bar.update(n, postfix)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _tensorboard(out_dir: Path, start: int):
    if importlib.util.find_spec("tensorboard") is None:
        logger.warning("TensorBoard events are not written: the tensorboard package is not installed "
                       "(pip install tensorboard, or pass --report-to none)")
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(out_dir / "runs"), purge_step=start or None)
    except Exception as e:  # a broken tensorboard install must not stop training
        logger.warning("TensorBoard disabled: %s", e)
        return None


def _wandb(out_dir: Path, run_id: str | None, config: dict | None):
    """A wandb run named after the output directory; WANDB_MODE (offline, disabled), WANDB_PROJECT
    and the other WANDB_* variables are wandb's own and honoured as they are. A resumed run
    continues the same wandb run (its id is the run's)."""
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dpo_fast"), name=out_dir.name, id=run_id,
                     resume="allow", dir=str(out_dir), config=config)
    mode = os.environ.get("WANDB_MODE")
    logger.info("wandb: logging to run %s%s", run_id, f" (WANDB_MODE={mode})" if mode else "")
    return run
