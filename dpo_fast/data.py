"""Preference data: loading, format detection, validation, tokenization and batching.

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
completion that does not already end with it. Truncation: a prompt longer than
`max_prompt_length` keeps its first tokens (`truncation_side="keep_start"`) or its last
(`"keep_end"`); then completions are cut to the room `max_length` leaves. A pair whose prompt
alone leaves no room for one completion token is skipped and counted in the report (and the log).

Tokenized columns: `example_id` (str), `row_index` (int64, row in the input data),
`prompt_input_ids`, and `chosen_input_ids` / `rejected_input_ids` (completion tokens only), or
`responses_input_ids` (a list per example) for ranked data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMATS = ("standard", "conversational", "implicit_prompt", "ranked")
TRUNCATION_SIDES = ("keep_start", "keep_end")
# Bump when the tokenization rules change in a way that changes token ids: it is part of the
# reference-cache fingerprint, so caches made by older rules are refused.
TOKENIZATION_VERSION = 1
IGNORE_INDEX = -100

_DATA_SUFFIXES = {
    ".json": "json", ".jsonl": "json", ".ndjson": "json",
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv", ".tsv": "csv",
    ".arrow": "arrow",
}


class MalformedRowError(ValueError):
    """A row of the preference data cannot be used; names the row and the column."""

    def __init__(self, row: int | None, column: str | None, problem: str):
        self.row, self.column, self.problem = row, column, problem
        where = []
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where) or 'preference data'}: {problem}")


# ----------------------------------------------------------------------------------------------
# Loading


def _data_builder(path: Path) -> tuple[str, dict]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst", ".zip"):
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in _DATA_SUFFIXES:
        raise ValueError(
            f"{path}: unknown data file type; expected one of {sorted(_DATA_SUFFIXES)} "
            "(optionally compressed), or a directory written by Dataset.save_to_disk"
        )
    builder = _DATA_SUFFIXES[suffixes[-1]]
    return builder, ({"delimiter": "\t"} if suffixes[-1] == ".tsv" else {})


_SLICE = re.compile(r"^(\w[\w.-]*)(?:\[(-?\d*):(-?\d*)\])?$")


def _pick_split(dd, split: str, source):
    """dd[split] for a DatasetDict; supports integer slices such as "train[:100]"."""
    m = _SLICE.match(split)
    if not m:
        raise ValueError(f"split: expected a name or a name with an integer slice like 'train[:100]', got {split!r}")
    base, start, stop = m.groups()
    if base not in dd:
        raise ValueError(f"{source}: no split {base!r}; available splits: {sorted(dd.keys())}")
    ds = dd[base]
    if start or stop:
        ds = ds.select(range(len(ds))[slice(int(start) if start else None, int(stop) if stop else None)])
    return ds


def load_preference_data(source, split: str = "train", *, revision: str | None = None, **kwargs):
    """Load preference data as a `datasets.Dataset`.

    source: a local data file (.json, .jsonl, .parquet, .csv, .tsv, .arrow, optionally
        compressed); a directory written by `save_to_disk` (a Dataset or a DatasetDict);
        a directory of data files; a hub dataset name (needs the network); or data already in
        memory: a `datasets.Dataset` / `DatasetDict`, a list of dicts or a pandas DataFrame.
    split: which split ("train", "test", slices like "train[:1000]"). A single data file is
        loaded under the split name given, whatever it is.
    revision: the hub revision (hub names only). Other keyword arguments go to `load_dataset`.
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        return _pick_split(source, split, "DatasetDict")
    if isinstance(source, list):
        return datasets.Dataset.from_list(source)
    if type(source).__name__ == "DataFrame":
        return datasets.Dataset.from_pandas(source, preserve_index=False)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source: expected a path, a hub name or a Dataset, got {type(source).__name__}")

    path = Path(source).expanduser()
    if path.is_dir():
        if any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return _pick_split(loaded, split, path)
            if "[" in split:
                return _pick_split(datasets.DatasetDict({split.split("[", 1)[0]: loaded}), split, path)
            return loaded
        return datasets.load_dataset(str(path), split=split, **kwargs)
    if path.is_file():
        builder, extra = _data_builder(path)
        base = split.split("[", 1)[0]
        return datasets.load_dataset(builder, data_files={base: str(path)}, split=split, **extra, **kwargs)
    text = str(source)
    if text.startswith((".", "/", "~")) or path.suffix.lower() in _DATA_SUFFIXES:
        raise FileNotFoundError(f"preference data not found: {source}")
    return datasets.load_dataset(text, split=split, revision=revision, **kwargs)


# ----------------------------------------------------------------------------------------------
# Formats and validation


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
        for k, r in enumerate(responses):
            _check_value(r, row, f"responses[{k}]", conv)
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


# ----------------------------------------------------------------------------------------------
# Tokenization


@dataclass(frozen=True)
class TokenizationSettings:
    """What the token ids depend on besides the tokenizer (part of the cache fingerprint)."""

    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation_side: str = "keep_start"

    def __post_init__(self):
        for name in ("max_length", "max_prompt_length"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {v!r}")
        if self.truncation_side not in TRUNCATION_SIDES:
            raise ValueError(f"truncation_side: expected one of {TRUNCATION_SIDES}, got {self.truncation_side!r}")

    def as_dict(self) -> dict:
        return {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
                "truncation_side": self.truncation_side, "tokenization_version": TOKENIZATION_VERSION}


@dataclass
class TokenizationReport:
    """What tokenization did to the data: counts, and the rows it skipped (input row indices)."""

    total: int = 0
    kept: int = 0
    skipped_rows: list[int] = field(default_factory=list)  # prompt alone exceeds the budget
    prompts_truncated: int = 0
    completions_truncated: int = 0  # examples with at least one completion cut

    @property
    def skipped(self) -> int:
        return len(self.skipped_rows)

    def __str__(self) -> str:
        text = (f"{self.kept} of {self.total} examples kept; {self.skipped} skipped (prompt alone leaves no room "
                f"within max_length); {self.prompts_truncated} prompts and {self.completions_truncated} "
                f"examples' completions truncated")
        if self.skipped_rows:
            head = ", ".join(map(str, self.skipped_rows[:10]))
            text += f"; skipped rows: {head}{', ...' if self.skipped > 10 else ''}"
        return text


def _leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of a plain text (e.g. [bos]); [] if none."""
    probe = "hello"
    with_sp = tokenizer(probe, add_special_tokens=True)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for i in range(len(with_sp) - len(without) + 1):
        if with_sp[i:i + len(without)] == without:
            return list(with_sp[:i])
    return []


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what decides token ids: the tokenizer's serialized model, special tokens and
    chat template. Equal for a tokenizer and its save_pretrained/from_pretrained copy."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    template = getattr(tokenizer, "chat_template", None)
    extra = {
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": template if isinstance(template, (str, type(None))) else json.dumps(template, sort_keys=True),
        "added": sorted((str(t), i) for t, i in tokenizer.get_added_vocab().items()),
    }
    h.update(json.dumps(extra, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def _truncate(prompt, completions, settings: TokenizationSettings):
    """(prompt, completions, prompt_truncated, completions_truncated) or None to skip."""
    p_trunc = c_trunc = False
    mpl = settings.max_prompt_length
    if mpl is not None and len(prompt) > mpl:
        prompt = prompt[:mpl] if settings.truncation_side == "keep_start" else prompt[-mpl:]
        p_trunc = True
    if settings.max_length is not None:
        room = settings.max_length - len(prompt)
        if room < 1:
            return None
        cut = [c[:room] for c in completions]
        c_trunc = any(len(a) != len(b) for a, b in zip(cut, completions))
        completions = cut
    return prompt, completions, p_trunc, c_trunc


def tokenize_preferences(
    ds,
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_side: str = "keep_start",
    fmt: str | None = None,
    num_proc: int | None = None,
    batch_size: int = 1000,
):
    """Tokenize preference data; returns (tokenized Dataset, TokenizationReport).

    See the module docstring for the rules and the output columns. Malformed rows raise
    MalformedRowError naming the row (index in `ds`) and the column. Rows whose prompt alone
    leaves no room for a completion token are dropped and listed in the report, and a warning
    with their count is logged.
    """
    import datasets

    settings = TokenizationSettings(max_length, max_prompt_length, truncation_side)
    fmt = fmt or detect_format(ds)
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token: completions must end with one; set tokenizer.eos_token")
    lead = _leading_special_ids(tokenizer)
    ranked = fmt == "ranked"

    def encode(batch, indices):
        n = len(indices)
        rows = [{k: batch[k][i] for k in batch} for i in range(n)]
        prompts, completions, templated, ids = [], [], [], []
        for row, ex in zip(indices, rows):
            validate_example(ex, fmt, row)
            ids.append(example_id(ex))
            p, cs, t = render_example(ex, fmt, tokenizer, row)
            prompts.append(p)
            completions.append(cs)
            templated.append(t)
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if n else []
        flat = [c for cs in completions for c in cs]
        c_flat = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        out = {"example_id": [], "row_index": [], "prompt_input_ids": [],
               "_skipped": [], "_p_trunc": [], "_c_trunc": []}
        comp_key = "responses_input_ids" if ranked else None
        if ranked:
            out[comp_key] = []
        else:
            out["chosen_input_ids"], out["rejected_input_ids"] = [], []
        pos = 0
        for i in range(n):
            p = list(p_ids[i])
            if not templated[i] and lead and p[:len(lead)] != lead:
                p = lead + p
            cs = []
            for _ in completions[i]:
                c = list(c_flat[pos])
                pos += 1
                if not c or c[-1] != eos:
                    c.append(eos)
                cs.append(c)
            res = _truncate(p, cs, settings)
            skipped = res is None
            if skipped:
                p_out, cs_out, pt, ct = [], [[] for _ in cs], False, False
            else:
                p_out, cs_out, pt, ct = res
            out["example_id"].append(ids[i])
            out["row_index"].append(indices[i])
            out["prompt_input_ids"].append(p_out)
            if ranked:
                out[comp_key].append(cs_out)
            else:
                out["chosen_input_ids"].append(cs_out[0])
                out["rejected_input_ids"].append(cs_out[1])
            out["_skipped"].append(skipped)
            out["_p_trunc"].append(pt)
            out["_c_trunc"].append(ct)
        return out

    ids_feature = datasets.List(datasets.Value("int32"))
    feats = {"example_id": datasets.Value("string"), "row_index": datasets.Value("int64"),
             "prompt_input_ids": ids_feature}
    if ranked:
        feats["responses_input_ids"] = datasets.List(ids_feature)
    else:
        feats["chosen_input_ids"] = ids_feature
        feats["rejected_input_ids"] = ids_feature
    feats.update(_skipped=datasets.Value("bool"), _p_trunc=datasets.Value("bool"), _c_trunc=datasets.Value("bool"))

    from . import __version__

    fp = hashlib.sha256(json.dumps(
        [getattr(ds, "_fingerprint", None), tokenizer_fingerprint(tokenizer), settings.as_dict(), fmt, __version__],
        sort_keys=True).encode()).hexdigest()[:16]
    tokenized = ds.map(
        encode, batched=True, batch_size=batch_size, with_indices=True, remove_columns=ds.column_names,
        features=datasets.Features(feats), num_proc=num_proc, new_fingerprint=f"dpo_fast_tok_{fp}",
        desc="tokenizing preference data",
    )
    flags = tokenized.select_columns(["_skipped", "_p_trunc", "_c_trunc", "row_index"]).with_format("numpy")[:]
    skipped_mask = flags["_skipped"]
    report = TokenizationReport(
        total=len(tokenized), kept=int((~skipped_mask).sum()),
        skipped_rows=[int(r) for r in flags["row_index"][skipped_mask]],
        prompts_truncated=int(flags["_p_trunc"].sum()), completions_truncated=int(flags["_c_trunc"].sum()),
    )
    if report.skipped:
        tokenized = tokenized.filter(lambda s: [not x for x in s], input_columns="_skipped", batched=True,
                                     new_fingerprint=f"dpo_fast_tokf_{fp}")
        logger.warning("preference data: %d of %d examples skipped: their prompt alone leaves no room within "
                       "max_length=%s (rows %s%s)", report.skipped, report.total, settings.max_length,
                       ", ".join(map(str, report.skipped_rows[:10])), ", ..." if report.skipped > 10 else "")
    tokenized = tokenized.remove_columns(["_skipped", "_p_trunc", "_c_trunc"])
    logger.info("tokenization: %s", report)
    return tokenized, report


def load_and_tokenize(source, tokenizer, *, split: str = "train", revision: str | None = None, **settings):
    """`load_preference_data` + `detect_format` + `tokenize_preferences`: (tokenized, report, fmt)."""
    ds = load_preference_data(source, split=split, revision=revision)
    fmt = detect_format(ds)
    tokenized, report = tokenize_preferences(ds, tokenizer, fmt=fmt, **settings)
    return tokenized, report, fmt


# ----------------------------------------------------------------------------------------------
# Batching


def _rows(features: list[dict]) -> tuple[list[list[int]], list[int], int]:
    """(token rows, prompt lengths, K) with rows ordered response-major: row k*B + b."""
    if not features:
        raise ValueError("PreferenceCollator: empty batch")
    if "responses_input_ids" in features[0]:
        ks = {len(f["responses_input_ids"]) for f in features}
        if len(ks) != 1:
            raise ValueError(f"PreferenceCollator: ranked examples in one batch must have the same number "
                             f"of responses; got {sorted(ks)}")
        K = ks.pop()
        comps = [[list(f["responses_input_ids"][k]) for f in features] for k in range(K)]
    else:
        K = 2
        comps = [[list(f["chosen_input_ids"]) for f in features], [list(f["rejected_input_ids"]) for f in features]]
    prompts = [list(f["prompt_input_ids"]) for f in features]
    rows, plens = [], []
    for k in range(K):
        for p, c in zip(prompts, comps[k]):
            rows.append(p + c)
            plens.append(len(p))
    return rows, plens, K


class PreferenceCollator:
    """Batches tokenized preference examples (the output of `tokenize_preferences`).

    Layout: row k * B + b holds prompt + completion k of example b, so for pairs the B chosen
    rows come first, then the B rejected rows (what `dpo_fast.loss` takes); for ranked data
    with K responses, `logps.view(K, B).T` is the (B, K) best-first matrix of
    `plackett_luce_loss`. All examples of a ranked batch must have the same K.

    Padded (default): `input_ids`, `attention_mask`, `labels` (K*B, T), right-padded with
    `pad_token_id`; labels are -100 on the prompt and the padding.
    Packed (`packing=True`): every row concatenated into `input_ids`, `labels`,
    `position_ids` (restarting at 0 for each row) and `sequence_ids` (the row index, -1 on the
    padding up to `pad_to_multiple_of`), all (1, N), plus `num_sequences` = K*B. No attention
    mask: Hugging Face models find the sequence boundaries from `position_ids` when called with
    `attention_mask=None` and `use_cache=False`.
    Both modes add `example_ids` (list of B str) and `num_responses` (K).
    """

    def __init__(self, pad_token_id: int, packing: bool = False, *, label_pad_token_id: int = IGNORE_INDEX,
                 pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id: the tokenizer has no pad token; set one (e.g. the eos token)")
        self.pad_token_id = int(pad_token_id)
        self.packing = packing
        self.label_pad_token_id = label_pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def _padded_length(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else -(-n // m) * m

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        import torch

        rows, plens, K = _rows(features)
        out: dict[str, Any] = {"example_ids": [f["example_id"] for f in features], "num_responses": K}
        ign = self.label_pad_token_id
        if not self.packing:
            T = self._padded_length(max(len(r) for r in rows))
            R = len(rows)
            input_ids = torch.full((R, T), self.pad_token_id, dtype=torch.long)
            attention = torch.zeros((R, T), dtype=torch.long)
            labels = torch.full((R, T), ign, dtype=torch.long)
            for i, (r, p) in enumerate(zip(rows, plens)):
                t = torch.tensor(r, dtype=torch.long)
                input_ids[i, :len(r)] = t
                attention[i, :len(r)] = 1
                labels[i, p:len(r)] = t[p:]
            out.update(input_ids=input_ids, attention_mask=attention, labels=labels)
            return out
        n = sum(len(r) for r in rows)
        N = self._padded_length(n)
        input_ids = torch.full((1, N), self.pad_token_id, dtype=torch.long)
        labels = torch.full((1, N), ign, dtype=torch.long)
        position_ids = torch.zeros((1, N), dtype=torch.long)
        sequence_ids = torch.full((1, N), -1, dtype=torch.long)
        pos = 0
        for i, (r, p) in enumerate(zip(rows, plens)):
            L = len(r)
            t = torch.tensor(r, dtype=torch.long)
            input_ids[0, pos:pos + L] = t
            labels[0, pos + p:pos + L] = t[p:]
            position_ids[0, pos:pos + L] = torch.arange(L)
            sequence_ids[0, pos:pos + L] = i
            pos += L
        out.update(input_ids=input_ids, labels=labels, position_ids=position_ids, sequence_ids=sequence_ids,
                   num_sequences=len(rows))
        return out


def batch_completion_tokens(batch: dict) -> Any:
    """Scored completion tokens per row of a collated batch (labels after the shift), shape (rows,) int64."""
    import torch

    labels = batch["labels"]
    if "sequence_ids" in batch:  # a row's first token is predicted by nothing: not scored
        seq = batch["sequence_ids"][0]
        scored = (labels[0] != IGNORE_INDEX) & (seq >= 0) & (batch["position_ids"][0] != 0)
        return torch.bincount(seq[scored], minlength=batch["num_sequences"])
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)
