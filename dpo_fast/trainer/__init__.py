"""`dpo-fast train` and `dpo_fast.train(...)`: a thin DPO trainer around the fused loss.

    dpo-fast train --model PATH_OR_NAME --data PATH_OR_NAME --output-dir DIR [options]
    torchrun --nproc_per_node N -m dpo_fast train ...          # DDP (gloo on CPU, nccl on CUDA)
    summary = dpo_fast.train("model_dir", "pairs.jsonl", "out", eval_data="eval.jsonl", max_steps=100)

One step: the policy's decoder gives the final hidden states, and `dpo_fast.loss(hidden=...,
weight=lm_head.weight)` turns them into the loss without ever building logits. Reference
log-probs come from a reference cache on disk (`--ref-cache`, or one this command precomputes
into DIR/ref_cache from the initial `--model`, which is then the reference), so only one model
is in memory while training; `--ref-model` computes them on the fly instead (two models).

Ranked data (prompt + K responses best first) trains with the Plackett-Luce loss
(dpo_fast.ranking_loss); --lora-r trains a LoRA adapter whose reference is the base model with the
adapter disabled, in the same forward; `dpo-fast eval` (eval_command.py) evaluates any model
against any reference with the trainer's evaluation loop.

DIR after a run:
    run.json             the run's id and settings
    metrics.jsonl        one JSON line per logging step (and one per evaluation: eval_before,
                         eval every --eval-steps, eval_after)
    summary.json         {"eval_before": {...}, "eval_after": {...}, "train": {...}}
    config.json, model.safetensors, tokenizer files: the trained policy, saved as the model came in
                         (LoRA: adapter_config.json + adapter_model.safetensors; merged/ with --merge-lora)
    checkpoint-N/        every --save-steps and at the final step: model, optimizer.pt, scheduler.pt,
                         rng_state.pt (scaler.pt for fp16), trainer_state.json (run id, step, settings,
                         metric windows); the model only with --save-only-model
    ref_cache/           the precomputed reference log-probs (when no --ref-cache was given)
    runs/                TensorBoard event files (--report-to tensorboard, when it is installed)

Modules: config.py (TrainConfig: every option once), rundir.py (the output directory: lock,
earlier runs), references.py, policy.py (the trained module, optimizer, schedule), precision.py
(dtype, fp16 loss scaling), lora.py, rankings.py (ranked data), metrics.py (names, writers),
evaluation.py (the evaluation loop), checkpoint.py, loop.py (the Trainer: the loop as named
steps), cli.py, eval_command.py + eval_setup.py (`dpo-fast eval`).
"""

from __future__ import annotations

from .cli import add_arguments, run_cli
from .config import TrainConfig, TrainError, TrainingInterrupted, make_config
from .metrics import EVAL_METRICS, LOSS_METRICS
from .policy import Schedule, lr_factor


def train(model=None, data=None, output_dir=None, *, config: TrainConfig | None = None, **options) -> dict:
    """Train `model` (a directory, hub name or loaded causal LM; then also pass `tokenizer=`) with
    DPO on `data`, writing to `output_dir`; returns the summary also written to summary.json:
    {"eval_before": {...} or None, "eval_after": {...} or None, "train": {...}}.

    Options are the fields of TrainConfig (the `dpo-fast train` flags with underscores; `lr=` too),
    e.g. eval_data=, ref_cache=, beta=, learning_rate=, optimizer=, batch_size=, max_steps=,
    save_steps=, resume=True. Under torchrun every rank calls it; rank 0 writes the files.
    Ctrl-C raises TrainingInterrupted (a KeyboardInterrupt) naming the step and the last checkpoint.
    """
    from .loop import Trainer

    if config is None:
        config = make_config(model, data, output_dir, **options)
    elif options or model is not None:
        raise TrainError("give either config= or model/data/output_dir with options, not both")
    config.check()
    return Trainer(config).run()


__all__ = ["train", "TrainConfig", "TrainError", "TrainingInterrupted", "make_config", "LOSS_METRICS", "EVAL_METRICS", "Schedule",
           "lr_factor", "add_arguments", "run_cli"]
