"""GGUF checkpoints: a tiny Llama written to a GGUF file here (the gguf package's writer, the layout
llama.cpp's converter writes), loaded through hf.load_causal_lm / load_tokenizer, trained, saved as
safetensors and reloaded; files transformers cannot load are refused with one line naming why."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from dpo_fast import gguf_loading, hf  # noqa: E402
from dpo_fast_tools.demo import TRAIN_FILE  # noqa: E402
from dpo_fast.trainer import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

WORDS = "the a of is and to odd even me tell parity this number or answer".split()
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 64, 4, 2, 2, 128


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """A sentencepiece-style vocabulary: <unk> <s> </s>, the 256 byte tokens, then words."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"]
    tokens += [f"\u2581{w}" for w in WORDS] + [str(d) for d in range(10)] + list(":?\n")
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, types


def llama_cpp_rotary_order(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The q/k row order llama.cpp stores (its rotary pairs adjacent); transformers undoes it on load."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(vocab: int, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         rms_norm_eps=1e-6, tie_word_embeddings=tied, initializer_range=0.2,
                         bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def write_gguf(path: Path, model, *, qtype=gguf.GGMLQuantizationType.F32, arch: str = "llama",
               raw_type: gguf.GGMLQuantizationType | None = None) -> Path:
    """model as a GGUF file: matrices in `qtype` (norms stay F32), the vocabulary above, a chat template.
    raw_type: store the first matrix as that type's bytes (all zero), for files nothing can dequantize."""
    tokens, scores, types = vocabulary()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(TEMPLATE)
    sd = model.state_dict()
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not model.config.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(LAYERS):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in parts.items()})
    for k, name in names.items():
        t = sd[k].float()
        if name.endswith("attn_q.weight"):
            t = llama_cpp_rotary_order(t, HEADS)
        elif name.endswith("attn_k.weight"):
            t = llama_cpp_rotary_order(t, KV_HEADS)
        data = t.numpy()
        if raw_type is not None and name == "blk.0.attn_q.weight":
            block, size = gguf.GGML_QUANT_SIZES[raw_type]
            w.add_tensor(name, np.zeros((t.shape[0], t.shape[1] // block * size), np.uint8), raw_dtype=raw_type)
        elif t.dim() == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def original():
    return tiny_llama(len(vocabulary()[0]), tied=False)


@pytest.fixture(scope="module")
def f32_file(original, tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", original)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 262, 265, 270, 272, 280, 285, 263]])


def test_float_file_loads_as_the_same_plain_trainable_model(original, f32_file):
    model = hf.load_causal_lm(f32_file, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in model.parameters())
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    torch.testing.assert_close(_logits(model, IDS), _logits(original, IDS), rtol=1e-5, atol=1e-5)
    head = hf.lm_head_parts(model)
    assert head.vocab_size == len(vocabulary()[0])


def test_quantized_file_is_dequantized_to_the_training_dtype(original, tmp_path):
    path = write_gguf(tmp_path / "tiny-q8.gguf", original, qtype=gguf.GGMLQuantizationType.Q8_0)
    for dtype in (torch.float32, torch.bfloat16):
        model = hf.load_causal_lm(path, dtype=dtype, device="cpu")
        assert model.get_input_embeddings().weight.dtype == dtype
        assert model.checkpoint_dtype == dtype
    model = hf.load_causal_lm(path, device="cpu")
    # the original with every matrix through Q8_0 and back (the gguf package's own round trip)
    expected = copy.deepcopy(original)
    with torch.no_grad():
        for p in expected.parameters():
            if p.dim() == 2:
                q = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
    torch.testing.assert_close(_logits(model, IDS), _logits(expected, IDS), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(model, IDS), _logits(original, IDS), rtol=1e-5, atol=1e-5)


def test_tokenizer_and_chat_template_come_from_the_file(f32_file):
    tok = hf.load_tokenizer(f32_file)
    assert len(tok) == len(vocabulary()[0])
    assert tok.convert_tokens_to_ids("\u2581odd") == vocabulary()[0].index("\u2581odd")
    assert tok.chat_template == TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "odd"}], tokenize=False)
    assert text == "<|user|>odd\n"
    assert tok.pad_token_id is not None


def test_train_save_reload(f32_file, tmp_path):
    out = tmp_path / "run"
    train(str(f32_file), str(TRAIN_FILE), out, split="train[:16]", batch_size=8, max_steps=2, optimizer="adamw",
          learning_rate=1e-2, save_steps=0, progress=False, tensorboard=False, max_length=64)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.gguf"))
    trained = hf.load_causal_lm(out, device="cpu")
    loaded = hf.load_causal_lm(f32_file, device="cpu")
    moved = [n for (n, a), b in zip(trained.named_parameters(), loaded.parameters()) if not torch.equal(a, b)]
    assert moved, "two AdamW steps left every weight as loaded"
    again = hf.load_causal_lm(out, device="cpu")
    torch.testing.assert_close(_logits(again, IDS), _logits(trained, IDS), rtol=0, atol=0)
    assert hf.load_tokenizer(out).chat_template == TEMPLATE


def test_type_nothing_can_dequantize_is_refused_before_loading(original, tmp_path):
    path = write_gguf(tmp_path / "q8_1.gguf", original, raw_type=gguf.GGMLQuantizationType.Q8_1)
    assert not gguf_loading.can_dequantize(int(gguf.GGMLQuantizationType.Q8_1))
    with pytest.raises(hf.ModelError, match=r"q8_1\.gguf: holds tensors of quantization type Q8_1 \(1 tensors\), "
                                            r"which the installed gguf package cannot dequantize"):
        hf.load_causal_lm(path, device="cpu")


def test_unmapped_architecture_is_refused(original, tmp_path):
    path = write_gguf(tmp_path / "odd.gguf", original, arch="nosucharch")
    with pytest.raises(hf.ModelError, match=r"odd\.gguf: transformers .* does not map the GGUF architecture "
                                            r"'nosucharch'"):
        hf.load_config(path)
    with pytest.raises(hf.ModelError, match="does not map the GGUF architecture"):
        hf.load_tokenizer(path)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(hf.ModelError, match=r"nothere\.gguf: no such GGUF file"):
        hf.load_causal_lm(tmp_path / "nothere.gguf", device="cpu")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(hf.ModelError, match=r"bad\.gguf: not a readable GGUF file"):
        hf.load_tokenizer(bad)


def test_cli_error_is_one_line(original, tmp_path, capsys):
    from dpo_fast.cli import main

    path = write_gguf(tmp_path / "odd.gguf", original, arch="nosucharch")
    code = main(["train", "--model", str(path), "--data", str(TRAIN_FILE), "--output-dir", str(tmp_path / "o"),
                 "--no-progress", "--no-tensorboard"])
    err = capsys.readouterr().err
    assert code == 2 and "does not map the GGUF architecture 'nosucharch'" in err and "Traceback" not in err
