"""Preference data: loading (loading.py), formats and validation (formats.py), tokenization
(tokenize.py) and batching (collate.py).

Pipeline (each step is a public function the trainer and the reference cache share):

    ds = load_preference_data("pairs.jsonl", split="train")      # JSON/JSONL/Parquet/CSV/save_to_disk/hub
    fmt = detect_format(ds)                                        # "standard", "conversational", ...
    tok, report = tokenize_preferences(ds, tokenizer, max_length=1024, max_prompt_length=512)
    collate = PreferenceCollator(tokenizer.pad_token_id)           # or packing=True
    batch = collate([tok[i] for i in range(8)])

Formats (`detect_format`):
  standard         prompt, chosen, rejected: strings
  conversational   prompt, chosen, rejected: lists of {"role", "content"} messages (the prompt
                   holds the conversation so far, chosen/rejected the assistant turn(s))
  implicit_prompt  chosen, rejected only (conversations or strings); their shared prefix is the
                   prompt: whole messages for conversations, whole words for strings
  ranked           prompt, responses (a list, best first, >= 2; strings or conversations)

Tokenization: the prompt and each completion are tokenized apart and concatenated. Conversations
are rendered with the tokenizer's chat template (the completion is the text the full conversation
adds after the prompt rendered with `add_generation_prompt=True`); without a template, with the
plain `role: content` lines of `render_plain`. Plain-text prompts get the special tokens the
tokenizer puts in front of a text (BOS for Llama-style tokenizers); EOS is appended to every
plain-text completion that does not already end with it (a chat template ends the turn itself).
Truncation: a prompt longer than
`max_prompt_length` keeps its first tokens (`truncation_side="keep_start"`) or its last
(`"keep_end"`); completions are cut to `max_completion_length`, then to the room `max_length` leaves. A pair whose prompt
alone leaves no room for one completion token is skipped and counted in the report (and the log).

Tokenized columns: `example_id` (str), `row_index` (int64, row in the input data),
`prompt_input_ids`, and `chosen_input_ids` / `rejected_input_ids` (completion tokens only), or
`responses_input_ids` (a list per example) for ranked data.
"""

from .collate import IGNORE_INDEX, PreferenceCollator, batch_completion_tokens
from .formats import (FORMATS, MalformedRowError, detect_format, example_id, is_conversation, render_example,
                      render_plain, split_implicit_prompt, validate_example)
from .loading import DataFileError, load_preference_data
from .tokenize import (DEFAULT_MAX_LENGTH, TOKENIZATION_VERSION, TRUNCATION_SIDES, TokenizationReport, TokenizationSettings,
                       load_and_tokenize, tokenize_preferences, tokenizer_fingerprint)

__all__ = ["IGNORE_INDEX", "PreferenceCollator", "batch_completion_tokens", "FORMATS", "MalformedRowError",
           "detect_format", "example_id", "is_conversation", "render_example", "render_plain",
           "split_implicit_prompt", "validate_example", "DataFileError", "load_preference_data",
           "DEFAULT_MAX_LENGTH", "TOKENIZATION_VERSION", "TRUNCATION_SIDES", "TokenizationReport", "TokenizationSettings",
           "load_and_tokenize", "tokenize_preferences", "tokenizer_fingerprint"]
