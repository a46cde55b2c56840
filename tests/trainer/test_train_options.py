"""The trainer features of issue 12 on tiny models (CPU, no downloads): LoRA (on one process, DDP
and FSDP2), rankings with the Plackett-Luce loss, evaluation during training and `dpo-fast eval`,
loss mixtures, and the TRL-style options. Runs are a few steps each and shared by module fixtures."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from dpo_fast_tools.demo import EVAL_FILE, TRAIN_FILE, build_demo_model
from dpo_fast.trainer import TrainError, train
from helpers_tiny import one_thread
from helpers_runs import records as _records, run_cli as _run, tiny  # noqa: F401  (the tiny model fixture)
from helpers_runs import train_records as _train_records, weights as _weights

# The LoRA tests need the peft extra (CI installs it: pip install -e ".[peft]").
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
FAST = dict(optimizer="adamw", learning_rate=1e-2, warmup_steps=2, logging_steps=1, save_steps=0,
            progress=False, report_to="none", max_length=64)


pytestmark = pytest.mark.usefixtures("single_thread")



def _main(*args) -> int:
    from dpo_fast.cli import main

    return main([str(a) for a in args])


# ----------------------------------------------------------------------------------------------
# Pairs: evaluation every N steps, a loss mixture, warmup ratio, Adam settings; `dpo-fast eval`


@pytest.fixture(scope="module")
def pairs_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "run"
    with one_thread():
        summary = train(str(tiny), str(TRAIN_FILE), out, split="train[:64]", eval_data=str(EVAL_FILE),
                        eval_split="test[:32]", eval_batch_size=8, batch_size=16, max_steps=6, eval_steps=2,
                        loss_type="sigmoid,bco_pair", loss_weights="0.8,0.2",
                        **dict(FAST, save_steps=3, warmup_steps=None, warmup_ratio=0.5, adam_beta1=0.8,
                               adam_epsilon=1e-6))
    return out, summary


def test_eval_steps_keep_the_first_and_final_evals(pairs_run):
    out, summary = pairs_run
    phases = [(r["step"], r["phase"]) for r in _records(out) if "phase" in r]
    assert phases == [(0, "eval_before"), (2, "eval"), (4, "eval"), (6, "eval_after")]
    evals = [r for r in _records(out) if r.get("phase") == "eval"]
    assert all(r["eval_pairs"] == 32 and "eval_rewards/ties" in r for r in evals)
    assert summary["eval_after"]["pairs"] == 32
    # At step 0 the policy is the reference: every reward is 0 up to float rounding. Which pairs tie
    # exactly is rounding too (the cache's batches group the pairs by length, the eval's by order, and
    # the CPU's GEMMs round rows of differently shaped batches apart), so exact ties are not asserted.
    before = summary["eval_before"]
    assert all(abs(before[k]) < 1e-6 for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))


def test_mixture_warmup_ratio_and_adam_settings_in_training(pairs_run):
    out, _ = pairs_run
    first = _train_records(out)[0]
    # Policy = reference at step 1: sigmoid gives ln 2, bco_pair 2 ln 2 (both rewards 0, the mean 0).
    assert first["loss"] == pytest.approx(0.8 * math.log(2) + 0.2 * 2 * math.log(2), abs=1e-6)
    lrs = [r["learning_rate"] for r in _train_records(out)]
    assert lrs == pytest.approx([1e-2 * f for f in (1 / 4, 2 / 4, 3 / 4, 1, 1, 1)])  # ceil(0.5 x 6) = 3 steps
    group = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)["param_groups"][0]
    assert tuple(group["betas"]) == (0.8, 0.999) and group["eps"] == 1e-6
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert (settings["loss_type"], settings["loss_weights"], settings["warmup_steps"]) == \
        ("sigmoid,bco_pair", "0.8,0.2", None)


def test_eval_command_gives_the_trainers_final_eval(pairs_run, tmp_path, capsys):
    """The trained model against the run's original cache (made from the initial model): the same
    metrics as the trainer's final evaluation. The loss settings come from the run's run.json."""
    out, summary = pairs_run
    report = tmp_path / "eval.json"
    assert _main("eval", "--model", out, "--ref-cache", out / "ref_cache", "--data", EVAL_FILE, "--split",
                 "test[:32]", "--batch-size", 8, "--output-file", report) == 0
    assert "weights are trusted" not in capsys.readouterr().out  # logged, not printed among the metrics
    got = json.loads(report.read_text())
    assert got["settings"]["loss_type"] == "sigmoid,bco_pair"
    assert set(got["metrics"]) == set(summary["eval_after"])
    for k, v in summary["eval_after"].items():
        assert got["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    # The same cache checked against the reference named (the initial model): the same numbers.
    checked = tmp_path / "checked.json"
    assert _main("eval", "--model", out, "--ref-cache", out / "ref_cache", "--ref-model", _tiny_of(out), "--data",
                 EVAL_FILE, "--split", "test[:32]", "--batch-size", 8, "--output-file", checked) == 0
    assert json.loads(checked.read_text())["metrics"] == got["metrics"]


def _tiny_of(run: Path) -> Path:
    return Path(json.loads((run / "run.json").read_text())["settings"]["model"])


def test_eval_command_refuses_a_cache_of_other_data_or_another_reference(pairs_run, tiny, tmp_path, capsys):
    from dpo_fast.refcache import precompute_reference

    out, _ = pairs_run
    other_data = tmp_path / "cache_train"
    precompute_reference(str(tiny), str(TRAIN_FILE), other_data, split="train[:8]", max_length=64, progress=False)
    assert _main("eval", "--model", out, "--ref-cache", other_data, "--data", EVAL_FILE, "--split", "test[:12]",
                 "--output-file", tmp_path / "x.json") == 2
    err = capsys.readouterr().err
    assert "has no reference log-probs for 12 of 12 example(s)" in err and "rows 0, 1, 2," in err
    assert "made from other data" in err
    other_model = tmp_path / "other"
    build_demo_model(other_model, vocab_size=256, seed=1, hidden_size=32, layers=2, heads=4)
    assert _main("eval", "--model", out, "--ref-cache", out / "ref_cache", "--ref-model", other_model, "--data",
                 EVAL_FILE, "--split", "test[:12]", "--output-file", tmp_path / "y.json") == 2
    assert "reference weights differ" in capsys.readouterr().err
    assert _main("eval", "--model", out, "--data", EVAL_FILE, "--output-file", tmp_path / "z.json") == 2
    assert "give the reference" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("x.json", "y.json", "z.json"))


# ----------------------------------------------------------------------------------------------
# LoRA


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    with one_thread():
        summary = train(str(tiny), str(TRAIN_FILE), out, split="train[:64]", eval_data=str(EVAL_FILE),
                        eval_split="test[:16]", batch_size=16, max_steps=8, lora_r=4, merge_lora=True, seed=2,
                        **FAST)
    return out, summary


@needs_peft
def test_lora_starts_at_ln2_trains_and_keeps_the_base(tiny, lora_run):
    out, summary = lora_run
    losses = [r["loss"] for r in _train_records(out)]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-7)  # B = 0: the policy is the base model exactly
    assert summary["eval_before"]["rewards/ties"] == 1.0  # the reference runs in the same forward
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 0.01
    assert not (out / "model.safetensors").exists()  # the adapter, not a model
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                "up_proj", "v_proj"]
    # The merged model = the base weights, untouched, plus scale x B A on the adapted layers.
    base, merged, adapter = _weights(tiny), _weights(out / "merged"), _weights_file(out / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    assert base.keys() == merged.keys()
    adapted = 0
    for name, w in base.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        if f"{prefix}.lora_A.weight" in adapter:
            delta = scale * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
            assert delta.abs().max() > 0, name
            torch.testing.assert_close(merged[name], w + delta, rtol=1e-5, atol=1e-6)
            adapted += 1
        else:
            assert torch.equal(merged[name], w), name
    assert adapted == 2 * 7


def _weights_file(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@needs_peft
def test_saved_adapter_loads_with_peft_and_gives_the_trained_logps(tiny, lora_run):
    from peft import PeftModel

    from dpo_fast import DPOLoss, hf
    from dpo_fast.data import PreferenceCollator, load_and_tokenize
    from dpo_fast.distributed import DistInfo
    from dpo_fast.trainer import evaluation
    from dpo_fast.trainer.policy import PolicyLoss
    from dpo_fast.trainer.references import References

    out, summary = lora_run
    model = PeftModel.from_pretrained(hf.load_causal_lm(str(tiny)), str(out)).eval()
    tok = hf.load_tokenizer(str(out))
    data, _, _ = load_and_tokenize(str(EVAL_FILE), tok, split="test[:16]", max_length=64)
    policy = PolicyLoss(model, DPOLoss(beta=0.1), torch.float32)
    got = evaluation.evaluate(policy, model, data, References(), PreferenceCollator(tok.pad_token_id),
                              batch_size=16, dist=DistInfo(), device=torch.device("cpu"),
                              vocab_size=policy.head.vocab_size, num_responses=None)
    for k in ("logps/chosen", "logps/rejected", "logps/accuracies"):  # the policy's own log-probs
        assert got[k] == pytest.approx(summary["eval_after"][k], rel=1e-6), k


@needs_peft
def test_lora_resume_continues_the_adapter(tiny, tmp_path):
    kw = dict(split="train[:32]", batch_size=8, lora_r=2, seed=4, **FAST)
    train(str(tiny), str(TRAIN_FILE), tmp_path / "full", max_steps=4, **kw)
    train(str(tiny), str(TRAIN_FILE), tmp_path / "cut", max_steps=2, **kw)
    assert (tmp_path / "cut" / "checkpoint-2" / "adapter_model.safetensors").exists()
    train(str(tiny), str(TRAIN_FILE), tmp_path / "cut", max_steps=4, resume=True, **kw)
    a = _weights_file(tmp_path / "full" / "adapter_model.safetensors")
    b = _weights_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@needs_peft
def test_lora_variants_agree_and_a_base_model_cache_is_accepted(tiny, pairs_run, tmp_path):
    """Packing, activation checkpointing and a reference cache made from the base model (the pairs
    run's, fingerprinted as the base weights) give the on-the-fly LoRA run's losses."""
    out, _ = pairs_run
    losses = {}
    for name, kw in {"plain": {}, "packing": dict(packing=True), "checkpointing": dict(gradient_checkpointing=True),
                     "cache": dict(ref_cache=str(out / "ref_cache"))}.items():
        train(str(tiny), str(TRAIN_FILE), tmp_path / name, split="train[:32]", batch_size=16, max_steps=3, lora_r=4,
              **FAST, **kw)
        losses[name] = [r["loss"] for r in _train_records(tmp_path / name)]
    for name, values in losses.items():
        assert values == pytest.approx(losses["plain"], rel=1e-6, abs=1e-7), name


def test_fp16_loss_scaling_unscales_before_clipping_and_keeps_its_state():
    """The fp16 path's scaler wiring, on the CPU's GradScaler (the trainer refuses fp16 on CPU;
    CUDA was not available to this work)."""
    from dpo_fast.trainer.precision import LossScaling

    torch.manual_seed(0)
    x = torch.randn(8, 4)
    w1 = torch.nn.Parameter(torch.randn(4, 1))
    w2 = torch.nn.Parameter(w1.detach().clone())
    plain, scaled = LossScaling(torch.float32, torch.device("cpu")), LossScaling(torch.float16, torch.device("cpu"))
    assert not plain.enabled and scaled.enabled
    o1, o2 = torch.optim.SGD([w1], lr=0.1), torch.optim.SGD([w2], lr=0.1)
    plain.backward((x @ w1).pow(2).mean())
    scaled.backward((x @ w2).pow(2).mean())
    assert not torch.allclose(w2.grad, w1.grad)  # scaled by 2^16
    scaled.unscale_(o2)
    torch.testing.assert_close(w2.grad, w1.grad)
    plain.step(o1)
    scaled.step(o2)
    torch.testing.assert_close(w2, w1)
    state = scaled.state_dict()
    again = LossScaling(torch.float16, torch.device("cpu"))
    again.load_state_dict(state)
    assert again.state_dict()["scale"] == state["scale"] and plain.state_dict() is None


_TWO_LORA_RUNS = """
import faulthandler
import sys
faulthandler.dump_traceback_later(300, exit=True)
from dpo_fast.cli import main
*common, ddp_dir, fsdp_dir = sys.argv[1:]
assert main(["train", *common, "--output-dir", ddp_dir]) == 0
assert main(["train", *common, "--output-dir", fsdp_dir, "--fsdp"]) == 0
"""


@needs_peft
def test_lora_under_ddp_and_fsdp_matches_one_process(tiny, tmp_path):
    # SGD: an update linear in the gradient. (Adam divides by sqrt(v): the adapter's A matrices get
    # exactly zero gradient at step 1 (B = 0), where float noise of an all-reduce would be amplified.)
    args = ["--model", tiny, "--data", TRAIN_FILE, "--split", "train[:32]", "--batch-size", 8, "--max-steps", 3,
            "--optimizer", "sgd", "--lr", "2.0", "--warmup-steps", 0, "--logging-steps", 1, "--save-steps", 2,
            "--no-progress", "--report-to", "none", "--max-length", 64, "--lora-r", 4, "--seed", 5]
    one = tmp_path / "one"
    assert _main("train", *args, "--output-dir", one) == 0
    script = tmp_path / "two.py"
    script.write_text(_TWO_LORA_RUNS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *map(str, args), str(tmp_path / "ddp"), str(tmp_path / "fsdp")]
    res = _run(cmd)
    assert res.returncode == 0, res.stderr[-4000:]
    w1 = _weights_file(one / "adapter_model.safetensors")
    for name in ("ddp", "fsdp"):
        two = tmp_path / name
        for a, b in zip(_train_records(one), _train_records(two)):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (name, a["step"])
        w2 = _weights_file(two / "adapter_model.safetensors")
        assert w2.keys() == w1.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)
        assert (two / "checkpoint-2" / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# Rankings


def _ranked_file(source: Path, path: Path, k: int, limit: int) -> Path:
    """The parity pairs as rankings: the right parity, the wrong one, then (K = 3) ' number'."""
    rows = [json.loads(line) for line in source.read_text().splitlines()[:limit]]
    third = [" number"] if k == 3 else []
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], *third]})
                            + "\n" for r in rows))
    return path


def test_rankings_of_three_train_and_rank_held_out_prompts(tiny, tmp_path):
    data = _ranked_file(TRAIN_FILE, tmp_path / "train.jsonl", 3, 640)
    held_out = _ranked_file(EVAL_FILE, tmp_path / "eval.jsonl", 3, 64)
    summary = train(str(tiny), str(data), tmp_path / "run", eval_data=str(held_out), batch_size=32, max_steps=60,
                    seed=0, **dict(FAST, learning_rate=5e-3, logging_steps=10))
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["prompts"] == after["prompts"] == 64
    # step 0: policy = reference, every reward 0 up to rounding (exact ties are rounding: see above)
    assert all(abs(before[f"rewards/rank_{k}"]) < 1e-6 for k in range(3)) and abs(before["rewards/margins"]) < 1e-6
    assert after["rewards/ranking_accuracy"] >= 0.8
    assert after["rewards/pairwise_accuracy"] > 0.9
    assert after["rewards/rank_0"] > after["rewards/rank_1"] > after["rewards/rank_2"]
    rec = _train_records(tmp_path / "run")[-1]
    assert {"rewards/rank_2", "rewards/ranking_accuracy", "rewards/pairwise_accuracy", "logps/rank_0"} <= set(rec)


def test_rankings_of_two_equal_the_pairwise_run(tiny, tmp_path):
    ranked = _ranked_file(TRAIN_FILE, tmp_path / "ranked.jsonl", 2, 32)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(TRAIN_FILE.read_text().splitlines(keepends=True)[:32]))
    kw = dict(batch_size=8, max_steps=3, seed=6, sft_weight=0.1, **FAST)
    train(str(tiny), str(pairs), tmp_path / "p", **kw)
    train(str(tiny), str(ranked), tmp_path / "r", **kw)
    for a, b in zip(_train_records(tmp_path / "p"), _train_records(tmp_path / "r")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["rewards/pairwise_accuracy"] == a["rewards/accuracies"]
    wp, wr = _weights(tmp_path / "p"), _weights(tmp_path / "r")
    for k in wp:
        torch.testing.assert_close(wr[k], wp[k], rtol=1e-5, atol=1e-7)


def test_ragged_or_tied_rankings_are_refused_naming_rows(tiny, tmp_path):
    rows = [{"prompt": f"Even or odd: {i} ?\nAnswer:", "responses": [" odd", " even", " number"][: 3 if i % 4 else 2]}
            for i in range(8)]
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TrainError, match=r"same number of responses.*most have 3, 2 have 2: rows 0, 4"):
        train(str(tiny), str(ragged), tmp_path / "a", batch_size=4, max_steps=1, **FAST)
    tied = tmp_path / "tied.jsonl"
    tied.write_text("".join(json.dumps({"prompt": "Even or odd: 3 ?", "responses": [" odd", " even odd even", c]})
                            + "\n" for c in (" even", " even odd")))
    with pytest.raises(TrainError, match=r"row 1: responses\[1\] and responses\[2\] are the same tokens"):
        train(str(tiny), str(tied), tmp_path / "b", batch_size=2, max_steps=1, max_completion_length=2, **FAST)
    with pytest.raises(TrainError, match="Plackett-Luce"):
        train(str(tiny), str(_ranked_file(TRAIN_FILE, tmp_path / "r.jsonl", 3, 8)), tmp_path / "c", batch_size=4,
              max_steps=1, loss_type="ipo", **FAST)


# ----------------------------------------------------------------------------------------------
# Options a TRL user sets; refusals before any work


def test_save_only_model_checkpoints_are_refused_on_resume(tiny, tmp_path):
    kw = dict(split="train[:16]", batch_size=8, save_only_model=True, **dict(FAST, save_steps=1))
    train(str(tiny), str(TRAIN_FILE), tmp_path, max_steps=1, **kw)
    ckpt = tmp_path / "checkpoint-1"
    assert (ckpt / "model.safetensors").exists() and not (ckpt / "optimizer.pt").exists()
    with pytest.raises(TrainError, match="holds the model only.*--save-only-model.*cannot continue"):
        train(str(tiny), str(TRAIN_FILE), tmp_path, max_steps=2, resume=True, **kw)


def test_report_to_wandb_logs_through_wandb_and_honours_its_mode(tiny, tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")

    class Run:
        def log(self, data, step):
            calls.append(("log", step, dict(data)))

        def finish(self):
            calls.append(("finish",))

    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(str(tiny), str(TRAIN_FILE), tmp_path, split="train[:16]", batch_size=8, max_steps=2,
          **dict(FAST, report_to="wandb"))
    init = calls[0][1]
    assert "mode" not in init  # wandb reads WANDB_MODE itself: offline stays offline
    assert init["id"] == json.loads((tmp_path / "run.json").read_text())["run_id"]
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2] and "loss" in calls[1][2]
    assert calls[-1] == ("finish",)


def test_every_option_is_in_help_with_its_default():
    import dataclasses

    from dpo_fast.cli import build_parser
    from dpo_fast.trainer import TrainConfig

    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    text = " ".join(sub.format_help().split())
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata.get("negative_flag") or "--" + f.name.replace("_", "-")
        assert flag in text, flag
    formatter = sub._get_formatter()
    shown = {a.option_strings[0]: formatter._expand_help(a) for a in sub._actions if a.option_strings[0] != "-h"}
    assert all("(default: " in h for h in shown.values()), [f for f, h in shown.items() if "(default: " not in h]
    for flag, default in (("--lora-dropout", "0.0"), ("--report-to", "none"), ("--eval-steps", "None"),
                          ("--save-only-model", "False"), ("--warmup-ratio", "None"), ("--adam-beta1", "None"),
                          ("--loss-type", "sigmoid"), ("--dtype", "auto")):
        assert shown[flag].endswith(f"(default: {default})"), flag


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(loss_type="sigmoid,hinge", loss_weights="1"), r"--loss-weights has 1 weight\(s\) for 2 loss type"),
    (dict(loss_type="sigmoid,hinge", loss_weights="1,-2"), r"--loss-weights must be finite numbers >= 0"),
    (dict(loss_type="sigmoid,kto"), r"--loss-type must be one of .*'kto'"),
    (dict(loss_weights="0.5,0.5"), r"2 weight\(s\) for 1 loss type"),
    (dict(report_to="wandb"), r"--report-to wandb: the wandb package is not installed \(pip install wandb\)"),
    (dict(report_to="tensorboard", tensorboard=False), "contradict"),
    (dict(dtype="fp16", device="cpu"), "--dtype fp16: float16 autocast with loss scaling runs on CUDA"),
    (dict(lora_alpha=16.0), r"--lora-alpha need\(s\) --lora-r"),
    (dict(merge_lora=True), r"--merge-lora need\(s\) --lora-r"),
    (dict(adam_beta1=0.8), "--adam-beta1 set the adam/adamw optimizer, but --optimizer is rmsprop"),
    (dict(warmup_steps=3, warmup_ratio=0.1), "--warmup-steps or --warmup-ratio, not both"),
    (dict(eval_steps=5), "--eval-steps needs --eval-data"),
])
def test_bad_settings_are_refused_before_any_work(kwargs, pattern, monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    with pytest.raises(TrainError, match=pattern):
        train("no/such/model", "no/such/data", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_lora_without_peft_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft fails as when it is not installed
    with pytest.raises(TrainError, match=r'^--lora-r: LoRA needs the peft package; install the extra: '
                                         r'pip install -e "\.\[peft\]"'):
        train("no/such/model", "no/such/data", tmp_path / "out", lora_r=8)
    from dpo_fast.cli import main

    assert main(["train", "--model", "m", "--data", "d", "--output-dir", str(tmp_path / "o"), "--lora-r", "8"]) == 2


def test_max_completion_length_cuts_completions_and_enters_the_fingerprint():
    import datasets

    from dpo_fast.data import TokenizationSettings, tokenize_preferences
    from dpo_fast_tools.tiny import build_tokenizer

    tok = build_tokenizer(["a b c d e f g h"])
    ds = datasets.Dataset.from_list([{"prompt": "a b", "chosen": "c d e f g", "rejected": "h"}])
    cut, report = tokenize_preferences(ds, tok, max_length=64, max_completion_length=3)
    assert len(cut[0]["chosen_input_ids"]) == 3 and len(cut[0]["rejected_input_ids"]) == 2  # h + eos
    assert report.completions_truncated == 1
    full, _ = tokenize_preferences(ds, tok, max_length=64)
    assert len(full[0]["chosen_input_ids"]) == 6
    assert "max_completion_length" not in TokenizationSettings(64).as_dict()  # older caches keep their print
    assert TokenizationSettings(64, max_completion_length=3).as_dict()["max_completion_length"] == 3
