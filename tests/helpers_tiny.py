"""Shared helpers of the data and reference-cache tests: tiny models and preference data, no downloads."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess

import torch

from dpo_fast_tools import tiny

WORDS = ("the quick brown fox jumps over lazy dog a helpful answer is short correct and polite "
         "what capital of france paris two plus four five water boils cats dogs rose flower").split()


def corpus() -> list[str]:
    return [" ".join(WORDS), *tiny.DEFAULT_TEXTS]


def make_tokenizer(kind: str = "word", **kw):
    return tiny.build_tokenizer(corpus(), kind=kind, **kw)


def make_model(tokenizer, **kw):
    # A larger init than the default so log-probs differ clearly between tokens.
    kw.setdefault("hidden_size", 32)
    kw.setdefault("heads", 2)
    kw.setdefault("initializer_range", 0.3)
    return tiny.build_tiny_model(len(tokenizer), tokenizer=tokenizer, **kw)


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def standard_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": sentence(rng, 2, 9), "chosen": sentence(rng, 1, 7), "rejected": sentence(rng, 1, 7)}
            for _ in range(n)]


def conversational_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": sentence(rng, 2, 6)}],
             "chosen": [{"role": "assistant", "content": sentence(rng, 1, 5)}],
             "rejected": [{"role": "assistant", "content": sentence(rng, 1, 5)}]} for _ in range(n)]


def ranked_rows(n: int, k: int = 3, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": sentence(rng, 2, 8), "responses": [sentence(rng, 1, 6) for _ in range(k)]} for _ in range(n)]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@contextlib.contextmanager
def one_thread():
    """Tiny matrices: one thread is fastest, oversubscribed OpenMP threads on the shared 2 cores are
    ~20x slower, and one thread gives the numbers of the subprocesses (OMP_NUM_THREADS=1), which the
    bit-for-bit comparisons need."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def run_in_session(cmd: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """subprocess.run in its own session, so a timeout also ends torchrun's worker processes."""
    import pytest

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
