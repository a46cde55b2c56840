"""Peak memory of `precompute-ref` with the full logits (how it computed before) and through the fused
hidden-state op (now), on a tiny Llama whose vocabulary is Llama 3's (128256), at two batch sizes.

    python benchmarks/precompute_memory.py [--pairs 128] [--batches 4,64] [--output-dir DIR]

Each case runs `dpo_fast.precompute_reference` in a fresh process (dpo_fast_tools.bench.meters:
peak RSS growth over the whole command: loading the model, tokenizing, computing, writing). The
"logits" case swaps the runner's per-sequence log-probs for the old computation: the model's full
logits (lm_head over every position), then the fused from-logits op. Both caches are compared
(to 1e-5) before anything is reported. Writes results.csv, results.md under
benchmarks/results/cpu/precompute_memory/ and the table into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

VOCAB = 128256


def _logits_sequence_logps(head, batch, *, compute_dtype=None, backend="auto"):
    """The old way: full logits of every position (lm_head over all hidden states), then log-probs."""
    import dpo_fast
    from dpo_fast import hf

    device = head.weight.device
    logits = head.head(hf.final_hidden(head.decoder, batch, device))  # (rows, T, V): what the runner avoids
    if head.softcap is not None:
        logits = head.softcap * (logits / head.softcap).tanh()
    return dpo_fast.sequence_logprobs(logits, batch["labels"].to(device), backend=backend,
                                      **hf.packed_arguments(batch, device)).float()


def case(model_dir: str, data: str, split: str, batch_size: int, way: str, out_dir: str):
    """In the fresh process: imports (not measured), then the step = the whole precompute-ref."""
    import torch

    from dpo_fast import hf
    from dpo_fast.refcache import precompute_reference

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if way == "logits":
        hf.sequence_logps = _logits_sequence_logps

    def step():
        t = time.perf_counter()
        precompute_reference(model_dir, data, out_dir, split=split, batch_size=batch_size, progress=False)
        return time.perf_counter() - t
    return step


def build_model(path: Path) -> None:
    from dpo_fast_tools.demo import build_demo_model

    build_demo_model(path, vocab_size=VOCAB, seed=0, hidden_size=64, layers=2, heads=4)


def compare(a: Path, b: Path) -> float:
    from dpo_fast.refcache import ReferenceCache

    x = ReferenceCache.open(a).to_pandas().set_index("example_id").sort_index()
    y = ReferenceCache.open(b).to_pandas().set_index("example_id").sort_index()
    assert list(x.index) == list(y.index), "the two caches hold different examples"
    return float(max((x[c] - y[c]).abs().max() for c in ("ref_chosen_logps", "ref_rejected_logps")))


def markdown(rows: list[dict], env: str) -> str:
    lines = [f"Measured on {env}. Peak RSS growth of the whole `precompute-ref` run in a fresh process; "
             f"tiny Llama (hidden 64, 2 layers) with a {VOCAB}-entry vocabulary, float32.", "",
             "| batch (pairs) | rows x tokens | logits path (before) | fused path (now) | time before / now | max diff |",
             "|---|---|---|---|---|---|"]
    for b in sorted({r["batch_pairs"] for r in rows}):
        lo = next(r for r in rows if r["batch_pairs"] == b and r["way"] == "logits")
        fu = next(r for r in rows if r["batch_pairs"] == b and r["way"] == "fused")
        lines.append(f"| {b} | {2 * b} x {lo['max_tokens']} | {lo['peak_mb']:.0f} MB | {fu['peak_mb']:.0f} MB | "
                     f"{lo['seconds']:.1f} s / {fu['seconds']:.1f} s | {fu['max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def update_readme(table: str) -> None:
    from dpo_fast_tools.bench import replace_readme_section

    replace_readme_section(HERE / "README.md", "<!-- bench:precompute-memory -->",
                           "<!-- /bench:precompute-memory -->", table, heading="precompute-ref peak memory")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=128, help="preference pairs precomputed per case")
    ap.add_argument("--batches", default="4,64", help="batch sizes in pairs")
    ap.add_argument("--output-dir", default=str(HERE / "results" / "cpu" / "precompute_memory"))
    a = ap.parse_args()
    from dpo_fast_tools.bench.meters import measure_in_fresh_process
    from dpo_fast_tools.bench.run import environment
    from dpo_fast_tools.demo import TRAIN_FILE

    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_model(model)
        split = f"train[:{a.pairs}]"
        for batch in (int(x) for x in a.batches.split(",")):
            caches = {}
            for way in ("logits", "fused"):
                caches[way] = Path(tmp) / f"cache-{way}-{batch}"
                peak = measure_in_fresh_process(f"{__file__}:case", str(model), str(TRAIN_FILE), split, batch, way,
                                                str(caches[way]), env={"OMP_NUM_THREADS": "2"}, timeout=3600)
                rows.append({"way": way, "batch_pairs": batch, "pairs": a.pairs, "vocab": VOCAB,
                             "peak_mb": peak.peak_bytes / 1e6, "seconds": peak.result, "method": peak.method})
                print(f"{way:7s} batch {batch:3d}: {peak.peak_bytes / 1e6:8.0f} MB  {peak.result:6.1f} s", flush=True)
            diff = compare(caches["logits"], caches["fused"])
            if diff > 1e-5:
                raise SystemExit(f"the caches disagree: max |difference| {diff:.3g} > 1e-5")
            for r in rows[-2:]:
                r["max_abs_diff"] = diff
        from dpo_fast.data import load_and_tokenize
        from dpo_fast.hf import load_tokenizer

        tok = load_tokenizer(model)
        ds, _, _ = load_and_tokenize(str(TRAIN_FILE), tok, split=split)
        longest = max(len(r["prompt_input_ids"]) + max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"]))
                      for r in ds)
        for r in rows:
            r["max_tokens"] = longest
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cpu = env["device_name"]
    table = markdown(rows, f"{cpu}, torch {env.get('torch')}, {time.strftime('%Y-%m-%d')}")
    (out / "results.md").write_text("# precompute-ref peak memory\n\n" + table)
    update_readme(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
