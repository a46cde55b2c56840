"""Generate the demo's embedded preference data set (dpo_fast_tools/data_files/parity_*.jsonl).

The task: say whether a number is even or odd. The preferred answer is the right parity, the
rejected one the wrong parity, so a model can only earn reward by reading the number's last
digit; completions alone carry no signal (each answer is preferred in about half the pairs).
Digits are written apart ("4 8 1 7") so a word-level tokenizer gives one token per digit.
Train and eval numbers never overlap, so the eval split measures whether the rule was
learned, not memorised. Deterministic: a fixed seed, rerun to get byte-identical files.

    python scripts/make_demo_data.py [--out dpo_fast_tools/data_files] [--train 640] [--eval 160]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# The number always ends the question, so its last digit sits at a fixed distance from the
# answer whatever the wording: a tiny model learns the rule in a few hundred steps.
TEMPLATES = (
    "Is this number even or odd: {n} ?\nAnswer:",
    "Even or odd: {n} ?\nAnswer:",
    "Tell me the parity of {n} ?\nAnswer:",
    "Q: is it even or odd, {n} ?\nAnswer:",
)


def make_pairs(numbers, rng: random.Random) -> list[dict]:
    rows = []
    for n in numbers:
        right, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
        prompt = rng.choice(TEMPLATES).format(n=" ".join(str(n)))
        rows.append({"prompt": prompt, "chosen": f" {right}", "rejected": f" {wrong}"})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "dpo_fast" / "data_files"))
    ap.add_argument("--train", type=int, default=640, help="training pairs")
    ap.add_argument("--eval", type=int, default=160, help="held-out pairs")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    numbers = rng.sample(range(10, 100_000), args.train + args.eval)  # distinct: no overlap
    splits = {"train": numbers[: args.train], "eval": numbers[args.train:]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, nums in splits.items():
        rows = make_pairs(nums, rng)
        path = out / f"parity_{name}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=True) + "\n")
        even = sum(r["chosen"] == " even" for r in rows)
        print(f"{path}: {len(rows)} pairs ({even} even, {len(rows) - even} odd)")


if __name__ == "__main__":
    main()
