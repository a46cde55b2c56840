"""The reward-KL frontier of the DPO paper (sec. 6.1, Fig. 2 left), reproduced small on CPU.

    run_frontier(output_dir, FULL)      # or QUICK; returns the rows also written to frontier.csv

1. SFT: a tiny Llama fitted to reviews of the task's language (task.py) by maximum likelihood,
   saved to OUTPUT_DIR/sft. It is the reference and every run's starting point.
2. Pairs, as the paper made them: `samples_per_prompt` completions from the SFT model per prompt,
   every pair of them labelled by the ground-truth reward (higher wins; ties dropped), written to
   OUTPUT_DIR/pairs.jsonl. Completions cut at max_new_tokens are left out of the pairs (the trainer
   would append an EOS that was never sampled), completions that are EOS alone (the trainer refuses
   an empty completion text) and completions that do not survive re-encoding as text (a special
   token sampled mid-completion). The counts are in frontier.json.
3. Runs from the SFT model, each evaluated after each of `steps` optimizer steps (the paper
   evaluated its runs every 100 steps): DPO per beta through `dpo_fast.train` (the project's
   trainer and kernels, one fresh output dir per run and step count: with a constant learning rate
   after warmup and the trainer's seeded data order, the run with max_steps = s is the first s
   steps of the longest one); Preferred-FT per learning rate and Unlikelihood per alpha
   (baselines.py, one trajectory each, evaluated in memory at the same step counts).
4. Every model, the SFT one included: mean reward and KL(pi || pi_ref) of `eval_samples`
   completions for each of `eval_prompts` held-out prompts (sampling.evaluate_policy).
5. OUTPUT_DIR/frontier.csv, frontier.png (reward against KL, one marker per evaluated model, one
   colour per method) and frontier.json (settings, data statistics, machine, wall times, and where
   DPO's points lie against each baseline's: compare_to_dpo). The CSV's train_seconds is the wall
   time up to that model: for DPO the whole trainer call (reference cache included), for a
   baseline its trajectory so far (earlier checkpoints' evaluations included).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dpo_fast.loss_settings import LossSettings
from dpo_fast.trainer import rundir
from . import baselines, sampling, task
from .sft import train_sft

logger = logging.getLogger(__name__)

METHODS = ("sft", "dpo", "preferred_ft", "unlikelihood")
CSV_COLUMNS = ("method", "setting", "reward", "reward_se", "kl", "kl_se", "steps", "seed", "samples", "prompts",
               "learning_rate", "train_seconds", "cut_share", "mean_tokens")
COLORS = {"sft": "black", "dpo": "tab:red", "preferred_ft": "tab:blue", "unlikelihood": "tab:green"}
LABELS = {"sft": "SFT (reference)", "dpo": "DPO (dpo_fast.train)", "preferred_ft": "Preferred-FT",
          "unlikelihood": "Unlikelihood"}


@dataclass(frozen=True)
class FrontierConfig:
    """Every setting of a frontier run. Training settings are shared by all methods (AdamW, the
    batch size, warmup, then a constant rate; DPO through the trainer, the baselines in baselines.py)."""

    seed: int = 0
    # SFT model and its data
    sft_reviews: int = 20000
    sft_steps: int = 1000
    sft_learning_rate: float = 3e-3
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    # preference pairs (the paper: 4 completions per prompt, so 6 pairs)
    pair_prompts: int = 1024
    samples_per_prompt: int = 4
    max_new_tokens: int = 40
    # training
    learning_rate: float = 5e-4
    batch_size: int = 64
    warmup_steps: int = 10
    max_length: int = 64
    steps: tuple[int, ...] = (25, 50, 100, 200, 400)
    betas: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    preferred_ft_learning_rates: tuple[float, ...] = (5e-4, 2e-3)
    unlikelihood_alphas: tuple[float, ...] = (0.05, 0.1, 1.0)
    # evaluation
    eval_prompts: int = 512
    eval_samples: int = 4

    def check(self) -> None:
        for name in ("sft_reviews", "sft_steps", "pair_prompts", "samples_per_prompt", "max_new_tokens",
                     "batch_size", "eval_prompts", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt: a pair needs >= 2 completions per prompt, got {self.samples_per_prompt}")
        if not self.steps or any(s < 1 for s in self.steps):
            raise ValueError(f"steps: expected step counts >= 1, got {self.steps}")
        for beta in self.betas:
            try:
                LossSettings(beta=beta)  # the one check of a beta
            except ValueError as e:
                raise ValueError(f"betas: {e}") from None
        if any(not a > 0 for a in self.unlikelihood_alphas):
            raise ValueError(f"unlikelihood_alphas: expected > 0, got {self.unlikelihood_alphas}")
        if any(not lr > 0 for lr in (self.learning_rate, self.sft_learning_rate, *self.preferred_ft_learning_rates)):
            raise ValueError("learning rates: expected > 0")


FULL = FrontierConfig()
# --quick: the same pipeline on a smaller grid and data, under 10 minutes on 2 idle cores.
QUICK = replace(FULL, sft_reviews=6000, sft_steps=400, pair_prompts=256, eval_prompts=128, steps=(50, 150),
                betas=(0.1, 1.0, 5.0), preferred_ft_learning_rates=(5e-4,), unlikelihood_alphas=(0.1,))


def _prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    # The trainer's framing of a plain-text prompt: BOS + its words.
    return [[tokenizer.bos_token_id] + ids for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def make_pairs(model, tokenizer, prompts: list[str], cfg: FrontierConfig, seed: int) -> tuple[list[dict], dict]:
    """Sample completions from `model` and label every pair per prompt (module docstring, step 2).
    Returns (rows with prompt/chosen/rejected texts, their rewards and token ids; statistics)."""
    eos = tokenizer.eos_token_id
    pids = _prompt_ids(tokenizer, prompts)
    samples = sampling.sample_completions(model, pids, num_samples=cfg.samples_per_prompt,
                                          max_new_tokens=cfg.max_new_tokens, eos_id=eos, seed=seed)
    rows, stats = [], {"prompts": len(prompts), "completions": 0, "cut": 0, "empty": 0, "not_text": 0,
                         "ties": 0}
    for prompt, p_ids, comps in zip(prompts, pids, samples):
        texts, ids, rewards = [], [], []
        for c in comps:
            stats["completions"] += 1
            if c[-1] != eos:
                stats["cut"] += 1
                continue
            if len(c) == 1:
                stats["empty"] += 1
                continue
            words = sampling.completion_words(tokenizer, c)
            text = " ".join(words)
            if tokenizer(text, add_special_tokens=False)["input_ids"] != c[:-1]:
                stats["not_text"] += 1
                continue
            texts.append(text)
            ids.append(c)
            rewards.append(task.reward(prompt.split(), words))
        labelled, ties = task.label_pairs(prompt, texts, rewards)
        stats["ties"] += ties
        by_text = dict(zip(texts, ids))
        for r in labelled:
            rows.append({**r, "prompt_ids": p_ids, "chosen_ids": by_text[r["chosen"]],
                         "rejected_ids": by_text[r["rejected"]]})
    stats["pairs"] = len(rows)
    if rows:
        stats["mean_reward_chosen"] = sum(r["reward_chosen"] for r in rows) / len(rows)
        stats["mean_reward_rejected"] = sum(r["reward_rejected"] for r in rows) / len(rows)
    return rows, stats


def write_pairs(rows: list[dict], path: Path) -> Path:
    """The trainer's input: standard prompt/chosen/rejected JSONL (plus the two rewards)."""
    keep = ("prompt", "chosen", "rejected", "reward_chosen", "reward_rejected")
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in keep}) + "\n")
    return path


def train_dpo(sft_dir: Path, pairs_file: Path, out_dir: Path, cfg: FrontierConfig, beta: float, steps: int) -> Path:
    """One DPO run through the project's public trainer; the model is written to `out_dir`."""
    import dpo_fast

    if out_dir.exists():
        shutil.rmtree(out_dir)  # a fresh output dir per run: no resume, no stale reference cache
    dpo_fast.train(str(sft_dir), str(pairs_file), str(out_dir), beta=beta, loss_type="sigmoid",
                   learning_rate=cfg.learning_rate, optimizer="adamw", batch_size=cfg.batch_size, max_steps=steps,
                   seed=cfg.seed, max_length=cfg.max_length, warmup_steps=cfg.warmup_steps,
                   logging_steps=max(1, steps // 5), save_steps=0, progress=False, tensorboard=False)
    return out_dir


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import dpo_fast

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "dpo_fast": dpo_fast.__version__, "load_average": list(os.getloadavg())}


class _Grid:
    """Runs the grid, collecting one row per evaluated model."""

    def __init__(self, out: Path, cfg: FrontierConfig, progress):
        self.out, self.cfg, self.progress = out, cfg, progress
        self.rows: list[dict] = []

    def evaluate(self, model, method: str, setting: str, steps: int, learning_rate: float | None,
                 train_seconds: float) -> dict:
        cfg = self.cfg
        ev = sampling.evaluate_policy(model, self.reference, self.tokenizer, self.eval_ids,
                                      num_samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens,
                                      seed=cfg.seed + 4)  # the same seed for every model
        row = {"method": method, "setting": setting, "reward": ev["reward"], "reward_se": ev["reward_se"],
               "kl": ev["kl"], "kl_se": ev["kl_se"], "steps": steps, "seed": cfg.seed, "samples": ev["samples"],
               "prompts": ev["prompts"], "learning_rate": learning_rate, "train_seconds": round(train_seconds, 2),
               "cut_share": ev["cut_share"], "mean_tokens": ev["mean_tokens"]}
        self.rows.append(row)
        self.progress(f"{method:13s} {setting:12s} steps {steps:4d}: reward {row['reward']:.3f} "
                      f"+- {row['reward_se']:.3f}, KL {row['kl']:.2f} +- {row['kl_se']:.2f}")
        return row

    def run(self) -> dict:
        from dpo_fast.hf import load_causal_lm
        from ..tiny import save_tiny

        cfg, out, seed = self.cfg, self.out, self.cfg.seed
        timings = {}
        t0 = time.perf_counter()
        model, tok, sft_info = train_sft(task.sample_reviews(cfg.sft_reviews, seed), task.sample_reviews(500, seed + 1),
                                         steps=cfg.sft_steps, learning_rate=cfg.sft_learning_rate, seed=seed,
                                         hidden_size=cfg.hidden_size, layers=cfg.layers, heads=cfg.heads)
        sft_dir = out / "sft"
        save_tiny(model, tok, sft_dir)
        timings["sft_s"] = time.perf_counter() - t0
        self.progress(f"SFT: {cfg.sft_steps} steps, held-out NLL {sft_info['held_out_nll']:.4f}/token "
                      f"({timings['sft_s']:.0f} s)")
        self.reference = load_causal_lm(sft_dir, device="cpu").eval()
        self.tokenizer = tok
        self.eval_ids = _prompt_ids(tok, task.sample_prompts(cfg.eval_prompts, seed + 3))

        t0 = time.perf_counter()
        pairs, pair_stats = make_pairs(self.reference, tok, task.sample_prompts(cfg.pair_prompts, seed + 2), cfg,
                                       seed=seed + 5)
        if len(pairs) < cfg.batch_size:
            raise RuntimeError(f"only {len(pairs)} preference pairs, fewer than one batch ({cfg.batch_size}): "
                               "raise pair_prompts")
        pairs_file = write_pairs(pairs, out / "pairs.jsonl")
        timings["pairs_s"] = time.perf_counter() - t0
        self.progress(f"pairs: {pair_stats}")
        self.evaluate(self.reference, "sft", f"reviews={cfg.sft_reviews}", cfg.sft_steps, cfg.sft_learning_rate,
                      timings["sft_s"])

        t0 = time.perf_counter()
        runs = out / "runs"
        for beta in cfg.betas:
            for steps in sorted(cfg.steps):
                t = time.perf_counter()
                run_dir = train_dpo(sft_dir, pairs_file, runs / f"dpo_beta{beta:g}_steps{steps}", cfg, beta, steps)
                seconds = time.perf_counter() - t
                policy = load_causal_lm(run_dir, device="cpu").eval()
                self.evaluate(policy, "dpo", f"beta={beta:g}", steps, cfg.learning_rate, seconds)
        timings["dpo_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        variants = [("preferred_ft", f"lr={lr:g}", lr, 0.0) for lr in cfg.preferred_ft_learning_rates]
        variants += [("unlikelihood", f"alpha={a:g}", cfg.learning_rate, a) for a in cfg.unlikelihood_alphas]
        for method, setting, lr, alpha in variants:
            policy = copy.deepcopy(self.reference)
            start = time.perf_counter()
            baselines.train_baseline(
                policy, method, pairs, tok.pad_token_id, steps=max(cfg.steps), batch_size=cfg.batch_size,
                learning_rate=lr, warmup_steps=cfg.warmup_steps, seed=seed, alpha=alpha, checkpoints=cfg.steps,
                on_checkpoint=lambda s, m=method, st=setting, l=lr: self.evaluate(
                    policy, m, st, s, l, time.perf_counter() - start))
        timings["baselines_s"] = time.perf_counter() - t0
        return {"sft": sft_info, "pairs": pair_stats, "timings_s": timings}


def run_frontier(output_dir, cfg: FrontierConfig = FULL, *, threads: int | None = 1, progress=print,
                 overwrite: bool = False) -> dict:
    """Run the grid; write sft/, pairs.jsonl, runs/ and frontier.csv, .png, .json to `output_dir`,
    which must be empty (or is cleared first with overwrite=True: --overwrite-output-dir) and is
    locked for the run. Returns the summary written to frontier.json, whose "rows" are the CSV's
    rows. `threads` sets torch's CPU threads for the run (restored afterwards)."""
    cfg.check()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = rundir.RunLock(out)
    lock.acquire()
    try:
        rundir.claim_output(out, overwrite=overwrite, flag="--overwrite-output-dir")
        lock.keep()
        return _run_and_write(out, cfg, threads, progress)
    finally:
        lock.release()


def _run_and_write(out: Path, cfg: FrontierConfig, threads: int | None, progress) -> dict:
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    from dpo_fast.progress import quiet_hf_progress_bars

    try:
        start_machine = machine_info()
        t0 = time.perf_counter()
        grid = _Grid(out, cfg, progress or (lambda _msg: None))
        with quiet_hf_progress_bars(True):
            details = grid.run()
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old_threads)
    summary = {"config": asdict(cfg), **details, "wall_seconds": round(wall, 1), "machine": start_machine,
               "load_average_end": list(os.getloadavg()), "comparison": compare_to_dpo(grid.rows),
               "rows": grid.rows}
    write_csv(grid.rows, out / "frontier.csv")
    (out / "frontier.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_frontier(grid.rows, out / "frontier.png", subtitle=f"{start_machine['cpu']}, {start_machine['cores']} cores, "
                  f"wall {wall / 60:.1f} min, seed {cfg.seed}")
    return summary


def compare_to_dpo(rows: list[dict]) -> dict:
    """Where DPO's points lie against each baseline's: for every baseline model, the best DPO reward
    among DPO models whose KL is at most that model's KL (None when no DPO model is that close to
    the reference). Per method: how many of its models a DPO model beats there by more than two
    combined standard errors, how many beat every such DPO model by that much, how many have no DPO
    model at so low a KL, and its best reward."""
    dpo = [r for r in rows if r["method"] == "dpo"]
    out = {}
    for method in ("preferred_ft", "unlikelihood"):
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        cmp = []
        for r in mine:
            under = [d for d in dpo if d["kl"] <= r["kl"]]
            best = max(under, key=lambda d: d["reward"]) if under else None
            margin = None if best is None else best["reward"] - r["reward"]
            noise = 0.0 if best is None else 2 * (best["reward_se"] ** 2 + r["reward_se"] ** 2) ** 0.5
            cmp.append({"setting": r["setting"], "steps": r["steps"], "kl": r["kl"], "reward": r["reward"],
                        "best_dpo_reward_at_lower_kl": None if best is None else best["reward"],
                        "dpo_margin": margin, "two_se": noise})
        out[method] = {
            "models": len(mine),
            "dpo_higher_at_no_more_kl": sum(c["dpo_margin"] is not None and c["dpo_margin"] > c["two_se"] for c in cmp),
            "baseline_higher": sum(c["dpo_margin"] is not None and c["dpo_margin"] < -c["two_se"] for c in cmp),
            "no_dpo_at_lower_kl": sum(c["dpo_margin"] is None for c in cmp),
            "best_reward": max(r["reward"] for r in mine),
            "models_detail": cmp,
        }
    out["dpo_best_reward"] = max((r["reward"] for r in dpo), default=None)
    return out


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in CSV_COLUMNS})
    return path


def read_csv(path: Path) -> list[dict]:
    """The rows of a frontier.csv, numbers as numbers (to redraw a plot without rerunning)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("reward", "reward_se", "kl", "kl_se", "learning_rate", "train_seconds", "cut_share", "mean_tokens"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else None
        for k in ("steps", "seed", "samples", "prompts"):
            r[k] = int(r[k])
    return rows


def replot(output_dir) -> Path:
    """Redraw OUTPUT_DIR/frontier.png from its frontier.csv and frontier.json (no training)."""
    out = Path(output_dir)
    summary = json.loads((out / "frontier.json").read_text())
    m = summary["machine"]
    return plot_frontier(read_csv(out / "frontier.csv"), out / "frontier.png",
                         subtitle=f"{m['cpu']}, {m['cores']} cores, wall {summary['wall_seconds'] / 60:.1f} min, "
                         f"seed {summary['config']['seed']}")


def plot_frontier(rows: list[dict], path: Path, subtitle: str = "", zoom_kl: float = 2.0) -> Path:
    """Write frontier_figure(rows, ...) to `path` (PNG)."""
    import matplotlib.pyplot as plt

    fig = frontier_figure(rows, subtitle, zoom_kl)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def frontier_figure(rows: list[dict], subtitle: str = "", zoom_kl: float = 2.0):
    """Reward against KL(pi || pi_ref), one marker per evaluated model (error bars: 1 standard error),
    one colour per method and, for DPO, one shade per beta (a run's step counts joined by a thin
    line of its colour). Left: every model; right: the models with KL <= zoom_kl, the axes fitted
    to them, where the reference's neighbourhood is otherwise a blur."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, limit in zip(axes, (None, zoom_kl)):
        shown = [r for r in rows if limit is None or r["kl"] <= limit]
        _draw(ax, shown)
        ax.set_xlabel("KL(pi || pi_ref), nats per completion (sampled estimate)")
        ax.set_ylabel("mean ground-truth reward")
        ax.set_title("all runs" if limit is None else f"zoom: KL <= {limit:g}", fontsize=9)
        ax.grid(alpha=0.3)
        if limit is not None and shown:
            lo = min(r["reward"] - r["reward_se"] for r in shown)
            hi = max(r["reward"] + r["reward_se"] for r in shown)
            pad = 0.04 * (hi - lo or 1.0)
            ax.set_xlim(-0.03 * limit, limit * 1.03)
            ax.set_ylim(lo - pad, hi + pad)
    axes[0].legend(loc="lower right", fontsize=7, ncol=2)
    fig.suptitle("Reward-KL frontier, synthetic review sentiment (after the DPO paper, Fig. 2 left)"
                 + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    fig.tight_layout()
    return fig


def _series(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """(label, colour, rows) per series: one per method, DPO one per beta (dark purple to orange as beta
    grows: hues apart from the baselines' blue and green)."""
    import matplotlib

    out = []
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        if method != "dpo":
            out.append((LABELS[method], COLORS[method], mine))
            continue
        settings = sorted(dict.fromkeys(r["setting"] for r in mine), key=lambda s: float(s.split("=", 1)[1]))
        shades = matplotlib.colormaps["plasma"]
        for i, setting in enumerate(settings):
            colour = shades(0.85 * i / max(len(settings) - 1, 1))
            out.append((f"DPO {setting.replace('beta', 'β')}", colour, [r for r in mine if r["setting"] == setting]))
    return out


def _draw(ax, rows: list[dict]) -> None:
    for label, colour, mine in _series(rows):
        sft = mine[0]["method"] == "sft"
        ax.errorbar([r["kl"] for r in mine], [r["reward"] for r in mine],
                    xerr=[r["kl_se"] for r in mine], yerr=[r["reward_se"] for r in mine],
                    fmt="*" if sft else "o", ms=10 if sft else 5, color=colour, ecolor=colour, elinewidth=0.6,
                    capsize=0, label=label, markeredgecolor="black" if mine[0]["method"] == "dpo" else colour,
                    markeredgewidth=0.4)
        for setting in dict.fromkeys(r["setting"] for r in mine):
            run = sorted((r for r in mine if r["setting"] == setting), key=lambda r: r["steps"])
            if len(run) > 1:
                ax.plot([r["kl"] for r in run], [r["reward"] for r in run], color=colour, lw=0.8, alpha=0.7)
