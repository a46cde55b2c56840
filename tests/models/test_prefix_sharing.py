"""Prefix sharing: the shared layout gives the unshared layout's losses, metrics and every parameter's
gradient, per family (sliding windows included), packed and unpacked; what it cannot do is refused."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from helpers_tiny import make_tokenizer, standard_rows  # noqa: E402

import dpo_fast  # noqa: E402
from dpo_fast import hf  # noqa: E402
from dpo_fast.data import PreferenceCollator, batch_completion_tokens, tokenize_preferences  # noqa: E402
from dpo_fast.data.shared import shared_from_padded, shared_layout, tree_attention_mask  # noqa: E402
from dpo_fast.prefix_sharing import PrefixSharingError, check_prefix_sharing, refusal  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

V = 61
PAD = 0


def _family(name: str, attn: str | None = None):
    """A tiny random model of the family, float64 (exact comparisons), with short sliding windows."""
    import transformers as tf

    small = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3)
    if name == "gpt2":
        config = tf.GPT2Config(vocab_size=V, n_positions=128, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               bos_token_id=1, eos_token_id=2)
    elif name == "llama":
        config = tf.LlamaConfig(**small)
    elif name == "mistral":
        config = tf.MistralConfig(**small, sliding_window=4)
    elif name == "phi3":
        config = tf.Phi3Config(**small, sliding_window=5, pad_token_id=PAD)
    elif name == "qwen2":  # layer 0 full, layer 1 sliding: a per-kind mask dict
        config = tf.Qwen2Config(**small, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    elif name == "gemma2":
        config = tf.Gemma2Config(**small, head_dim=8, sliding_window=4)
    elif name == "gemma3":
        config = tf.Gemma3TextConfig(**small, head_dim=8, sliding_window=4, sliding_window_pattern=2)
    else:
        raise AssertionError(name)
    if attn:
        config._attn_implementation = attn
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).double().eval()
    return model


def _features(n: int, seed: int = 0, prompt=(0, 9), completion=(1, 7)) -> list[dict]:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(1, V) for _ in range(rng.randint(lo, hi))]
    return [{"example_id": str(i), "prompt_input_ids": ids(*prompt), "chosen_input_ids": ids(*completion),
             "rejected_input_ids": ids(*completion)} for i in range(n)]


def _grads(model, value):
    model.zero_grad()
    value.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(model, plain, shared):
    """Per-sequence log-probs (float64) and the gradients of a weighted sum of them to float64 rounding
    where the family computes in float64 (GPT-2); RMS norms upcast to float32 and cast back (Llama,
    Gemma, ...), so there the gradient reaching the shared prompt, summed over both branches before that
    rounding, agrees to float32 rounding. dpo_fast.loss (its loss and metrics are float32 by design)
    to float32 rounding."""
    head = hf.lm_head_parts(model)
    P = len(plain["example_ids"])
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(2 * P, generator=g, dtype=torch.float64)  # a different upstream gradient per row
    logps = {}
    grads = {}
    for name, batch in (("plain", plain), ("shared", shared)):
        logps[name] = dpo_fast.linear_sequence_logprobs(**hf.fused_inputs(head, batch), backend="reference")
        assert logps[name].dtype == torch.float64
        grads[name] = _grads(model, (logps[name] * weights).sum())
    float64_family = model.config.model_type == "gpt2"
    want = logps["plain"].detach()
    atol = 1e-12 if float64_family else 1e-7 * float(want.abs().max())
    torch.testing.assert_close(logps["shared"].detach(), want, rtol=0, atol=atol)
    assert grads["plain"].keys() == grads["shared"].keys() and len(grads["plain"]) == len(list(model.parameters()))
    for name, want in grads["plain"].items():
        atol = 1e-12 if float64_family else 1e-6 * float(want.abs().max())
        torch.testing.assert_close(grads["shared"][name], want, rtol=0, atol=atol, msg=name)

    refs = tuple(-torch.rand(P, generator=g, dtype=torch.float64) * 20 for _ in range(2))
    outs = {}
    for name, batch in (("plain", plain), ("shared", shared)):
        outs[name] = dpo_fast.loss(**hf.fused_inputs(head, batch), ref_chosen_logps=refs[0],
                                   ref_rejected_logps=refs[1], beta=0.3, sft_weight=0.2, backend="reference")
        grads[name] = _grads(model, outs[name].loss)
    a, b = outs["plain"], outs["shared"]
    for field in ("loss", "chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), msg=field)  # float32 defaults
    for name in a.metrics:
        torch.testing.assert_close(b.metrics[name], a.metrics[name], msg=name)
    for name, want in grads["plain"].items():  # the float32 per-sequence loss gradient scales every gradient
        torch.testing.assert_close(grads["shared"][name], want, rtol=0, atol=1e-6 * float(want.abs().max()), msg=name)
    assert torch.equal(batch_completion_tokens(shared), batch_completion_tokens(plain))


FAMILIES = [("llama", None), ("qwen2", None), ("gemma2", "eager"), ("gemma3", None),
            ("gpt2", None), ("phi3", None), ("mistral", None), ("llama", "eager")]


@pytest.mark.parametrize("family,attn", FAMILIES)
@pytest.mark.parametrize("packing", [False, True])
def test_losses_metrics_and_gradients_equal_the_unshared_path(family, attn, packing):
    model = _family(family, attn)
    check_prefix_sharing(model)  # the load-time probe passes
    # prompts up to 12 tokens cross the sliding windows (4, 5); prompts of 0 and 1 tokens included
    feats = _features(6, seed=3, prompt=(0, 12)) + _features(2, seed=4, prompt=(1, 1))
    # Gemma 2 eager in float64 gives NaN on padded rows (transformers' float64 padding mask: a fully masked
    # padding query's NaN values reach every query through 0 * NaN); its unshared reference is the
    # packed layout, which has no padding
    padded = not (family == "gemma2" and attn == "eager")
    plain = PreferenceCollator(PAD, packing=not padded)(feats)
    shared = PreferenceCollator(PAD, packing=packing, prefix_sharing=True)(feats)
    assert shared["unshared_examples"] == 0
    plain_tokens = plain["attention_mask"].sum() if padded else (plain["sequence_ids"] >= 0).sum()
    assert (shared["segment_ids"] >= 0).sum() < plain_tokens
    _assert_same(model, plain, shared)


def test_float32_agrees_to_float_rounding():
    model = _family("llama").float()
    feats = _features(4, seed=5, prompt=(20, 40), completion=(5, 10))
    plain = PreferenceCollator(PAD)(feats)
    shared = PreferenceCollator(PAD, packing=True, prefix_sharing=True)(feats)
    head = hf.lm_head_parts(model)
    with torch.no_grad():
        a, b = hf.sequence_logps(head, plain), hf.sequence_logps(head, shared)
    torch.testing.assert_close(b, a, rtol=0, atol=2e-5)


def test_layout_positions_sequences_and_mask():
    # one pair: prompt [5 6 7], chosen [8 9], rejected [10]
    b = shared_layout([[([5, 6, 7, 8, 9], 3), ([5, 6, 7, 10], 3)]], PAD)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 10]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    assert b["sequence_ids"].tolist() == [[-1, -1, 0, 0, 0, 1, 1]]  # chosen pair 0, rejected P + 0 = 1
    assert b["labels"].tolist() == [[-100, -100, -100, 8, 9, -100, 10]]
    mask = tree_attention_mask(b)[0, 0].int()
    # the rejected branch sees the trunk and itself, not the chosen tokens
    assert mask[5].tolist() == [1, 1, 0, 0, 0, 1, 0]
    assert mask[6].tolist() == [1, 1, 0, 0, 0, 1, 1]
    assert mask[4].tolist() == [1, 1, 1, 1, 1, 0, 0]
    windowed = tree_attention_mask(b, sliding_window=2)[0, 0].int()
    assert windowed[6].tolist() == [0, 0, 0, 0, 0, 1, 1]  # positions 2, 3 only


def test_pairs_that_do_not_share_their_prompt_fall_back_per_pair(caplog):
    model = _family("llama")
    # TRL-style padded rows: pair 0 shares its prompt, pair 1's prompts differ at the boundary
    rows = [([1, 2, 3, 4, 5], 3), ([1, 2, 9, 5], 2), ([1, 2, 3, 6], 3), ([1, 2, 3, 7, 8], 3)]
    T = 6
    ids = torch.zeros(4, T, dtype=torch.long)
    att = torch.zeros(4, T, dtype=torch.long)
    comp = torch.zeros(4, T, dtype=torch.long)
    for i, (t, n) in enumerate(rows):  # left padding: the layout must not care
        ids[i, T - len(t):] = torch.tensor(t)
        att[i, T - len(t):] = 1
        comp[i, T - len(t) + n:] = 1
    with caplog.at_level("INFO", logger="dpo_fast.data.shared"):
        shared = shared_from_padded(ids, att, comp, PAD)
    shared["example_ids"] = ["a", "b"]
    assert shared["unshared_examples"] == 1
    assert any("1 of 2 examples in this batch laid out unshared" in r.getMessage() for r in caplog.records)
    plain = {"input_ids": ids, "attention_mask": att, "labels": ids.masked_fill(comp == 0, -100),
             "example_ids": ["a", "b"]}
    _assert_same(model, plain, shared)


@pytest.mark.parametrize("side", ["keep_start", "keep_end"])
def test_truncation_and_prompts_that_leave_no_room(side):
    tok = make_tokenizer()
    ds = datasets.Dataset.from_list(standard_rows(12, seed=2))
    tokenized, report = tokenize_preferences(ds, tok, max_length=9, max_prompt_length=8, truncation_side=side)
    assert report.prompts_truncated > 0 and report.completions_truncated > 0
    import transformers as tf  # a model over the tokenizer's vocabulary, sliding window shorter than the rows

    config = tf.MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, sliding_window=3, initializer_range=0.3)
    torch.manual_seed(0)
    model = tf.MistralForCausalLM(config).double().eval()
    feats = [tokenized[i] for i in range(len(tokenized))]
    plain = PreferenceCollator(tok.pad_token_id)(feats)
    for packing in (False, True):
        shared = PreferenceCollator(tok.pad_token_id, packing=packing, prefix_sharing=True)(feats)
        _assert_same(model, plain, shared)
    # a prompt that fills max_length leaves no room: the row is skipped before collation
    ds = datasets.Dataset.from_list([{"prompt": " ".join(["the"] * 20), "chosen": "a", "rejected": "b"},
                                     *standard_rows(2, seed=1)])
    tokenized, report = tokenize_preferences(ds, tok, max_length=9, truncation_side=side)
    assert report.skipped_rows == [0]
    batch = PreferenceCollator(tok.pad_token_id, prefix_sharing=True)([tokenized[i] for i in range(len(tokenized))])
    assert batch["num_sequences"] == 4


def test_ranked_examples_share_their_prompt():
    model = _family("qwen2")
    rng = random.Random(7)
    feats = [{"example_id": str(i), "prompt_input_ids": [rng.randrange(1, V) for _ in range(6)],
              "responses_input_ids": [[rng.randrange(1, V) for _ in range(rng.randint(1, 5))] for _ in range(3)]}
             for i in range(3)]
    head = hf.lm_head_parts(model)
    with torch.no_grad():
        plain = hf.sequence_logps(head, PreferenceCollator(PAD)(feats))
        shared = hf.sequence_logps(head, PreferenceCollator(PAD, packing=True, prefix_sharing=True)(feats))
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-10)


def test_flash_attention_is_refused_by_name():
    model = _family("llama")
    model.config._attn_implementation = "flash_attention_2"
    assert "flash-attention" in refusal(model)
    with pytest.raises(PrefixSharingError, match="flash_attention_2"):
        check_prefix_sharing(model)


def test_recurrent_layers_are_refused():
    model = _family("llama")
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(PrefixSharingError, match="linear_attention.*recurrent"):
        check_prefix_sharing(model)


def test_a_family_that_ignores_the_mask_fails_the_probe(monkeypatch):
    model = _family("llama")
    decoder = model.get_decoder()
    forward = decoder.forward

    def own_mask(*args, attention_mask=None, **kwargs):  # builds its own causal mask, as some families do
        return forward(*args, attention_mask=None if attention_mask is None or attention_mask.dim() == 4
                       else attention_mask, **kwargs)
    monkeypatch.setattr(decoder, "forward", own_mask)
    with pytest.raises(PrefixSharingError, match="differ from the unshared"):
        check_prefix_sharing(model)
