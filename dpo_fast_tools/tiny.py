"""Tiny Llama-style models and tokenizers built in-process: no downloads, for tests and demos.

    tok = build_tokenizer(texts)                          # word-level, trained on `texts`
    model = build_tiny_model(len(tok), tokenizer=tok)     # 2 layers, hidden 64, random init
    save_tiny(model, tok, "out/tiny")                     # loadable with AutoModelForCausalLM / AutoTokenizer

The tokenizer has the special tokens `<pad>`, `<s>` (bos), `</s>` (eos), `<unk>`, the chat role
markers `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`, and a chat template that renders
`<s><|user|> hi <|end|> <|assistant|> hello <|end|> ` (with `add_generation_prompt`, the prompt
ends in `<|assistant|> `), so conversational data works as with a real chat model. Plain-text
encoding prepends `<s>` (like Llama tokenizers); completions are encoded without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK) + ROLE_TOKENS

# Roles other than system/user/assistant render as plain text inside the markers.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

# A few sentences so `build_tokenizer()` works without arguments (and covers the demo words).
DEFAULT_TEXTS = (
    "the quick brown fox jumps over the lazy dog .",
    "a helpful answer is short , correct and polite .",
    "what is the capital of france ? paris is the capital of france .",
    "i do not know . please ask someone else .",
    "two plus two is four . two plus three is five .",
    "hello ! how are you today ? i am fine , thank you .",
    "water boils at one hundred degrees .",
    "cats and dogs are animals ; a rose is a flower .",
)


def build_tokenizer(
    texts: Iterable[str] | None = None,
    *,
    kind: str = "word",
    vocab_size: int = 512,
    lowercase: bool = False,
    chat_template: str | None = CHAT_TEMPLATE,
    model_max_length: int = 2048,
):
    """Train a tokenizer on `texts` with the `tokenizers` library; return a `PreTrainedTokenizerFast`.

    kind: "word" (whitespace/punctuation split, one id per word, unknown words -> `<unk>`) or
          "bpe" (byte-level BPE: never produces `<unk>`, any text round-trips).
    vocab_size: upper bound on the vocabulary (special tokens included).
    chat_template: Jinja template stored on the tokenizer; None leaves it without one.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(DEFAULT_TEXTS if texts is None else texts)
    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
    else:
        raise ValueError(f"kind: expected 'word' or 'bpe', got {kind!r}")
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        model_max_length=model_max_length,
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


def build_tiny_model(
    vocab_size: int,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    *,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    tokenizer=None,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.02,
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """A randomly initialised `LlamaForCausalLM` built from a `LlamaConfig` (float32, eval mode).

    With `tokenizer`, the pad/bos/eos ids come from it and `vocab_size` must cover it.
    Initialisation is seeded (`seed`) without touching the global RNG state.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = {}
    if tokenizer is not None:
        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range, **ids,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def save_tiny(model, tokenizer, path) -> Path:
    """Save model (safetensors) and tokenizer side by side; `path` then loads with the Auto classes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
