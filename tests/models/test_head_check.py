"""The lm_head self-check: a model whose head the fused path would get wrong is refused at every entry
point (naming the class and the difference), a right one passes once per model, and the explicit
opt-out (check_head=False / --skip-head-check) is honoured."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dpo_fast import heads, hf
from dpo_fast_tools.tiny import build_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def llama(**config):
    model = build_tiny_model(50, hidden_size=16, layers=1, heads=2, initializer_range=0.5)
    for key, value in config.items():
        setattr(model.config, key, value)
    return model


def test_a_right_head_passes_once_per_model(monkeypatch):
    model = llama()
    calls = []
    real = heads.check_parts
    monkeypatch.setattr(heads, "check_parts", lambda *a, **k: calls.append(1) or real(*a, **k))
    hf.lm_head_parts(model)
    hf.lm_head_parts(model)  # e.g. once per training step: no second probe
    assert calls == [1] and getattr(model, heads.VERDICT) == "passed"


def test_the_probe_leaves_the_model_as_it_was():
    model = llama()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hf.lm_head_parts(model)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_softcap_the_model_never_applies_is_refused_with_class_and_difference():
    # Llama's forward does not read final_logit_softcapping: taking it from the config would be wrong.
    model = llama(final_logit_softcapping=0.5)
    with pytest.raises(hf.ModelError, match=r"LlamaForCausalLM: the fused lm_head path disagrees .* differ by up "
                                            r"to [0-9.e+-]+ nats, tolerance .*--skip-head-check"):
        hf.lm_head_parts(model)


def test_an_unknown_logit_transform_is_refused():
    class Doubled(nn.Module):  # logits scaled by 2 inside the forward: nothing in the config says so
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits = out.logits * 2
            return out

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def get_decoder(self):
            return self.inner.model

    with pytest.raises(hf.ModelError, match="Doubled: the fused lm_head path disagrees"):
        hf.lm_head_parts(Doubled(llama()))


def test_opt_out_is_kept_on_the_model():
    model = llama(final_logit_softcapping=0.5)
    parts = hf.lm_head_parts(model, check=False)
    assert parts.softcap == 0.5 and getattr(model, heads.VERDICT) == "skipped"
    hf.lm_head_parts(model)  # the user's opt-out holds for later calls on the same model


def test_extra_parameters_on_the_head_are_refused():
    model = llama()

    class ScaledHead(nn.Linear):
        def __init__(self, linear):
            super().__init__(linear.in_features, linear.out_features, bias=False)
            self.temperature = nn.Parameter(torch.ones(()))

    model.lm_head = ScaledHead(model.lm_head)
    with pytest.raises(hf.ModelError, match=r"lm_head \(ScaledHead\) has parameters other than weight and bias "
                                            r"\(temperature\)"):
        hf.lm_head_parts(model, check=False)  # structural: refused even without the probe


def test_masked_lm_is_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16)
    model = BertForMaskedLM(config)
    with pytest.raises(hf.ModelError, match="BertForMaskedLM is a masked LM, not a causal LM"):
        hf.lm_head_parts(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(hf.ModelError, match="BertForMaskedLM, a masked LM, not a causal LM"):
        hf.load_causal_lm(tmp_path)


def test_bert_generation_loads_from_disk(tmp_path):
    from transformers import BertGenerationConfig, BertGenerationDecoder

    config = BertGenerationConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, is_decoder=True)
    BertGenerationDecoder(config).save_pretrained(tmp_path)
    model = hf.load_causal_lm(tmp_path)
    assert type(model).__name__ == "BertGenerationDecoder" and getattr(model, heads.VERDICT) == "passed"


def test_encoder_decoder_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_ff=16, num_layers=1, num_heads=2,
                                                d_kv=8))
    with pytest.raises(hf.ModelError, match="encoder-decoder model, not a causal LM"):
        hf.lm_head_parts(model)


def test_tolerance_follows_dtype_and_logit_size():
    assert heads.tolerance(torch.float32, 10.0) == 2e-3
    assert heads.tolerance(torch.bfloat16, 100.0) > heads.tolerance(torch.bfloat16, 1.0) >= 3e-2


@pytest.fixture
def wrong_head_model(tmp_path):
    """A saved tiny Llama whose config carries a soft-cap its forward never applies (what an unknown head
    looks like to the fused path), and the tokenizer beside it."""
    from dpo_fast_tools.tiny import build_tiny_model, build_tokenizer, save_tiny

    path = tmp_path / "model"
    tokenizer = build_tokenizer()
    model = build_tiny_model(len(tokenizer), tokenizer=tokenizer, hidden_size=16, layers=1, heads=2,
                             initializer_range=0.5)
    save_tiny(model, tokenizer, path)
    config = json.loads((path / "config.json").read_text())
    config["final_logit_softcapping"] = 0.5
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_load_causal_lm_refuses_then_honours_the_opt_out(wrong_head_model):
    with pytest.raises(hf.ModelError, match="LlamaForCausalLM: the fused lm_head path disagrees"):
        hf.load_causal_lm(wrong_head_model)
    assert getattr(hf.load_causal_lm(wrong_head_model, check_head=False), heads.VERDICT) == "skipped"


@pytest.mark.parametrize("command", ["train", "precompute-ref", "eval"])
def test_every_command_refuses_a_wrong_head_and_has_the_opt_out(wrong_head_model, tmp_path, capsys, command):
    from dpo_fast.cli import main
    from helpers_tiny import standard_rows, write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(4))
    where = {"train": ["--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2", "--no-progress"],
             "precompute-ref": ["--output-dir", str(tmp_path / "cache"), "--no-progress"],
             "eval": ["--split", "train", "--reference-free", "--output-file", str(tmp_path / "m.json")]}[command]
    assert main([command, "--model", str(wrong_head_model), "--data", data, *where]) == 2
    assert "LlamaForCausalLM: the fused lm_head path disagrees" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--skip-head-check" in capsys.readouterr().out


def test_trl_drop_in_checks_each_model_it_patches():
    from dpo_fast.integrations.trl import install_forward

    with pytest.raises(hf.ModelError, match="LlamaForCausalLM: the fused lm_head path disagrees"):
        install_forward(llama(final_logit_softcapping=0.5))
    model = llama(final_logit_softcapping=0.5)
    install_forward(model, check_head=False)
    assert getattr(model, heads.VERDICT) == "skipped"
