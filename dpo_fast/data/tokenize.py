"""Tokenization of preference data: settings (part of the reference-cache fingerprint), the report,
truncation, and `tokenize_preferences` / `load_and_tokenize`."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .formats import FORMATS, MalformedRowError, detect_format, example_id, render_example, validate_example
from .loading import load_preference_data, row_line, split_offset

logger = logging.getLogger(__name__)

TRUNCATION_SIDES = ("keep_start", "keep_end")
# Bump when the tokenization rules change in a way that changes token ids: it is part of the
# reference-cache fingerprint, so caches made by older rules are refused. 2: chat-templated
# completions get no extra EOS (the template ends the turn).
TOKENIZATION_VERSION = 2
# The max_length of precompute-ref and train alike (a cache made with one is usable by the other).
DEFAULT_MAX_LENGTH = 512

@dataclass(frozen=True)
class TokenizationSettings:
    """What the token ids depend on besides the tokenizer (part of the cache fingerprint)."""

    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation_side: str = "keep_start"
    max_completion_length: int | None = None

    def __post_init__(self):
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {v!r}")
        if self.truncation_side not in TRUNCATION_SIDES:
            raise ValueError(f"truncation_side: expected one of {TRUNCATION_SIDES}, got {self.truncation_side!r}")

    def arguments(self) -> dict:
        """The keyword arguments that make these settings (tokenize_preferences, compute_fingerprint)."""
        return {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
                "truncation_side": self.truncation_side, "max_completion_length": self.max_completion_length}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizationSettings":
        return cls(d.get("max_length"), d.get("max_prompt_length"), d.get("truncation_side", "keep_start"),
                   d.get("max_completion_length"))

    def as_dict(self) -> dict:
        # max_completion_length only when set: caches made before it existed keep their fingerprint.
        extra = {} if self.max_completion_length is None else {"max_completion_length": self.max_completion_length}
        return {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
                "truncation_side": self.truncation_side, "tokenization_version": TOKENIZATION_VERSION, **extra}


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
    mcl = settings.max_completion_length
    if mcl is not None and any(len(c) > mcl for c in completions):
        completions, c_trunc = [c[:mcl] for c in completions], True
    if settings.max_length is not None:
        room = settings.max_length - len(prompt)
        if room < 1:
            return None
        cut = [c[:room] for c in completions]
        c_trunc = c_trunc or any(len(a) != len(b) for a, b in zip(cut, completions))
        completions = cut
    return prompt, completions, p_trunc, c_trunc


class _Encoder:
    """The batched map function of tokenize_preferences (a class: datasets fingerprints it by value)."""

    def __init__(self, tokenizer, fmt: str, settings: TokenizationSettings):
        self.tokenizer, self.fmt, self.settings = tokenizer, fmt, settings
        self.eos = tokenizer.eos_token_id
        self.lead = _leading_special_ids(tokenizer)
        self.ranked = fmt == "ranked"

    def _render(self, rows, indices):
        prompts, completions, templated, ids = [], [], [], []
        for row, ex in zip(indices, rows):
            validate_example(ex, self.fmt, row)
            ids.append(example_id(ex))
            p, cs, t = render_example(ex, self.fmt, self.tokenizer, row)
            prompts.append(p)
            completions.append(cs)
            templated.append(t)
        return prompts, completions, templated, ids

    def _token_ids(self, p_ids, c_ids, templated: bool):
        """Prompt with the tokenizer's leading special tokens (plain text), completions with EOS
        (plain text: a chat template ends the turn itself)."""
        p = list(p_ids)
        if not templated and self.lead and p[:len(self.lead)] != self.lead:
            p = self.lead + p
        cs = []
        for c in c_ids:
            c = list(c)
            if not templated and (not c or c[-1] != self.eos):
                c.append(self.eos)
            cs.append(c)
        return p, cs

    def __call__(self, batch, indices):
        n = len(indices)
        rows = [{k: batch[k][i] for k in batch} for i in range(n)]
        prompts, completions, templated, ids = self._render(rows, indices)
        p_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"] if n else []
        flat = [c for cs in completions for c in cs]
        c_flat = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        keys = ["responses_input_ids"] if self.ranked else ["chosen_input_ids", "rejected_input_ids"]
        out = {k: [] for k in ["example_id", "row_index", "prompt_input_ids", *keys, "_skipped", "_p_trunc",
                               "_c_trunc"]}
        pos = 0
        for i in range(n):
            k = len(completions[i])
            p, cs = self._token_ids(p_ids[i], c_flat[pos:pos + k], templated[i])
            pos += k
            res = _truncate(p, cs, self.settings)
            p_out, cs_out, pt, ct = res if res is not None else ([], [[] for _ in cs], False, False)
            out["example_id"].append(ids[i])
            out["row_index"].append(indices[i])
            out["prompt_input_ids"].append(p_out)
            if self.ranked:
                out["responses_input_ids"].append(cs_out)
            else:
                out["chosen_input_ids"].append(cs_out[0])
                out["rejected_input_ids"].append(cs_out[1])
            out["_skipped"].append(res is None)
            out["_p_trunc"].append(pt)
            out["_c_trunc"].append(ct)
        return out


def _features(ranked: bool):
    import datasets

    ids_feature = datasets.List(datasets.Value("int32"))
    feats = {"example_id": datasets.Value("string"), "row_index": datasets.Value("int64"),
             "prompt_input_ids": ids_feature}
    if ranked:
        feats["responses_input_ids"] = datasets.List(ids_feature)
    else:
        feats["chosen_input_ids"] = ids_feature
        feats["rejected_input_ids"] = ids_feature
    feats.update(_skipped=datasets.Value("bool"), _p_trunc=datasets.Value("bool"), _c_trunc=datasets.Value("bool"))
    return datasets.Features(feats)


def tokenize_preferences(
    ds,
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_side: str = "keep_start",
    max_completion_length: int | None = None,
    fmt: str | None = None,
    num_proc: int | None = None,
    batch_size: int = 1000,
):
    """Tokenize preference data; returns (tokenized Dataset, TokenizationReport).

    See the package docstring for the rules and the output columns. Malformed rows raise
    MalformedRowError naming the row (index in `ds`) and the column. Rows whose prompt alone
    leaves no room for a completion token are dropped and listed in the report, and a warning
    with their count is logged.
    """
    from .. import __version__

    settings = TokenizationSettings(max_length, max_prompt_length, truncation_side, max_completion_length)
    fmt = fmt or detect_format(ds)
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token: completions must end with one; set tokenizer.eos_token")
    fp = hashlib.sha256(json.dumps(
        [getattr(ds, "_fingerprint", None), tokenizer_fingerprint(tokenizer), settings.as_dict(), fmt, __version__],
        sort_keys=True).encode()).hexdigest()[:16]
    tokenized = ds.map(
        _Encoder(tokenizer, fmt, settings), batched=True, batch_size=batch_size, with_indices=True,
        remove_columns=ds.column_names, features=_features(fmt == "ranked"), num_proc=num_proc,
        new_fingerprint=f"dpo_fast_tok_{fp}", desc="tokenizing preference data",
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
    logger.debug("tokenization: %s", report)  # the callers report it once, naming the data
    return tokenized, report


def load_and_tokenize(source, tokenizer, *, split: str = "train", revision: str | None = None, **settings):
    """`load_preference_data` + `detect_format` + `tokenize_preferences`: (tokenized, report, fmt)."""
    ds = load_preference_data(source, split=split, revision=revision)
    try:
        fmt = detect_format(ds)
        tokenized, report = tokenize_preferences(ds, tokenizer, fmt=fmt, **settings)
    except MalformedRowError as e:
        path = Path(str(source)).expanduser() if isinstance(source, (str, Path)) else None
        if path is None or not path.is_file() or e.row is None:
            raise
        raise e.located(path, row_line(path, e.row + split_offset(split))) from None
    return tokenized, report, fmt
