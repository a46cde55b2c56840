"""What a run trusts is checked first (issue 22, items 6b, 6c and parts of 9): a reference cache
computed in another dtype is accepted with a note naming it (and its own fingerprint is the one
printed), a damaged checkpoint is never loaded (--resume falls back to the previous one, saying so),
--resume past the end changes nothing, a damaged or half-written cache says how to repair it."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from dpo_fast.cli import main
from dpo_fast.demo import TRAIN_FILE
from dpo_fast.refcache import precompute_reference
from dpo_fast.trainer import TrainError, train
from test_trainer import tiny  # noqa: F401  (the tiny model fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = dict(optimizer="adamw", learning_rate=3e-3, warmup_steps=2, logging_steps=1, save_steps=0, progress=False,
            tensorboard=False, max_length=64, split="train[:16]", batch_size=8)


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# 6b. A cache computed in another dtype: accepted, with a note; its own fingerprint printed


def test_a_bfloat16_cache_is_accepted_with_a_note_and_its_own_fingerprint(tiny, tmp_path, caplog):
    cache = tmp_path / "cache_bf16"
    precompute_reference(str(tiny), str(TRAIN_FILE), cache, split="train[:16]", max_length=64, dtype="bfloat16",
                         progress=False)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["fingerprint"]["dtype"] == "bfloat16"
    with caplog.at_level(logging.INFO):
        train(str(tiny), str(TRAIN_FILE), tmp_path / "run", ref_cache=str(cache), max_steps=1, **FAST)
    text = caplog.text
    assert "computed in bfloat16" in text and "float32" in text, text
    assert manifest["fingerprint_sha256"][:12] in text  # the cache's own fingerprint, which names its dtype
