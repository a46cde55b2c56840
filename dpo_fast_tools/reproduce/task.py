"""The controlled-generation task: a synthetic review language whose sentiment a program computes.

The DPO paper's sentiment experiment (sec. 6.1, Fig. 2 left) prompts a model with the first 2-8
tokens of an IMDb review and scores the continuation with a sentiment classifier. Here the reviews
come from a small probabilistic grammar and the classifier is replaced by an exact rule, so the
ground-truth reward is known for any token sequence the policy may produce (grammatical or not).

The language (one token per word, "." is a word):

    review   := sentence sentence{1..3}                         then EOS
    sentence := "the" NOUN ("was"|"is") ADJP "."
              | "i found the" NOUN ADJP "."
              | "i thought the" NOUN "was" ADJP "."
              | NEUTRAL                                        (e.g. "i saw it with my friends .")
    a sentence after the first may start with "but" (its polarity differs from the review's
    attitude) or "and" (it agrees)
    ADJP     := ADJ | "very" ADJ | "not" ADJ

Each review has a hidden attitude (+1 or -1, even odds); each sentence agrees with it with
probability AGREE, is neutral with probability NEUTRAL_P; an opinion is expressed as a plain
adjective of its polarity, "very" + that adjective, or "not" + an adjective of the other polarity.

The reward of a completion y given the prompt x (`reward(x, y)`):

    score(x, y) = sum over the words w_i of y that are in LEXICON of
                  LEXICON[w_i] * (-1 if the word before w_i is "not")
                               * ( 2 if the word before w_i is "very")
    reward(x, y) = sigmoid(score(x, y))          in (0, 1), 0.5 for no sentiment at all

"The word before" is looked up in x + y, so a prompt ending in "not" flips the completion's first
adjective. Only sentiment words of y count: the prompt's own sentiment is not the policy's doing.
LEXICON: mild words +-1, strong words +-2. Like a classifier's P(positive), the reward saturates:
two strong positive words already give 0.98.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

POSITIVE = {"good": 1, "nice": 1, "fun": 1, "great": 2, "superb": 2, "wonderful": 2}
NEGATIVE = {"bad": -1, "dull": -1, "weak": -1, "awful": -2, "terrible": -2, "boring": -2}
LEXICON = {**POSITIVE, **NEGATIVE}
NEGATOR, INTENSIFIER = "not", "very"
NOUNS = ("movie", "film", "plot", "acting", "story", "music", "ending", "cast", "script", "dialogue")
NEUTRAL = (
    "i saw it with my friends .",
    "it is a long film .",
    "the story is about a family .",
    "i watched it on friday .",
    "the movie has two parts .",
)
AGREE = 0.75          # a sentence shares the review's attitude
NEUTRAL_P = 0.15      # a sentence carries no opinion
PROMPT_TOKENS = (2, 8)  # prompt length in words, as the paper's IMDb prefixes
WORDS = sorted({w for s in NEUTRAL for w in s.split()}
               | set(NOUNS) | set(LEXICON)
               | set("the was is i found thought but and . not very".split()))


def _adjp(rng: random.Random, polarity: int) -> str:
    u = rng.random()
    if u < 0.2:  # "not" + an adjective of the other polarity
        return f"{NEGATOR} " + rng.choice(list(NEGATIVE if polarity > 0 else POSITIVE))
    adj = rng.choice(list(POSITIVE if polarity > 0 else NEGATIVE))
    return f"{INTENSIFIER} {adj}" if u < 0.45 else adj


def _sentence(rng: random.Random, polarity: int) -> str:
    noun, adjp = rng.choice(NOUNS), _adjp(rng, polarity)
    form = rng.randrange(3)
    if form == 0:
        return f"the {noun} {rng.choice(('was', 'is'))} {adjp} ."
    if form == 1:
        return f"i found the {noun} {adjp} ."
    return f"i thought the {noun} was {adjp} ."


def sample_review(rng: random.Random) -> str:
    """One review of the language (words separated by single spaces, no EOS)."""
    attitude = rng.choice((1, -1))
    parts = []
    for k in range(rng.randint(2, 4)):
        if rng.random() < NEUTRAL_P:
            parts.append(rng.choice(NEUTRAL))
            continue
        agree = k == 0 or rng.random() < AGREE
        text = _sentence(rng, attitude if agree else -attitude)
        if k > 0 and (not agree or rng.random() < 0.3):
            text = ("and " if agree else "but ") + text
        parts.append(text)
    return " ".join(parts)


def sample_reviews(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [sample_review(rng) for _ in range(n)]


def sample_prompts(n: int, seed: int) -> list[str]:
    """Prompts: the first 2-8 words (uniform) of fresh reviews, cut before the review's end."""
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < n:
        words = sample_review(rng).split()
        k = rng.randint(*PROMPT_TOKENS)
        if k < len(words):
            prompts.append(" ".join(words[:k]))
    return prompts


def score(prompt_words: Sequence[str], completion_words: Sequence[str]) -> float:
    """The sentiment score of the completion (module docstring); words are whitespace tokens."""
    words = list(prompt_words) + list(completion_words)
    total = 0.0
    for i in range(len(prompt_words), len(words)):
        value = LEXICON.get(words[i])
        if value is None:
            continue
        before = words[i - 1] if i > 0 else None
        if before == NEGATOR:
            value = -value
        elif before == INTENSIFIER:
            value = 2 * value
        total += value
    return float(total)


def reward(prompt: str | Sequence[str], completion: str | Sequence[str]) -> float:
    """sigmoid(score): the ground-truth reward of `completion` after `prompt` (strings are split on
    whitespace; special tokens such as EOS are not in the lexicon and count as plain words)."""
    p = prompt.split() if isinstance(prompt, str) else prompt
    c = completion.split() if isinstance(completion, str) else completion
    return 1.0 / (1.0 + math.exp(-score(p, c)))


def label_pairs(prompt: str, completions: Sequence[str], rewards: Sequence[float]) -> tuple[list[dict], int]:
    """All pairs of `completions` of one prompt, the higher-reward one chosen, as the paper labelled
    its sampled completions with the classifier. Pairs of equal reward carry no preference and are
    dropped; returns (rows {prompt, chosen, rejected, reward_chosen, reward_rejected}, ties dropped)."""
    if len(completions) != len(rewards):
        raise ValueError(f"rewards: expected one per completion ({len(completions)}), got {len(rewards)}")
    rows, ties = [], 0
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            if rewards[i] == rewards[j]:
                ties += 1
                continue
            w, l = (i, j) if rewards[i] > rewards[j] else (j, i)
            rows.append({"prompt": prompt, "chosen": completions[w], "rejected": completions[l],
                         "reward_chosen": rewards[w], "reward_rejected": rewards[l]})
    return rows, ties


def build_task_tokenizer():
    """The word-level tokenizer of the language (dpo_fast_tools.tiny): every word of WORDS is one token."""
    from ..tiny import build_tokenizer

    return build_tokenizer([" ".join(WORDS)], kind="word", vocab_size=len(WORDS) + 64)
