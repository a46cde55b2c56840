"""The reference model's log-probs, computed once and stored on disk (`dpo-fast precompute-ref`).

    dpo-fast precompute-ref --model PATH_OR_NAME --data PATH_OR_NAME --output-dir DIR \\
        [--split train] [--batch-size 8] [--max-length N] [--dtype float32] [--verify 16]

Layout of DIR (readable with pandas / pyarrow: `pandas.read_parquet("DIR/shards")`):

    manifest.json                     what the values depend on (the fingerprint), the list of
                                      shards with their row counts and SHA-256, a checksum
    shards/shard-rRRRRR-NNNNNN.parquet  rank RRRRR's NNNNNN-th shard; columns
        example_id          string   content hash of the example (`dpo_fast.data.example_id`)
        ref_chosen_logps    float64  sum over the chosen completion tokens of log p_ref
        ref_rejected_logps  float64  same for the rejected completion
        chosen_tokens       int64    scored completion tokens (after truncation)
        rejected_tokens     int64
      ranked data instead: ref_logps list<float64>, tokens list<int64> (responses best first)

The values are the float32 results of the fused hidden-state op (`dpo_fast.linear_sequence_logprobs`
through `dpo_fast.hf`: the logits are never built) widened to float64. Nothing here uses pickle:
JSON and Parquet only. Modules: fingerprint.py (what the values depend on), store.py (files,
manifest, shards, verification, the reader), precompute.py (computing and verifying), cli.py.

Crash safety: a shard is written to `shards/.NAME.tmp`, fsynced, then renamed, its SHA-256
recorded beside it first (`.NAME.sha256`); the manifest likewise. A rerun checks every shard it
keeps against that checksum: one edited, damaged or repeating another's examples is moved to
`DIR/damaged/` and its examples are recomputed. Before the first shard, a manifest with `"complete": false` records the fingerprint,
so a rerun resumes only a cache made for the same model/tokenizer/settings. A rerun with the
same command skips the examples already in complete shards; because shards complete in order
and each shard's batches depend only on its examples, the resumed run computes the same
batches as an uninterrupted run and ends with the same values. Each process (torchrun rank, or
`--rank/--world-size`) takes the examples whose id hashes to it and writes only its own shards;
the manifest is finalised once every example is covered.

In a trainer (the same tokenization settings as the cache, and the same kind of model source):

    fp = compute_fingerprint(ref_model, tokenizer, max_length=..., max_prompt_length=...,
                             data_kind="paired", model_path=MODEL_DIR)
    cache = ReferenceCache.open(CACHE_DIR, expected_fingerprint=fp)   # refuses a mismatch
    cache.check_covers(tokenized["example_id"])                       # counts missing examples
    ref = cache.lookup(batch["example_ids"])   # ref_chosen_logps, ref_rejected_logps: (B,) float64
"""

from __future__ import annotations

from .fingerprint import (CACHE_FORMAT_VERSION, DTYPES, compute_fingerprint, config_fingerprint, diff_fingerprints,
                          fingerprint_digest, safetensors_fingerprint, state_dict_fingerprint, weights_fingerprint)
from .precompute import (VerifyReport, compute_examples, precompute_reference, precompute_tokenized,
                         verify_reference_cache)
from .store import (MANIFEST, PAIRED_COLUMNS, RANKED_COLUMNS, SHARD_DIR, CacheCorruptError, CacheError,
                    CacheMismatchError, MissingExamplesError, ReferenceCache, read_manifest)
from .cli import add_arguments, run_cli  # noqa: E402  (the dpo-fast precompute-ref command)

__all__ = ["CACHE_FORMAT_VERSION", "DTYPES", "compute_fingerprint", "config_fingerprint", "diff_fingerprints",
           "fingerprint_digest", "safetensors_fingerprint", "state_dict_fingerprint", "weights_fingerprint",
           "VerifyReport", "compute_examples", "precompute_reference", "precompute_tokenized",
           "verify_reference_cache", "MANIFEST", "PAIRED_COLUMNS", "RANKED_COLUMNS", "SHARD_DIR",
           "CacheCorruptError", "CacheError", "CacheMismatchError", "MissingExamplesError", "ReferenceCache",
           "read_manifest", "add_arguments", "run_cli"]
