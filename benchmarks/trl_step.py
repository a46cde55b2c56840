"""Whole DPO training steps, side by side: trl.DPOTrainer as it ships, trl.DPOTrainer with the
dpo_fast integration, and `dpo-fast train`, on the same tiny model with a large vocabulary, the
same pairs and the same batch.

    python benchmarks/trl_step.py                  # the README case (fp32; about 15 minutes on 2 cores)
    python benchmarks/trl_step.py --dtype bf16     # the same under bf16 autocast
    python benchmarks/trl_step.py --vocab 8192 --pairs 2 --prompt-len 64 --completion-len 192 \
        --hidden 256 --steps 3 --threads 1 --out /tmp/trl_step        # a quick proof run

Cases (each in a fresh Python process, so memory peaks are its own):
  trl           trl.DPOTrainer (its fused LM head, TRL's ChunkedLogProbFunction)
  trl+dpo_fast  dpo_fast.integrations.trl.DPOTrainer (dpo_fast.loss(hidden=, weight=))
  dpo-fast      dpo_fast's own trainer (dpo-fast train)
Reference modes: "model" (a second model computes reference log-probs every step) and
"precomputed" (TRL's precompute_ref_log_probs=True / dpo-fast's reference cache, computed from the
initial policy before training; then one model is in memory).

Per case: peak RSS growth over the steps (the high-water mark reset with /proc/self/clear_refs
after setup: models, data, precompute and optimizer exist) and the median step time (forward,
backward and optimizer step; the first step is a warm-up and not timed). Every pair has the same
prompt and completion lengths, and the data holds exactly one batch of pairs, so every step of
every case runs the same shapes, and the first step the same pairs: its loss and mean log-probs
are checked to agree across the three cases before any result is written.
Writes results.csv, results.md and trl_step.png to benchmarks/results/cpu/trl_step/ (bf16:
trl_step_bf16/; or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from dpo_fast_tools.bench.meters import CpuMeter, status_bytes  # noqa: E402

CASES = ("trl", "trl+dpo_fast", "dpo-fast")
MODES = ("model", "precomputed")
WORDS = ("the quick brown fox jumps over lazy dog a helpful answer is short correct and polite what capital of "
         "france paris two plus four five water boils cats dogs rose flower").split()


# ----------------------------------------------------------------------------------------------
# Setup (parent process): models, tokenizer and data in a work directory


def prepare(work: Path, a) -> None:
    import random

    from dpo_fast_tools import tiny

    tok = tiny.build_tokenizer([" ".join(WORDS)])
    for name, seed in (("policy", 0), ("ref", 1)):
        model = tiny.build_tiny_model(a.vocab, hidden_size=a.hidden, layers=a.layers, heads=max(1, a.hidden // 64),
                                      tokenizer=tok, seed=seed, initializer_range=0.05)
        tiny.save_tiny(model, tok, work / name)
    rng = random.Random(0)

    def text(n):  # one token per word (word-level tokenizer)
        return " ".join(rng.choices(WORDS, k=n))

    # TRL joins prompt + completion as strings: completions start with a space.
    rows = [{"prompt": text(a.prompt_len - 1), "chosen": " " + text(a.completion_len - 1),
             "rejected": " " + text(a.completion_len - 1)} for _ in range(a.pairs)]
    with open(work / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# ----------------------------------------------------------------------------------------------
# One case (worker process)


class Meter(CpuMeter):
    """dpo_fast_tools.bench's CPU meter, in a worker that loaded a model before the steps: start() first
    releases the heap's free memory (trim=True), so that buffers a precompute or a model load left
    cached do not hide the steps' own peak from the growth."""

    def __init__(self):
        super().__init__(trim=True)

    def peak(self) -> tuple[int, int]:
        """(peak RSS, peak growth over the RSS at start()) in bytes."""
        peak = status_bytes("VmHWM")
        return peak, max(0, peak - self.base)


def in_memory(*modules):
    """Copy the modules' tensors out of the checkpoint file's memory map into memory of their own.
    Loaders leave some weights mapped from the file, resident only where touched: the first
    optimizer update would then copy them in during the steps and count as growth. Done in every
    case before the baseline. Returns the first module."""
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            t.data = t.data.clone()
    return modules[0]


def trl_trainer_class(case: str):
    """trl.DPOTrainer, or the dpo_fast drop-in for the case "trl+dpo_fast"."""
    import trl

    if case == "trl+dpo_fast":
        from dpo_fast.integrations.trl import DPOTrainer
        return DPOTrainer
    return trl.DPOTrainer


def timing_callback(meter, steps: int, rec: dict):
    """A TrainerCallback filling `rec`: each step's time, the logged losses, the meter's peak after
    `steps` steps, and the first step's phases when the meter measures phases (step_begin/step_end)."""
    from transformers import TrainerCallback

    phased = hasattr(meter, "step_begin")

    class Timing(TrainerCallback):
        def on_train_begin(self, *args, **kw):
            meter.start()

        def on_step_begin(self, *args, **kw):
            if phased:
                meter.step_begin()
            rec["t0"] = time.perf_counter()

        def on_step_end(self, *args, **kw):
            rec.setdefault("times", []).append(time.perf_counter() - rec["t0"])
            if phased:
                rec.setdefault("phases", meter.step_end())
            if len(rec["times"]) == steps:
                rec["peak"] = meter.peak()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                rec.setdefault("logs", []).append(logs)

    return Timing()


def step_result(rec: dict) -> dict:
    """Step times, peak memory and the first step's loss and log-probs of a timed run (TRL or dpo-fast)."""
    first = rec["logs"][0]
    return {"times": rec["times"], "peak_rss": rec["peak"][0], "peak": rec["peak"][1], "loss": first["loss"],
            "logps_chosen": first["logps/chosen"], "logps_rejected": first["logps/rejected"]}


def run_trl(case: str, mode: str, work: Path, a, meter: Meter) -> dict:
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rec = {}
    rows = [json.loads(line) for line in open(work / "pairs.jsonl")]
    config = trl.DPOConfig(
        output_dir=str(work / f"out-{case}-{mode}"), per_device_train_batch_size=a.pairs, max_steps=a.steps,
        optim="sgd", learning_rate=1e-6, bf16=a.dtype == "bf16", gradient_checkpointing=False, use_cpu=True,
        max_length=a.prompt_len + a.completion_len + 4, precompute_ref_log_probs=mode == "precomputed",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, beta=0.1)
    tok = AutoTokenizer.from_pretrained(work / "policy")
    model = in_memory(AutoModelForCausalLM.from_pretrained(work / "policy", dtype="float32"))
    ref = in_memory(AutoModelForCausalLM.from_pretrained(work / "ref", dtype="float32")) if mode == "model" else None
    trainer = trl_trainer_class(case)(model, ref_model=ref, args=config, train_dataset=datasets.Dataset.from_list(rows),
                                      processing_class=tok, callbacks=[timing_callback(meter, a.steps, rec)])
    trainer.train()
    return step_result(rec)


def run_dpo_fast(mode: str, work: Path, a, meter: Meter) -> dict:
    from dpo_fast.trainer import make_config
    from dpo_fast.trainer.loop import Trainer

    rec = {"times": [], "logs": []}

    class Timed(Trainer):
        def step(self, step):
            if step == self.start_step:
                refs = self.refs_train.head
                in_memory(self.model, *([] if refs is None else [refs.decoder, refs.head]))
                meter.start()
            t0 = time.perf_counter()
            super().step(step)
            rec["times"].append(time.perf_counter() - t0)
            rec["logs"].append(self.last_logged)
            if len(rec["times"]) == a.steps:
                rec["peak"] = meter.peak()

        def save(self, done):  # no checkpoints in a benchmark
            pass

        def finish(self):
            return {}

    extra = {"ref_model": str(work / "ref")} if mode == "model" else {}
    cfg = make_config(str(work / "policy"), str(work / "pairs.jsonl"), str(work / f"out-dpo-fast-{mode}"),
                      batch_size=a.pairs, max_steps=a.steps, optimizer="sgd", learning_rate=1e-6, warmup_steps=0,
                      max_length=a.prompt_len + a.completion_len + 4, dtype=a.dtype, logging_steps=1, save_steps=0,
                      progress=False, tensorboard=False, seed=0, beta=0.1, overwrite_output_dir=True, **extra)
    cfg.check()
    Timed(cfg).run()
    return step_result(rec)


def worker(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    meter, work = Meter(), Path(a.work)
    if a.worker == "dpo-fast":
        result = run_dpo_fast(a.mode, work, a, meter)
    else:
        result = run_trl(a.worker, a.mode, work, a, meter)
    Path(a.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# Driver and report


def run_case(case: str, mode: str, work: Path, a) -> dict:
    result = work / f"result-{case}-{mode}.json"
    cmd = [sys.executable, __file__, "--worker", case, "--mode", mode, "--work", str(work), "--result", str(result),
           *sum(([f"--{k.replace('_', '-')}", str(getattr(a, k))] for k in SHAPE_ARGS), [])]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} ({mode}) failed:\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    timed = out["times"][1:] or out["times"]
    print(f"  {case:13s} {mode:11s} peak +{out['peak'] / 2**20:8.1f} MB (RSS {out['peak_rss'] / 2**20:7.0f} MB)  "
          f"step {statistics.median(timed):7.3f} s  loss {out['loss']:.6f}  ({time.time() - t0:.0f} s wall)", flush=True)
    return dict(case=case, reference=mode, peak_mb=out["peak"] / 2**20, peak_rss_mb=out["peak_rss"] / 2**20,
                step_s=statistics.median(timed),
                step_min_s=min(timed), first_loss=out["loss"], logps_chosen=out["logps_chosen"],
                logps_rejected=out["logps_rejected"], timed_steps=len(timed))


def agreed_keys(mode: str, dtype: str) -> tuple[str, ...]:
    """What the cases must agree on at the first step. bf16 with precomputed references: dpo-fast's
    cache holds float32 reference log-probs, TRL precomputes under bf16 autocast, so the losses
    differ by design (dpo-fast's is not ln 2); the policy's log-probs are compared."""
    logps = ("logps_chosen", "logps_rejected")
    return logps if (dtype == "bf16" and mode == "precomputed") else ("first_loss",) + logps


def check_agreement(rows: list[dict], dtype: str, rtol: float = 1e-4) -> None:
    """The first-step loss and mean log-probs of the cases of a reference mode agree."""
    for mode in {r["reference"] for r in rows}:
        group = [r for r in rows if r["reference"] == mode]
        for key in agreed_keys(mode, dtype):
            values = [r[key] for r in group]
            spread = max(values) - min(values)
            if spread > rtol * max(1.0, max(abs(v) for v in values)):
                raise SystemExit(f"reference={mode}: {key} disagrees across cases: "
                                 + ", ".join(f"{r['case']} {r[key]!r}" for r in group))


def machine(a) -> dict:
    import torch
    import transformers
    import trl

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def write_report(rows: list[dict], info: dict, a, out: Path) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    shape = {k: getattr(a, k) for k in SHAPE_ARGS}
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(shape) + list(info))
        w.writeheader()
        w.writerows(dict(r, **shape, **info) for r in rows)
    tokens = 2 * a.pairs * (a.prompt_len + a.completion_len)
    lines = [f"Whole DPO training steps: {a.pairs} pairs x ({a.prompt_len} prompt + {a.completion_len} completion "
             f"tokens) = {tokens} tokens per step; Llama, {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}, "
             f"{a.dtype}, SGD; {info['cpu']}, {a.threads} thread(s) of {info['cores']} cores (1-min load "
             f"average {info['load_avg_1m']:.1f} at start); torch {info['torch']}, transformers "
             f"{info['transformers']}, trl {info['trl']}; {info['date']}. Median of {rows[0]['timed_steps']} steps "
             "after a warm-up step; peak RSS growth over the steps (over the RSS after setup, free heap trimmed) and "
             "the process's peak RSS during them (models included). First-step losses and policy log-probs agree "
             "across the cases" + (" (bf16, precomputed: log-probs only; dpo-fast's cache is float32)"
                                   if a.dtype == "bf16" else "") + ".", "",
             "| reference | case | step time (s) | vs trl | peak RSS growth (MB) | vs trl | peak RSS (MB) | "
             "first-step loss |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next((b for b in rows if b["reference"] == r["reference"] and b["case"] == "trl"), None)
        ratio = (lambda k: f"{r[k] / max(base[k], 1e-9):.2f}x") if base else (lambda k: "-")
        lines.append(f"| {r['reference']} | {r['case']} | {r['step_s']:.3f} | {ratio('step_s')} | {r['peak_mb']:.0f} | "
                     f"{ratio('peak_mb')} | {r['peak_rss_mb']:.0f} | {r['first_loss']:.6f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "trl_step.png", f"DPO training step: {tokens} tokens, vocab {a.vocab}, hidden {a.hidden}, {a.dtype}, "
                                      f"{a.threads} thread(s), {info['cpu']} ({info['date']})")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["reference"] == m for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(CASES)
    for k, case in enumerate(CASES):
        for ax, key in zip(axes, ("step_s", "peak_mb")):
            values = [next((r[key] for r in rows if r["case"] == case and r["reference"] == m), 0) for m in modes]
            ax.bar([i + k * width for i in range(len(modes))], values, width, label=case)
    for ax, label in zip(axes, ("median step time (s)", "peak RSS growth (MB)")):
        ax.set_xticks([i + width for i in range(len(modes))], [f"reference: {m}" for m in modes])
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SHAPE_ARGS = ("pairs", "prompt_len", "completion_len", "hidden", "layers", "vocab", "steps", "threads", "dtype")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4, help="pairs per step (the batch)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--completion-len", type=int, default=384)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--steps", type=int, default=4, help="steps per case; the first is a warm-up")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--references", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
    ap.add_argument("--out", help="default: benchmarks/results/cpu/trl_step (bf16: trl_step_bf16)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    ap.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    if a.steps < 2:
        ap.error("--steps must be at least 2 (the first is a warm-up)")
    cases = [c for c in a.cases.split(",") if c]
    modes = [m for m in a.references.split(",") if m]
    for name, got, allowed in (("--cases", cases, CASES), ("--references", modes, MODES)):
        if not got or set(got) - set(allowed):
            ap.error(f"{name}: expected some of {allowed}, got {got}")
    a.out = a.out or str(HERE / "results" / "cpu" / ("trl_step_bf16" if a.dtype == "bf16" else "trl_step"))
    info = machine(a)
    with tempfile.TemporaryDirectory(prefix="trl_step-") as tmp:
        work = Path(tmp)
        prepare(work, a)
        print(f"trl_step: {a.pairs} pairs x {a.prompt_len}+{a.completion_len} tokens, H={a.hidden}, V={a.vocab}, "
              f"{a.dtype}, {a.threads} thread(s); load average {info['load_avg_1m']:.1f}", flush=True)
        rows = [run_case(case, mode, work, a) for mode in modes for case in cases]
    check_agreement(rows, a.dtype)
    write_report(rows, info, a, Path(a.out))
    print((Path(a.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
