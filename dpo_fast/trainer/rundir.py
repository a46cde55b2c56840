"""The output directory of a run: one run at a time (a lock naming its holder), and an earlier run
is never overwritten or mixed without the user asking (--resume, --overwrite-output-dir)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from .config import TrainError

logger = logging.getLogger(__name__)

LOCK_FILE = ".dpo_fast.lock"
RUN_FILE = "run.json"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# What marks a directory as holding an earlier run (any of them).
_RUN_MARKERS = (RUN_FILE, METRICS_FILE, SUMMARY_FILE, "model.safetensors", "model.safetensors.index.json",
                "adapter_model.safetensors")


class RunLock:
    """An exclusive lock on the output directory for this process's lifetime (or until released);
    the lock file says which process holds it. Until the run calls `keep` (it is about to write into
    the directory), releasing restores the lock file as it was (removes one this lock created), so a
    refused run leaves an earlier run's directory byte for byte unchanged."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_FILE
        self._file = None
        self._previous: bytes | None = None
        self._kept = False

    def acquire(self) -> None:
        self._previous = self.path.read_bytes() if self.path.exists() else None
        f = open(self.path, "a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().decode(errors="replace").strip() or "another process"
            f.close()
            raise TrainError(f"{self.path.parent} is in use by another training run ({holder}); wait for it to "
                             "finish or stop it, or use another --output-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        f.flush()
        self._file = f

    def keep(self) -> None:
        """The run has claimed the directory: the lock file stays as this run wrote it."""
        self._kept = True

    def release(self) -> None:
        if self._file is not None:
            if not self._kept:  # refused or failed before writing anything: leave no trace
                if self._previous is None:
                    self.path.unlink(missing_ok=True)
                else:
                    self._file.seek(0)
                    self._file.truncate()
                    self._file.write(self._previous)
            self._file.close()  # closing releases the flock (so does the process dying)
            self._file = None


def remove_if_unused(out_dir: Path, created: bool) -> None:
    """A directory this run created and that holds nothing but a lock (the run failed before writing
    anything) is removed again (after the lock is released), so a failed start leaves no trace."""
    if created and out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= {LOCK_FILE}:
        shutil.rmtree(out_dir, ignore_errors=True)


def checkpoints(out_dir: Path, run_id: str | None = None) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in out_dir, oldest first; only run `run_id`'s if given."""
    found = []
    if not out_dir.is_dir():
        return found
    for p in out_dir.iterdir():
        name = p.name
        if not (p.is_dir() and name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit()
                and (p / STATE_FILE).exists()):
            continue
        if run_id is not None and read_state(p).get("run_id") != run_id:
            continue
        found.append((int(name[len(CHECKPOINT_PREFIX):]), p))
    return sorted(found)


def read_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"checkpoint {checkpoint}: {STATE_FILE} is unreadable ({e})") from None


def check_resumable_files(checkpoint: Path) -> None:
    """A checkpoint saved with --save-only-model (or missing its optimizer state) cannot continue a
    run exactly: refused, saying what to do instead."""
    state = read_state(checkpoint)
    if state.get("save_only_model") or not (checkpoint / "optimizer.pt").exists():
        raise TrainError(f"--resume {checkpoint}: the checkpoint holds the model only (saved with --save-only-model: "
                         "no optimizer, scheduler or RNG state), so the run cannot continue where it stopped; start "
                         "a new run from its weights (--model " f"{checkpoint}) in another --output-dir")


def holds_a_run(out_dir: Path) -> bool:
    return out_dir.is_dir() and (any((out_dir / m).exists() for m in _RUN_MARKERS) or bool(checkpoints(out_dir)))


def clear_run(out_dir: Path) -> None:
    """--overwrite-output-dir: remove everything an earlier run left (all but our lock)."""
    for p in out_dir.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def claim_output(path: Path, *, overwrite: bool, flag: str) -> None:
    """The output of a command that is not a resumable run (reproduce's directory, eval's metrics
    file): whatever is already there was not made by this invocation, so it is refused, left
    untouched, unless `flag` was given; then a directory is cleared (all but our lock) and a file is
    replaced when written."""
    if path.is_dir():
        if not any(p.name != LOCK_FILE for p in path.iterdir()):
            return
        if not overwrite:
            raise TrainError(f"{path} is not empty (this command would overwrite or delete what is there); pass "
                             f"{flag} to replace its contents, or use another directory")
        clear_run(path)
    elif path.exists() and not overwrite:
        raise TrainError(f"{path} exists (this command would overwrite it); pass {flag} to replace it, or choose "
                         "another file")


def file_records(directory: Path) -> dict:
    """{relative path: [size, sha256]} of every file in a checkpoint being written (trainer_state.json,
    written last, records them), so a later --resume can tell a damaged file before loading it."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != STATE_FILE:
            with open(p, "rb") as f:
                out[str(p.relative_to(directory))] = [p.stat().st_size, hashlib.file_digest(f, "sha256").hexdigest()]
    return out


def checkpoint_damage(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be trusted (a recorded file missing, truncated or changed), or None.
    Checkpoints of older versions record no files and are trusted as before."""
    for name, (size, digest) in (read_state(checkpoint).get("files") or {}).items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != digest:
                return f"{name} was changed after it was written"
    return None


def find_resume(resume, out_dir: Path) -> Path | None:
    """The checkpoint --resume means: the newest intact one in out_dir ("latest"/True; a damaged
    newer one is skipped with a warning), or the one given (refused if damaged)."""
    if resume in (None, False):
        return None
    if resume not in (True, "latest"):
        path = Path(str(resume))
        if not (path / STATE_FILE).exists():
            raise TrainError(f"--resume {path}: not a checkpoint directory (no {STATE_FILE})")
        damage = checkpoint_damage(path)
        if damage:
            raise TrainError(f"--resume {path}: the checkpoint is damaged ({damage}); resume from an earlier one or "
                             "start over")
        return path
    found = checkpoints(out_dir, current_run_id(out_dir))
    skipped = []
    for _, path in reversed(found):
        damage = checkpoint_damage(path)
        if damage is None:
            if skipped:
                logger.warning("--resume: %s; resuming from %s", "; ".join(skipped), path.name)
            return path
        skipped.append(f"{path.name} is damaged ({damage})")
    if skipped:
        raise TrainError(f"--resume: every checkpoint in {out_dir} is damaged ({'; '.join(skipped)}); start over "
                         "with --overwrite-output-dir")
    return None


def current_run_id(out_dir: Path) -> str | None:
    """The id of the run the directory holds (run.json), or None."""
    try:
        return json.loads((out_dir / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def prepare(out_dir: Path, *, resume, overwrite: bool) -> tuple[Path | None, str]:
    """Decide, before anything is written, what this run does with out_dir: (checkpoint to resume
    or None, run id). Refuses a directory holding an earlier run unless asked; clears it for
    --overwrite-output-dir. Call with the lock held (rank 0 only)."""
    ckpt = find_resume(resume, out_dir)
    if ckpt is not None:
        return ckpt, read_state(ckpt).get("run_id") or uuid.uuid4().hex
    if holds_a_run(out_dir):
        if overwrite:
            clear_run(out_dir)
        elif resume:
            raise TrainError(f"--resume: {out_dir} holds an earlier run but no checkpoint to resume from; use "
                             "--overwrite-output-dir to start over, or another --output-dir")
        else:
            raise TrainError(f"{out_dir} holds an earlier run (metrics, checkpoints or a model); pass --resume to "
                             "continue it, --overwrite-output-dir to replace it, or use another --output-dir")
    return None, uuid.uuid4().hex


def write_run_file(out_dir: Path, run_id: str, settings: dict) -> None:
    (out_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id, "settings": settings}, indent=1) + "\n")
