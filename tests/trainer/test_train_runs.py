"""End-to-end tests of `dpo-fast train` / `dpo_fast.train` on tiny models (CPU, no downloads).

The expensive pieces run once per module: one tiny model on disk, one short training run that
several tests inspect. Subprocess tests (resume after SIGKILL, two gloo ranks under torchrun)
go through `python -m dpo_fast train`, as a user would.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpo_fast import hf, trainer
from helpers_runs import cli_env as _env, records as _records, run_cli as _run, tiny  # noqa: F401
from helpers_runs import train_records as _train_records, weights as _weights
from helpers_tiny import one_thread
from dpo_fast_tools.demo import EVAL_FILE, TRAIN_FILE, build_demo_model
from dpo_fast.trainer import TrainError, lr_factor, train
import dpo_fast.trainer.cli  # noqa: F401
import dpo_fast.trainer.loop  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
# Settings shared by the runs below: AdamW at a high rate so a randomly initialised model
# learns the parity rule in a few dozen steps.
FAST = dict(optimizer="adamw", learning_rate=3e-3, warmup_steps=2, logging_steps=1, save_steps=0,
            progress=False, tensorboard=False, max_length=64)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One short run with held-out evaluation, inspected by several tests."""
    out = tmp_path_factory.mktemp("run")
    with one_thread():
        summary = train(str(tiny), str(TRAIN_FILE), out, eval_data=str(EVAL_FILE), eval_split="test[:96]",
                        batch_size=32, max_steps=40, seed=0, **dict(FAST, learning_rate=5e-3))
    return out, summary


def _cli(tiny, out, *extra) -> list[str]:
    return ["--model", str(tiny), "--data", str(TRAIN_FILE), "--split", "train[:96]", "--output-dir", str(out),
            "--batch-size", "8", "--optimizer", "adamw", "--lr", "3e-3", "--warmup-steps", "2",
            "--logging-steps", "1", "--no-progress", "--no-tensorboard", "--max-length", "64", *extra]


# ----------------------------------------------------------------------------------------------
# One real run


def test_steps_change_the_weights_and_lower_the_loss(tiny, trained):
    out, summary = trained
    before, after = _weights(tiny), _weights(out)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every tensor moved
    losses = [r["loss"] for r in _train_records(out)]
    assert len(losses) == 40
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: log 2
    assert sum(losses[-5:]) / 5 < 0.5


def test_eval_reward_accuracy_rises_on_held_out_pairs(trained):
    _, summary = trained
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["pairs"] == after["pairs"] == 96
    assert abs(before["rewards/margins"]) < 1e-4  # the policy starts as the reference
    assert 0.25 < before["logps/accuracies"] < 0.75  # a random model has no idea
    assert after["rewards/accuracies"] >= 0.85
    assert after["rewards/margins"] > 0.3
    assert after["loss"] < before["loss"] - 0.1


def test_metrics_and_summary_files(trained):
    out, summary = trained
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk) == {"eval_before", "eval_after", "train"}
    assert on_disk["eval_after"]["rewards/accuracies"] == summary["eval_after"]["rewards/accuracies"]
    rec = _train_records(out)[-1]
    for name in trainer.LOSS_METRICS + ("learning_rate", "grad_norm", "tokens_per_second", "peak_memory_gb",
                                        "step", "epoch"):
        assert name in rec and isinstance(rec[name], (int, float)), name
    assert on_disk["train"]["global_step"] == 40
    phases = [r["phase"] for r in _records(out) if "phase" in r]
    assert phases == ["eval_before", "eval_after"]
    # The final model and tokenizer load back; the reference cache was precomputed on disk.
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert (out / "ref_cache" / "manifest.json").exists()


# ----------------------------------------------------------------------------------------------
# Resume after a kill, bit for bit


def test_resume_after_kill_matches_uninterrupted_run(tiny, tmp_path, caplog):
    steps, every = 40, 5
    full = tmp_path / "full"
    train(str(tiny), str(TRAIN_FILE), full, split="train[:96]", batch_size=8, max_steps=steps, seed=1,
          **dict(FAST, save_steps=every))

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dpo_fast", "train", *_cli(tiny, killed, "--max-steps", str(steps),
                                                           "--save-steps", str(every), "--seed", "1")]
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    try:
        # Kill it (SIGKILL: no cleanup) as soon as its first checkpoint is on disk.
        while not (killed / f"checkpoint-{every}").exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.json").exists()
    stopped_at = max(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    assert stopped_at < steps

    # Rerun the same command with --resume (in this process, through the same CLI entry point).
    from dpo_fast.cli import main

    with caplog.at_level(logging.INFO, logger="dpo_fast.trainer.loop"):
        assert main(cmd[3:] + ["--resume"]) == 0
    assert f"resuming from {killed / f'checkpoint-{stopped_at}'}" in caplog.text

    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    keys = trainer.LOSS_METRICS + ("grad_norm", "learning_rate")
    ra, rb = _train_records(full), _train_records(killed)
    assert [r["step"] for r in rb] == list(range(1, steps + 1))  # lines past the checkpoint were redone once
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]


def test_resume_without_checkpoint_starts_fresh(tiny, tmp_path):
    summary = train(str(tiny), str(TRAIN_FILE), tmp_path, split="train[:32]", batch_size=16, max_steps=2,
                    resume=True, **FAST)
    assert summary["train"]["global_step"] == 2


# ----------------------------------------------------------------------------------------------
# Several processes


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory) -> Path:
    """The single-process run the two-process runs are compared with (same global batch)."""
    out = tmp_path_factory.mktemp("one")
    with one_thread():
        train(str(tiny), str(TRAIN_FILE), out, split="train[:96]", batch_size=8, max_steps=4, seed=3,
              eval_data=str(EVAL_FILE), eval_split="test[:15]", eval_batch_size=3, **FAST)
    return out


# Runs the CLI twice in the same torchrun processes (saves a launch): DDP, then FSDP2.
_TWO_RUNS = """
import faulthandler
import sys
faulthandler.dump_traceback_later(300, exit=True)  # a hang fails with every thread's stack
from dpo_fast.cli import main
*common, ddp_dir, fsdp_dir = sys.argv[1:]
assert main(["train", *common, "--output-dir", ddp_dir]) == 0
assert main(["train", *common, "--output-dir", fsdp_dir, "--fsdp"]) == 0
"""


def test_two_gloo_processes_match_one_process(tiny, one_process, tmp_path):
    """torchrun, 2 ranks x 4 pairs, DDP and FSDP2 (fully_shard), against 1 process x 8 pairs."""
    script = tmp_path / "two_runs.py"
    script.write_text(_TWO_RUNS)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    # 15 held-out pairs in batches of 3: the ranks get 8 and 7, the short one pads with a weight-0 pair.
    common = _cli(tiny, tmp_path / "unused", "--max-steps", "4", "--seed", "3", "--save-steps", "2",
                  "--eval-data", str(EVAL_FILE), "--eval-split", "test[:15]", "--eval-batch-size", "3")
    common = common[:common.index("--output-dir")] + common[common.index("--output-dir") + 2:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *common, str(ddp), str(fsdp)]
    res = _run(cmd)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("dpo-fast train: done") == 2  # only rank 0 reports (and writes)
    r1 = _train_records(one_process)
    w1 = _weights(one_process)
    assert len(r1) == 4
    for two in (ddp, fsdp):
        r2 = _train_records(two)
        assert len(r2) == 4, two
        for a, b in zip(r1, r2):
            for k in trainer.LOSS_METRICS + ("grad_norm",):
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (two.name, a["step"], k)
        s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one_process, two))
        for phase in ("eval_before", "eval_after"):
            assert s2[phase]["pairs"] == s1[phase]["pairs"] == 15
            for k in trainer.EVAL_METRICS:
                if phase == "eval_before" and k in ("rewards/ties", "rewards/accuracies"):
                    # Policy = reference: every reward is 0 up to float rounding, and the cache's batches
                    # (grouped by example hash over the ranks) differ from the eval batches, so which
                    # pairs tie exactly is rounding; rewards/margins below still agrees to 1e-6.
                    continue
                assert s2[phase][k] == pytest.approx(s1[phase][k], rel=1e-5, abs=1e-6), (two.name, phase, k)
        w2 = _weights(two)
        assert w2.keys() == w1.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)
        # Checkpoints hold the full (unsharded) model and optimizer state.
        torch.testing.assert_close(_weights(two / "checkpoint-2")["lm_head.weight"].shape, w1["lm_head.weight"].shape)
        osd = torch.load(two / "checkpoint-2" / "optimizer.pt", weights_only=True)
        assert len(osd["state"]) == len(w1)


# ----------------------------------------------------------------------------------------------
# Variants of the same step agree


def test_packing_checkpointing_accumulation_and_reference_sources_agree(tiny, tmp_path):
    """Packed batches, gradient checkpointing, accumulation, an on-the-fly --ref-model, a user's
    cache lacking the eval pairs and a logits memory budget all give the plain run's losses; bf16
    is close."""
    from dpo_fast.refcache import precompute_reference

    cache = tmp_path / "my_cache"
    precompute_reference(str(tiny), str(TRAIN_FILE), cache, split="train[:32]", max_length=64, progress=False)
    manifest_before = (cache / "manifest.json").read_text()
    variants = {"plain": {}, "packing": dict(packing=True), "checkpointing": dict(gradient_checkpointing=True),
                "accumulation": dict(grad_accum=2), "ref_model": dict(ref_model=str(tiny)),
                "user_cache": dict(ref_cache=str(cache)), "bf16": dict(dtype="bf16"),
                "logits_budget": dict(logits_memory_mb=0.1)}  # ~2 pairs' logits held, 3 GEMM passes
    losses, evals = {}, {}
    for name, kw in variants.items():
        out = tmp_path / name
        s = train(str(tiny), str(TRAIN_FILE), out, split="train[:32]", eval_data=str(EVAL_FILE),
                  eval_split="test[:16]", batch_size=16, max_steps=3, seed=5, **FAST, **kw)
        losses[name] = [r["loss"] for r in _train_records(out)]
        evals[name] = s["eval_after"]["loss"]
    # The user's cache is read, never written: the eval pairs it lacks went next to the run.
    assert manifest_before == (cache / "manifest.json").read_text()
    assert (tmp_path / "user_cache" / "ref_cache_eval" / "manifest.json").exists()
    assert not (tmp_path / "user_cache" / "ref_cache").exists()
    for name in variants:
        tol = 2e-3 if name == "bf16" else 1e-6
        assert losses[name] == pytest.approx(losses["plain"], rel=tol, abs=tol), name
        assert evals[name] == pytest.approx(evals["plain"], rel=tol, abs=tol), name


# ----------------------------------------------------------------------------------------------
# Errors users hit


def test_missing_columns(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Even or odd: 3 ?", "chosen": " odd"}) + "\n")
    with pytest.raises(TrainError, match=r"missing column\(s\) \['rejected'\]"):
        train(str(tiny), str(bad), tmp_path / "out", **FAST)


def test_cache_from_another_model(tiny, tmp_path):
    from dpo_fast.refcache import CacheMismatchError, precompute_reference

    other = tmp_path / "other"
    build_demo_model(other, vocab_size=256, seed=1, hidden_size=32, layers=2, heads=4)
    cache = tmp_path / "cache"
    precompute_reference(str(other), str(TRAIN_FILE), cache, split="train[:16]", max_length=64, progress=False)
    with pytest.raises(CacheMismatchError, match="reference weights differ"):
        train(str(tiny), str(TRAIN_FILE), tmp_path / "out", split="train[:16]", ref_cache=str(cache),
              batch_size=8, max_steps=1, **FAST)


def test_model_without_lm_head(tiny, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    base = tmp_path / "base"
    AutoModel.from_pretrained(str(tiny)).save_pretrained(base)  # LlamaModel: no lm_head
    AutoTokenizer.from_pretrained(str(tiny)).save_pretrained(base)
    with pytest.raises(hf.ModelError, match="without an lm_head"):
        train(str(base), str(TRAIN_FILE), tmp_path / "out", **FAST)
    with pytest.raises(hf.ModelError, match="no lm_head"):  # a module given directly
        train(AutoModel.from_pretrained(str(tiny)), str(TRAIN_FILE), tmp_path / "out2",
              tokenizer=str(tiny), **FAST)


def test_batch_size_not_divisible(tiny, tmp_path):
    with pytest.raises(TrainError, match=r"batch size 8 is not divisible by world size 1 x grad_accum 3"):
        train(str(tiny), str(TRAIN_FILE), tmp_path / "out", batch_size=8, grad_accum=3, **FAST)


def test_every_backend_reported_available_trains_and_precomputes(tiny, tmp_path, capsys):
    """One backend vocabulary: every name available_backends reports usable here trains (the
    hidden-state family, precompute included) to the same losses; one it reports unusable is a
    one-line error before any work."""
    import dpo_fast
    from dpo_fast.cli import main

    status = dpo_fast.available_backends("cpu")
    names = [n for n, info in status.items() if info.available]
    assert {"cpu", "reference"} <= set(names)
    losses = {}
    for name in names:
        out = tmp_path / name
        train(str(tiny), str(TRAIN_FILE), out, split="train[:16]", batch_size=8, max_steps=2, backend=name, **FAST)
        losses[name] = [r["loss"] for r in _train_records(out)]
    for name in names:
        assert losses[name] == pytest.approx(losses["reference"], rel=1e-5), name
    unusable = next(n for n, info in status.items() if not info.available)
    code = main(["train", *_cli(tiny, tmp_path / "never", "--backend", unusable)])
    err = capsys.readouterr().err
    assert code == 2 and f"--backend: backend {unusable!r} is not available on cpu" in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_cli_reports_errors_without_traceback(tiny, tmp_path, capsys):
    from dpo_fast.cli import main

    code = main(["train", *_cli(tiny, tmp_path / "out", "--grad-accum", "3")])
    assert code == 2
    assert "dpo-fast train: error: batch size 8 is not divisible" in capsys.readouterr().err


def test_bad_options():
    for kw, pattern in ((dict(optimizer="lion"), "optimizer"), (dict(max_steps=3, epochs=1.0), "not both"),
                        (dict(ref_cache="c", ref_model="m"), "not several"), (dict(beta=-1.0), "beta")):
        with pytest.raises(TrainError, match=pattern):
            train("m", "d", "o", **kw)


# ----------------------------------------------------------------------------------------------
# Pieces


def test_help_names_the_paper_defaults():
    from dpo_fast.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    text = " ".join(sub.format_help().split())
    for flag, value in (("--beta", "0.1"), ("--learning-rate", "1e-06"), ("--optimizer", "rmsprop"),
                        ("--warmup-steps", "150"), ("--batch-size", "64")):
        assert flag in text and value in text
    assert text.count("as in the DPO paper") >= 5
    args = sub.parse_args(["--model", "m", "--data", "d", "--output-dir", "o"])
    cfg = trainer.cli.config_from_args(args)
    cfg.check()  # resolves the warmup: --warmup-steps unset and no --warmup-ratio is the paper's 150
    assert (cfg.beta, cfg.learning_rate, cfg.optimizer, cfg.warmup_steps, cfg.batch_size) == \
        (0.1, 1e-6, "rmsprop", 150, 64)


def test_gradient_checkpointing_recomputes_the_layers(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny))
    trainer.loop._enable_checkpointing(model)
    model.train()
    decoder = hf.lm_head_parts(model).decoder  # its self-check runs the model: before the hook counts
    calls = []
    # A pre-hook: the recompute stops early, after the last saved tensor, inside the MLP.
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 40, (2, 7))
    hidden = hf.final_hidden(decoder, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.device("cpu"))
    assert len(calls) == 1
    hidden.sum().backward()
    assert len(calls) == 2


def test_warmup_and_schedules():
    assert lr_factor(0, 150, 1000, "constant") == pytest.approx(1 / 151)
    assert lr_factor(149, 150, 1000, "constant") == pytest.approx(150 / 151)
    assert lr_factor(150, 150, 1000, "constant") == 1.0
    assert lr_factor(999, 150, 1000, "constant") == 1.0
    assert lr_factor(575, 150, 1000, "linear") == pytest.approx(0.5)
    assert lr_factor(575, 150, 1000, "cosine") == pytest.approx(0.5)
    assert lr_factor(5, 0, 10, "constant") == 1.0


def test_data_order_is_a_function_of_the_step():
    s = trainer.Schedule(n=50, batch_size=8, seed=7)
    assert s.steps_per_epoch == 6
    epoch0 = [i for step in range(6) for i in s.global_batch(step)]
    assert len(set(epoch0)) == 48  # each pair at most once per epoch; the remainder is dropped
    again = trainer.Schedule(n=50, batch_size=8, seed=7)
    assert again.global_batch(13) == s.global_batch(13)  # no state: resume needs only the step
    assert s.global_batch(6) != s.global_batch(0)  # a new permutation each epoch
