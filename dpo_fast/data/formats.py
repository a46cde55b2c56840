"""The preference-data formats: detection, row validation, content ids, the implicit prompt, and
rendering conversations into the texts that get tokenized."""

from __future__ import annotations

import hashlib
import json

FORMATS = ("standard", "conversational", "implicit_prompt", "ranked")


class MalformedRowError(ValueError):
    """A row of the preference data cannot be used; names the row and the column."""

    def __init__(self, row: int | None, column: str | None, problem: str, *, path=None, line: int | None = None):
        self.row, self.column, self.problem, self.path, self.line = row, column, problem, path, line
        where = []
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        prefix = "" if path is None else f"{path}{f':{line}' if line is not None else ''}: "
        super().__init__(f"{prefix}{', '.join(where) or 'preference data'}: {problem}")

    def located(self, path, line: int | None) -> "MalformedRowError":
        """The same error, naming the file (and line) the row came from."""
        return MalformedRowError(self.row, self.column, self.problem, path=path, line=line)


def is_conversation(value) -> bool:
    """True for a list of {"role", "content"} dicts (a conversation)."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)


def detect_format(ds) -> str:
    """One of FORMATS, from the column names and the first row's types. Raises ValueError naming
    the missing columns when the data fits no format."""
    columns = list(ds.column_names if hasattr(ds, "column_names") else ds[0].keys())
    cols = set(columns)
    if "responses" in cols:
        if "prompt" not in cols:
            raise ValueError(f"ranked data needs a 'prompt' column besides 'responses'; columns are {columns}")
        return "ranked"
    missing = [c for c in ("chosen", "rejected") if c not in cols]
    if missing:
        raise ValueError(
            f"preference data: missing column(s) {missing}; columns are {columns}. Expected "
            "prompt/chosen/rejected, chosen/rejected (implicit prompt) or prompt/responses (ranked)"
        )
    if "prompt" not in cols:
        return "implicit_prompt"
    if len(ds) == 0:
        return "standard"
    first = ds[0]
    return "conversational" if is_conversation(first["chosen"]) or is_conversation(first["prompt"]) else "standard"


def _clean_messages(messages) -> list[dict]:
    # Arrow stores messages as structs: keys other rows use come back as None; drop them.
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _check_text(value, row, column, *, allow_empty=False) -> None:
    if not isinstance(value, str):
        raise MalformedRowError(row, column, f"expected a string, got {type(value).__name__} ({value!r:.60})")
    if not allow_empty and not value.strip():
        raise MalformedRowError(row, column, "empty completion" if column != "prompt" else "empty prompt")


def _check_conversation(value, row, column, *, allow_empty=False) -> None:
    if not isinstance(value, list):
        raise MalformedRowError(row, column,
                                f"expected a list of messages, got {type(value).__name__} ({value!r:.60})")
    if not value and not allow_empty:
        raise MalformedRowError(row, column,
                                "empty list of messages" + (" (empty completion)" if column != "prompt" else ""))
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise MalformedRowError(row, column, f"message {i}: expected a dict with 'role' and 'content', "
                                                 f"got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise MalformedRowError(row, column, f"message {i}: {key!r} must be a string, "
                                                     f"got {type(m.get(key)).__name__}")
    if column != "prompt" and not allow_empty and not any(m["content"].strip() for m in value):
        raise MalformedRowError(row, column, "empty completion (all message contents are empty)")


def _check_value(value, row, column, conversational, *, allow_empty=False) -> None:
    if value is None:
        raise MalformedRowError(row, column, "missing value (null)")
    if conversational:
        _check_conversation(value, row, column, allow_empty=allow_empty)
    else:
        _check_text(value, row, column, allow_empty=allow_empty)


def validate_example(example: dict, fmt: str, row: int | None = None) -> None:
    """Raise MalformedRowError (naming `row` and the column) if `example` does not fit `fmt`."""
    need = {"ranked": ("prompt", "responses"), "implicit_prompt": ("chosen", "rejected")}.get(
        fmt, ("prompt", "chosen", "rejected"))
    for column in need:
        if column not in example:
            raise MalformedRowError(row, column, "missing column")
    if fmt == "ranked":
        responses = example["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise MalformedRowError(row, "responses", f"expected a list of at least 2 responses, got {responses!r:.80}")
        conv = is_conversation(example["prompt"]) or any(is_conversation(r) for r in responses)
        _check_value(example["prompt"], row, "prompt", conv, allow_empty=True)
        seen = {}
        for k, r in enumerate(responses):
            _check_value(r, row, f"responses[{k}]", conv)
            key = json.dumps(_canonical(r), sort_keys=True)
            if key in seen:
                raise MalformedRowError(row, f"responses[{k}]", f"repeats responses[{seen[key]}] (a tie): a ranking "
                                        "orders distinct responses, best first")
            seen[key] = k
        return
    conv = fmt == "conversational" or (fmt == "implicit_prompt" and is_conversation(example["chosen"]))
    if fmt != "implicit_prompt":
        _check_value(example["prompt"], row, "prompt", conv, allow_empty=True)
    for column in ("chosen", "rejected"):
        _check_value(example[column], row, column, conv)


def _canonical(value):
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items() if v is not None}
    return value


def example_id(example: dict) -> str:
    """Content hash identifying an example (32 hex digits of SHA-256).

    Covers the prompt (if any) and chosen/rejected, or the responses of ranked data; ignores
    other columns, so shuffled, filtered or reordered data still finds its cached rows.
    Messages are compared without the keys whose value is None (Arrow fills those in).
    """
    if "responses" in example:
        keys = ("prompt", "responses")
    else:
        keys = ("prompt", "chosen", "rejected") if "prompt" in example else ("chosen", "rejected")
    payload = {k: _canonical(example[k]) for k in keys if k in example}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def split_implicit_prompt(chosen, rejected, row: int | None = None):
    """(prompt, chosen_rest, rejected_rest) for implicit-prompt data.

    Conversations: the longest run of identical leading messages. Strings: the longest common
    prefix, cut back to the end of its last whitespace so no word is split.
    """
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise MalformedRowError(row, "chosen", "implicit prompt: chosen and rejected share no leading message")
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
        prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
        if not prompt.strip():
            raise MalformedRowError(row, "chosen", "implicit prompt: chosen and rejected share no leading words")
    for column, rest in (("chosen", c), ("rejected", r)):
        if not rest or (isinstance(rest, str) and not rest.strip()):
            raise MalformedRowError(row, column,
                                    "implicit prompt: nothing left after the shared prefix (empty completion)")
    return prompt, c, r


# ----------------------------------------------------------------------------------------------
# Rendering


def render_plain(messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """The fallback rendering of a conversation for tokenizers without a chat template."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    messages = _clean_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return render_plain(messages, add_generation_prompt=add_generation_prompt)


def render_example(example: dict, fmt: str, tokenizer, row: int | None = None) -> tuple[str, list[str], bool]:
    """(prompt_text, completion_texts, templated): the strings that get tokenized.

    completion_texts is [chosen, rejected] for pairs and the responses (best first) for ranked
    data. `templated` is True when the prompt came out of a chat template (it then carries its
    own special tokens; plain text prompts get the tokenizer's leading special tokens).
    """
    if fmt == "ranked":
        prompt, completions = example["prompt"], list(example["responses"])
    elif fmt == "implicit_prompt":
        prompt, c, r = split_implicit_prompt(example["chosen"], example["rejected"], row)
        completions = [c, r]
    else:
        prompt, completions = example["prompt"], [example["chosen"], example["rejected"]]

    conversational = is_conversation(prompt) or any(is_conversation(c) for c in completions)
    if not conversational:
        return prompt, completions, False
    if isinstance(prompt, str):  # a plain prompt with message completions: treat as one user turn
        prompt = [{"role": "user", "content": prompt}] if prompt else []
    templated = bool(getattr(tokenizer, "chat_template", None))
    prompt_text = _render(tokenizer, prompt, True)
    no_gen_text = _render(tokenizer, prompt, False)
    names = ["chosen", "rejected"] if fmt != "ranked" else [f"responses[{k}]" for k in range(len(completions))]
    texts = []
    for name, comp in zip(names, completions):
        if isinstance(comp, str):
            comp = [{"role": "assistant", "content": comp}]
        full = _render(tokenizer, list(prompt) + list(comp), False)
        if full.startswith(prompt_text):
            texts.append(full[len(prompt_text):])
        elif full.startswith(no_gen_text):  # templates whose generation prompt differs from the turn start
            texts.append(full[len(no_gen_text):])
        else:
            raise MalformedRowError(
                row, name, "the chat template does not render the prompt as a prefix of the whole "
                "conversation, so the completion cannot be separated from it; give the data as plain strings")
    if any(not t.strip() for t in texts):
        bad = names[[not t.strip() for t in texts].index(True)]
        raise MalformedRowError(row, bad, "empty completion after rendering the conversation")
    return prompt_text, texts, templated
