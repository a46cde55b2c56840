"""Errors that say what is wrong and how to fix it (issue 22, item 9): a non-UTF-8 data file names its
line, lm_head as a LoRA target is explained, a damaged cache shard says that rerunning precompute-ref
repairs it (and it does), a cache precomputed in parts names the part that is missing."""

from __future__ import annotations

import pytest

from dpo_fast.cli import main
from dpo_fast_tools.demo import TRAIN_FILE
from dpo_fast.refcache import precompute_reference
from helpers_runs import tiny  # noqa: F401  (the tiny model fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
TRAIN = ["--split", "train[:16]", "--max-length", "64", "--batch-size", "8", "--max-steps", "1", "--no-progress"]


def _train_error(capsys, tiny, tmp_path, *extra, data=TRAIN_FILE) -> str:
    rc = main(["train", "--model", str(tiny), "--data", str(data), "--output-dir", str(tmp_path / "run"), *TRAIN,
               *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("name,content", [
    ("latin1.jsonl", b'{"prompt": "a b", "chosen": "c", "rejected": "d"}\n{"prompt": "caf\xe9 au lait", '
                     b'"chosen": "c", "rejected": "d"}\n'),
    ("latin1.csv", b'prompt,chosen,rejected\na b,c,d\nx,y,z\n"caf\xe9",c,d\n'),
])
def test_a_non_utf8_data_file_names_the_line(capsys, tiny, tmp_path, name, content):
    data = tmp_path / name
    data.write_bytes(content)
    line = 2 if name.endswith(".jsonl") else 4
    err = _train_error(capsys, tiny, tmp_path, data=data)
    assert f"{name}:{line}: not UTF-8" in err and "0xe9" in err, err


def test_lm_head_as_a_lora_target_is_explained(capsys, tiny, tmp_path):
    pytest.importorskip("peft")
    err = _train_error(capsys, tiny, tmp_path, "--lora-r", "4", "--lora-target-modules", "q_proj,lm_head")
    assert "lm_head is the output layer" in err and "never adapted" in err and "no linear layer" not in err, err


def test_a_truncated_shard_says_precompute_ref_repairs_it_and_it_does(capsys, tiny, tmp_path):
    cache = tmp_path / "cache"
    common = ["--model", str(tiny), "--data", str(TRAIN_FILE), "--split", "train[:16]", "--max-length", "64",
              "--no-progress"]
    assert main(["precompute-ref", *common, "--output-dir", str(cache)]) == 0
    shard = next((cache / "shards").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    err = _train_error(capsys, tiny, tmp_path, "--ref-cache", str(cache))
    assert shard.name in err and "rerunning the precompute-ref command that wrote the cache repairs it" in err, err
    assert main(["precompute-ref", *common, "--output-dir", str(cache)]) == 0
    capsys.readouterr()
    assert main(["train", "--model", str(tiny), "--data", str(TRAIN_FILE), "--output-dir", str(tmp_path / "run2"),
                 "--ref-cache", str(cache), *TRAIN]) == 0


def test_a_cache_precomputed_in_parts_names_the_missing_part(capsys, tiny, tmp_path):
    cache = tmp_path / "cache"
    precompute_reference(str(tiny), str(TRAIN_FILE), cache, split="train[:16]", max_length=64, progress=False,
                         rank=0, world_size=2)
    err = _train_error(capsys, tiny, tmp_path, "--ref-cache", str(cache))
    assert "--rank 1" in err and "--world-size 2" in err and "incomplete" in err, err
