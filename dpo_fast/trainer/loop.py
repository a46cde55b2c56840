"""The DPO trainer: short named steps over the pieces of this package.

    setup      claim the output dir, tokenize the data once, reference log-probs, the policy, the optimizer
    step       one optimizer step over world_size x grad_accum micro-batches of the step's pairs
    log        the window's means to metrics.jsonl / TensorBoard / the progress bar
    evaluate   the whole eval set, every pair once over all ranks
    save       a checkpoint (the final step always), rotation within this run
    finish     the final model as it came in, summary.json

Data order is a pure function of (seed, epoch, step), so a run resumes from its step number
alone and the same global batch gives the same loss on any number of ranks.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import distributed, hf
from ..backends import check_backend
from ..loss import DPOLoss
from ..prefix_sharing import check_prefix_sharing
from ..data import DataFileError, MalformedRowError, PreferenceCollator, TokenizationSettings, load_and_tokenize
from ..progress import quiet_hf_progress_bars
from . import checkpoint, cpu_memory, evaluation, lora, metrics, precision, rankings, references, rundir
from .config import TrainConfig, TrainError, TrainingInterrupted
from .evaluation import rows as _rows
from .policy import (PolicyLoss, Schedule, average_gradients, clip_grad_norm, ddp_wrap, fsdp_wrap, grad_sync,
                     lr_factor, make_optimizer)

logger = logging.getLogger(__name__)
_WINDOW_EXTRA = ("grad_norm", "tokens", "steps")


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out_dir = Path(cfg.output_dir)
        self.device = hf.resolve_device(cfg.device)
        self.lock = None
        self.writer = None
        self.created_dir = False
        self.steps_done: int | None = None  # optimizer steps done, once training began

    def run(self) -> dict:
        try:
            self.dist = distributed.setup(self.device, tp=self.cfg.tp)
        except ValueError as e:  # --tp that does not divide the world: refused before anything is loaded
            raise TrainError(str(e)) from None
        with quiet_hf_progress_bars(not self.cfg.progress or not self.dist.main):
            try:
                self.setup()
                for step in range(self.start_step, self.total_steps):
                    self.step(step)
                return self.finish()
            except KeyboardInterrupt:  # Ctrl-C: where it stopped and what to resume from, no traceback
                found = rundir.checkpoints(self.out_dir, getattr(self, "run_id", None)) if self.lock else []
                raise TrainingInterrupted(self.out_dir, self.steps_done, found[-1][1] if found else None) from None
            finally:
                if self.writer is not None:
                    self.writer.close()
                if self.lock is not None:
                    self.lock.release()
                    rundir.remove_if_unused(self.out_dir, self.created_dir)

    # ------------------------------------------------------------------------------------------
    # setup

    def setup(self) -> None:
        cfg = self.cfg
        try:
            check_backend(cfg.backend, self.device)
        except ValueError as e:
            raise TrainError(f"--backend: {e}") from None
        world = self.dist.data_world  # tensor-parallel ranks of a group share their batches
        if cfg.batch_size % (world * cfg.grad_accum):
            raise TrainError(
                f"batch size {cfg.batch_size} is not divisible by world size {world} x grad_accum {cfg.grad_accum} = "
                f"{world * cfg.grad_accum}: every rank and accumulation step needs the same number of pairs; use a "
                f"batch size that is a multiple of {world * cfg.grad_accum}")
        self.micro = cfg.batch_size // (world * cfg.grad_accum)
        self.compute_dtype = precision.compute_dtype(cfg, self.device)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model_is_path = isinstance(cfg.model, (str, Path))
        if self.model_is_path:
            config = hf.load_config(cfg.model)
            hf.check_causal_lm(cfg.model, config)
            if cfg.tp > 1:
                hf.check_tp_plan(cfg.model, config)
        else:
            if cfg.tp > 1:
                raise TrainError("--tp: give the model as a path (it is loaded sharded), not as a module")
            hf.lm_head_parts(cfg.model, check=not cfg.skip_head_check)
        self._claim_output_dir()
        self._load_data()
        # after the checks that refuse a run (a refusal is one line), before the model's memory is used
        if self.device.type == "cpu" and cpu_memory.release_freed_memory():
            logger.info("CPU: blocks over %d KiB are mapped apart and unmapped when freed (glibc mmap threshold; "
                        "set MALLOC_MMAP_THRESHOLD_ to choose another)", cpu_memory.MMAP_THRESHOLD // 1024)
        self._load_policy_and_references()
        self._build_optimisation()
        if self.dist.main and self.ckpt is None:  # from here on the directory holds this run
            rundir.write_run_file(self.out_dir, self.run_id, self.cfg.as_json())
        if self.start_step == 0 and self.eval_before is None:
            self.eval_before = self.evaluate("eval_before", 0)

    def _claim_output_dir(self) -> None:
        """Rank 0 locks the directory and decides (resume / refuse / overwrite) before anything is
        written; every rank gets the same verdict (an error is raised on all of them)."""
        verdict = [None]
        if self.dist.main:
            try:
                self.created_dir = not self.out_dir.exists()
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self.lock = rundir.RunLock(self.out_dir)
                self.lock.acquire()
                ckpt, run_id = rundir.prepare(self.out_dir, resume=self.cfg.resume,
                                              overwrite=self.cfg.overwrite_output_dir)
                if ckpt is not None:
                    self._check_resumable(ckpt)
                verdict = [(None, None if ckpt is None else str(ckpt), run_id)]
            except TrainError as e:
                verdict = [(str(e), None, None)]
        if self.dist.enabled:
            dist.broadcast_object_list(verdict, src=0)
        error, ckpt, self.run_id = verdict[0]
        if error is not None:
            raise TrainError(error)
        self.ckpt = None if ckpt is None else Path(ckpt)
        self.state = rundir.read_state(self.ckpt) if self.ckpt is not None else None

    def _check_resumable(self, ckpt: Path) -> None:
        rundir.check_resumable_files(ckpt)
        saved = rundir.read_state(ckpt).get("settings")
        if saved is None:
            raise TrainError(f"--resume {ckpt}: the checkpoint records no settings (made by an older dpo_fast); "
                             "start a new run")
        now = self.cfg.run_settings()
        diffs = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                 if saved.get(k) != now.get(k)]
        if diffs:
            raise TrainError(f"--resume {ckpt}: these settings differ from the run being resumed: {'; '.join(diffs)}. "
                             "Use the run's settings (only max-steps, epochs, evaluation, logging and checkpoint "
                             "cadence may change), or start a new run in another --output-dir")

    def _tokenize(self, source, split: str, what: str):
        try:
            tokenized, report, fmt = load_and_tokenize(source, self.tokenizer, split=split, **self.settings.arguments())
        except (MalformedRowError, DataFileError, FileNotFoundError):
            raise
        except ValueError as e:
            raise TrainError(f"{what} {source}: {e}") from None
        if len(tokenized) == 0:
            raise TrainError(f"{what} {source}: no usable pairs ({report})")
        logger.info("%s: %s", what, report)
        return tokenized, fmt

    def _load_data(self) -> None:
        cfg = self.cfg
        source = cfg.tokenizer if cfg.tokenizer is not None else (cfg.model if self.model_is_path else None)
        if source is None:
            raise TrainError("tokenizer: required when the model is given as a module")
        self.tokenizer = source if not isinstance(source, (str, Path)) else hf.load_tokenizer(source)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.settings = TokenizationSettings(cfg.max_length, cfg.max_prompt_length, cfg.truncation_side,
                                             cfg.max_completion_length)
        self.train_data = self._tokenize(cfg.data, cfg.split, "--data")
        self.eval_data = self._tokenize(cfg.eval_data, cfg.eval_split, "--eval-data") \
            if cfg.eval_data is not None else None
        self.data_kind = rankings.data_kind(self.train_data[1], self.eval_data and self.eval_data[1])
        self.num_responses = self.eval_responses = None  # pairs
        if self.data_kind == "ranked":
            rankings.check_settings(cfg)
            self.num_responses = rankings.responses_per_example(self.train_data[0], "--data")
            if self.eval_data is not None:
                self.eval_responses = rankings.responses_per_example(self.eval_data[0], "--eval-data")
        self.schedule = Schedule(len(self.train_data[0]), cfg.batch_size, cfg.seed)
        if self.schedule.steps_per_epoch == 0:
            raise TrainError(f"--batch-size {cfg.batch_size} is larger than the {len(self.train_data[0])} usable "
                             "pairs of --data; lower --batch-size")
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else \
            max(1, int((cfg.epochs or 1.0) * self.schedule.steps_per_epoch))
        self._check_steps_left()

    def _check_steps_left(self) -> None:
        """--resume of a run already at (with its summary written) or past the end: nothing to train, so
        nothing is touched (a run stopped between its last checkpoint and its summary is finished)."""
        done = int(self.state["global_step"]) if self.state is not None else 0
        finished = (self.out_dir / rundir.SUMMARY_FILE).exists()
        if done > self.total_steps or (done == self.total_steps and finished and done > 0):
            raise TrainError(f"--resume: the run in {self.out_dir} is already at step {done} ({self.ckpt.name}), "
                             f"--max-steps {self.total_steps} asks for no more: nothing to train, nothing changed "
                             "(raise --max-steps or --epochs to continue it)")

    def _load_policy_and_references(self) -> None:
        if self.lock is not None:
            self.lock.keep()  # from here on this run writes into the directory (its reference cache first)
        cfg = self.cfg
        # LoRA without a cache: the reference is the base model, run by the policy (lora.py says why)
        self.base_reference = bool(cfg.lora_r) and cfg.ref_cache is None and cfg.ref_model is None \
            and not cfg.reference_free
        use_cache = not cfg.reference_free and cfg.ref_model is None and not self.base_reference
        progress = cfg.progress and self.dist.main
        whole_model_ckpt = self.ckpt if not cfg.lora_r else None  # a LoRA checkpoint holds the adapter only
        if use_cache and self.model_is_path:  # before the policy is loaded: one model in memory at a time
            references.ensure_caches(cfg, self.out_dir, self.tokenizer, self.settings, self.train_data,
                                     self.eval_data, cfg.model, self.device, progress)
        if self.model_is_path:
            self.model = hf.load_causal_lm(whole_model_ckpt or cfg.model, device=self.device,
                                           attn=cfg.attn_implementation, tp_mesh=self.dist.tp_mesh,
                                           check_head=not cfg.skip_head_check)
            if self.state is not None and self.state.get("model_dtype"):
                self.model.checkpoint_dtype = getattr(torch, self.state["model_dtype"])
        else:
            self.model = cfg.model.to(self.device)
            self.model.checkpoint_dtype = next(self.model.parameters()).dtype
            if use_cache and self.ckpt is None:
                references.ensure_caches(cfg, self.out_dir, self.tokenizer, self.settings, self.train_data,
                                         self.eval_data, self.model, self.device, progress)
            if whole_model_ckpt is not None:
                checkpoint.load_weights_into(self.model, whole_model_ckpt, self.device)
        self.model.loaded_use_cache = getattr(self.model.config, "use_cache", None)
        hf.lm_head_parts(self.model, check=not cfg.skip_head_check)
        if not cfg.keep_dropout:
            hf.disable_dropout(self.model)
        if cfg.gradient_checkpointing:
            _enable_checkpointing(self.model)
        self.packing = cfg.packing if cfg.packing is not None else \
            hf.attn_implementation(self.model.config, self.device, cfg.attn_implementation) == "flash_attention_2"
        if cfg.prefix_sharing:
            check_prefix_sharing(self.model)
        self._open_references()
        if cfg.lora_r:  # after the reference's fingerprint: that is the base weights
            self.model = lora.add_adapter(self.model, cfg, self.ckpt)
        self.head = hf.lm_head_parts(self.model)

    def _open_references(self) -> None:
        cfg = self.cfg
        self.ref_fingerprint = None
        ranked = self.data_kind == "ranked"
        if cfg.reference_free or self.base_reference:
            self.refs_train = self.refs_eval = references.References()
        elif cfg.ref_model is not None:
            ref = hf.load_causal_lm(cfg.ref_model, device=self.device, attn=cfg.attn_implementation,
                                    tp_mesh=self.dist.tp_mesh, check_head=not cfg.skip_head_check).eval()
            ref.requires_grad_(False)
            if not cfg.keep_dropout:
                hf.disable_dropout(ref)
            if cfg.prefix_sharing:
                check_prefix_sharing(ref)
            self.refs_train = self.refs_eval = references.References(
                head=hf.lm_head_parts(ref), compute_dtype=self.compute_dtype, backend=cfg.backend, ranked=ranked)
        else:
            self.ref_fingerprint = (self.state or {}).get("reference_fingerprint") or \
                references.reference_fingerprint(self.model, self.tokenizer, cfg, self.settings, self.data_kind)
            self.refs_train, self.refs_eval = references.open_caches(
                cfg, self.out_dir, self.ref_fingerprint, self.train_data[0]["example_id"],
                None if self.eval_data is None else self.eval_data[0]["example_id"])

    def _build_optimisation(self) -> None:
        cfg = self.cfg
        self.collator = PreferenceCollator(self.tokenizer.pad_token_id, packing=self.packing,
                                           prefix_sharing=cfg.prefix_sharing)
        self.policy = PolicyLoss(self.model, DPOLoss(cfg.loss_settings()), self.compute_dtype,
                                 ranked=self.data_kind == "ranked", base_reference=self.base_reference)
        self.model.train()
        if self.dist.tp > 1:  # DTensor parameters: gradients averaged over the data groups by hand
            self.wrapped = self.policy
        elif self.dist.enabled and cfg.fsdp:
            self.policy = self.wrapped = fsdp_wrap(self.policy, self.compute_dtype, self.dist.world, self.device)
        elif self.dist.enabled:
            self.wrapped = ddp_wrap(self.policy, self.device)
        else:
            if cfg.fsdp:
                logger.warning("--fsdp without several processes (torchrun): training on one device unsharded")
            self.wrapped = self.policy
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg.optimizer, self.params, cfg.learning_rate, cfg.weight_decay,
                                        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        warmup = cfg.warmup(self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, self.total_steps, cfg.lr_scheduler))
        self.scaling = precision.LossScaling(self.compute_dtype, self.device)
        self.sync = grad_sync(self.wrapped, self.dist.enabled, cfg.fsdp)
        self.step_metrics = metrics.loss_metrics(self.num_responses)
        self.window = metrics.Sums(self.step_metrics + _WINDOW_EXTRA, self.device)
        self.start_step, self.eval_before, self.last_logged, self.total_tokens = 0, None, {}, 0.0
        if self.ckpt is not None:
            self._restore()
        self.writer = metrics.MetricsWriter(self.out_dir, self.dist.main, cfg.report_targets(), cfg.progress,
                                            self.total_steps, self.start_step, run_id=self.run_id,
                                            config=cfg.as_json())
        if self.ckpt is not None:
            self.writer.truncate_after(self.start_step)
        self.t_window = self.t_start = time.perf_counter()
        self.tokens_run = 0.0
        self.steps_done = self.start_step

    @property
    def sharded(self) -> bool:
        """Parameters are DTensors (FSDP2 or tensor parallelism): states are gathered to save them."""
        return self.dist.tp > 1 or (self.cfg.fsdp and self.dist.enabled)

    def _restore(self) -> None:
        checkpoint.load_training_state(self.ckpt, dist_info=self.dist, fsdp=self.sharded, policy=self.policy,
                                       optimizer=self.optimizer, scheduler=self.scheduler, scaling=self.scaling)
        s = self.state
        self.start_step = int(s["global_step"])
        windows = s.get("window_ranks") or []
        if len(windows) == self.dist.world:
            self.window = metrics.Sums(self.step_metrics + _WINDOW_EXTRA, self.device, windows[self.dist.rank])
        self.eval_before = s.get("eval_before")
        self.last_logged = dict(s.get("last_logged") or {})
        self.total_tokens = float(s.get("total_tokens", 0.0))
        logger.info("resuming from %s (step %d)", self.ckpt, self.start_step)

    # ------------------------------------------------------------------------------------------
    # the loop

    def step(self, step: int) -> None:
        """One optimizer step: this rank's micro-batches of the step's pairs, clipping, update."""
        cfg = self.cfg
        indices = self.schedule.global_batch(step)
        lr_now = self.optimizer.param_groups[0]["lr"]
        step_sums = metrics.Sums(self.step_metrics, self.device)
        tokens = 0
        for k in range(cfg.grad_accum):
            start = (self.dist.data_rank * cfg.grad_accum + k) * self.micro
            batch = self.collator(_rows(self.train_data[0], indices[start:start + self.micro]))
            refs = self.refs_train(batch, self.device)
            with self.sync(k == cfg.grad_accum - 1):
                out = self.wrapped(batch, **refs)
                self.scaling.backward(out.loss / cfg.grad_accum)
            step_sums.add(loss=out.loss.detach() / cfg.grad_accum,
                          **{m: out.metrics[m].detach() / cfg.grad_accum for m in self.step_metrics[1:]})
            tokens += _model_tokens(batch)
        if self.dist.tp > 1 and self.dist.data_world > 1:
            average_gradients(self.params, self.dist.data_group, self.dist.data_world)
        self.scaling.unscale_(self.optimizer)
        gn = clip_grad_norm(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        self.scaling.step(self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.window.values[:len(self.step_metrics)] += step_sums.values
        self.window.add(grad_norm=gn.detach(), tokens=tokens, steps=1)
        done = self.steps_done = step + 1
        if done % cfg.logging_steps == 0 or done == self.total_steps:
            self.log(done, lr_now)
        self.writer.progress(1)
        if cfg.eval_steps and done % cfg.eval_steps == 0 and done != self.total_steps:  # the last: finish()
            self.evaluate("eval", done)
        if done == self.total_steps or (cfg.save_steps and done % cfg.save_steps == 0):
            self.save(done)

    def log(self, done: int, lr: float) -> None:
        """Means of the window over its steps and the ranks (tokens summed over ranks)."""
        w = self.window.reduced(self.dist.enabled)
        world = self.dist.world if self.dist.enabled else 1
        nsteps = max(w["steps"] / world, 1.0)
        elapsed = max(time.perf_counter() - self.t_window, 1e-9)
        peak = torch.tensor(metrics.peak_memory_gb(self.device), dtype=torch.float64, device=self.device)
        if self.dist.enabled:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        record = {"step": done, "epoch": round(done / self.schedule.steps_per_epoch, 4)}
        record.update({m: w[m] / world / nsteps for m in self.step_metrics})
        tokens = w["tokens"] / self.dist.tp  # the tp ranks of a group count the same tokens
        record.update(learning_rate=lr, grad_norm=w["grad_norm"] / world / nsteps,
                      tokens_per_second=tokens / elapsed, peak_memory_gb=float(peak))
        self.writer.write(record)
        self.last_logged = record
        self.total_tokens += tokens
        self.tokens_run += tokens
        self.window.zero_()
        self.t_window = time.perf_counter()
        acc = "rewards/accuracies" if self.num_responses is None else "rewards/ranking_accuracy"
        self.writer.progress(0, {"loss": record["loss"], "acc": record[acc]})

    def evaluate(self, phase: str, step: int) -> dict | None:
        """Metrics of the whole eval set, each example counted once over all ranks."""
        if self.eval_data is None:
            return None
        result = evaluation.evaluate(self.policy, self.model, self.eval_data[0], self.refs_eval, self.collator,
                                     batch_size=self.cfg.eval_batch_size or self.micro, dist=self.dist,
                                     device=self.device, vocab_size=self.head.vocab_size,
                                     num_responses=self.eval_responses)
        self.writer.write({"step": step, "phase": phase, **{f"eval_{k}": v for k, v in result.items()}})
        logger.info("%s: %s", phase, ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        return result

    def save(self, done: int) -> None:
        windows = [self.window.tolist()]
        if self.dist.enabled:
            windows = [None] * self.dist.world
            dist.all_gather_object(windows, self.window.tolist())
        state = {
            "run_id": self.run_id, "global_step": done, "epoch": done / self.schedule.steps_per_epoch,
            "world_size": self.dist.world, "num_pairs": len(self.train_data[0]), "total_steps": self.total_steps,
            "window_ranks": windows, "eval_before": self.eval_before, "last_logged": self.last_logged,
            "total_tokens": self.total_tokens, "reference_fingerprint": self.ref_fingerprint,
            "model_dtype": str(self.model.checkpoint_dtype).removeprefix("torch."),
            "settings": self.cfg.run_settings(), "config": self.cfg.as_json(),
        }
        with checkpoint.sigint_deferred():  # a checkpoint is written whole or not at all
            checkpoint.save_checkpoint(self.out_dir, done, dist_info=self.dist, fsdp=self.sharded,
                                       policy=self.policy, model=self.model, tokenizer=self.tokenizer,
                                       optimizer=self.optimizer, scheduler=self.scheduler, state=state,
                                       keep=self.cfg.save_total_limit, model_only=self.cfg.save_only_model,
                                       scaler_state=self.scaling.state_dict())

    def finish(self) -> dict:
        runtime = time.perf_counter() - self.t_start
        eval_after = self.evaluate("eval_after", self.total_steps)
        msd, _ = checkpoint.full_state_dicts(True, self.policy, self.optimizer) if self.sharded else (None, None)
        summary = {
            "eval_before": self.eval_before, "eval_after": eval_after,
            "train": dict(self.last_logged, global_step=self.total_steps, runtime_s=runtime,
                          total_tokens=self.total_tokens, tokens_per_second_overall=self.tokens_run / max(runtime, 1e-9),
                          world_size=self.dist.world, tp=self.dist.tp, packing=self.packing,
                          lm_head_rows_per_rank=_local_rows(self.head.weight),
                          dtype=precision.dtype_label(self.compute_dtype)),
        }
        if self.dist.main:
            with checkpoint.sigint_deferred():  # the final model and summary.json, whole or not at all
                checkpoint.save_model(self.model, self.out_dir, msd, dtype=self.model.checkpoint_dtype)
                self.tokenizer.save_pretrained(self.out_dir)
                if self.cfg.merge_lora:
                    merged = checkpoint.save_merged(self.cfg, self.model, self.out_dir, self.model.checkpoint_dtype)
                    self.tokenizer.save_pretrained(merged)
                (self.out_dir / rundir.SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        distributed.barrier(self.dist)
        return summary


def _model_tokens(batch: dict) -> int:
    """Tokens the model ran on (padding excluded; a shared prompt once)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["segment_ids" if "segment_ids" in batch else "sequence_ids"] >= 0).sum())


def _local_rows(weight) -> int:
    """The lm_head rows this rank holds (all of them unless sharded over the vocabulary)."""
    return (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]


def _enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing with the non-reentrant torch.utils.checkpoint."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise TrainError(f"{type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
