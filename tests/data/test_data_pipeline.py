"""dpo_fast.data and dpo_fast_tools.tiny: loading, formats, tokenization, truncation, collation."""

from __future__ import annotations

import logging

import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

from helpers_tiny import (conversational_rows, make_model, make_tokenizer, one_thread, ranked_rows,  # noqa: E402
                          standard_rows, write_jsonl)

from dpo_fast import data  # noqa: E402
from dpo_fast_tools import tiny
from dpo_fast.data import MalformedRowError, PreferenceCollator, tokenize_preferences  # noqa: E402


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------- tiny


def test_tiny_tokenizer_and_model_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = make_tokenizer()
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert tok("the dog")["input_ids"][0] == tok.bos_token_id
    model = make_model(tok)
    tiny.save_tiny(model, tok, tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.tensor([tok("the quick brown fox")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model2(x).logits, model(x).logits, rtol=0, atol=0)
    assert tok2("the quick brown fox")["input_ids"] == tok("the quick brown fox")["input_ids"]
    assert data.tokenizer_fingerprint(tok2) == data.tokenizer_fingerprint(tok)
    msgs = [{"role": "user", "content": "hi"}]
    rendered = tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|user|> hi <|end|> <|assistant|> "
    # BPE never needs <unk>.
    bpe = tiny.build_tokenizer(["hello world"], kind="bpe", vocab_size=300)
    ids = bpe("Zürich 42!", add_special_tokens=False)["input_ids"]
    assert bpe.unk_token_id not in ids and bpe.decode(ids) == "Zürich 42!"
    assert data.tokenizer_fingerprint(bpe) != data.tokenizer_fingerprint(tok)


# ---------------------------------------------------------------------------------------------- loading


def test_load_every_file_kind(tmp_path):
    import pandas as pd

    rows = standard_rows(6)
    df = pd.DataFrame(rows)
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
    df.to_json(tmp_path / "d.json", orient="records")
    paths["json"] = tmp_path / "d.json"
    df.to_parquet(tmp_path / "d.parquet")
    paths["parquet"] = tmp_path / "d.parquet"
    df.to_csv(tmp_path / "d.csv", index=False)
    paths["csv"] = tmp_path / "d.csv"
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    paths["save_to_disk"] = tmp_path / "saved"
    for kind, p in paths.items():
        ds = data.load_preference_data(p)
        assert ds.to_list() == rows, kind
        assert data.detect_format(ds) == "standard"
    # DatasetDict on disk: --split picks, slices work, an unknown split is named.
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "dd"))
    assert data.load_preference_data(tmp_path / "dd", split="test").to_list() == rows[:2]
    assert data.load_preference_data(tmp_path / "dd", split="train[1:3]").to_list() == rows[1:3]
    with pytest.raises(ValueError, match="no split 'validation'.*test.*train"):
        data.load_preference_data(tmp_path / "dd", split="validation")
    # A single file loads under the split name asked for; slices apply.
    assert data.load_preference_data(paths["jsonl"], split="test[:2]").to_list() == rows[:2]
    # In memory.
    assert data.load_preference_data(rows).to_list() == rows
    assert data.load_preference_data(df).to_list() == rows
    with pytest.raises(FileNotFoundError):
        data.load_preference_data(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown data file type"):
        data.load_preference_data(tmp_path / "d.txt")


def test_detect_format():
    D = datasets.Dataset.from_list
    assert data.detect_format(D(standard_rows(2))) == "standard"
    assert data.detect_format(D(conversational_rows(2))) == "conversational"
    assert data.detect_format(D([{k: v for k, v in r.items() if k != "prompt"} for r in standard_rows(2)])) \
        == "implicit_prompt"
    assert data.detect_format(D(ranked_rows(2))) == "ranked"
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]"):
        data.detect_format(D([{"prompt": "a", "chosen": "b"}]))


# ---------------------------------------------------------------------------------------------- tokenization


def test_standard_tokenization_and_collation(tok):
    rows = [{"prompt": "what is the capital of france ?", "chosen": "paris", "rejected": "i do not know"},
            {"prompt": "two plus two is", "chosen": "four .", "rejected": "five ."}]
    out, report = tokenize_preferences(datasets.Dataset.from_list(rows), tok)
    assert report.kept == 2 and report.skipped == 0
    ex = out[0]
    assert ex["prompt_input_ids"] == [tok.bos_token_id] + _ids(tok, rows[0]["prompt"])
    assert ex["chosen_input_ids"] == _ids(tok, "paris") + [tok.eos_token_id]
    assert ex["rejected_input_ids"] == _ids(tok, "i do not know") + [tok.eos_token_id]
    assert ex["example_id"] == data.example_id(rows[0]) and ex["row_index"] == 0

    batch = PreferenceCollator(tok.pad_token_id)([out[0], out[1]])
    assert batch["example_ids"] == [out[0]["example_id"], out[1]["example_id"]] and batch["num_responses"] == 2
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 4
    # Rows: chosen 0, chosen 1, rejected 0, rejected 1.
    for row, (e, key) in enumerate([(0, "chosen"), (1, "chosen"), (0, "rejected"), (1, "rejected")]):
        p, c = out[e]["prompt_input_ids"], out[e][f"{key}_input_ids"]
        n = len(p) + len(c)
        assert ids[row, :n].tolist() == p + c and mask[row].sum() == n
        assert labels[row, :len(p)].eq(-100).all() and labels[row, len(p):n].tolist() == c
        assert labels[row, n:].eq(-100).all() and ids[row, n:].eq(tok.pad_token_id).all()
    assert data.batch_completion_tokens(batch).tolist() == [
        len(out[0]["chosen_input_ids"]), len(out[1]["chosen_input_ids"]),
        len(out[0]["rejected_input_ids"]), len(out[1]["rejected_input_ids"])]


def test_eos_not_doubled(tok):
    rows = [{"prompt": "two plus two", "chosen": "four </s>", "rejected": "five"}]
    out, _ = tokenize_preferences(datasets.Dataset.from_list(rows), tok)
    assert out[0]["chosen_input_ids"].count(tok.eos_token_id) == 1
    assert out[0]["chosen_input_ids"][-1] == tok.eos_token_id


def test_conversational_with_and_without_chat_template(tok):
    rows = conversational_rows(3)
    ds = datasets.Dataset.from_list(rows)
    out, _ = tokenize_preferences(ds, tok)
    r = rows[0]
    prompt_text = f"<s><|user|> {r['prompt'][0]['content']} <|end|> <|assistant|> "
    assert out[0]["prompt_input_ids"] == _ids(tok, prompt_text)
    # The template ends the turn: no EOS after it (TRL does the same for conversations).
    assert out[0]["chosen_input_ids"] == _ids(tok, f"{r['chosen'][0]['content']} <|end|> ")

    plain = make_tokenizer(chat_template=None)
    out2, _ = tokenize_preferences(ds, plain)
    expect_prompt = data.render_plain(r["prompt"], add_generation_prompt=True)
    assert expect_prompt == f"user: {r['prompt'][0]['content']}\nassistant: "
    assert out2[0]["prompt_input_ids"] == [plain.bos_token_id] + _ids(plain, expect_prompt)
    assert out2[0]["rejected_input_ids"] == _ids(plain, r["rejected"][0]["content"] + "\n") + [plain.eos_token_id]


def test_implicit_prompt(tok):
    conv = conversational_rows(2)
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in conv]
    a, _ = tokenize_preferences(datasets.Dataset.from_list(conv), tok)
    b, _ = tokenize_preferences(datasets.Dataset.from_list(implicit), tok)
    assert data.detect_format(datasets.Dataset.from_list(implicit)) == "implicit_prompt"
    for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
        assert a[key] == b[key]
    # Strings: the shared prefix, cut at a word boundary.
    p, c, r = data.split_implicit_prompt("the quick brown fox", "the quick brown dog")
    assert (p, c, r) == ("the quick brown ", "fox", "dog")
    p, c, r = data.split_implicit_prompt("two plus four", "two plus five")
    assert (p, c, r) == ("two plus ", "four", "five")
    with pytest.raises(MalformedRowError, match="row 3.*share no leading"):
        data.split_implicit_prompt("cats", "dogs", row=3)
    with pytest.raises(MalformedRowError, match="rejected.*empty completion"):
        data.split_implicit_prompt("a b c", "a b ", row=0)


def test_ranked(tok):
    rows = ranked_rows(3, k=3)
    out, _ = tokenize_preferences(datasets.Dataset.from_list(rows), tok)
    assert out[0]["responses_input_ids"] == [_ids(tok, s) + [tok.eos_token_id] for s in rows[0]["responses"]]
    for packing in (False, True):
        batch = PreferenceCollator(tok.pad_token_id, packing=packing)([out[0], out[1]])
        assert batch["num_responses"] == 3
        n_rows = batch["num_sequences"] if packing else batch["input_ids"].shape[0]
        assert n_rows == 6
    # row k*B + b = response k of example b
    batch = PreferenceCollator(tok.pad_token_id)([out[0], out[1]])
    for k in range(3):
        for b in range(2):
            p, c = out[b]["prompt_input_ids"], out[b]["responses_input_ids"][k]
            assert batch["input_ids"][k * 2 + b, :len(p) + len(c)].tolist() == p + c
    other = tokenize_preferences(datasets.Dataset.from_list(ranked_rows(1, k=2)), tok)[0]
    with pytest.raises(ValueError, match="same number of responses"):
        PreferenceCollator(tok.pad_token_id)([out[0], other[0]])
    with pytest.raises(MalformedRowError, match="row 0, column 'responses'.*at least 2"):
        tokenize_preferences(datasets.Dataset.from_list([{"prompt": "a", "responses": ["b"]}]), tok)


def test_truncation_and_skipped_rows(tok, caplog):
    long_prompt = " ".join(["the quick brown fox"] * 3)  # 12 words
    rows = [{"prompt": long_prompt, "chosen": "a helpful answer is short", "rejected": "no"},
            {"prompt": "two plus", "chosen": "four", "rejected": "five"}]
    ds = datasets.Dataset.from_list(rows)
    full = [tok.bos_token_id] + _ids(tok, long_prompt)
    # keep_start / keep_end of the prompt.
    out, rep = tokenize_preferences(ds, tok, max_prompt_length=5)
    assert out[0]["prompt_input_ids"] == full[:5] and rep.prompts_truncated == 1
    out, _ = tokenize_preferences(ds, tok, max_prompt_length=5, truncation_side="keep_end")
    assert out[0]["prompt_input_ids"] == full[-5:]
    # Completions get the room max_length leaves (EOS cut with them).
    out, rep = tokenize_preferences(ds, tok, max_length=8, max_prompt_length=5)
    assert out[0]["chosen_input_ids"] == _ids(tok, "a helpful answer")
    assert out[0]["rejected_input_ids"] == _ids(tok, "no") + [tok.eos_token_id]
    assert rep.completions_truncated == 1
    assert max(len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) for r in out) <= 8
    # A prompt that alone fills max_length: skipped, reported with its row, logged.
    with caplog.at_level(logging.WARNING, logger="dpo_fast.data"):
        out, rep = tokenize_preferences(ds, tok, max_length=10)
    assert rep.skipped_rows == [0] and rep.kept == 1 and rep.total == 2 and len(out) == 1
    assert out[0]["row_index"] == 1
    assert "1 of 2 examples skipped" in caplog.text and "rows 0" in caplog.text
    assert "1 skipped" in str(rep)
    with pytest.raises(ValueError, match="truncation_side"):
        tokenize_preferences(ds, tok, truncation_side="middle")


@pytest.mark.parametrize("row,column,problem", [
    ({"prompt": "a", "chosen": "", "rejected": "b"}, "chosen", "empty completion"),
    ({"prompt": "a", "chosen": "b", "rejected": None}, "rejected", "missing value"),
    ({"prompt": 3, "chosen": "b", "rejected": "c"}, "prompt", "expected a string, got int"),
    ({"prompt": "a", "chosen": "b", "rejected": "   "}, "rejected", "empty completion"),
])
def test_malformed_rows_name_row_and_column(tok, row, column, problem):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    rows = [good, good, row] if not isinstance(row["prompt"], int) else None
    if rows is None:  # Arrow would not mix types in one column: check the row directly
        with pytest.raises(MalformedRowError, match=rf"row 2, column '{column}': {problem}"):
            data.validate_example(row, "standard", 2)
        return
    with pytest.raises(MalformedRowError, match=rf"row 2, column '{column}': {problem}"):
        tokenize_preferences(datasets.Dataset.from_list(rows), tok)


def test_malformed_conversations(tok):
    bad_role = conversational_rows(2)
    bad_role[1]["chosen"] = [{"role": "assistant", "content": None}]
    with pytest.raises(MalformedRowError, match=r"row 1, column 'chosen': message 0: 'content' must be a string"):
        tokenize_preferences(datasets.Dataset.from_list(bad_role), tok)
    empty = conversational_rows(2)
    empty[1]["rejected"] = []
    with pytest.raises(MalformedRowError, match=r"row 1, column 'rejected': empty list of messages"):
        tokenize_preferences(datasets.Dataset.from_list(empty), tok)


def test_example_id_follows_content_not_position(tok):
    rows = standard_rows(6)
    ds = datasets.Dataset.from_list(rows)
    out, _ = tokenize_preferences(ds, tok)
    shuffled, _ = tokenize_preferences(ds.shuffle(seed=1).add_column("extra", list(range(6))), tok)
    assert sorted(out["example_id"]) == sorted(shuffled["example_id"])
    assert len(set(out["example_id"])) == 6
    assert data.example_id(dict(rows[0], rejected=rows[0]["rejected"] + " x")) != data.example_id(rows[0])
    # Arrow's None-filled message keys do not change the id.
    conv = conversational_rows(1)[0]
    filled = dict(conv, chosen=[dict(conv["chosen"][0], name=None)])
    assert data.example_id(filled) == data.example_id(conv)


def test_packed_layout_matches_padded(tok):
    out, _ = tokenize_preferences(datasets.Dataset.from_list(standard_rows(3)), tok)
    feats = [out[i] for i in range(3)]
    pad = PreferenceCollator(tok.pad_token_id)(feats)
    pk = PreferenceCollator(tok.pad_token_id, packing=True, pad_to_multiple_of=16)(feats)
    N = pk["input_ids"].shape[1]
    assert N % 16 == 0 and pk["num_sequences"] == 6 and "attention_mask" not in pk
    seq = pk["sequence_ids"][0]
    for r in range(6):
        n = int(pad["attention_mask"][r].sum())
        sel = seq == r
        assert pk["input_ids"][0, sel].tolist() == pad["input_ids"][r, :n].tolist()
        assert pk["labels"][0, sel].tolist() == pad["labels"][r, :n].tolist()
        assert pk["position_ids"][0, sel].tolist() == list(range(n))
    assert (seq[int((seq >= 0).sum()):] == -1).all()
    assert data.batch_completion_tokens(pk).tolist() == data.batch_completion_tokens(pad).tolist()


def test_packed_and_padded_batches_give_the_same_logprobs(tok):
    from dpo_fast.hf import lm_head_parts, sequence_logps

    model = make_model(tok)
    out, _ = tokenize_preferences(datasets.Dataset.from_list(standard_rows(4, seed=3)), tok)
    feats = [out[i] for i in range(4)]
    with torch.inference_mode():
        padded = sequence_logps(lm_head_parts(model), PreferenceCollator(tok.pad_token_id)(feats))
        packed = sequence_logps(lm_head_parts(model), PreferenceCollator(tok.pad_token_id, packing=True, pad_to_multiple_of=8)(feats))
    assert padded.shape == packed.shape == (8,)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
