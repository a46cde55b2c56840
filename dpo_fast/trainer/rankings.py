"""Ranked data in training: prompts with K responses best first, trained with the Plackett-Luce
loss (dpo_fast.ranking_loss). A batch is K x P rows (row k*P + p), so every example of a data set
has the same K; a ranking with fewer than 2 responses or a tie cannot be trained and is refused,
naming its row."""

from __future__ import annotations

from collections import Counter

from .config import TrainConfig, TrainError


def _scan(tokenized) -> tuple[Counter, dict[int, list[int]], tuple[int, int, int] | None]:
    """(K -> count, K -> input rows, first (row, k, j) whose responses k and j are the same tokens)."""
    counts, rows, tie = Counter(), {}, None
    for batch in tokenized.select_columns(["row_index", "responses_input_ids"]).iter(batch_size=1000):
        for row, responses in zip(batch["row_index"], batch["responses_input_ids"]):
            K = len(responses)
            counts[K] += 1
            rows.setdefault(K, []).append(row)
            if tie is None:
                seen = {}
                for k, r in enumerate(responses):
                    j = seen.setdefault(tuple(r), k)
                    if j != k:
                        tie = (row, j, k)
                        break
    return counts, rows, tie


def responses_per_example(tokenized, what: str) -> int:
    """The K of a tokenized ranked data set, or a TrainError naming the rows that differ from the
    most common K, a row with fewer than 2 responses, or a row whose responses tie (the same tokens,
    e.g. after truncation)."""
    counts, rows, tie = _scan(tokenized)
    K, _ = counts.most_common(1)[0]
    if len(counts) > 1:
        odd = sorted(r for k, rs in rows.items() if k != K for r in rs)
        head = ", ".join(map(str, odd[:10])) + (", ..." if len(odd) > 10 else "")
        others = ", ".join(str(k) for k in sorted(counts) if k != K)
        raise TrainError(f"{what}: ranked examples must all have the same number of responses (a batch is K x P "
                         f"rows); most have {K}, {len(odd)} have {others}: rows {head}. Split the data by number "
                         "of responses")
    if K < 2:
        raise TrainError(f"{what}: row {rows[K][0]} has {K} response(s); a ranking needs at least 2")
    if tie is not None:
        row, j, k = tie
        raise TrainError(f"{what}: row {row}: responses[{j}] and responses[{k}] are the same tokens (after "
                         "truncation to --max-length / --max-completion-length): a tie, which a ranking cannot "
                         "order; make them distinct or drop one")
    return K


def check_settings(cfg: TrainConfig) -> None:
    """Settings that have no meaning for the Plackett-Luce loss are refused, not ignored."""
    if cfg.loss_type != "sigmoid" or cfg.loss_weights is not None:
        raise TrainError(f"--loss-type {cfg.loss_type}: ranked data trains with the Plackett-Luce loss (the "
                         "sigmoid loss generalised to K responses); leave --loss-type at sigmoid, or train on pairs")
    if cfg.label_smoothing:
        raise TrainError("--label-smoothing: the Plackett-Luce loss of ranked data has no label smoothing")
    if cfg.logits_memory_mb is not None:
        raise TrainError("--logits-memory-mb is not supported with ranked data yet; leave it unset")


def data_kind(train_fmt: str, eval_fmt: str | None) -> str:
    """"ranked" or "paired"; train and eval data must be of one kind (one cache, one loss)."""
    kind = "ranked" if train_fmt == "ranked" else "paired"
    if eval_fmt is not None and (eval_fmt == "ranked") != (kind == "ranked"):
        raise TrainError(f"--eval-data is {'ranked' if eval_fmt == 'ranked' else 'paired'} but --data is {kind}: "
                         "evaluate on the kind of data the run trains on")
    return kind
