"""Regression tests of issue 10 (trust), the run-directory and cache half: nothing is lost, nothing is
mixed, settings are checked before anything is touched. Each test failed on the code before the fix.
Tiny models built here; every run is a few steps on CPU."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


from dpo_fast_tools.demo import TRAIN_FILE
from dpo_fast.refcache import ReferenceCache, precompute_reference
from dpo_fast.trainer import TrainError, train
from helpers_runs import tiny  # noqa: F401  (the tiny model fixture)

ROOT = Path(__file__).resolve().parents[2]
FAST = dict(optimizer="adamw", learning_rate=3e-3, warmup_steps=2, logging_steps=1, save_steps=0,
            progress=False, tensorboard=False, max_length=64, split="train[:64]", batch_size=8)


pytestmark = pytest.mark.usefixtures("single_thread")


def _snapshot(directory: Path) -> dict:
    """Every file's bytes (hash) under a directory, except the run lock's."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".dpo_fast.lock"}


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpo_fast", *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# 1. An earlier run is never overwritten; rotation keeps to this run; the final step is checkpointed


def test_finished_run_is_refused_unchanged_then_overwritten_on_request(tiny, tmp_path):
    out = tmp_path / "run"
    train(str(tiny), str(TRAIN_FILE), out, max_steps=3, seed=0, **dict(FAST, save_steps=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # final step too
    before = _snapshot(out)
    with pytest.raises(TrainError, match="holds an earlier run"):
        train(str(tiny), str(TRAIN_FILE), out, max_steps=2, seed=1, **FAST)
    assert _snapshot(out) == before  # byte for byte
    res = _cli("train", "--model", tiny, "--data", TRAIN_FILE, "--output-dir", out, "--max-steps", "1",
               "--max-length", "64", "--batch-size", "8", "--split", "train[:64]", "--no-progress", "--no-tensorboard")
    assert res.returncode == 2 and "holds an earlier run" in res.stderr and res.stderr.count("\n") == 1
    assert _snapshot(out) == before

    old_id = json.loads((out / "run.json").read_text())["run_id"]
    train(str(tiny), str(TRAIN_FILE), out, max_steps=2, seed=1, overwrite_output_dir=True, **FAST)
    assert json.loads((out / "run.json").read_text())["run_id"] != old_id
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2] or steps == [1, 2]  # only the new run's lines
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the old run's are gone


def test_rotation_deletes_only_this_runs_checkpoints_and_resume_picks_this_run(tiny, tmp_path):
    out = tmp_path / "run"
    train(str(tiny), str(TRAIN_FILE), out, max_steps=2, seed=0, **dict(FAST, save_steps=1, save_total_limit=1))
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    foreign = out / "checkpoint-1000"  # e.g. copied in from another run
    (out / "checkpoint-2").rename(tmp_path / "keep")
    import shutil
    shutil.copytree(tmp_path / "keep", foreign)
    (tmp_path / "keep").rename(out / "checkpoint-2")
    state = json.loads((foreign / "trainer_state.json").read_text())
    (foreign / "trainer_state.json").write_text(json.dumps(dict(state, run_id="another-run")))
    train(str(tiny), str(TRAIN_FILE), out, max_steps=4, seed=0, resume=True,
          **dict(FAST, save_steps=1, save_total_limit=1))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1000", "checkpoint-4"]
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "phase" not in r]
    assert steps == [1, 2, 3, 4]  # resumed this run at step 2, not the foreign checkpoint's 1000


# ----------------------------------------------------------------------------------------------
# 2. One run per directory at a time; workers die with their launcher


def test_a_second_run_is_refused_naming_the_holder(tiny, tmp_path):
    from dpo_fast.trainer.rundir import RunLock

    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out)
    lock.acquire()
    try:
        with pytest.raises(TrainError, match=rf"in use by another training run \(pid {os.getpid()} on "):
            train(str(tiny), str(TRAIN_FILE), out, max_steps=1, **FAST)
        assert not (out / "metrics.jsonl").exists() and not (out / "ref_cache").exists()
    finally:
        lock.release()


_LONG_RUN = """
import sys
from dpo_fast.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_torchrun_workers_exit_when_the_launcher_is_killed(tiny, tmp_path):
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "run.py"
    script.write_text(_LONG_RUN)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--model", str(tiny), "--data", str(TRAIN_FILE), "--output-dir", str(out), "--max-steps", "100000",
           "--batch-size", "8", "--max-length", "64", "--split", "train[:64]", "--save-steps", "0",
           "--logging-steps", "1", "--no-progress", "--no-tensorboard", "--optimizer", "adamw"]
    agent = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert agent.poll() is None and time.time() < deadline, "the run did not start training"
            time.sleep(0.2)
        workers = psutil.Process(agent.pid).children(recursive=True)
        assert len([w for w in workers if "run.py" in " ".join(w.cmdline())]) == 2
        agent.send_signal(signal.SIGKILL)  # the launcher dies without cleaning up
        agent.wait()
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers outlived their launcher: {[p.pid for p in alive]}"
    finally:
        os.killpg(agent.pid, signal.SIGKILL) if agent.poll() is None else None
        for p in psutil.Process().children(recursive=True):
            if "run.py" in " ".join(p.cmdline()):
                p.kill()


# ----------------------------------------------------------------------------------------------
# 3. precompute-ref checks every shard it keeps, and repairs


SETTINGS = dict(split="train[:40]", max_length=64, shard_size=16, progress=False, batch_size=8)


def test_an_edited_shard_is_moved_aside_and_recomputed(tiny, tmp_path):
    out = tmp_path / "cache"
    precompute_reference(str(tiny), str(TRAIN_FILE), out, **SETTINGS)
    good = ReferenceCache.open(out).to_pandas().set_index("example_id")
    shard = sorted((out / "shards").glob("shard-*.parquet"))[1]
    table = pq.read_table(shard)
    edited = table.set_column(1, "ref_chosen_logps", pa.array([v + 1.0 for v in table.column(1).to_pylist()]))
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), shard)  # a valid, edited shard

    _, rep = precompute_reference(str(tiny), str(TRAIN_FILE), out, return_report=True, **SETTINGS)
    assert rep["computed"] == table.num_rows  # its examples were recomputed, not re-approved
    assert (out / "damaged" / shard.name).exists()  # moved aside, never deleted
    again = ReferenceCache.open(out).to_pandas().set_index("example_id")
    assert again.sort_index().equals(good.sort_index())


def test_duplicate_example_ids_are_repaired(tiny, tmp_path):
    out = tmp_path / "cache"
    precompute_reference(str(tiny), str(TRAIN_FILE), out, **SETTINGS)
    first = sorted((out / "shards").glob("shard-*.parquet"))[0]
    copy = first.with_name("shard-r00000-000099.parquet")  # e.g. two runs wrote the same examples
    copy.write_bytes(first.read_bytes())
    (out / "shards" / f".{copy.name}.sha256").write_text((out / "shards" / f".{first.name}.sha256").read_text())
    _, rep = precompute_reference(str(tiny), str(TRAIN_FILE), out, return_report=True, **SETTINGS)
    assert rep["complete"] and rep["computed"] == 0
    assert (out / "damaged" / copy.name).exists()
    cache = ReferenceCache.open(out)
    assert len(cache) == len(set(cache.to_pandas()["example_id"]))


# ----------------------------------------------------------------------------------------------
# 7, 8. Ranges and resume settings are checked before anything is touched


def test_bad_numbers_are_refused_before_any_work(tiny, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="--sft-weight: expected >= 0.0, got -1.0"):
        train(str(tiny), str(TRAIN_FILE), out, sft_weight=-1.0, **FAST)
    assert not out.exists()
    res = _cli("train", "--model", tiny, "--data", TRAIN_FILE, "--output-dir", out, "--max-length", "0")
    assert res.returncode == 2 and "--max-length: expected >= 1, got 0" in res.stderr and "--data" not in res.stderr
    with pytest.raises(TrainError, match="--batch-size 1000 is larger than the 64 usable pairs"):
        train(str(tiny), str(TRAIN_FILE), out, **dict(FAST, batch_size=1000))
    assert not (out / "ref_cache").exists()  # caught before the cache was computed


def test_resume_with_other_settings_is_refused_before_anything_is_touched(tiny, tmp_path):
    out = tmp_path / "run"
    train(str(tiny), str(TRAIN_FILE), out, max_steps=2, seed=0, **dict(FAST, save_steps=1))
    before = _snapshot(out)
    changed = dict(learning_rate=1e-3, beta=0.3, loss_type="ipo", optimizer="rmsprop", warmup_steps=5)
    with pytest.raises(TrainError) as err:
        train(str(tiny), str(TRAIN_FILE), out, max_steps=4, seed=0, resume=True,
              **dict(FAST, save_steps=1, **changed))
    for flag in ("--learning-rate", "--beta", "--loss-type", "--optimizer", "--warmup-steps"):
        assert flag in str(err.value)
    assert _snapshot(out) == before
    # Cadence and length may change.
    train(str(tiny), str(TRAIN_FILE), out, max_steps=3, seed=0, resume=True, **dict(FAST, save_steps=3,
                                                                                   logging_steps=3))
    assert (out / "checkpoint-3").exists()


# ----------------------------------------------------------------------------------------------
# 10, 12. The README's sequence works with the defaults; a missing model is a local error


def test_precompute_then_train_with_default_settings(tiny, tmp_path):
    cache = tmp_path / "cache"
    res = _cli("precompute-ref", "--model", tiny, "--data", TRAIN_FILE, "--split", "train[:32]", "--output-dir",
               cache, "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    res = _cli("train", "--model", tiny, "--data", TRAIN_FILE, "--split", "train[:32]", "--output-dir",
               tmp_path / "run", "--ref-cache", cache, "--batch-size", "8", "--max-steps", "1", "--no-progress",
               "--no-tensorboard")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "dpo-fast train: done" in res.stdout


@pytest.mark.parametrize("command", ["train", "precompute-ref"])
def test_a_missing_model_path_is_named_not_a_hub_error(tmp_path, command):
    res = _cli(command, "--model", tmp_path / "no_such_model", "--data", TRAIN_FILE, "--output-dir", tmp_path / "o")
    assert res.returncode == 2
    assert f"model {tmp_path / 'no_such_model'}: no such directory" in res.stderr
    assert "Repo id" not in res.stderr and "connect" not in res.stderr and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------------------------
# 11. Bad data files: one line naming file, line and problem


@pytest.mark.parametrize("name,content,expect", [
    ("bad.jsonl", '{"prompt": "Is 1 even or odd?", "chosen": " odd", "rejected": " even"}\n{"prompt": \n',
     r"bad.jsonl:2: invalid JSON"),
    ("empty.jsonl", "", r"empty.jsonl: empty file"),
    ("header.csv", "prompt,chosen,rejected\n", r"header.csv: header only"),
    ("blank.jsonl", '{"prompt": "Is 1 even or odd?", "chosen": " odd", "rejected": " even"}\n\n'
                    '{"prompt": "Is 2 even or odd?", "chosen": "", "rejected": " odd"}\n',
     r"blank.jsonl:3: row 1, column 'chosen': empty completion"),
])
def test_bad_data_files_give_one_line(tiny, tmp_path, name, content, expect):
    path = tmp_path / name
    path.write_text(content)
    res = _cli("train", "--model", tiny, "--data", path, "--output-dir", tmp_path / "o", "--no-progress")
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    import re
    assert re.search(expect, lines[0]), lines[0]
