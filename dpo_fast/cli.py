"""The `dpo-fast` command: one subcommand per module, each module owning its own arguments.

A subcommand module exposes `add_arguments(parser)` and `run_cli(args) -> int`, and keeps
heavy imports (transformers, datasets) inside functions so `dpo-fast --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("dpo_fast_tools.demo", "the end-to-end demo on the embedded data set (no downloads)"),
    "train": ("dpo_fast.trainer", "train a causal LM with DPO using the fused loss"),
    "eval": ("dpo_fast.trainer.eval_command", "the eval metrics of a model against a reference on preference data"),
    "precompute-ref": ("dpo_fast.refcache", "compute the reference model's log-probs once, to disk"),
    "bench": ("dpo_fast_tools.bench", "side-by-side micro-benchmarks against the reference and peers"),
    "reproduce": ("dpo_fast_tools.reproduce.cli", "reproduce the DPO paper's experiments small (frontier: reward vs KL)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-fast", description="Fast, lean DPO training kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run_cli(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
