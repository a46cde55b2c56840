"""Every code block of README.md and docs/*.md, checked (issue 22, item 11). How each is checked:

python blocks   run, each in a fresh namespace with a fresh temporary directory as the working
                directory. Only placeholders are adapted, by these rules:
                1. the working directory holds MODEL_DIR/ (a tiny Llama and its word-level
                   tokenizer, saved), pairs.jsonl and eval.jsonl (tiny preference pairs whose
                   completions start with a space, as TRL tokenizes them);
                2. the names a block uses without defining them come from `placeholders()` (a
                   model and tokenizer, a dataset, a collated batch of 2P rows with its labels,
                   reference log-probs, ...), all built here from MODEL_DIR: add a name there
                   when a new block uses a new placeholder;
                3. a block whose first line is a comment "# dpo-fast ..." runs that command first
                   (the command the block depends on);
                4. a block in COMPILE_ONLY (file, index among its python blocks) -> reason) is only
                   compiled: it needs something this machine cannot run in a test.
bash blocks     every `dpo-fast ...` line (and `torchrun ... -m dpo_fast ...`, and each part of an
                `a && b` line) is parsed by dpo-fast's own argument parser after: comments
                dropped; `...` -> the subcommand's required options it does not name yet;
                `[--flag a|b]` -> `--flag a`. `pip install -e ".[x,y]"` lines: every extra exists
                in setup.py's extras_require. `python -m pytest` lines: the test suite itself, not rerun.
                Any other line fails the test: add a rule here.
text blocks     (no language: e.g. the layout) are not code.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from dpo_fast_tools import tiny
from dpo_fast.cli import build_parser, main
from helpers_tiny import make_model, make_tokenizer, one_thread, standard_rows

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMPILE_ONLY = {
    ("docs/tensor_parallel.md", 0): "needs torchrun with several ranks and a tensor-parallel plan; the same calls "
                                    "run in tests/ops/test_vocab_parallel.py::test_hf_tp_plan_auto_matches_one_process",
}
REQUIRED = {"train": ["--model", "MODEL_DIR", "--data", "pairs.jsonl", "--output-dir", "run"],
            "precompute-ref": ["--model", "MODEL_DIR", "--data", "pairs.jsonl", "--output-dir", "ref_cache"],
            "eval": ["--model", "run", "--data", "eval.jsonl", "--reference-free"]}


def blocks(language: str) -> list[tuple[str, int, str]]:
    """(file relative to the repo, index among the file's blocks of that language, code)."""
    out = []
    for path in DOCS:
        found = re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), re.S | re.M)
        code = [c for lang, c in found if lang == language]
        out += [(str(path.relative_to(ROOT)), i, c) for i, c in enumerate(code)]
    return out


# ----------------------------------------------------------------------------------------------
# python blocks


def _rows(n: int = 8) -> list[dict]:
    return [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
            for r in standard_rows(n)]


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def placeholders(workdir: Path) -> dict:
    """The names the blocks use as placeholders (rule 2): the model and tokenizer loaded from
    MODEL_DIR as a user's would be, the pairs as a dataset, a collated batch of them (2P rows: P
    chosen, then P rejected) with the decoder's hidden states, and reference log-probs."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dpo_fast
    from dpo_fast.data import PreferenceCollator, tokenize_preferences

    path = str(workdir / "MODEL_DIR")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ds = datasets.Dataset.from_list(_rows())
    tokenized, _ = tokenize_preferences(ds, tok, max_length=64)
    batch = PreferenceCollator(tok.pad_token_id)([tokenized[i] for i in range(len(tokenized))])
    n = batch["input_ids"].shape[0]
    g = torch.Generator().manual_seed(0)
    ref = -20 - torch.rand(n // 2, 2, generator=g)  # (P, K = 2): chosen and rejected per prompt
    hidden = model.model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    names = dict(model=model, tokenizer=tok, ds=ds, train=ds, input_ids=batch["input_ids"],
                 attention_mask=batch["attention_mask"], labels=batch["labels"], hidden=hidden,
                 ref_chosen=ref[:, 0], ref_rejected=ref[:, 1], rc=ref[:, 0], rr=ref[:, 1], w=model.lm_head.weight,
                 ref=ref, K=2, log=lambda metrics: None, torch=torch, dpo_fast=dpo_fast,
                 AutoModelForCausalLM=AutoModelForCausalLM, path=path)
    names.update(ids=names["input_ids"], mask=names["attention_mask"], ref_model=model, ref_hidden=hidden.detach())
    return names


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Rule 1: MODEL_DIR/, pairs.jsonl and eval.jsonl in a fresh working directory."""
    tok = make_tokenizer()
    tiny.save_tiny(make_model(tok, seed=0), tok, tmp_path / "MODEL_DIR")
    _write_jsonl(tmp_path / "pairs.jsonl", _rows())
    _write_jsonl(tmp_path / "eval.jsonl", _rows(4))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("where,index,code", blocks("python"), ids=lambda v: str(v)[:40] if isinstance(v, str) else v)
def test_python_block_runs(workdir, where, index, code):
    compiled = compile(code, f"{where} python block {index}", "exec")
    if (where, index) in COMPILE_ONLY:
        pytest.skip(f"compiled only: {COMPILE_ONLY[where, index]}")
    first = code.lstrip().splitlines()[0]
    if first.startswith("# dpo-fast "):  # rule 3
        assert main(shlex.split(first[len("# dpo-fast "):]) + ["--no-progress"]) == 0, first
    namespace = placeholders(workdir)
    with one_thread():
        exec(compiled, namespace)


# ----------------------------------------------------------------------------------------------
# bash blocks


def _adapt(argv: list[str]) -> list[str]:
    """`...` -> the subcommand's missing required options; `[--flag a|b]` -> `--flag a`."""
    text = re.sub(r"\[([^\]]*)\]", lambda m: re.sub(r"(\S+)\|\S+", r"\1", m.group(1)), " ".join(argv))
    argv = shlex.split(text)
    if "..." in argv:
        argv.remove("...")
        required = REQUIRED.get(argv[0], [])
        for i in range(0, len(required), 2):
            if required[i] not in argv:
                argv += required[i:i + 2]
    return argv


def _extras() -> set[str]:
    """The extras setup.py declares (extras_require's keys)."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return {k.value for k in node.value.keys}
    raise AssertionError("setup.py declares no extras_require")


def _commands(code: str) -> list[str]:
    lines = []
    for line in code.splitlines():
        line = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
        lines += [part.strip() for part in line.split("&&") if part.strip()]
    return lines


@pytest.mark.parametrize("where,index,code", blocks("bash"), ids=lambda v: str(v)[:40] if isinstance(v, str) else v)
def test_bash_block_parses(where, index, code):
    extras = _extras()
    parser = build_parser()
    for line in _commands(code):
        words = shlex.split(line)
        if words[0] == "torchrun":
            words = ["dpo-fast", *words[words.index("dpo_fast") + 1:]]
        if words[0] == "dpo-fast":
            try:
                parser.parse_args(_adapt(words[1:]))
            except SystemExit:
                pytest.fail(f"{where}: `{line}` does not parse")
        elif words[:2] == ["pip", "install"]:
            for word in words:
                m = re.fullmatch(r"\.\[(.*)\]", word)
                if m:
                    assert set(m.group(1).split(",")) <= extras, (line, extras)
        elif words[:3] == ["python", "-m", "pytest"]:
            continue
        else:
            pytest.fail(f"{where}: no rule checks `{line}`; add one to tests/test_docs.py")


def test_no_doc_passes_tp_plan_to_from_pretrained():
    """Issue 22, item 9: transformers 5.25 deprecates from_pretrained(..., tp_plan=); the plan goes in a
    DistributedConfig."""
    for path in DOCS:
        for call in re.findall(r"from_pretrained\((?:[^()]|\([^()]*\))*\)", path.read_text()):
            assert not re.search(r"(?<!DistributedConfig\()\btp_plan=", call), (path, call)
