"""`dpo-fast bench`: the arguments (read at `dpo-fast --help`, so no torch here) and the command."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .cases import DTYPES, OPS, evaluate_targets, parse_shapes, plan, target_shapes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="device to benchmark (default: cuda when available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="a small sweep (about 5 minutes on 2 CPU cores)")
    parser.add_argument("--ops", default=None, help="comma-separated subset of logits,linear,loss (default: all)")
    parser.add_argument("--output-dir", default=None, help="where results.csv/.md and plots go "
                        "(default: bench_results/<device>, or bench_results/<device>/targets)")
    parser.add_argument("--targets", action="store_true",
                        help="run exactly the cases the project's targets are stated on, and judge them")
    parser.add_argument("--dtypes", default=None, help="comma-separated dtypes, each measured (the first is the "
                        "one the vocab, token and hidden sweeps run in)")
    parser.add_argument("--impls", default=None, help="only these implementations (the reference always runs)")
    parser.add_argument("--vocabs", default=None, help="comma-separated vocabulary sizes, the only ones measured "
                        "(the first is the one the token, hidden and dtype sweeps run at)")
    parser.add_argument("--shapes", default=None, metavar="OP:DTYPE:SxT:V[:H],...",
                        help="measure exactly these shapes instead of a sweep, e.g. logits:float32:8x512:128256")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions on CPU (default 3 quick, 5 full)")
    parser.add_argument("--impl-plugin", action="append", default=[], metavar="FILE",
                        help="a Python file (or module) that registers more implementations")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU: run cases in this process (debugging; memory peaks are less reliable)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case before it is abandoned")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--peak-bw", type=float, default=None, help="device memory bandwidth in GB/s (CUDA)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s for the dtype (CUDA)")
    parser.add_argument("--readme", default=None,
                        help="also paste results.md into this file, between its "
                             "<!-- bench:<device>[:targets]:start/end --> markers")
    parser.add_argument("--list", action="store_true",
                        help="list the implementations and whether they can run, then exit")


def _command_line(args, device: str) -> str:
    """The options that differ from the defaults, for the record in results.md."""
    parts = ["dpo-fast bench", f"--device {device}"]
    skip = {"device", "output_dir", "readme", "list", "command"}
    p = argparse.ArgumentParser()
    add_arguments(p)
    dflt = vars(p.parse_args([]))
    for k, v in vars(args).items():
        if k in skip or k not in dflt or v == dflt[k]:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            parts.append(flag)
        elif isinstance(v, list):
            parts += [f"{flag} {x}" for x in v]
        else:
            parts.append(f"{flag} {v}")
    return " ".join(parts)


def _vocabs(text: str) -> list[int]:
    try:
        vocabs = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--vocabs: expected comma-separated integers, got {text!r}") from None
    if not vocabs or min(vocabs) < 2:
        raise ValueError(f"--vocabs: every vocabulary size must be at least 2, got {text!r}")
    return vocabs


def _shapes(args, device: str, ops: list[str]):
    """The shapes to measure, exactly as the options name them; a ValueError names an option that
    cannot be honoured (a sweep option next to --shapes or --targets, which fix their own shapes)."""
    dtypes = [d.strip() for d in args.dtypes.split(",")] if args.dtypes else None
    if dtypes and any(d not in DTYPES for d in dtypes):
        raise ValueError(f"--dtypes must be among {DTYPES}")
    fixed = "--shapes" if args.shapes else ("--targets" if args.targets else None)
    if fixed:
        given = [f for f, v in (("--vocabs", args.vocabs), ("--dtypes", args.dtypes)) if v] + \
            (["--ops"] if args.ops and args.shapes else [])
        if given:
            raise ValueError(f"{', '.join(given)} cannot be combined with {fixed}, which states its own shapes")
    if args.shapes:
        return parse_shapes(args.shapes)
    if args.targets:
        return [s for s in target_shapes(device) if s.op in ops]
    return plan(device, args.quick, ops, dtypes, _vocabs(args.vocabs) if args.vocabs else None)


def run_cli(args) -> int:
    from .impls import REGISTRY, load_plugin  # the run path: torch from here on
    from .report import update_readme, write_outputs
    from .run import run_benchmark

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("dpo-fast bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    for p in args.impl_plugin:
        load_plugin(p)
    ops = [o.strip() for o in (args.ops or ",".join(OPS)).split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        print(f"dpo-fast bench: unknown op(s) {bad}; choose from {OPS}", file=sys.stderr)
        return 2
    if args.list:
        for impl in REGISTRY.values():
            ok, why = impl.available(device)
            print(f"{impl.name:<24} {','.join(impl.ops):<20} {'available' if ok else why}")
        return 0
    try:
        shapes = _shapes(args, device, ops)
    except ValueError as e:
        print(f"dpo-fast bench: {e}", file=sys.stderr)
        return 2
    only = set(i.strip() for i in args.impls.split(",")) if args.impls else None
    unknown = sorted(only - set(REGISTRY)) if only else []
    if unknown:
        print(f"dpo-fast bench: --impls: unknown implementation(s) {unknown}; see --list", file=sys.stderr)
        return 2
    out_dir = args.output_dir or os.path.join("bench_results", device, *(["targets"] if args.targets else []))
    t0 = time.perf_counter()
    rows = run_benchmark(shapes, device, repeats=args.repeats or (3 if args.quick else 5), only=only,
                         plugins=args.impl_plugin, in_process=args.in_process, timeout=args.timeout,
                         peak_bw=args.peak_bw, peak_tflops=args.peak_tflops, log=lambda m: print(m, flush=True))
    elapsed = time.perf_counter() - t0
    targets = evaluate_targets(rows, device) if args.targets else None
    kind = "targets" if args.targets else ("quick sweep" if args.quick else "sweep")
    files = write_outputs(rows, out_dir, f"dpo_fast benchmark: {kind} ({device})", _command_line(args, device),
                          targets, plots=not args.no_plots and not args.targets,
                          labels={n: i.label for n, i in REGISTRY.items()})
    if args.readme:
        update_readme(args.readme, os.path.join(out_dir, "results.md"),
                      f"bench:{device}" + (":targets" if args.targets else ""))
    print(f"wrote {', '.join(files)} in {elapsed / 60:.1f} min")
    for t in targets or []:
        print(f"  [{ {True: 'met', False: 'NOT MET', None: 'info'}[t['met']] }] {t['target']}: {t['measured']}")
    return 0
