"""`dpo-fast reproduce frontier`: the task's reward, the KL estimator, seeded sampling, the baselines'
losses, and a smoke run of the whole grid (trimmed) through the project's trainer."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import pytest
import torch

from dpo_fast_tools import tiny
from dpo_fast_tools.reproduce import baselines, frontier, sampling, task
from helpers_tiny import one_thread


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# The reward


@pytest.mark.parametrize("prompt, completion, score", [
    ("", "the movie was great .", 2),                                  # strong positive
    ("", "the plot was not bad .", 1),                                 # "not" flips a mild negative
    ("i found", "the cast very dull . and the music was nice .", -2 + 1),  # "very" doubles
    ("the acting was not", "good . the film is superb .", -1 + 2),     # the modifier may sit in the prompt
    ("the film was awful . i found", "the music fun .", 1),            # the prompt's own sentiment is not counted
    ("", "great great not very good", 2 + 2 + 2),                      # only the word right before counts
    ("", "not not bad", 1),
    ("", "i saw it with my friends .", 0),                             # no sentiment: reward 0.5
    ("the story was", "", 0),
])
def test_reward_hand_computed(prompt, completion, score):
    assert task.score(prompt.split(), completion.split()) == score
    assert task.reward(prompt, completion) == pytest.approx(sigmoid(score), abs=1e-12)
    assert task.reward(prompt.split(), completion.split()) == task.reward(prompt, completion)


def test_language_is_one_token_per_word_and_prompts_are_2_to_8_words():
    tok = task.build_task_tokenizer()
    reviews = task.sample_reviews(200, seed=3)
    for r in reviews:
        ids = tok(r, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == r.split()  # no <unk>, exact round trip
    lengths = [len(p.split()) for p in task.sample_prompts(300, seed=4)]
    assert min(lengths) == 2 and max(lengths) == 8
    # The grammar makes reviews of both attitudes: the rewards of whole reviews spread over (0, 1).
    rewards = [task.reward("", r) for r in reviews]
    assert min(rewards) < 0.2 and max(rewards) > 0.8
    assert task.sample_reviews(5, seed=3) == reviews[:5]


def test_label_pairs_higher_reward_wins_and_ties_are_dropped():
    rows, ties = task.label_pairs("p", ["a", "b", "c", "d"], [0.5, 0.9, 0.5, 0.1])
    assert ties == 1  # (a, c)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("b", "a"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert all(r["reward_chosen"] > r["reward_rejected"] for r in rows)
    with pytest.raises(ValueError, match="rewards"):
        task.label_pairs("p", ["a", "b"], [0.1])


# ---------------------------------------------------------------------------------------------
# Log-probs, the KL estimator and sampling


def test_clustered_mean_hand_computed():
    # per-prompt means 2, 2, 6: mean 10/3, sample variance 48/9, standard error sqrt(48/9 / 3) = 4/3
    mean, se = sampling.clustered_mean([[1.0, 3.0], [2.0], [6.0, 6.0, 6.0]])
    assert mean == pytest.approx(10 / 3, abs=1e-12)
    assert se == pytest.approx(4 / 3, abs=1e-12)
    assert math.isnan(sampling.clustered_mean([[1.0, 2.0]])[1])


def _small_lm(seed: int, init: float = 0.5):
    words = "a b c d e f g h".split()
    tok = tiny.build_tokenizer([" ".join(words)], kind="word")
    model = tiny.build_tiny_model(len(tok), hidden_size=16, layers=1, heads=2, tokenizer=tok, seed=seed,
                                  initializer_range=init)
    return model, tok


def _logits_logprobs(model, batch) -> torch.Tensor:
    """The same sums the long way: full logits, log_softmax, gather (the oracle)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = batch["labels"][:, 1:]
    mask = labels != sampling.IGNORE_INDEX
    picked = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(1)


def test_sequence_logprobs_and_kl_match_logits():
    policy, tok = _small_lm(seed=1)
    reference, _ = _small_lm(seed=2)
    prompts = [[tok.bos_token_id, 9, 10], [tok.bos_token_id], [tok.bos_token_id, 11]]
    comps = [[12, 13, tok.eos_token_id], [9, tok.eos_token_id], [14, 9, 9, 10]]
    batch = sampling.encode_batch(prompts, comps, tok.pad_token_id)
    with torch.no_grad():
        got = sampling.sequence_logprobs(policy, batch)
        want = _logits_logprobs(policy, batch)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
        kls = sampling.kl_samples(policy, reference, prompts, [[c] for c in comps], tok.pad_token_id, batch_size=2)
        diff = want - _logits_logprobs(reference, batch)
    assert [k[0] for k in kls] == pytest.approx(diff.tolist(), abs=1e-4)
    assert all(abs(d) > 1e-2 for d in diff.tolist())  # the two models do differ
    same = sampling.kl_samples(policy, policy, prompts, [[c] for c in comps], tok.pad_token_id)
    assert [k[0] for k in same] == [0.0, 0.0, 0.0]


def test_token_logprobs_differentiable():
    policy, tok = _small_lm(seed=1)
    batch = sampling.encode_batch([[tok.bos_token_id, 9]], [[10, tok.eos_token_id]], tok.pad_token_id)
    logps, rows = sampling.token_logprobs(policy, batch)
    assert logps.shape == (2,) and rows.tolist() == [0, 0]
    logps.sum().backward()
    assert policy.lm_head.weight.grad is not None and policy.lm_head.weight.grad.abs().sum() > 0


def test_sampling_is_reproducible_with_a_seed():
    model, tok = _small_lm(seed=1)
    prompts = [[tok.bos_token_id, 9], [tok.bos_token_id], [tok.bos_token_id, 10, 11], [tok.bos_token_id, 12]]
    kw = dict(num_samples=3, max_new_tokens=6, eos_id=tok.eos_token_id)
    a = sampling.sample_completions(model, prompts, seed=7, **kw)
    b = sampling.sample_completions(model, prompts, seed=7, **kw)
    c = sampling.sample_completions(model, prompts, seed=8, **kw)
    assert a == b
    assert a != c
    assert len(a) == 4 and all(len(s) == 3 for s in a)
    for s in (c for cs in a for c in cs):
        assert 1 <= len(s) <= 6 and (s[-1] == tok.eos_token_id or len(s) == 6)
        assert tok.eos_token_id not in s[:-1]


def _exact_kl_two_tokens(policy, reference, prompt: list[int], eos: int) -> float:
    """KL(pi || ref) of the process 'sample up to 2 tokens, stop at EOS', by enumeration."""
    def next_logp(model, ids):
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)

    p1, q1 = next_logp(policy, prompt), next_logp(reference, prompt)
    kl = 0.0
    for y1 in range(p1.shape[0]):
        term = float(p1[y1] - q1[y1])
        if y1 != eos:
            p2, q2 = next_logp(policy, prompt + [y1]), next_logp(reference, prompt + [y1])
            term += float((p2.exp() * (p2 - q2)).sum())
        kl += float(p1[y1].exp()) * term
    return kl


def test_kl_estimate_agrees_with_exact_enumeration():
    """Monte Carlo KL from the sampler (temperature 1, fused log-probs) against the exact value."""
    with one_thread():
        policy, tok = _small_lm(seed=1, init=1.0)
        reference, _ = _small_lm(seed=2, init=1.0)
        prompt = [tok.bos_token_id, 9]
        exact = _exact_kl_two_tokens(policy, reference, prompt, tok.eos_token_id)
        n = 3000
        samples = sampling.sample_completions(policy, [prompt], num_samples=n, max_new_tokens=2,
                                              eos_id=tok.eos_token_id, seed=0, batch_size=n)
        values = sampling.kl_samples(policy, reference, [prompt], samples, tok.pad_token_id, batch_size=1000)[0]
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    assert exact > 0.3  # a real divergence, not a trivial zero
    assert abs(mean - exact) < 4 * se, (mean, exact, se)


# ---------------------------------------------------------------------------------------------
# The baselines' losses


def test_unlikelihood_term_hand_computed():
    vals = baselines.unlikelihood_term(torch.tensor([math.log(0.5), math.log(0.25), 0.0]))
    want = [math.log(2), -math.log(0.75), -math.log(baselines.MIN_ONE_MINUS_P)]
    assert vals.tolist() == pytest.approx(want, rel=1e-5)


def test_baseline_losses_match_logits():
    model, tok = _small_lm(seed=3)
    eos, bos = tok.eos_token_id, tok.bos_token_id
    pairs = [{"prompt_ids": [bos, 9], "chosen_ids": [10, 11, eos], "rejected_ids": [12, eos]},
             {"prompt_ids": [bos], "chosen_ids": [13, eos], "rejected_ids": [9, 9, 14, eos]}]

    def token_lp(key):
        batch = sampling.encode_batch([p["prompt_ids"] for p in pairs], [p[key] for p in pairs], tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        labels = batch["labels"][:, 1:]
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return lp[labels != sampling.IGNORE_INDEX]

    with torch.no_grad():
        chosen, rejected = token_lp("chosen_ids"), token_lp("rejected_ids")
        nll = -chosen.mean()
        ul = -torch.log1p(-rejected.exp()).mean()
        pft = baselines.baseline_loss(model, "preferred_ft", pairs, tok.pad_token_id)
        unl = baselines.baseline_loss(model, "unlikelihood", pairs, tok.pad_token_id, alpha=0.3)
    assert float(pft) == pytest.approx(float(nll), abs=1e-5)
    assert float(unl) == pytest.approx(float(nll + 0.3 * ul), abs=1e-5)
    with pytest.raises(ValueError, match="method"):
        baselines.baseline_loss(model, "ppo", pairs, tok.pad_token_id)
    with pytest.raises(ValueError, match="alpha"):
        baselines.train_baseline(model, "unlikelihood", pairs, tok.pad_token_id, steps=1, batch_size=1,
                                 learning_rate=1e-3, warmup_steps=0, seed=0, alpha=0.0)


# ---------------------------------------------------------------------------------------------
# The grid, trimmed


SMOKE = replace(frontier.QUICK, sft_reviews=2000, sft_steps=200, hidden_size=32, heads=2, pair_prompts=96,
                eval_prompts=64, batch_size=32, steps=(60,), betas=(0.5,), preferred_ft_learning_rates=(5e-4,),
                unlikelihood_alphas=(0.1,), learning_rate=1e-3)


def test_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        replace(SMOKE, samples_per_prompt=1).check()
    with pytest.raises(ValueError, match="betas"):
        replace(SMOKE, betas=(0.0,)).check()
    with pytest.raises(ValueError, match="steps"):
        replace(SMOKE, steps=()).check()


def test_cli_parses_the_frontier_command():
    from dpo_fast.cli import build_parser

    args = build_parser().parse_args(["reproduce", "frontier", "--output-dir", "x", "--quick", "--betas", "0.1,5",
                                      "--steps", "10,20"])
    assert (args.experiment, args.output_dir, args.quick, args.betas, args.steps) == \
        ("frontier", "x", True, (0.1, 5.0), (10, 20))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reproduce", "frontier", "--output-dir", "x", "--steps", "1.5"])


def test_smoke_frontier_dpo_raises_the_reward(tmp_path):
    summary = frontier.run_frontier(tmp_path, SMOKE, threads=1, progress=None)
    with open(tmp_path / "frontier.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == frontier.CSV_COLUMNS
    assert [r["method"] for r in rows] == ["sft", "dpo", "preferred_ft", "unlikelihood"]
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert saved["machine"]["cores"] >= 1 and saved["wall_seconds"] > 0
    assert saved["pairs"]["pairs"] >= SMOKE.batch_size
    assert saved["comparison"]["preferred_ft"]["models"] == 1 and saved["comparison"]["unlikelihood"]["models"] == 1
    sft, dpo = (next(r for r in summary["rows"] if r["method"] == m) for m in ("sft", "dpo"))
    assert sft["kl"] == 0.0 and sft["samples"] == SMOKE.eval_prompts * SMOKE.eval_samples
    assert dpo["steps"] == 60 and dpo["kl"] > 0
    # DPO moved the policy towards the preferred completions: more reward than the reference,
    # beyond the sampling noise of both estimates.
    assert dpo["reward"] - sft["reward"] > 3 * math.hypot(dpo["reward_se"], sft["reward_se"]), (dpo, sft)


def test_compare_to_dpo_counts():
    def row(method, kl, reward, se=0.01):
        return {"method": method, "setting": "s", "steps": 1, "kl": kl, "reward": reward, "reward_se": se}

    rows = [row("dpo", 0.5, 0.60), row("dpo", 2.0, 0.90),
            row("preferred_ft", 0.4, 0.70),   # no DPO model at KL <= 0.4
            row("preferred_ft", 0.6, 0.70),   # above the only DPO model at KL <= 0.6 (0.60) by 0.1 > 2 s.e.
            row("preferred_ft", 3.0, 0.70),   # below DPO's 0.90 at KL 2
            row("preferred_ft", 2.5, 0.89)]   # within noise of 0.90
    c = frontier.compare_to_dpo(rows)["preferred_ft"]
    assert (c["models"], c["no_dpo_at_lower_kl"], c["baseline_higher"], c["dpo_higher_at_no_more_kl"]) == (4, 1, 1, 1)
    assert c["best_reward"] == 0.89
    assert c["models_detail"][1]["best_dpo_reward_at_lower_kl"] == 0.60


def test_evaluate_policy_scores_its_own_samples():
    tok = task.build_task_tokenizer()
    model = tiny.build_tiny_model(len(tok), hidden_size=16, layers=1, heads=2, tokenizer=tok, seed=0,
                                  initializer_range=0.5)
    prompts = frontier._prompt_ids(tok, ["the acting was not", "i found the plot", "the film"])
    kw = dict(num_samples=5, max_new_tokens=8, seed=3)
    ev = sampling.evaluate_policy(model, model, tok, prompts, **kw)
    samples = sampling.sample_completions(model, prompts, eos_id=tok.eos_token_id, **kw)
    per_prompt = [[task.reward(text.split(), sampling.completion_words(tok, c)) for c in cs]
                  for text, cs in zip(["the acting was not", "i found the plot", "the film"], samples)]
    assert ev["reward"] == pytest.approx(sum(map(sum, per_prompt)) / 15, abs=1e-12)
    assert (ev["kl"], ev["kl_se"], ev["samples"], ev["prompts"]) == (0.0, 0.0, 15, 3)
    assert len({r for rs in per_prompt for r in rs}) > 1  # the random words carry some sentiment


def test_plot_colours_dpo_runs_by_beta_and_fits_the_zoom(tmp_path):
    """Issue 22, item 12: on the committed results, one labelled colour per DPO beta, and every line
    and marker of the zoom panel inside its frame."""
    import matplotlib.colors as mcolors

    from pathlib import Path

    rows = frontier.read_csv(Path(__file__).resolve().parents[2] / "benchmarks/results/frontier/frontier.csv")
    betas = sorted({r["setting"] for r in rows if r["method"] == "dpo"})
    fig = frontier.frontier_figure(rows, zoom_kl=2.0)
    full, zoom = fig.axes
    labels = [t.get_text() for t in full.get_legend().get_texts()]
    assert all(f"DPO {b.replace('beta', 'β')}" in labels for b in betas), labels
    colours = {}
    for container in full.containers:
        label = container.get_label()
        if label.startswith("DPO"):
            colours[label] = mcolors.to_hex(container.lines[0].get_color())
    assert len(colours) == len(betas) == len(set(colours.values())), colours
    (x0, x1), (y0, y1) = zoom.get_xlim(), zoom.get_ylim()
    for line in zoom.get_lines():
        xs, ys = line.get_xdata(), line.get_ydata()
        assert all(x0 <= x <= x1 for x in xs) and all(y0 <= y <= y1 for y in ys), line
    assert x1 <= 2.0 * 1.05
