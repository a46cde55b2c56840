"""Prefix sharing against the unshared layout: one DPO training step (the decoder forward, the fused
loss, backward) on pairs of a given prompt / response length, side by side in one run.

    python benchmarks/prefix_sharing.py [--mixes 512/128,128/512,32/32] [--pairs 4] [--repeats 5]
                                        [--device cpu|cuda] [--model DIR] [--output-dir DIR]

Without --model, a tiny Llama (default hidden 256, 6 layers, 4 heads, vocabulary 8000, float32,
sdpa; --hidden, --layers, --vocab) is built: its decoder has about twice the lm_head's parameters, as real models do (Llama 3 8B: 7.5B vs
0.5B; SmolLM2 360M: 0.3B vs 0.03B), so the step's cost is mostly the decoder, which is what sharing saves. Every pair of a mix has exactly the prompt and response lengths named (random tokens).
Per mix and layout (unshared: the padded 2P rows the trainer uses by default; shared: one row per
pair, `PreferenceCollator(prefix_sharing=True)`; shared+packed: all pairs in one row):
- peak memory of one step beyond what is allocated before it (model, gradient buffers, inputs):
  the activations and the step's temporaries; a fresh process per case (CPU: peak RSS growth;
  CUDA: max_memory_allocated growth);
- median step time over --repeats steps after one warm-up, in another fresh process;
- tokens/s: the pairs' tokens (2 x (prompt + response) each, the same count for every layout) per second;
- the loss and per-sequence log-probs of the first step, checked against the unshared layout before
  anything is reported (|difference| <= 1e-4 relative).
Writes results.csv and results.md under benchmarks/results/<device>/prefix_sharing/ (a --model DIR:
prefix_sharing_<its name>/) and the table into benchmarks/README.md (a --model its own section).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

LAYOUTS = {"unshared": {}, "shared": {"prefix_sharing": True}, "shared+packed": {"prefix_sharing": True,
                                                                                  "packing": True}}


def build_model(path: Path, hidden: int, layers: int, vocab: int) -> None:
    from dpo_fast_tools.demo import build_demo_model

    build_demo_model(path, vocab_size=vocab, seed=0, hidden_size=hidden, layers=layers, heads=max(1, hidden // 64))


def _setup(model_dir: str, prompt: int, response: int, pairs: int, layout: str, device: str):
    """The model on the device, its gradient buffers allocated, the batch collated: (model, step)."""
    import torch

    import dpo_fast
    from dpo_fast import hf
    from dpo_fast.data import PreferenceCollator
    from dpo_fast.prefix_sharing import check_prefix_sharing

    torch.manual_seed(0)
    model = hf.load_causal_lm(model_dir, device=device)
    hf.disable_dropout(model)
    model.train()
    if LAYOUTS[layout]:
        check_prefix_sharing(model)
    vocab = hf.lm_head_parts(model).vocab_size
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, vocab, (n,), generator=g).tolist()
    features = [{"example_id": str(i), "prompt_input_ids": ids(prompt), "chosen_input_ids": ids(response),
                 "rejected_input_ids": ids(response)} for i in range(pairs)]
    batch = PreferenceCollator(0, **LAYOUTS[layout])(features)
    refs = (-torch.rand(pairs, generator=g) * response, -torch.rand(pairs, generator=g) * response)
    refs = tuple(r.to(device) for r in refs)
    head = hf.lm_head_parts(model)

    def step():
        model.zero_grad(set_to_none=False)  # gradient buffers stay: the step's peak is its activations
        out = dpo_fast.loss(**hf.fused_inputs(head, batch), ref_chosen_logps=refs[0], ref_rejected_logps=refs[1])
        out.loss.backward()
        return out
    step()  # warm-up: allocates the gradient buffers, first-call costs
    return model, step


def memory_case(model_dir, prompt, response, pairs, layout, device):
    _, step = _setup(model_dir, prompt, response, pairs, layout, device)

    def measured():
        out = step()
        logps = [float(x) for x in out.chosen_logps.tolist() + out.rejected_logps.tolist()]
        return {"loss": float(out.loss.detach()), "logps": logps}
    return measured


def time_mix(model_dir, prompt, response, pairs, device, repeats):
    """Every layout in one process, their steps interleaved (round after round), so that load from other
    jobs on a shared machine falls on all of them alike: {layout: [seconds per step]}."""
    import torch

    steps = {layout: _setup(model_dir, prompt, response, pairs, layout, device)[1] for layout in LAYOUTS}

    def measured():
        times = {layout: [] for layout in steps}
        for _ in range(repeats):
            for layout, step in steps.items():
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                step()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[layout].append(time.perf_counter() - t)
        return times
    return measured


def markdown(rows: list[dict], env: str, model: str, load: float) -> str:
    lines = [f"Measured on {env}; {model}; one DPO step (forward, fused loss, backward); step times of the "
             "layouts interleaved in one process (median and fastest); peak = memory beyond the model and its "
             "gradient buffers during a step (fresh process per case). 1-min load average at the start "
             f"{load:.1f} (other jobs on the machine add noise to the times, the fastest step the least; memory "
             "does not).", "",
             "| prompt / response | pairs | layout | step time (median) | vs unshared | fastest | vs unshared | "
             "peak memory | vs unshared | tokens/s | max diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt']} / {r['response']} | {r['pairs']} | {r['layout']} | {r['step_s'] * 1e3:.0f} ms | "
                     f"{r['time_ratio']:.2f}x | {r['min_step_s'] * 1e3:.0f} ms | {r['min_time_ratio']:.2f}x | "
                     f"{r['peak_mb']:.0f} MB | {r['memory_ratio']:.2f}x | {r['tokens_per_s']:.0f} | "
                     f"{r['loss_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def update_readme(table: str, name: str | None) -> None:
    """The tiny model's table under "Prefix sharing", a real model's (--model DIR) under its own."""
    from dpo_fast_tools.bench import replace_readme_section

    key = "prefix-sharing" + (f":{name}" if name else "")
    replace_readme_section(HERE / "README.md", f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->", table,
                           heading="Prefix sharing" + (f": {name}" if name else ""))


def run_mix(model_dir: str, prompt: int, response: int, a, threads: dict) -> list[dict]:
    from dpo_fast_tools.bench.meters import measure_in_fresh_process

    rows, first = [], {}
    times = measure_in_fresh_process(f"{__file__}:time_mix", model_dir, prompt, response, a.pairs, a.device,
                                     a.repeats, device=a.device, env=threads, timeout=3600).result
    for layout in LAYOUTS:
        peak = measure_in_fresh_process(f"{__file__}:memory_case", model_dir, prompt, response, a.pairs, layout,
                                        a.device, device=a.device, env=threads, timeout=1800)
        first[layout] = peak.result
        step, fastest = statistics.median(times[layout]), min(times[layout])
        rows.append({"prompt": prompt, "response": response, "pairs": a.pairs, "layout": layout, "step_s": step,
                     "min_step_s": fastest, "peak_mb": peak.peak_bytes / 1e6,
                     "tokens_per_s": 2 * a.pairs * (prompt + response) / step, "memory_method": peak.method})
        print(f"{prompt:4d}/{response:<4d} {layout:14s} median {step * 1e3:8.1f} ms  min {fastest * 1e3:8.1f} ms  "
              f"{peak.peak_bytes / 1e6:8.1f} MB", flush=True)
    base = rows[0]
    for r in rows:
        got, want = first[r["layout"]], first["unshared"]
        diff = max(abs(x - y) for x, y in zip(got["logps"] + [got["loss"]], want["logps"] + [want["loss"]]))
        scale = max(1.0, max(abs(y) for y in want["logps"]))
        if diff > 1e-4 * scale:
            raise SystemExit(f"{prompt}/{response} {r['layout']}: log-probs differ from unshared by {diff:.3g}")
        r.update(loss_diff=diff, time_ratio=r["step_s"] / base["step_s"],
                 min_time_ratio=r["min_step_s"] / base["min_step_s"], memory_ratio=r["peak_mb"] / base["peak_mb"])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixes", default="512/128,128/512,32/32", help="prompt/response lengths, comma-separated")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per step")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per case (after one warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (OMP_NUM_THREADS) of each case")
    ap.add_argument("--model", default=None, help="a causal LM directory (default: a tiny Llama built here)")
    ap.add_argument("--hidden", type=int, default=256, help="the tiny Llama's hidden size (heads of 64)")
    ap.add_argument("--layers", type=int, default=6, help="the tiny Llama's layers")
    ap.add_argument("--vocab", type=int, default=8000, help="the tiny Llama's vocabulary")
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--no-readme", action="store_true", help="do not paste the table into benchmarks/README.md")
    a = ap.parse_args()
    from dpo_fast_tools.bench.run import environment

    kind = "cuda" if a.device.startswith("cuda") else "cpu"
    name = Path(a.model).resolve().name if a.model else None
    out = Path(a.output_dir or HERE / "results" / kind / ("prefix_sharing" + (f"_{name}" if name else "")))
    load = os.getloadavg()[0]
    out.mkdir(parents=True, exist_ok=True)
    env = environment(kind)
    threads = {"OMP_NUM_THREADS": str(a.threads)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model
        if model_dir is None:
            model_dir = str(Path(tmp) / "model")
            build_model(Path(model_dir), a.hidden, a.layers, a.vocab)
        for mix in a.mixes.split(","):
            prompt, response = (int(x) for x in mix.split("/"))
            rows += run_mix(model_dir, prompt, response, a, threads)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    model = (f"the model {name} (--model)" if a.model else
             f"tiny Llama (hidden {a.hidden}, {a.layers} layers, {max(1, a.hidden // 64)} heads, vocabulary {a.vocab}, "
             "float32, sdpa)")
    where = f"{env['device_name']}, torch {env.get('torch')}, {a.threads} threads, {time.strftime('%Y-%m-%d')}"
    table = markdown(rows, where, model, load)
    (out / "results.md").write_text("# Prefix sharing\n\n" + table)
    if not a.no_readme:
        update_readme(table, name)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
