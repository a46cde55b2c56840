"""`dpo-fast demo`: the whole pipeline on the embedded data set, with no downloads.

    dpo-fast demo [--output-dir ./dpo_fast_demo_out] [--quick] [--max-steps N]

1. A word-level tokenizer is trained on the embedded parity pairs (dpo_fast_tools/data_files) and a
   tiny Llama-style model is built from a config with a fixed seed; both are saved to
   OUTPUT_DIR/model_init. This random model is the starting policy and the reference.
2. precompute-ref: the reference log-probs of the train and held-out pairs go to
   OUTPUT_DIR/ref_cache (Parquet + manifest), computed from the saved files as a user would.
3. train: `dpo_fast.train` with the fused loss (hidden states + lm_head weight, no logits), the
   reference read from the cache, eval on the held-out pairs before and after.
4. Memory: the DPO loss forward + backward of one training batch, measured once with
   dpo_fast.loss on the hidden states and once the usual way (logits = hidden @ W.T, float32
   log_softmax, gather), each in a fresh subprocess (peak RSS growth on CPU,
   max_memory_allocated on CUDA).
5. A short report is printed and OUTPUT_DIR/summary.json written.

The task: "Is 4 8 1 7 even or odd?" The preferred answer is the right parity, so the policy only
gains reward by reading the last digit; held-out numbers never occur in training. The model's
vocabulary is padded to --vocab-size rows (default 8192; 32000 is Llama 2's size) beyond the few
dozen words the tokenizer uses, so the loss works on a vocabulary of realistic width.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data_files"
TRAIN_FILE = DATA_DIR / "parity_train.jsonl"
EVAL_FILE = DATA_DIR / "parity_eval.jsonl"

# Defaults of the full demo; --quick shortens it for the test suite. The learning rate is far
# above the paper's 1e-6: the policy here starts from random weights, not from an SFT model.
DEMO = dict(max_steps=80, batch_size=32, learning_rate=2e-3, warmup_steps=5, beta=0.1, optimizer="adamw",
            vocab_size=8192, hidden_size=64, layers=2, heads=4, logging_steps=10)
QUICK = dict(max_steps=25, vocab_size=1024)
MAX_LENGTH = 64  # tokens; the longest demo pair has about 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="./dpo_fast_demo_out", help="where everything is written "
                        "(model_init/, ref_cache/, train/, summary.json); its demo subfolders are replaced")
    parser.add_argument("--quick", action="store_true", help=f"a short run for tests: {QUICK['max_steps']} steps, "
                        f"vocabulary {QUICK['vocab_size']}")
    parser.add_argument("--max-steps", type=int, default=None, help=f"optimizer steps (unset: {DEMO['max_steps']}, {QUICK['max_steps']} with --quick)")
    parser.add_argument("--batch-size", type=int, default=DEMO["batch_size"], help="pairs per step")
    parser.add_argument("--learning-rate", type=float, default=DEMO["learning_rate"], help="AdamW peak learning rate")
    parser.add_argument("--beta", type=float, default=DEMO["beta"], help="DPO beta")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"rows of the model's embedding and lm_head (unset: {DEMO['vocab_size']}, "
                        f"{QUICK['vocab_size']} with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and data order seed")
    parser.add_argument("--skip-memory", action="store_true", help="skip the loss memory comparison")
    parser.add_argument("--device", default=None, help="unset: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default); "
                        "the demo's tiny matrices run fastest on one, and other processes keep their cores")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bars (shown: %(default)s)")


def run_cli(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    summary = run_demo(output_dir=args.output_dir, quick=args.quick, max_steps=args.max_steps,
                       batch_size=args.batch_size, learning_rate=args.learning_rate, beta=args.beta,
                       vocab_size=args.vocab_size, seed=args.seed, measure_memory=not args.skip_memory,
                       device=args.device, progress=args.progress, threads=args.threads)
    print(format_report(summary))
    return 0


def _texts() -> list[str]:
    texts = []
    for path in (TRAIN_FILE, EVAL_FILE):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts.append(" ".join((row["prompt"], row["chosen"], row["rejected"])))
    return texts


def build_demo_model(path: Path, *, vocab_size: int, seed: int, hidden_size: int = 64, layers: int = 2,
                     heads: int = 4):
    """Tokenizer trained on the embedded pairs + a random tiny Llama, saved to `path`."""
    from .tiny import build_tiny_model, build_tokenizer, save_tiny

    tokenizer = build_tokenizer(_texts(), kind="word")
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    model = build_tiny_model(vocab_size, hidden_size=hidden_size, layers=layers, heads=heads, tokenizer=tokenizer,
                             seed=seed)
    save_tiny(model, tokenizer, path)
    return model, tokenizer


def run_demo(output_dir="./dpo_fast_demo_out", *, quick: bool = False, max_steps: int | None = None,
             batch_size: int = DEMO["batch_size"], learning_rate: float = DEMO["learning_rate"],
             beta: float = DEMO["beta"], vocab_size: int | None = None, seed: int = 0, measure_memory: bool = True,
             device: str | None = None, progress: bool = True, threads: int | None = 1) -> dict:
    """Run the demo; returns the summary written to OUTPUT_DIR/summary.json. `threads` sets
    torch's CPU threads for the run (restored afterwards); None or 0 leaves them alone."""
    import torch

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    from dpo_fast.progress import quiet_hf_progress_bars

    try:
        with quiet_hf_progress_bars(True):  # the report stays readable; the training bar remains
            return _run_demo(output_dir, quick, max_steps, batch_size, learning_rate, beta, vocab_size, seed,
                             measure_memory, device, progress)
    finally:
        torch.set_num_threads(old_threads)


def _run_demo(output_dir, quick, max_steps, batch_size, learning_rate, beta, vocab_size, seed, measure_memory,
              device, progress) -> dict:
    import torch

    from dpo_fast.refcache import precompute_reference
    from dpo_fast.trainer import train

    t_start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("model_init", "ref_cache", "train"):
        shutil.rmtree(out / sub, ignore_errors=True)  # the demo always starts from scratch
    max_steps = max_steps or (QUICK["max_steps"] if quick else DEMO["max_steps"])
    vocab_size = vocab_size or (QUICK["vocab_size"] if quick else DEMO["vocab_size"])
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    timings = {}

    t = time.perf_counter()
    model, tokenizer = build_demo_model(out / "model_init", vocab_size=vocab_size, seed=seed,
                                        hidden_size=DEMO["hidden_size"], layers=DEMO["layers"], heads=DEMO["heads"])
    n_params = sum(p.numel() for p in model.parameters())
    del model
    timings["build_model_s"] = time.perf_counter() - t

    t = time.perf_counter()
    for data in (TRAIN_FILE, EVAL_FILE):  # one cache holds both splits
        precompute_reference(str(out / "model_init"), str(data), out / "ref_cache", batch_size=64, dtype="float32",
                             max_length=MAX_LENGTH, device=device, progress=progress)
    timings["precompute_ref_s"] = time.perf_counter() - t

    t = time.perf_counter()
    summary = train(
        str(out / "model_init"), str(TRAIN_FILE), out / "train", eval_data=str(EVAL_FILE),
        ref_cache=str(out / "ref_cache"), optimizer=DEMO["optimizer"], learning_rate=learning_rate,
        warmup_steps=DEMO["warmup_steps"], beta=beta, batch_size=batch_size, max_steps=max_steps,
        logging_steps=DEMO["logging_steps"], save_steps=0, seed=seed, dtype="fp32", device=device,
        progress=progress, max_length=MAX_LENGTH, tensorboard=False)
    timings["train_s"] = time.perf_counter() - t

    memory = None
    if measure_memory:
        t = time.perf_counter()
        memory = measure_loss_memory(out, batch_size=batch_size, beta=beta, device=device)
        timings["memory_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    with open(out / "train" / "metrics.jsonl") as f:
        first = next((json.loads(line) for line in f if '"phase"' not in line), None)
    result = {
        "eval_before": summary["eval_before"],
        "eval_after": summary["eval_after"],
        "train": dict(summary["train"], first_logged_loss=first["loss"] if first else None),
        "memory": memory,
        "timings": timings,
        "setup": {"task": "parity of a number (embedded data set)", "train_pairs": _count(TRAIN_FILE),
                  "eval_pairs": _count(EVAL_FILE), "vocab_size": vocab_size, "tokenizer_size": len(tokenizer),
                  "parameters": n_params, "hidden_size": DEMO["hidden_size"], "layers": DEMO["layers"],
                  "max_steps": max_steps, "batch_size": batch_size, "learning_rate": learning_rate, "beta": beta,
                  "optimizer": DEMO["optimizer"], "device": device, "torch_threads": torch.get_num_threads(),
                  "output_dir": str(out)},
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


# ----------------------------------------------------------------------------------------------
# Loss memory: fused vs the plain PyTorch way, on one batch of the trained model


def measure_loss_memory(out: Path, *, batch_size: int, beta: float, device: str) -> dict:
    """Peak extra memory of the DPO loss forward + backward for one training batch, fused vs the
    reference way. Inputs (hidden states of the trained model, lm_head weight, labels, reference
    log-probs) are saved once; each way runs in its own fresh process."""
    import torch

    from dpo_fast import hf
    from dpo_fast.data import PreferenceCollator, load_and_tokenize
    from dpo_fast.refcache import ReferenceCache

    model = hf.load_causal_lm(out / "train", device=device).eval()
    tokenizer = hf.load_tokenizer(out / "train")
    ds, _, _ = load_and_tokenize(str(TRAIN_FILE), tokenizer, max_length=MAX_LENGTH)
    rows = ds.select(range(min(batch_size, len(ds)))).to_list()
    batch = PreferenceCollator(tokenizer.pad_token_id)(rows)
    ref = ReferenceCache.open(out / "ref_cache").lookup(batch["example_ids"], dtype=torch.float32)
    head = hf.lm_head_parts(model)
    with torch.no_grad():
        hidden = hf.final_hidden(head.decoder, batch, torch.device(device)).float().cpu()
    inputs = out / "memory_inputs.pt"
    torch.save({"hidden": hidden, "weight": head.weight.detach().float().cpu(), "labels": batch["labels"],
                "ref_chosen": ref["ref_chosen_logps"], "ref_rejected": ref["ref_rejected_logps"], "beta": beta},
               inputs)
    del model
    from .bench.meters import MeterUnavailable, measure_in_fresh_process

    try:
        results = {way: measure_in_fresh_process(_loss_step, str(inputs), way, device, device=device,
                                                 env={"OMP_NUM_THREADS": "1"}) for way in ("fused", "reference")}
    except MeterUnavailable as e:
        logger.warning("loss memory comparison skipped: %s", e)
        return None
    finally:
        inputs.unlink(missing_ok=True)
    rows_, T, H = hidden.shape
    V = head.weight.shape[0]
    return {
        "pairs": rows_ // 2, "tokens": int(batch["attention_mask"].sum()), "padded_shape": [rows_, T], "hidden": H,
        "vocab": V, "device": device,
        "method": results["fused"].method,
        "fused_bytes": results["fused"].peak_bytes, "reference_bytes": results["reference"].peak_bytes,
        "loss_agreement": abs(results["fused"].result - results["reference"].result),
        "logits_bytes_fp32": rows_ * T * V * 4,
    }


def _dpo_loss_reference(hidden, weight, labels, ref_c, ref_r, beta):
    """What DPO trainers usually do: full logits, float32 log_softmax, gather, sigmoid loss."""
    import torch.nn.functional as F

    from dpo_fast.kernels.reference import naive_sequence_logprobs

    logits = hidden @ weight.T
    logps = naive_sequence_logprobs(logits, labels)
    P = logps.shape[0] // 2
    margin = beta * ((logps[:P] - ref_c) - (logps[P:] - ref_r))
    return -F.logsigmoid(margin).mean()


def _loss_step(inputs: str, way: str, device: str):
    """In a fresh process (dpo_fast_tools.bench.meters): load the inputs, warm the way up on one pair
    (kernels and lazy state load outside the measurement), return the measured step: the loss
    forward + backward of the whole batch, its gradients kept alive as in training."""
    import torch

    import dpo_fast

    d = torch.load(inputs, weights_only=True)
    dev = torch.device(device)
    S = d["hidden"].shape[0]
    P = S // 2

    def run(rows):
        h = d["hidden"][rows].to(dev).requires_grad_(True)
        w = d["weight"].to(dev).requires_grad_(True)
        labels = d["labels"][rows].to(dev)
        rc, rr = d["ref_chosen"][rows[:len(rows) // 2]].to(dev), d["ref_rejected"][rows[:len(rows) // 2]].to(dev)
        if way == "fused":
            loss = dpo_fast.loss(hidden=h, weight=w, labels=labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                 beta=d["beta"]).loss
        else:
            loss = _dpo_loss_reference(h, w, labels, rc, rr, d["beta"])
        loss.backward()
        return float(loss.detach())

    run([0, P])
    return lambda: run(list(range(S)))


# ----------------------------------------------------------------------------------------------
# Report


def _mb(n) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_report(s: dict) -> str:
    setup, tr, eb, ea = s["setup"], s["train"], s["eval_before"], s["eval_after"]
    window = DEMO["logging_steps"]
    first = tr.get("first_logged_loss")
    lines = [
        f"dpo-fast demo: {setup['task']}; {setup['train_pairs']} train / {setup['eval_pairs']} held-out pairs",
        f"  model: random tiny Llama ({setup['layers']} layers, hidden {setup['hidden_size']}, vocabulary "
        f"{setup['vocab_size']}, {setup['parameters'] / 1e6:.1f}M parameters) = policy start and reference",
        f"  precompute-ref: {s['timings']['precompute_ref_s']:.1f} s -> {setup['output_dir']}/ref_cache",
        f"  train: {tr['global_step']} steps x {setup['batch_size']} pairs ({setup['optimizer']}, lr "
        f"{setup['learning_rate']:g}, beta {setup['beta']:g}) in {s['timings']['train_s']:.1f} s; loss "
        f"{first if first is not None else float('nan'):.4f} (first {window} steps) -> {tr['loss']:.4f} "
        f"(last {window})",
        "",
        "  held-out pairs                 before     after",
        f"  reward accuracy (strict)     {eb['rewards/accuracies']:8.3f}  {ea['rewards/accuracies']:8.3f}",
        f"  reward ties                  {eb['rewards/ties']:8.3f}  {ea['rewards/ties']:8.3f}",
        f"  reward margin                {eb['rewards/margins']:8.3f}  {ea['rewards/margins']:8.3f}",
        f"  policy prefers chosen        {eb['logps/accuracies']:8.3f}  {ea['logps/accuracies']:8.3f}",
        f"  loss                         {eb['loss']:8.4f}  {ea['loss']:8.4f}",
        "  (before training the policy is the reference: every reward is ~0, and pairs whose rewards are",
        "   not exactly tied differ by float rounding only; 'policy prefers chosen' is logp(chosen) >",
        "   logp(rejected))",
    ]
    m = s.get("memory")
    if m:
        ratio = m["reference_bytes"] / max(m["fused_bytes"], 1)
        lines += [
            "",
            f"  DPO loss forward + backward, one training batch ({m['pairs']} pairs, {m['padded_shape'][0]} rows x "
            f"{m['padded_shape'][1]} tokens, vocabulary {m['vocab']}),",
            f"  {m['method']}:",
            f"    dpo_fast.loss(hidden=, weight=)               {_mb(m['fused_bytes']):>12}",
            f"    plain PyTorch (logits, float32 log_softmax)   {_mb(m['reference_bytes']):>12}   {ratio:.1f}x more; "
            f"the logits alone: {_mb(m['logits_bytes_fp32'])}",
            f"    the two losses agree to {m['loss_agreement']:.1e}",
        ]
    lines += ["", f"  wrote {setup['output_dir']}/summary.json; pipeline time {s['timings']['total_s']:.1f} s "
              "(after imports)"]
    return "\n".join(lines)
