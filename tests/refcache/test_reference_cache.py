"""dpo_fast.refcache: the on-disk reference log-prob cache (`dpo-fast precompute-ref`)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("transformers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from helpers_tiny import make_model, make_tokenizer, one_thread, ranked_rows, standard_rows, write_jsonl  # noqa: E402

from dpo_fast import hf, refcache  # noqa: E402
from dpo_fast_tools import tiny
from dpo_fast.refcache import (CacheCorruptError, CacheError, CacheMismatchError, MissingExamplesError,  # noqa: E402
                               ReferenceCache, compute_fingerprint, precompute_reference)

REPO = Path(__file__).resolve().parents[2]
MAX_LENGTH = 24
N_ROWS = 24
SETTINGS = dict(max_length=MAX_LENGTH, batch_size=3, shard_size=4, progress=False)


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny model, a JSONL data file (with a duplicate and a too-long row) and the
    uninterrupted cache of it."""
    root = tmp_path_factory.mktemp("refcache")
    tok = make_tokenizer()
    model = make_model(tok)
    tiny.save_tiny(model, tok, root / "model")
    rows = standard_rows(N_ROWS, seed=7)
    rows.append(dict(rows[3]))  # a duplicate: cached once
    rows.append({"prompt": " ".join(["the quick brown fox"] * 8), "chosen": "yes", "rejected": "no"})  # too long
    data_path = write_jsonl(root / "pairs.jsonl", rows)
    with one_thread():
        out, rep = precompute_reference(root / "model", data_path, root / "baseline", return_report=True,
                                        **SETTINGS)
    return {"root": root, "model_dir": root / "model", "data": data_path, "rows": rows, "baseline": out,
            "report": rep}


def _table(cache_dir) -> dict:
    """example_id -> row (as a dict) of every shard on disk; asserts each id appears once."""
    t = pq.read_table(Path(cache_dir) / "shards").to_pylist()
    ids = [r["example_id"] for r in t]
    assert len(ids) == len(set(ids)), "an example is cached twice"
    return {r["example_id"]: r for r in t}


def test_layout_manifest_and_report(world):
    out, rep = world["baseline"], world["report"]
    assert rep["complete"] and rep["computed"] == N_ROWS and rep["tokenization"].skipped_rows == [N_ROWS + 1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_examples"] == N_ROWS
    assert manifest["info"]["skipped_examples"] == 1 and manifest["info"]["duplicate_examples"] == 1
    fp = manifest["fingerprint"]
    assert fp["weights"]["method"] == "safetensors-sha256" and fp["dtype"] == "float32"
    assert fp["tokenization"]["max_length"] == MAX_LENGTH and fp["data_kind"] == "paired"
    assert len(manifest["shards"]) == N_ROWS // SETTINGS["shard_size"]
    assert sum(s["rows"] for s in manifest["shards"]) == N_ROWS
    # Parquet readable by pandas and pyarrow; nothing but JSON and Parquet in the cache.
    import pandas as pd

    df = pd.read_parquet(out / "shards")
    assert list(df.columns) == list(refcache.PAIRED_COLUMNS) and len(df) == N_ROWS
    assert str(df.ref_chosen_logps.dtype) == "float64" and str(df.chosen_tokens.dtype) == "int64"
    files = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".lock")]
    shards = {s["file"].split("/")[-1]: s["sha256"] for s in manifest["shards"]}
    for p in files:
        if p.name.endswith(".sha256"):  # the checksum recorded when the shard was written
            assert p.name.startswith(".") and shards[p.name[1:-len(".sha256")]] == p.read_text().strip(), p
            continue
        head = p.read_bytes()[:4]
        assert head == b"PAR1" or p.name == "manifest.json", p
    assert not list((out / "shards").glob(".*.tmp"))  # no temporary files left


def test_values_equal_direct_transformers_computation(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_fast.data import example_id

    model = AutoModelForCausalLM.from_pretrained(world["model_dir"]).eval()
    tok = AutoTokenizer.from_pretrained(world["model_dir"])
    cached = _table(world["baseline"])
    checked = 0
    for row in world["rows"][:8]:
        prompt = tok(row["prompt"])["input_ids"]  # with <s>
        entry = cached[example_id(row)]
        for key in ("chosen", "rejected"):
            completion = tok(row[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            targets = ids[0, len(prompt):]
            direct = logp[len(prompt) - 1:-1].gather(1, targets[:, None]).sum().item()
            assert entry[f"ref_{key}_logps"] == pytest.approx(direct, abs=2e-4, rel=1e-5)
            assert entry[f"{key}_tokens"] == len(completion)
            checked += 1
        assert entry["ref_chosen_logps"] != entry["ref_rejected_logps"]
    assert checked == 16


def test_lookup_and_missing_examples(world):
    from dpo_fast.data import example_id

    cache = ReferenceCache.open(world["baseline"])
    assert len(cache) == N_ROWS
    table = _table(world["baseline"])
    ids = [example_id(r) for r in world["rows"][:5]][::-1]
    got = cache.lookup(ids)
    assert got["ref_chosen_logps"].dtype == torch.float64 and got["ref_chosen_logps"].shape == (5,)
    assert got["ref_rejected_logps"].tolist() == [table[i]["ref_rejected_logps"] for i in ids]
    assert got["chosen_tokens"].tolist() == [table[i]["chosen_tokens"] for i in ids]
    assert cache.lookup(ids, dtype=torch.float32)["ref_chosen_logps"].dtype == torch.float32
    too_long = example_id(world["rows"][-1])
    with pytest.raises(MissingExamplesError, match=r"2 of 7 example\(s\) are missing from reference cache"):
        cache.lookup(ids + [too_long, "0" * 32])
    assert cache.missing(ids + [too_long]) == [too_long]
    with pytest.raises(MissingExamplesError, match="1 of 6"):
        cache.check_covers(ids + [too_long])


def test_fingerprint_checks_refuse_other_setups(world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = world["baseline"]
    model = AutoModelForCausalLM.from_pretrained(world["model_dir"])
    tok = AutoTokenizer.from_pretrained(world["model_dir"])
    same = compute_fingerprint(model, tok, max_length=MAX_LENGTH, model_path=world["model_dir"])
    ReferenceCache.open(out, expected_fingerprint=same)  # the trainer's check passes

    with pytest.raises(CacheMismatchError, match=rf"{out}.*max_length differs \(cache 24, now 32\)"):
        ReferenceCache.open(out, expected_fingerprint=dict(same, tokenization=dict(same["tokenization"],
                                                                                     max_length=32)))
    other = make_model(make_tokenizer(), seed=1)
    tiny.save_tiny(other, tok, tmp_path / "other")
    fp = compute_fingerprint(other, tok, max_length=MAX_LENGTH, model_path=tmp_path / "other")
    with pytest.raises(CacheMismatchError, match="reference weights differ"):
        ReferenceCache.open(out, expected_fingerprint=fp)
    fp = compute_fingerprint(model, make_tokenizer(kind="bpe", vocab_size=300), max_length=MAX_LENGTH,
                             model_path=world["model_dir"])
    with pytest.raises(CacheMismatchError, match="tokenizer differs"):
        ReferenceCache.open(out, expected_fingerprint=fp)
    with pytest.raises(CacheMismatchError, match="dtype differs"):
        ReferenceCache.open(out, expected_fingerprint=dict(same, dtype="bfloat16"))
    ReferenceCache.open(out, expected_fingerprint=dict(same, dtype="bfloat16"), ignore=("dtype",))
    with pytest.raises(CacheMismatchError, match="dpo_fast version differs"):
        ReferenceCache.open(out, expected_fingerprint=dict(same, dpo_fast_version="0.0.1"))
    # The state-dict fingerprint is stable and different from the file hash's method.
    sd = compute_fingerprint(model, tok, max_length=MAX_LENGTH)
    assert sd["weights"]["method"] == "state-dict-sha256"
    assert sd == compute_fingerprint(model, tok, max_length=MAX_LENGTH)
    bf16 = make_model(make_tokenizer()).to(torch.bfloat16)  # lossless load in two dtypes: same weights hash
    assert refcache.state_dict_fingerprint(bf16) == refcache.state_dict_fingerprint(bf16.float())
    with pytest.raises(CacheMismatchError, match="fingerprinted differently"):
        ReferenceCache.open(out, expected_fingerprint=sd)

    # A rerun into the same directory with other settings is refused before computing anything.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(CacheMismatchError, match=rf"{copy}.*max_length differs"):
        precompute_reference(world["model_dir"], world["data"], copy, **dict(SETTINGS, max_length=20))
    with pytest.raises(CacheMismatchError, match="reference weights differ"):
        precompute_reference(tmp_path / "other", world["data"], copy, **SETTINGS)


def test_tampered_cache_is_refused(world, tmp_path):
    def fresh(name):
        d = tmp_path / name
        shutil.copytree(world["baseline"], d)
        return d

    # A value changed in a shard (a valid Parquet file, other bytes).
    d = fresh("edited")
    shard = sorted((d / "shards").glob("*.parquet"))[1]
    t = pq.read_table(shard)
    vals = t.column("ref_chosen_logps").to_pylist()
    vals[0] += 1.0
    pq.write_table(t.set_column(1, "ref_chosen_logps", pa.array(vals, pa.float64())), shard)
    with pytest.raises(CacheCorruptError, match=rf"{shard.name} was modified"):
        ReferenceCache.open(d)
    # Damaged bytes, then a missing shard.
    d = fresh("damaged")
    shard = sorted((d / "shards").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-20])
    with pytest.raises(CacheCorruptError, match=shard.name):
        ReferenceCache.open(d)
    shard.unlink()
    with pytest.raises(CacheCorruptError, match="missing"):
        ReferenceCache.open(d)
    # A hand-edited manifest (even one that still parses).
    d = fresh("manifest")
    m = json.loads((d / "manifest.json").read_text())
    m["fingerprint"]["tokenization"]["max_length"] = 4096
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheCorruptError, match="manifest.json was modified"):
        ReferenceCache.open(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(CacheCorruptError, match="unreadable"):
        ReferenceCache.open(d)
    with pytest.raises(CacheError, match="no manifest.json"):
        ReferenceCache.open(tmp_path)


def test_resume_after_a_crash_in_process(world, tmp_path, monkeypatch):
    """A run that dies after two shards (leaving a half-written temporary shard) and is rerun
    ends with every example once and the values of the uninterrupted run, bit for bit."""
    out = tmp_path / "cache"
    from dpo_fast.refcache import precompute as precompute_module

    real = precompute_module.write_shard
    calls = []

    def dying(directory, name, *args):
        if len(calls) == 2:
            (directory / "shards" / f".{name}.tmp").write_bytes(b"PAR1 half a shard")
            raise KeyboardInterrupt("simulated kill")
        calls.append(name)
        return real(directory, name, *args)

    monkeypatch.setattr(precompute_module, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        precompute_reference(world["model_dir"], world["data"], out, **SETTINGS)
    monkeypatch.setattr(precompute_module, "write_shard", real)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(CacheError, match="incomplete"):
        ReferenceCache.open(out)
    assert len(_table(out)) == 2 * SETTINGS["shard_size"]

    _, rep = precompute_reference(world["model_dir"], world["data"], out, return_report=True, **SETTINGS)
    assert rep["computed"] == N_ROWS - 2 * SETTINGS["shard_size"] and rep["complete"]
    assert _table(out) == _table(world["baseline"])
    assert not list((out / "shards").glob(".*.tmp"))
    assert len(ReferenceCache.open(out)) == N_ROWS
    # A second process writing the same rank at the same time is refused.
    with refcache.store.file_lock(out / ".lock-r00000", "a test"):
        with pytest.raises(CacheError, match="another process is writing rank 0"):
            precompute_reference(world["model_dir"], world["data"], out, **SETTINGS)
    # A rerun of a complete cache computes nothing and keeps it valid.
    _, rep = precompute_reference(world["model_dir"], world["data"], out, return_report=True, **SETTINGS)
    assert rep["computed"] == 0 and len(ReferenceCache.open(out)) == N_ROWS


_DRIVER = """
import argparse, sys, time
import torch
torch.set_num_threads(1)
from dpo_fast import hf, refcache
real = hf.sequence_logps
def slow(*a, **k):
    time.sleep(0.25)
    return real(*a, **k)
hf.sequence_logps = slow
p = argparse.ArgumentParser()
refcache.add_arguments(p)
sys.exit(refcache.run_cli(p.parse_args(sys.argv[1:])))
"""


def _cli_args(world, out, *extra):
    return ["--model", str(world["model_dir"]), "--data", world["data"], "--output-dir", str(out),
            "--max-length", str(MAX_LENGTH), "--batch-size", str(SETTINGS["batch_size"]),
            "--shard-size", str(SETTINGS["shard_size"]), "--no-progress", *extra]


def _run_cli(argv):
    parser = argparse.ArgumentParser()
    refcache.add_arguments(parser)
    return refcache.run_cli(parser.parse_args(argv))


def test_resume_after_sigkill(world, tmp_path):
    """The real thing: a `precompute-ref` process SIGKILLed mid-run, then the same command again."""
    out = tmp_path / "cache"
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen([sys.executable, str(driver), *_cli_args(world, out)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / "shards").glob("shard-*.parquet"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: " + (tmp_path / "log.txt").read_text()
        time.sleep(0.3)  # somewhere inside the next shard
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    done = len(_table(out))
    assert 0 < done < N_ROWS

    assert _run_cli(_cli_args(world, out)) == 0
    assert _table(out) == _table(world["baseline"])
    assert len(ReferenceCache.open(out)) == N_ROWS


def test_cli_verify(world, tmp_path, capsys):
    out = tmp_path / "cache"
    shutil.copytree(world["baseline"], out)
    assert _run_cli(_cli_args(world, out, "--verify", "4")) == 0
    text = capsys.readouterr().out
    assert "0 example(s) computed now" in text and "verified 4 cached example(s)" in text and "OK" in text
    report = refcache.verify_reference_cache(out, world["model_dir"], world["data"], n=3)
    assert report.checked == 3 and report.max_abs_diff < 1e-4 and report.token_count_mismatches == 0
    # A wrong value is found by --verify (after the manifest is made consistent with it again).
    shard = sorted((out / "shards").glob("*.parquet"))[0]
    t = pq.read_table(shard)
    vals = [v - 0.5 for v in t.column("ref_rejected_logps").to_pylist()]
    t = t.set_column(2, "ref_rejected_logps", pa.array(vals, pa.float64()))
    pq.write_table(t, shard)
    manifest = json.loads((out / "manifest.json").read_text())
    import hashlib
    for s in manifest["shards"]:
        s["sha256"] = hashlib.sha256((out / s["file"]).read_bytes()).hexdigest()
    refcache.store.write_manifest(out, manifest)
    report = refcache.verify_reference_cache(out, world["model_dir"], world["data"], n=N_ROWS)
    assert report.max_abs_diff == pytest.approx(0.5, abs=1e-3)
    assert _run_cli(_cli_args(world, out, "--verify", str(N_ROWS))) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_two_ranks_write_disjoint_shards(world, tmp_path):
    out = tmp_path / "cache"
    _, r1 = precompute_reference(world["model_dir"], world["data"], out, rank=0, world_size=2,
                                 return_report=True, **SETTINGS)
    assert not r1["complete"]  # rank 1's examples are not there yet
    _, r2 = precompute_reference(world["model_dir"], world["data"], out, rank=1, world_size=2,
                                 return_report=True, **SETTINGS)
    assert r2["complete"] and r1["computed"] + r2["computed"] == N_ROWS and min(r1["computed"], r2["computed"]) > 0
    by_rank = {r: {row["example_id"] for p in (out / "shards").glob(f"shard-r0000{r}-*.parquet")
                   for row in pq.read_table(p).to_pylist()} for r in (0, 1)}
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    got, base = _table(out), _table(world["baseline"])
    assert got.keys() == base.keys()
    for k, row in got.items():
        assert row["chosen_tokens"] == base[k]["chosen_tokens"]
        assert row["ref_chosen_logps"] == pytest.approx(base[k]["ref_chosen_logps"], abs=1e-4)
    assert len(ReferenceCache.open(out)) == N_ROWS


def test_ranked_cache(world, tmp_path):
    from dpo_fast.data import PreferenceCollator, example_id, tokenize_preferences
    import datasets

    rows = ranked_rows(6, k=3, seed=2)
    path = write_jsonl(tmp_path / "ranked.jsonl", rows)
    out = precompute_reference(world["model_dir"], path, tmp_path / "cache", batch_size=4, shard_size=4,
                               progress=False)
    cache = ReferenceCache.open(out)
    assert cache.manifest["data_kind"] == "ranked"
    assert pq.read_table(out / "shards").column_names == list(refcache.RANKED_COLUMNS)
    ids = [example_id(r) for r in rows]
    got = cache.lookup(ids)
    assert got["ref_logps"].shape == (6, 3) and got["tokens"].shape == (6, 3)
    # Same numbers as the padded batch of the collator (layout: row k*B + b).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(world["model_dir"]).eval()
    tk, _ = tokenize_preferences(datasets.Dataset.from_list(rows), tok)
    with torch.inference_mode():
        lp = hf.sequence_logps(hf.lm_head_parts(model), PreferenceCollator(tok.pad_token_id)([tk[i] for i in range(6)]))
    torch.testing.assert_close(got["ref_logps"], lp.double().view(3, 6).T, rtol=1e-5, atol=1e-4)


def test_inside_an_initialised_process_group(world, tmp_path):
    """With torch.distributed initialised (as under torchrun), rank and barriers come from it."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already in use")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        _, rep = precompute_reference(world["model_dir"], world["data"], tmp_path / "cache", return_report=True,
                                      **SETTINGS)
    finally:
        dist.destroy_process_group()
    assert rep["complete"] and _table(tmp_path / "cache") == _table(world["baseline"])
