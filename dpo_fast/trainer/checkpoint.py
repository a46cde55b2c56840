"""Checkpoints and the final model: saved as they came in (the checkpoint's dtype, its config
unchanged, tied weights once), written to a temporary directory and renamed, so a crash leaves
either the old checkpoint or the new one; RNG states per rank; full (unsharded) FSDP states."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import hf
from . import lora
from .config import TrainConfig
from .rundir import CHECKPOINT_PREFIX, STATE_FILE, checkpoints, file_records

logger = logging.getLogger(__name__)
SCALER_FILE = "scaler.pt"


@contextlib.contextmanager
def sigint_deferred():
    """Ctrl-C waits until the block is done (then raises KeyboardInterrupt), so files are written
    whole; a no-op off the main thread, where no signal handler can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_gauss": [int(np_state[3]), float(np_state[4])], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def full_state_dicts(fsdp: bool, policy, optimizer, *, with_optimizer: bool = True):
    """(model state dict or None for 'the module's own', optimizer state dict or None), in full on
    every rank (FSDP: a collective that gathers the shards to CPU)."""
    if not fsdp:
        return None, optimizer.state_dict() if with_optimizer else None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(policy, options=opts)
    osd = get_optimizer_state_dict(policy, optimizer, options=opts) if with_optimizer else None
    prefix = "model."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in msd.items()}, osd


def _tied_duplicates(model) -> set[str]:
    """Names under which a tied parameter appears a second time (e.g. lm_head.weight = embed_tokens.weight)."""
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in model.named_parameters()}


def save_model(model, directory: Path, state_dict: dict | None = None, dtype: torch.dtype | None = None) -> None:
    """save_pretrained with tied weights once and the config as loaded (use_cache untouched); the
    weights in `dtype` (the final model: the dtype the checkpoint came in, `model.checkpoint_dtype`),
    or as trained (checkpoints: float32 masters, so a resumed run continues bit for bit). A LoRA
    model saves its adapter only, as trained (lora.save_adapter)."""
    if lora.is_peft(model):
        lora.save_adapter(model, directory, state_dict)
        return
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v for k, v in sd.items() if k not in _tied_duplicates(model)}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    config = model.config
    saved = {k: getattr(config, k, None) for k in ("dtype", "use_cache", "distributed_config")}
    try:
        if saved["distributed_config"] is not None:  # a whole model is saved, loadable without torchrun
            config.distributed_config = None
        model.save_pretrained(directory, state_dict=sd)
        # save_pretrained writes the dtype of the parameters in memory (float32 masters): the
        # config goes down again with the dtype the weights were saved in and use_cache as loaded.
        if dtype is not None:
            config.dtype = dtype
        if hasattr(model, "loaded_use_cache"):
            config.use_cache = model.loaded_use_cache
        config.save_pretrained(directory)
    finally:
        for k, v in saved.items():
            setattr(config, k, v)


def save_checkpoint(out_dir: Path, step: int, *, dist_info, fsdp: bool, policy, model, tokenizer, optimizer, scheduler,
                    state: dict, keep: int | None, model_only: bool = False, scaler_state: dict | None = None) -> Path:
    """checkpoint-STEP with the model, tokenizer, optimizer, scheduler, per-rank RNG states (and the
    fp16 loss scale) and the trainer state (written last: a directory without it is not a
    checkpoint); model_only (--save-only-model): the model, tokenizer and trainer state only.
    Rotation removes only this run's older checkpoints."""
    msd, osd = full_state_dicts(fsdp, policy, optimizer, with_optimizer=not model_only)
    state = dict(state, save_only_model=model_only)
    rngs = [rng_state()]
    if dist_info.enabled and not model_only:
        rngs = [None] * dist_info.world
        dist.all_gather_object(rngs, rng_state())
    final = out_dir / f"{CHECKPOINT_PREFIX}{step}"
    if dist_info.main:
        tmp = out_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_model(model, tmp, msd)  # as trained: resume continues from the exact weights
        tokenizer.save_pretrained(tmp)
        if not model_only:
            torch.save(osd, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"ranks": rngs}, tmp / "rng_state.pt")
            if scaler_state is not None:
                torch.save(scaler_state, tmp / SCALER_FILE)
        state["files"] = file_records(tmp)  # what --resume verifies before trusting the checkpoint
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for _, old in checkpoints(out_dir, state["run_id"])[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved %s", final)
    if dist_info.enabled:
        dist.barrier()
    return final


def load_training_state(ckpt: Path, *, dist_info, fsdp: bool, policy, optimizer, scheduler, scaling=None) -> None:
    """Optimizer, scheduler, this rank's RNG state (and the fp16 loss scale) from a checkpoint (the
    weights were loaded with the model)."""
    if scaling is not None and (ckpt / SCALER_FILE).exists():
        scaling.load_state_dict(torch.load(ckpt / SCALER_FILE, map_location="cpu", weights_only=True))
    osd = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(policy, optimizer, optim_state_dict=osd, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(osd)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
    rngs = torch.load(ckpt / "rng_state.pt", map_location="cpu", weights_only=True)["ranks"]
    if len(rngs) == dist_info.world:
        set_rng_state(rngs[dist_info.rank])
    else:
        logger.warning("resuming on %d rank(s) a run saved on %d: RNG states are not restored", dist_info.world,
                       len(rngs))


def load_weights_into(model, ckpt: Path, device) -> None:
    """A checkpoint's weights into a model given as a module (tied weights are saved once)."""
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        sd.update(load_file(str(f), device=str(device)))
    sd = {k: v.to(model.state_dict()[k].dtype) if k in model.state_dict() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in _tied_duplicates(model)]
    if unexpected or missing:
        raise ValueError(f"--resume {ckpt}: its weights do not fit the model given (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")


def save_merged(cfg: TrainConfig, model, out_dir: Path, dtype: torch.dtype) -> Path:
    """--merge-lora: OUTPUT_DIR/merged, a plain causal LM with the adapter merged into the base
    weights, in `dtype`. From a --model path, the base is loaded afresh and the saved adapter put
    on it (also under FSDP, whose weights are sharded); a model given as a module is merged in
    place (after training: nothing uses it afterwards)."""
    from peft import PeftModel  # the peft extra, present whenever --lora-r trained an adapter

    target = out_dir / "merged"
    if isinstance(cfg.model, (str, Path)):
        base = hf.load_causal_lm(cfg.model, device="cpu", check_head=not cfg.skip_head_check)
        merged = PeftModel.from_pretrained(base, str(out_dir)).merge_and_unload()
    else:
        merged = model.merge_and_unload()
    save_model(merged, target, dtype=dtype)
    return target
