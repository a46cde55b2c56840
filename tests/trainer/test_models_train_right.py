"""Regression tests of issue 10 (trust), the "never train silently wrong" half, each on a model that
has the property: GPT-2 and Llama with dropout, a ChatML chat template, Gemma 2, a bf16 checkpoint,
a tied model under FSDP with two gloo processes. Each test failed on the code before the fix."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dpo_fast
from dpo_fast_tools import tiny
from dpo_fast_tools.demo import TRAIN_FILE, _texts
from dpo_fast.trainer import TrainError, train

ROOT = Path(__file__).resolve().parents[2]
FAST = dict(optimizer="adamw", learning_rate=3e-3, warmup_steps=0, logging_steps=1, save_steps=0, progress=False,
            tensorboard=False, max_length=64, split="train[:32]", batch_size=8)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer(_texts(), kind="word")


def _first_loss(out: Path) -> float:
    return next(json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if '"phase"' not in line)


# ----------------------------------------------------------------------------------------------
# 4. Dropout is off in policy and reference by default (TRL does the same); --keep-dropout keeps it


def _gpt2(tok, path: Path, p: float) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2, resid_pdrop=p,
                        embd_pdrop=p, attn_pdrop=p, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, initializer_range=0.3)  # outputs far from uniform
    torch.manual_seed(0)
    tiny.save_tiny(GPT2LMHeadModel(config), tok, path)
    return path


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dropout_is_off_unless_kept(tok, tmp_path, family):
    """Policy = reference at step 1, so the loss is ln 2 exactly unless dropout perturbs the policy
    (GPT-2: nn.Dropout modules; Llama: attention dropout read as a float in forward)."""
    if family == "gpt2":
        model = _gpt2(tok, tmp_path / "m", 0.1)
    else:
        llama = tiny.build_tiny_model(len(tok), hidden_size=32, heads=2, tokenizer=tok)
        llama.config.attention_dropout = 0.5  # read into each attention layer when loaded
        model = tiny.save_tiny(llama, tok, tmp_path / "m")
    train(str(model), str(TRAIN_FILE), tmp_path / "off", max_steps=1, **FAST)
    assert _first_loss(tmp_path / "off") == pytest.approx(math.log(2), abs=1e-6)
    train(str(model), str(TRAIN_FILE), tmp_path / "kept", max_steps=1, keep_dropout=True, **FAST)
    assert abs(_first_loss(tmp_path / "kept") - math.log(2)) > 1e-4
    cfg = json.loads((tmp_path / "off" / "config.json").read_text())  # the config is saved as it came
    assert cfg.get("resid_pdrop", cfg.get("attention_dropout")) in (0.1, 0.5)


# ----------------------------------------------------------------------------------------------
# 5. A ChatML template ends the turn itself: no second end-of-turn token


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chatml_completion_ends_its_turn_once():
    from datasets import Dataset

    from dpo_fast.data import tokenize_preferences

    chat = tiny.build_tokenizer(["hello there friend", "how are you"], kind="bpe", chat_template=CHATML)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.eos_token = "<|im_end|>"
    rows = [{"prompt": [{"role": "user", "content": "how are you"}],
             "chosen": [{"role": "assistant", "content": "hello there"}],
             "rejected": [{"role": "assistant", "content": "friend"}]}]
    out, _ = tokenize_preferences(Dataset.from_list(rows), chat)
    end = chat.convert_tokens_to_ids("<|im_end|>")
    for key in ("chosen_input_ids", "rejected_input_ids"):
        ids = out[0][key]
        assert ids.count(end) == 1, chat.decode(ids)
        assert chat.decode(ids).endswith("<|im_end|>\n")


# ----------------------------------------------------------------------------------------------
# 6. inplace_backward: correct gradients or a clear error, never a silent wrong value


def _logits_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 50, generator=g)
    labels = torch.randint(0, 50, (4, 8), generator=g)
    return x, labels, torch.randn(2, generator=g), torch.randn(2, generator=g)


@pytest.mark.parametrize("z_first", [False, True])
def test_inplace_backward_with_another_user_of_the_logits(z_first):
    x0, labels, rc, rr = _logits_batch()

    def run(inplace):
        x = x0.clone().requires_grad_(True)
        z = (lambda: 1e-2 * torch.logsumexp(x, -1).pow(2).mean())  # a z-loss on the same logits
        zl = z() if z_first else None
        out = dpo_fast.loss(x, labels, rc, rr, inplace_backward=inplace)
        total = out.loss + (zl if z_first else z())
        total.backward()
        return x.grad

    want = run(False)
    try:
        got = run(True)
    except RuntimeError as e:  # a clear error is acceptable; a wrong gradient is not
        assert "modified by an inplace operation" in str(e)
        return
    torch.testing.assert_close(got, want)


def test_inplace_backward_twice_or_after_a_change_raises_clearly():
    x0, labels, rc, rr = _logits_batch()
    x = x0.clone().requires_grad_(True)
    out = dpo_fast.loss(x, labels, rc, rr, inplace_backward=True)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated once"):
        out.loss.backward()
    y = x0.clone().requires_grad_(True)
    logits = y * 1.0
    lp = dpo_fast.sequence_logprobs(logits, labels, inplace_backward=True)
    with torch.no_grad():
        logits.mul_(2.0)  # changed after the forward: the stats no longer describe the logits
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        lp.sum().backward()


# ----------------------------------------------------------------------------------------------
# 9. torch.compile with inductor (the default) on the logits form


@pytest.mark.parametrize("packed", [False, True])
def test_inductor_compiles_the_logits_form(packed):
    x0, labels, rc, rr = _logits_batch()
    x0, labels = x0.repeat(1, 2, 1), labels.repeat(1, 2)  # T = 16
    labels[:, :3] = -100  # prompt tokens
    kw = {}
    if packed:
        x0, labels = x0.reshape(1, 64, 50), labels.reshape(1, 64)
        kw = dict(sequence_ids=torch.arange(4).repeat_interleave(16).unsqueeze(0), num_sequences=4)

    def f(x, labels, ref_c, ref_r):  # labels as graph inputs, as in a training step
        return dpo_fast.loss(x, labels, ref_c, ref_r, **kw).loss

    eager, compiled = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    f(eager, labels, rc, rr).backward()
    torch.set_num_threads(2)  # the failing codegen was the multi-threaded (atomic) scatter
    value = torch.compile(f, fullgraph=True)(compiled, labels, rc, rr)
    value.backward()
    torch.testing.assert_close(value, f(x0, labels, rc, rr))
    torch.testing.assert_close(compiled.grad, eager.grad)


# ----------------------------------------------------------------------------------------------
# Gemma 2 (attention soft-cap: no sdpa) trains without flags


def test_gemma2_trains_without_flags(tok, tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = tiny.save_tiny(Gemma2ForCausalLM(config), tok, tmp_path / "gemma2")
    train(str(model), str(TRAIN_FILE), tmp_path / "run", max_steps=2, **FAST)
    assert _first_loss(tmp_path / "run") == pytest.approx(math.log(2), abs=1e-6)


# ----------------------------------------------------------------------------------------------
# 13. The saved model is what came in: dtype, config, tied weights once (FSDP too)


def test_bf16_checkpoint_saved_as_bf16_with_its_config(tok, tmp_path):
    from safetensors import safe_open

    model = tiny.build_tiny_model(len(tok), hidden_size=32, heads=2, tokenizer=tok).to(torch.bfloat16)
    src = tiny.save_tiny(model, tok, tmp_path / "bf16")
    before = json.loads((src / "config.json").read_text())
    train(str(src), str(TRAIN_FILE), tmp_path / "run", max_steps=1, gradient_checkpointing=True, **FAST)
    after = json.loads((tmp_path / "run" / "config.json").read_text())
    assert after["dtype"] == "bfloat16" and after.get("use_cache") == before.get("use_cache")
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


_FSDP = """
import sys
from dpo_fast.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_fsdp_save_of_a_tied_model_has_no_duplicate_lm_head(tok, tmp_path):
    from safetensors.torch import load_file

    src = tiny.save_tiny(tiny.build_tiny_model(len(tok), hidden_size=32, heads=2, tokenizer=tok,
                                               tie_word_embeddings=True), tok, tmp_path / "tied")
    script = tmp_path / "run.py"
    script.write_text(_FSDP)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), "--model", str(src), "--data", str(TRAIN_FILE), "--split", "train[:32]",
                          "--output-dir", str(tmp_path / "run"), "--fsdp", "--max-steps", "2", "--batch-size", "8",
                          "--max-length", "64", "--no-progress", "--no-tensorboard", "--save-steps", "0"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert set(load_file(str(tmp_path / "run" / "model.safetensors"))) == set(load_file(str(src / "model.safetensors")))
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run"))
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()


# ----------------------------------------------------------------------------------------------
# 14. Both parts of the loss are reported, in training and evaluation


def test_train_and_eval_report_both_parts_of_the_loss(tok, tmp_path):
    src = tiny.save_tiny(tiny.build_tiny_model(len(tok), hidden_size=32, heads=2, tokenizer=tok), tok, tmp_path / "m")
    summary = train(str(src), str(TRAIN_FILE), tmp_path / "run", max_steps=2, sft_weight=0.5,
                    eval_data=str(TRAIN_FILE), eval_split="train[32:48]", **FAST)
    for rec in [summary["eval_after"], summary["train"]]:
        assert rec["loss"] == pytest.approx(rec["loss/preference"] + 0.5 * rec["loss/sft"], rel=1e-5)
        assert rec["loss/sft"] > 0.5  # an NLL per token of an untrained model, not 0


# ----------------------------------------------------------------------------------------------
# 15. Small things a user hits


def test_python_api_takes_what_the_cli_takes(tok, tmp_path):
    src = tiny.save_tiny(tiny.build_tiny_model(len(tok), hidden_size=32, heads=2, tokenizer=tok), tok, tmp_path / "m")
    opts = dict(FAST, learning_rate=None)
    opts.pop("learning_rate")
    summary = train(str(src), str(TRAIN_FILE), tmp_path / "run", max_steps=1, lr=1e-3, beta=torch.tensor(0.2), **opts)
    assert summary["train"]["learning_rate"] == pytest.approx(1e-3)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["beta"] == pytest.approx(0.2)
    with pytest.raises(TrainError, match="'lr' and 'learning_rate' are the same option"):
        train(str(src), str(TRAIN_FILE), tmp_path / "o2", lr=1e-3, learning_rate=1e-3)
    x0, labels, rc, rr = _logits_batch()
    a = dpo_fast.loss(x0, labels, rc, rr, beta=torch.tensor(0.2)).loss
    assert a == dpo_fast.loss(x0, labels, rc, rr, beta=0.2).loss


def test_inplace_backward_with_hidden_states_is_refused():
    h, w = torch.randn(2, 5, 8), torch.randn(30, 8)
    with pytest.raises(ValueError, match="inplace_backward=True applies to the logits form"):
        dpo_fast.loss(hidden=h, weight=w, labels=torch.randint(0, 30, (2, 5)), inplace_backward=True)


def test_help_and_tensorboard_messages(tok, tmp_path, caplog):
    from dpo_fast.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    text = " ".join(sub.format_help().split())
    assert "--no-progress hide the progress bar" in text and "(shown" not in text
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here: nothing is refused")
    src = tiny.save_tiny(tiny.build_tiny_model(len(tok), hidden_size=32, heads=2, tokenizer=tok), tok, tmp_path / "m")
    # issue 22, item 8: a missing tensorboard is refused up front, as a missing wandb is (no warning every run)
    with pytest.raises(TrainError, match="--report-to tensorboard: the tensorboard package is not installed"):
        train(str(src), str(TRAIN_FILE), tmp_path / "run", max_steps=1,
              **dict(FAST, tensorboard=True, report_to="tensorboard"))
    assert not (tmp_path / "run").exists()
