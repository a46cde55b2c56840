"""Shared helpers of the data and reference-cache tests: tiny models and preference data, no downloads."""

from __future__ import annotations

import contextlib
import json
import random

import torch

from dpo_fast import tiny

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
    """Other test runs share the 2 cores: oversubscribed OpenMP threads are ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
