"""dpo_fast.integrations.trl against trl.DPOTrainer itself, on tiny local models (no downloads):
the same first-step loss, gradients and metrics for every shared loss type, the same three training
steps with precompute, PEFT LoRA and gradient accumulation (+ checkpointing, evaluation), the
refusals, and reference log-probs from a dpo_fast cache."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install \"dpo_fast[trl]\")")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from dpo_fast import precompute_reference  # noqa: E402
from dpo_fast_tools import tiny  # noqa: E402
from dpo_fast.integrations import trl as integration  # noqa: E402
from dpo_fast.refcache import CacheMismatchError, MissingExamplesError  # noqa: E402

from helpers_tiny import make_model, make_tokenizer, one_thread, standard_rows  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def rows(n: int = 8, seed: int = 0, space: bool = True) -> list[dict]:
    # TRL tokenizes prompt + completion as one string: completions start with a space.
    lead = " " if space else ""
    return [{"prompt": r["prompt"], "chosen": lead + r["chosen"], "rejected": lead + r["rejected"]}
            for r in standard_rows(n, seed)]


def dataset(n: int = 8, tag: str = "", **kw):
    # `tag`: a column TRL drops, so that two trainers do not share TRL's on-disk precompute cache
    # (it is keyed by the dataset's fingerprint and the model's hash).
    data = rows(n, **kw)
    return datasets.Dataset.from_list([dict(r, tag=tag) for r in data] if tag else data)


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                max_steps=3, report_to="none", bf16=False, gradient_checkpointing=False, use_cpu=True,
                logging_steps=1, save_strategy="no", learning_rate=0.1, optim="sgd", beta=0.5, seed=0,
                disable_tqdm=True)
    base.update(kw)
    return trl.DPOConfig(**base)


def build(cls, tok, args, *, ref: bool = True, **kw):
    model = make_model(tok, seed=0)
    ref_model = make_model(tok, seed=1) if ref else None  # a reference unlike the policy: no trivial ratios
    kw.setdefault("train_dataset", dataset())
    return cls(model, ref_model=ref_model, args=args, processing_class=tok, **kw)


def first_step(trainer):
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def assert_grads_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        assert g.abs().max() > 0, name  # every parameter gets a gradient worth comparing
        scale = g.abs().max().item()
        err = (got[name] - g).abs().max().item()
        assert err <= 2e-5 * scale, f"{name}: max |diff| {err:.3g} vs max |grad| {scale:.3g}"


def assert_metrics_match(got: dict, want: dict) -> None:
    assert set(got) == set(want) - set(integration.UNLOGGED_METRICS)
    # Rewards are differences of summed log-probs: their float32 rounding scales with |log-probs|.
    scale = 1 + max(abs(want["logps/chosen"]), abs(want["logps/rejected"]))
    for key, value in got.items():
        assert value == pytest.approx(want[key], rel=1e-5, abs=2e-6 * scale), key


@pytest.mark.parametrize("loss_type", integration.SUPPORTED_LOSS_TYPES)
def test_first_step_matches_trl(tok, tmp_path, loss_type):
    smoothing = 0.1 if loss_type in ("robust", "exo_pair") else 0.0
    with one_thread():
        out = []
        for cls in (trl.DPOTrainer, integration.DPOTrainer):
            args = config(tmp_path, loss_type=loss_type, label_smoothing=smoothing)
            out.append(first_step(build(cls, tok, args)))
    (want_loss, want_grads, want_metrics), (loss, grads, metrics) = out
    assert math.isfinite(want_loss.item()) and abs(want_loss.item() - math.log(2)) > 1e-3
    assert loss.item() == pytest.approx(want_loss.item(), rel=2e-6)
    assert_grads_close(grads, want_grads)
    assert_metrics_match(metrics, want_metrics)


def test_logits_memory_budget_matches_trl(tok, tmp_path):
    """logits_memory_mb (whole pairs' logits held, 3 GEMM passes): TRL's first step all the same."""
    with one_thread():
        want = first_step(build(trl.DPOTrainer, tok, config(tmp_path)))
        got = first_step(build(integration.DPOTrainer, tok, config(tmp_path), logits_memory_mb=0.02))
    assert got[0].item() == pytest.approx(want[0].item(), rel=2e-6)
    assert_grads_close(got[1], want[1])
    assert_metrics_match(got[2], want[2])
    with pytest.raises(ValueError, match="logits_memory_mb"):
        build(integration.DPOTrainer, tok, config(tmp_path), logits_memory_mb=-1)


def train(cls, tok, args, **kw):
    trainer = build(cls, tok, args, **kw)
    with one_thread():
        trainer.train()
    return trainer


def assert_runs_match(ours, theirs) -> None:
    logs = [h for h in theirs.state.log_history if "loss" in h]
    got = [h for h in ours.state.log_history if "loss" in h]
    assert len(got) == len(logs) == 3
    for a, b in zip(got, logs):
        assert_metrics_match({k: v for k, v in a.items() if k not in ("epoch", "step", "grad_norm",
                                                                      "learning_rate", "loss")},
                             {k: v for k, v in b.items() if k not in ("epoch", "step", "grad_norm",
                                                                      "learning_rate", "loss")})
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    mine = dict(ours.model.named_parameters())
    for name, p in theirs.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(mine[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_grad_accumulation_checkpointing_and_eval_match_trl(tok, tmp_path):
    args = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, gradient_checkpointing=True,
                loss_type="ipo")
    theirs = train(trl.DPOTrainer, tok, config(tmp_path, **args), eval_dataset=dataset(4, seed=1))
    ours = train(integration.DPOTrainer, tok, config(tmp_path, **args), eval_dataset=dataset(4, seed=1))
    assert_runs_match(ours, theirs)
    with one_thread():
        want, got = theirs.evaluate(), ours.evaluate()
    assert set(got) == set(want) - {f"eval_{m}" for m in integration.UNLOGGED_METRICS}
    for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen", "eval_logits/rejected"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_precompute_ref_log_probs_matches_trl(tok, tmp_path):
    theirs = train(trl.DPOTrainer, tok, config(tmp_path, precompute_ref_log_probs=True), ref=False,
                   train_dataset=dataset(tag="trl"))
    calls = []

    class Counting(integration.DPOTrainer):
        def compute_ref_log_probs(self, model, inputs):
            calls.append(len(inputs["input_ids"]))
            return super().compute_ref_log_probs(model, inputs)

    ours = train(Counting, tok, config(tmp_path, precompute_ref_log_probs=True), ref=False,
                 train_dataset=dataset(tag="ours"))
    assert sum(calls) == 16 and ours.ref_model is None  # 8 pairs precomputed here, none at train time
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(ours.train_dataset[column]), torch.tensor(theirs.train_dataset[column]),
                                   rtol=1e-6, atol=1e-5)
    assert_runs_match(ours, theirs)


def test_peft_lora_matches_trl(tok, tmp_path):
    peft = pytest.importorskip("peft")

    def lora():
        return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])

    theirs = train(trl.DPOTrainer, tok, config(tmp_path), ref=False, peft_config=lora())
    ours = train(integration.DPOTrainer, tok, config(tmp_path), ref=False, peft_config=lora())
    assert ours.ref_model is None  # the reference is the model with its adapter disabled
    lora_b = [p for n, p in ours.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # the adapter trained
    assert_runs_match(ours, theirs)


def test_bf16_autocast_matches_trl(tok, tmp_path):
    # DPOConfig's default bf16=True: accelerate runs the model forward (ours included) under bf16
    # autocast, and TRL's reference forward too; the first step must agree, and differ from float32.
    first = {}
    for name, cls, bf16 in (("trl", trl.DPOTrainer, True), ("ours", integration.DPOTrainer, True),
                            ("fp32", trl.DPOTrainer, False)):
        trainer = train(cls, tok, config(tmp_path, bf16=bf16, max_steps=1))
        first[name] = next(h for h in trainer.state.log_history if "loss" in h)
    assert abs(first["fp32"]["loss"] - first["trl"]["loss"]) > 1e-3  # bf16 is in effect
    scale = 1 + abs(first["trl"]["logps/chosen"])
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert first["ours"][key] == pytest.approx(first["trl"][key], rel=1e-5, abs=2e-6 * scale), key


@pytest.mark.parametrize("setting, match", [
    (dict(loss_type="bco_pair"), "loss_type='bco_pair'"),
    (dict(loss_type="aot"), "loss_type='aot'"),
    (dict(loss_type="discopop"), "loss_type='discopop'"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0]), "loss_type=\\['sigmoid', 'sft'\\]"),
    (dict(f_divergence_type="js_divergence"), "f_divergence_type='js_divergence'"),
    (dict(ld_alpha=0.5), "ld_alpha=0.5"),
    (dict(use_weighting=True), "use_weighting=True"),
    (dict(loss_type="robust", label_smoothing=0.6), "label_smoothing"),
])
def test_unsupported_settings_are_refused(tok, tmp_path, setting, match):
    with pytest.raises(ValueError, match=match):
        build(integration.DPOTrainer, tok, config(tmp_path, **setting))


def test_moe_aux_loss_and_bad_backend_are_refused(tok, tmp_path):
    model = make_model(tok)
    model.config.output_router_logits = False  # what an MoE config has
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.01"):
        integration.DPOTrainer(model, ref_model=make_model(tok, seed=1), args=config(tmp_path, router_aux_loss_coef=0.01),
                               train_dataset=dataset(), processing_class=tok)
    with pytest.raises(ValueError, match="backend"):
        build(integration.DPOTrainer, tok, config(tmp_path), backend="fast")


def test_sigmoid_label_smoothing_is_ignored_as_in_trl(tok, tmp_path):
    with pytest.warns(UserWarning, match="label_smoothing=0.2 is ignored"):
        trainer = build(integration.DPOTrainer, tok, config(tmp_path, label_smoothing=0.2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = first_step(build(trl.DPOTrainer, tok, config(tmp_path, label_smoothing=0.2)))[0]
    assert first_step(trainer)[0].item() == pytest.approx(want.item(), rel=2e-6)


class Schedule(transformers.TrainerCallback):
    """Sets trainer attributes before each step, as a TRL user writes a beta schedule."""

    def __init__(self, trainer, changes: dict):
        self.trainer, self.changes = trainer, changes

    def on_step_begin(self, args, state, control, **kwargs):
        for name, values in self.changes.items():
            setattr(self.trainer, name, values[state.global_step])


@pytest.mark.parametrize("loss_type, changes", [
    ("sigmoid", {"beta": [0.5, 2.0, 0.05]}),
    ("robust", {"label_smoothing": [0.1, 0.3, 0.0], "beta": [0.5, 0.5, 1.5]}),
    ("sigmoid", {"loss_weights": [[1.0], [0.25], [3.0]]}),
])
def test_settings_changed_per_step_act_as_in_trl(tok, tmp_path, loss_type, changes):
    """TRL reads beta, label_smoothing and loss_weights from the trainer at every step: a callback
    that changes them changes the loss and the gradients here exactly as there."""
    runs = []
    for cls in (trl.DPOTrainer, integration.DPOTrainer):
        trainer = build(cls, tok, config(tmp_path, loss_type=loss_type, label_smoothing=0.1))
        trainer.add_callback(Schedule(trainer, changes))
        with one_thread():
            trainer.train()
        runs.append(trainer)
    theirs, ours = runs
    assert_runs_match(ours, theirs)
    norms = [[h["grad_norm"] for h in t.state.log_history if "grad_norm" in h] for t in (ours, theirs)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


@pytest.mark.parametrize("name, value, match", [
    ("beta", -1.0, "beta"), ("loss_types", ["bco_pair"], "bco_pair"),
    ("f_divergence_type", "js_divergence", "f_divergence_type"), ("use_weighting", True, "use_weighting"),
])
def test_unsupported_settings_set_during_training_are_refused(tok, tmp_path, name, value, match):
    trainer = build(integration.DPOTrainer, tok, config(tmp_path))
    setattr(trainer, name, value)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with pytest.raises(ValueError, match=match):
        trainer.compute_loss(trainer.model, batch)


def test_empty_prompt_is_refused_for_per_token_losses(tok, tmp_path):
    trainer = build(integration.DPOTrainer, tok, config(tmp_path, loss_type="ipo"))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batch["completion_mask"][0, 0] = 1
    with pytest.raises(ValueError, match="completion starts at position 0"):
        trainer.compute_loss(trainer.model, batch)


# ----------------------------------------------------------------------------------------------
# Reference log-probs from a dpo_fast cache


@pytest.fixture(scope="module")
def cached(tok, tmp_path_factory):
    """A saved reference model and a dpo_fast cache of rows(8) made from it with max_length=24."""
    root = tmp_path_factory.mktemp("trl_cache")
    model_dir = tiny.save_tiny(make_model(tok, seed=0), tok, root / "model")
    with one_thread():
        precompute_reference(str(model_dir), rows(8), root / "cache", max_length=24, progress=False, device="cpu")
    return model_dir, root / "cache"


def test_precompute_ref_dataset_matches_trl_precompute(tok, tmp_path, cached):
    model_dir, cache = cached
    args = config(tmp_path, precompute_ref_log_probs=True, max_length=24)
    filled = integration.precompute_ref_dataset(dataset(tag="cache"), cache, model=model_dir, tokenizer=tok, args=args)
    theirs = train(trl.DPOTrainer, tok, args, ref=False, train_dataset=dataset(tag="trl"))

    class NoReference(integration.DPOTrainer):
        def compute_ref_log_probs(self, model, inputs):
            raise AssertionError("the cached values must be used")

    ours = train(NoReference, tok, args, ref=False, train_dataset=filled)
    assert integration.DIGEST not in ours.train_dataset.column_names
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(ours.train_dataset[column]), torch.tensor(theirs.train_dataset[column]),
                                   rtol=1e-6, atol=1e-5)
    assert_runs_match(ours, theirs)


def test_precompute_ref_dataset_refusals(tok, tmp_path, cached):
    model_dir, cache = cached
    args = config(tmp_path, precompute_ref_log_probs=True, max_length=24)
    more = datasets.Dataset.from_list(rows(8) + rows(2, seed=5))
    with pytest.raises(MissingExamplesError, match="2 of 10 example"):
        integration.precompute_ref_dataset(more, cache, model=model_dir, tokenizer=tok, args=args)
    with pytest.raises(CacheMismatchError, match="reference weights differ"):
        other = tiny.save_tiny(make_model(tok, seed=3), tok, tmp_path / "other")
        integration.precompute_ref_dataset(dataset(), cache, model=other, tokenizer=tok, args=args)
    with pytest.raises(CacheMismatchError, match="max_length differs"):
        integration.precompute_ref_dataset(dataset(), cache, model=model_dir, tokenizer=tok,
                                           args=config(tmp_path, max_length=32))
    with pytest.raises(ValueError, match="truncation_mode='keep_end'"):
        integration.precompute_ref_dataset(dataset(), cache, model=model_dir, tokenizer=tok,
                                           args=config(tmp_path, max_length=24, truncation_mode="keep_end"))
    filled = integration.precompute_ref_dataset(dataset(), cache, model=model_dir, tokenizer=tok, args=args)
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True"):
        build(integration.DPOTrainer, tok, config(tmp_path, max_length=24), train_dataset=filled)


def test_precompute_ref_dataset_refuses_other_token_sequences(tok, tmp_path):
    # Without a space before the completion, TRL's joint tokenization merges the prompt's last word
    # with the completion's first (an unknown word here); dpo_fast tokenizes them apart.
    model_dir = tiny.save_tiny(make_model(tok, seed=0), tok, tmp_path / "model")
    data = rows(4, space=False)
    with one_thread():
        precompute_reference(str(model_dir), data, tmp_path / "cache", max_length=24, progress=False, device="cpu")
    args = config(tmp_path, precompute_ref_log_probs=True, max_length=24)
    filled = integration.precompute_ref_dataset(datasets.Dataset.from_list(data), tmp_path / "cache",
                                                model=model_dir, tokenizer=tok, args=args)
    with pytest.raises(ValueError, match="other token sequences"):
        build(integration.DPOTrainer, tok, args, ref=False, train_dataset=filled)
