"""--prefix-sharing in every entry point: dpo-fast train, precompute-ref (same cache, same fingerprint),
dpo-fast eval and the TRL drop-in give what the unshared path gives; a family it cannot serve is
refused with the reason before any step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from helpers_tiny import make_model, make_tokenizer, standard_rows, write_jsonl  # noqa: E402

from dpo_fast_tools import tiny  # noqa: E402
from dpo_fast.hf import ModelError  # noqa: E402
from dpo_fast.refcache import ReferenceCache, precompute_reference, read_manifest  # noqa: E402
from dpo_fast.trainer import train  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning",
                                                                                    "ignore::FutureWarning")]
FAST = dict(optimizer="adamw", learning_rate=3e-3, warmup_steps=0, logging_steps=1, save_steps=0, progress=False,
            tensorboard=False, max_length=24, max_prompt_length=16, batch_size=4, max_steps=3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    tok = make_tokenizer()
    model = tiny.save_tiny(make_model(tok, seed=0), tok, root / "model")
    rows = [dict(r, prompt=r["prompt"] + " " + r["prompt"]) for r in standard_rows(16, seed=3)]  # longer prompts
    data = write_jsonl(root / "pairs.jsonl", rows)
    return tok, str(model), data, root


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"phase"' not in line]


def test_train_precompute_and_eval_equal_the_unshared_path(setup, tmp_path):
    tok, model, data, _ = setup
    caches = {}
    for shared in (False, True):
        caches[shared] = precompute_reference(model, data, tmp_path / f"cache{shared}", max_length=24,
                                              max_prompt_length=16, progress=False, prefix_sharing=shared)
    # the same cache: the fingerprint does not change, the values agree to float rounding
    assert read_manifest(caches[True])["fingerprint_sha256"] == read_manifest(caches[False])["fingerprint_sha256"]
    frames = [ReferenceCache.open(caches[k]).to_pandas().set_index("example_id").sort_index() for k in (False, True)]
    assert len(frames[0]) == 16 and (frames[0].index == frames[1].index).all()
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        assert (frames[0][col] - frames[1][col]).abs().max() < 1e-4
    for col in ("chosen_tokens", "rejected_tokens"):
        assert (frames[0][col] == frames[1][col]).all()

    runs = {}
    for shared in (False, True):
        runs[shared] = tmp_path / f"run{shared}"
        train(model, data, runs[shared], ref_cache=str(caches[False]), prefix_sharing=shared, eval_data=data,
              eval_split="train", **FAST)
    plain, got = _losses(runs[False]), _losses(runs[True])
    assert len(plain) == len(got) == 3
    for p, g in zip(plain, got):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert g[key] == pytest.approx(p[key], rel=1e-5, abs=1e-6), key

    from dpo_fast.trainer.eval_command import EvalConfig, evaluate_model
    reports = {shared: evaluate_model(EvalConfig(model=str(runs[False]), data=data, split="train",
                                                 ref_cache=str(caches[False]), prefix_sharing=shared,
                                                 output_file=str(tmp_path / f"eval{shared}.json")))
               for shared in (False, True)}
    for key, value in reports[False]["metrics"].items():
        assert reports[True]["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_refused_family_stops_training_with_the_reason(setup, tmp_path):
    tok, _, data, root = setup
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, layer_types=["full_attention", "linear_attention"])
    path = tiny.save_tiny(LlamaForCausalLM(config), tok, root / "hybrid")
    with pytest.raises(ModelError, match="prefix sharing refused.*linear_attention"):
        train(str(path), data, tmp_path / "run", prefix_sharing=True, reference_free=True, **FAST)


def test_cli_flag_is_documented_and_parsed(setup, tmp_path, capsys):
    from dpo_fast.cli import main

    _, model, data, _ = setup
    rc = main(["precompute-ref", "--model", model, "--data", data, "--output-dir", str(tmp_path / "c"),
               "--max-length", "24", "--prefix-sharing", "--no-progress"])
    assert rc == 0
    assert "reference cache" in capsys.readouterr().out


trl = pytest.importorskip("trl")


def _trl_first_step(tok, shared: bool, space: bool, tmp_path):
    from dpo_fast.integrations.trl import DPOTrainer

    rows = [{"prompt": r["prompt"], "chosen": (" " if space else "") + r["chosen"],
             "rejected": (" " if space else "") + r["rejected"]} for r in standard_rows(8, seed=5)]
    args = trl.DPOConfig(output_dir=str(tmp_path / f"out{shared}{space}"), per_device_train_batch_size=4,
                         max_steps=1, report_to="none", use_cpu=True, save_strategy="no", beta=0.5, seed=0,
                         disable_tqdm=True)
    trainer = DPOTrainer(make_model(tok, seed=0), ref_model=make_model(tok, seed=1), args=args, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(rows), prefix_sharing=shared)
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("space", [True, False])
def test_trl_drop_in_equals_its_unshared_path(setup, tmp_path, space):
    """Without a space TRL's tokens merge across the prompt boundary (TRL then starts the completion where
    prompt and prompt + completion diverge): the layout takes TRL's boundaries as they are."""
    tok = setup[0]
    loss0, grads0, metrics0 = _trl_first_step(tok, False, space, tmp_path)
    loss1, grads1, metrics1 = _trl_first_step(tok, True, space, tmp_path)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=0, atol=2e-5 * float(g.abs().max()), msg=name)
    for key, value in metrics0.items():
        assert metrics1[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
