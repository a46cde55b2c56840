"""`dpo-fast reproduce EXPERIMENT`: the DPO paper's experiments, small, on this machine.

    dpo-fast reproduce frontier --output-dir DIR [--quick] [--seed N] [--betas 0.1,1] [--steps 50,150]
    dpo-fast reproduce frontier --output-dir DIR --replot     # redraw DIR/frontier.png only
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _ints(text: str) -> tuple[int, ...]:
    values = _floats(text)
    if any(v != int(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return tuple(int(v) for v in values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .frontier import FULL, QUICK

    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    p = sub.add_parser("frontier", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="reward against KL(pi || pi_ref) for DPO, Preferred-FT and Unlikelihood (paper Fig. 2 left)",
                       description="Train an SFT model on a synthetic review language, sample preference pairs "
                       "from it labelled by an exact sentiment reward, train DPO at several betas (dpo_fast.train), "
                       "Preferred-FT and Unlikelihood from it, and write frontier.csv / .png / .json.")
    p.add_argument("--output-dir", required=True, help="where everything is written (sft/, pairs.jsonl, runs/, "
                   "frontier.*); an empty or new directory, locked for the run")
    p.add_argument("--overwrite-output-dir", action="store_true", help="delete everything in a non-empty "
                   "--output-dir first (without it such a directory is refused and left untouched)")
    p.add_argument("--quick", action="store_true", help=f"a smaller grid and data set (< 10 min on 2 idle cores): "
                   f"betas {QUICK.betas}, steps {QUICK.steps}, {QUICK.pair_prompts} pair prompts, "
                   f"{QUICK.eval_prompts} eval prompts")
    p.add_argument("--seed", type=int, default=FULL.seed, help="seed of everything (data, models, sampling)")
    p.add_argument("--betas", type=_floats, default=None, help=f"DPO betas (unset: {FULL.betas}, "
                   f"{QUICK.betas} with --quick)")
    p.add_argument("--steps", type=_ints, default=None, help=f"step counts each run is evaluated at (unset: "
                   f"{FULL.steps}, {QUICK.steps} with --quick)")
    p.add_argument("--replot", action="store_true", help="only redraw OUTPUT_DIR/frontier.png from its frontier.csv "
                   "and frontier.json (no training)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default); the tiny "
                   "models run fastest on one")


def run_cli(args: argparse.Namespace) -> int:
    from dpo_fast.trainer import TrainError
    from .frontier import FULL, QUICK, replot, run_frontier

    if args.replot:
        try:
            print(f"wrote {replot(args.output_dir)}")
        except (OSError, KeyError, ValueError) as e:
            print(f"dpo-fast reproduce frontier: --replot: cannot read {args.output_dir}'s frontier.csv / "
                  f"frontier.json ({e})", file=sys.stderr)
            return 2
        return 0

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    cfg = replace(QUICK if args.quick else FULL, seed=args.seed)
    if args.betas is not None:
        cfg = replace(cfg, betas=args.betas)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    try:
        cfg.check()
    except ValueError as e:
        print(f"dpo-fast reproduce frontier: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_frontier(args.output_dir, cfg, threads=args.threads, progress=lambda m: print(m, flush=True),
                               overwrite=args.overwrite_output_dir)
    except TrainError as e:
        print(f"dpo-fast reproduce frontier: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the run cannot be resumed; what is there is marked as partial
        print(f"dpo-fast reproduce frontier: interrupted; {args.output_dir} holds a partial run (no frontier.csv); "
              "start over with the same command and --overwrite-output-dir", file=sys.stderr)
        return 130
    cmp = summary["comparison"]
    for method in ("preferred_ft", "unlikelihood"):
        if method in cmp:
            c = cmp[method]
            print(f"{method}: of {c['models']} models, {c['dpo_higher_at_no_more_kl']} have less reward than a DPO "
                  f"model at no more KL, {c['baseline_higher']} more than every such DPO model (margins beyond 2 "
                  f"standard errors), {c['no_dpo_at_lower_kl']} have no DPO model at so low a KL; best reward "
                  f"{c['best_reward']:.3f} (DPO: {cmp['dpo_best_reward']:.3f})")
    print(f"wrote {args.output_dir}/frontier.csv, frontier.png, frontier.json "
          f"({len(summary['rows'])} models, {summary['wall_seconds'] / 60:.1f} min)")
    return 0
