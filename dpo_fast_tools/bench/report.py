"""Results: CSV, markdown (tables per op, targets, what could not run), plots, README tables."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from .cases import OPS

CSV_COLUMNS = [
    "implementation", "kind", "op", "device", "dtype", "tokens", "hidden", "vocab", "batch", "seqlen", "pass",
    "time_ms", "time_p20_ms", "time_p80_ms", "cpu_time_ms", "repeats", "peak_mem_mb", "grad_mb", "mem_vs_grad",
    "speedup_vs_ref", "agrees", "max_err", "tolerance", "status", "tflops", "gbps", "pct_peak_flops",
    "pct_peak_bw", "sweep", "device_name", "threads", "loadavg", "torch", "triton", "dpo_fast", "trl",
    "liger_kernel", "cut_cross_entropy", "python", "timestamp",
]
_INTS = {"tokens", "hidden", "vocab", "batch", "seqlen", "repeats", "threads"}
_FLOATS = {"time_ms", "time_p20_ms", "time_p80_ms", "cpu_time_ms", "peak_mem_mb", "grad_mb", "mem_vs_grad",
           "speedup_vs_ref", "tflops", "gbps", "pct_peak_flops", "pct_peak_bw", "loadavg", "tolerance"}


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})


def read_csv(path: str) -> list[dict]:
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            d = {}
            for k, v in r.items():
                if v == "":
                    d[k] = None
                elif k in _INTS:
                    d[k] = int(float(v))
                elif k in _FLOATS:
                    d[k] = float(v)
                elif k == "agrees":
                    d[k] = v == "True"
                else:
                    d[k] = v
            out.append(d)
    return out


# ================================================================ markdown


def _fmt_ms(v):
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _fmt_mb(v):
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def _cell(r) -> str:
    if r is None:
        return "-"
    if r.get("agrees") is False:
        return "✗ disagrees"
    if r.get("time_ms") is None:
        return (r.get("status") or "-").split(":")[0]
    sp = (f" ({r['speedup_vs_ref']:.2f}x)" if r.get("speedup_vs_ref") and r["implementation"] != "pytorch"
          and r.get("agrees") else "")
    return f"{_fmt_ms(r['time_ms'])} ms{sp} / {_fmt_mb(r.get('peak_mem_mb'))} MB"


def _unique(values) -> list:
    return list(dict.fromkeys(values))


def _shape_key(r) -> tuple:
    return (r["dtype"], r["tokens"], r.get("hidden"), r["vocab"], r["batch"], r["seqlen"])


def _header(measured: list[dict], rows: list[dict], title: str, command: str) -> list[str]:
    any_r = (measured or rows or [{}])[0]
    dates = sorted({(r.get("timestamp") or "")[:10] for r in measured if r.get("timestamp")})
    loads = [r["loadavg"] for r in measured if r.get("loadavg") is not None]
    L = [f"# {title}", ""]
    L.append(f"Measured on **{any_r.get('device_name')}** ({any_r.get('device')}, {any_r.get('threads')} threads) "
             f"on {', '.join(dates) or '?'}; torch {any_r.get('torch')}, triton {any_r.get('triton')}, "
             f"dpo_fast {any_r.get('dpo_fast')}, TRL: {any_r.get('trl')}, Liger-Kernel: {any_r.get('liger_kernel')}, "
             f"Cut Cross-Entropy: {any_r.get('cut_cross_entropy')}, Python {any_r.get('python')}.")
    if loads:
        L.append(f"1-minute load average during the run: {min(loads):.1f} to {max(loads):.1f} on "
                 f"{os.cpu_count()} cores: above the core count, other work competed for the CPU and "
                 f"wall-clock times are inflated; the CPU time column (all threads of the process) "
                 f"is less sensitive to that.")
    L += ["", f"Command: `{command}`", ""]
    L.append("Cells: median time of forward + backward (speed-up over the PyTorch reference) / peak memory "
             "beyond the inputs, in MB (10^6 bytes); the gradient itself is in the `grad MB` column. "
             "✗: outputs disagree with the reference (not timed). All passes, quantiles and errors: results.csv.")
    L.append("")
    return L


def _targets_table(targets: list[dict]) -> list[str]:
    L = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in targets:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        L.append(f"| {t['target']} | {t['measured']} | {met} |")
    return L + [""]


def _op_tables(op: str, ops_rows: list[dict]) -> list[str]:
    """The op's summary table (one column per implementation) and its fwd / bwd split."""
    lin = op == "linear"
    impls = _unique(r["implementation"] for r in ops_rows)
    floors = _unique(r["implementation"] for r in ops_rows if r.get("kind") == "baseline")
    shapes = _unique(_shape_key(r) for r in ops_rows)
    L = [f"## {op}", ""]
    if floors:
        L += [f"Timing floors (plain GEMMs, no loss, not checked): {', '.join(f'`{f}`' for f in floors)}.", ""]
    hdr = ["dtype", "tokens"] + (["H"] if lin else []) + ["V", "grad MB"] + impls
    L += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for k in shapes:
        dt, tok, h, v, b, t = k
        sel = {r["implementation"]: r for r in ops_rows if _shape_key(r) == k and r["pass"] == "fwd+bwd"}
        g = next(iter(sel.values()))["grad_mb"] if sel else None
        cells = [dt, f"{tok} ({b}x{t})"] + ([str(h)] if lin else []) + [str(v), _fmt_mb(g)]
        L.append("| " + " | ".join(cells + [_cell(sel.get(i)) for i in impls]) + " |")
    L += ["", f"<details><summary>{op}: forward / backward split (median ms; peak MB)</summary>", "",
          "| dtype | tokens | " + ("H | " if lin else "") + "V | implementation | fwd ms | bwd ms | "
          "fwd+bwd ms (p20-p80) | CPU time ms | peak fwd MB | peak bwd MB | max err / tol |",
          "|---|---|" + ("---|" if lin else "") + "---|---|---|---|---|---|---|---|---|"]
    for k in shapes:
        dt, tok, h, v, b, t = k
        for i in impls:
            sel = {r["pass"]: r for r in ops_rows if r["implementation"] == i and _shape_key(r) == k}
            if not sel:
                continue
            fb = sel.get("fwd+bwd", {})
            q = (f"{_fmt_ms(fb.get('time_ms'))} ({_fmt_ms(fb.get('time_p20_ms'))}-{_fmt_ms(fb.get('time_p80_ms'))})"
                 if fb.get("time_ms") is not None else (fb.get("status") or "-"))
            et = (f"{fb.get('max_err')} / {fb.get('tolerance')}" if fb.get("tolerance") is not None else "-")
            L.append(f"| {dt} | {tok} | " + (f"{h} | " if lin else "") +
                     f"{v} | {i} | {_fmt_ms(sel.get('fwd', {}).get('time_ms'))} | "
                     f"{_fmt_ms(sel.get('bwd', {}).get('time_ms'))} | {q} | {_fmt_ms(fb.get('cpu_time_ms'))} | "
                     f"{_fmt_mb(sel.get('fwd', {}).get('peak_mem_mb'))} | "
                     f"{_fmt_mb(sel.get('bwd', {}).get('peak_mem_mb'))} | {et} |")
    return L + ["", "</details>", ""]


def markdown(rows: list[dict], title: str, command: str, targets: list[dict] | None = None,
             plots_dir: str | None = None, labels: dict | None = None) -> str:
    """results.md: header, targets, one section per op, plots, what was not measured, and the
    implementations (labels: name -> description)."""
    measured = [r for r in rows if r.get("pass")]
    notes = [r for r in rows if not r.get("pass")]
    L = _header(measured, rows, title, command)
    if targets:
        L += _targets_table(targets)
    for op in OPS:
        ops_rows = [r for r in measured if r["op"] == op]
        if ops_rows:
            L += _op_tables(op, ops_rows)
    pngs = [op for op in OPS if plots_dir and os.path.exists(os.path.join(plots_dir, f"{op}.png"))]
    if pngs:
        L += ["## Plots", ""] + [f"![{op}]({op}.png)" for op in pngs] + [""]
    if notes:
        L += ["## Not measured", "", "| implementation | op | why |", "|---|---|---|"]
        L += [f"| {r['implementation']} | {r['op']} | {r['status']} |" for r in notes]
        L.append("")
    labels = labels or {}
    L += ["## Implementations", ""]
    L += [f"- `{n}`: {labels.get(n, n)}" for n in _unique(r["implementation"] for r in rows)]
    L.append("")
    return "\n".join(L)


# ================================================================ plots


def _series(sel: list[dict], x: str) -> list[dict]:
    """The points of the largest one-factor sweep along x: rows that agree on every other shape
    factor (dtype, and tokens / vocab / hidden other than x), most distinct x values first."""
    others = [k for k in ("dtype", "tokens", "vocab", "hidden") if k != x]
    groups: dict[tuple, list] = {}
    for r in sel:
        groups.setdefault(tuple(r.get(k) for k in others), []).append(r)
    best = max(groups.values(), key=lambda g: (len({r[x] for r in g}), len(g)), default=[])
    return best if len({r[x] for r in best}) >= 2 else []


def _plot_axis(axs, j: int, op: str, x: str, pts: list[dict], impls: list[str]) -> None:
    for i in impls:
        ir = sorted([r for r in pts if r["implementation"] == i], key=lambda r: r[x])
        tr = [(r[x], r["time_ms"]) for r in ir if r.get("time_ms") is not None]
        mr = [(r[x], r["peak_mem_mb"]) for r in ir if r.get("peak_mem_mb") is not None and r.get("agrees")]
        style = "--" if any(r.get("kind") == "baseline" for r in ir) else "-"
        if tr:
            axs[0][j].plot(*zip(*tr), style, marker="o", ms=3, label=i)
        if mr:
            axs[1][j].plot(*zip(*mr), style, marker="o", ms=3, label=i)
    gr = sorted({(r[x], r["grad_mb"]) for r in pts if r.get("grad_mb") is not None})
    if gr:
        axs[1][j].plot(*zip(*gr), ":", color="black", label="gradient itself")
    xs = sorted({r[x] for r in pts})
    for k, ylabel in ((0, "time fwd+bwd (ms)"), (1, "peak extra memory (MB)")):
        ax = axs[k][j]
        ax.set_xlabel(x if x != "hidden" else "hidden size")
        ax.set_ylabel(ylabel)
        if x != "vocab":
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{v / 1000:.0f}k" if x == "vocab" else str(v) for v in xs], fontsize=7)
        ax.minorticks_off()
        if k == 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    base = pts[0]
    fixed = {"vocab": f"tokens={base['tokens']}", "tokens": f"V={base['vocab']}",
             "hidden": f"tokens={base['tokens']}, V={base['vocab']}"}[x]
    h = f", H={base['hidden']}" if op == "linear" and x != "hidden" else ""
    axs[0][j].set_title(f"{op}: vs {x} ({fixed}{h}, {base['dtype']})", fontsize=9)


def plot(rows: list[dict], out_dir: str) -> list[str]:
    """One PNG per op: time and memory (fwd+bwd) against vocab, tokens (and hidden size), one
    line per implementation (dashed: timing floors); the dotted line is the gradient's size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    meas = [r for r in rows if r.get("pass") == "fwd+bwd"]
    for op in OPS:
        sel = [r for r in meas if r["op"] == op]
        axes_def = [(x, pts) for x in ("vocab", "tokens", "hidden") for pts in [_series(sel, x)] if pts]
        if not axes_def:
            continue
        fig, axs = plt.subplots(2, len(axes_def), figsize=(max(6.0, 4.2 * len(axes_def)), 6.4), squeeze=False)
        impls = _unique(r["implementation"] for r in sel)
        for j, (x, pts) in enumerate(axes_def):
            _plot_axis(axs, j, op, x, pts, impls)
        for k in (0, 1):
            if axs[k][0].get_legend_handles_labels()[0]:
                axs[k][0].legend(fontsize=7)
        dev = sel[0].get("device_name", "")
        fig.suptitle(f"dpo_fast bench, {op} op, {dev}, {(sel[0].get('timestamp') or '')[:10]}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=72)
        plt.close(fig)
        files.append(path)
    return files


# ================================================================ files


def write_outputs(rows, out_dir: str, title: str, command: str, targets=None, plots=True,
                  labels: dict | None = None) -> list[str]:
    """results.csv, the plots and results.md in out_dir (the latter two from what the CSV holds)."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    write_csv(rows, csv_path)
    rows = read_csv(csv_path)
    files = [csv_path]
    if plots:
        files += plot(rows, out_dir)
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as f:
        f.write(markdown(rows, title, command, targets, out_dir if plots else None, labels))
    return files + [md]


def replace_readme_section(readme, start: str, end: str, body: str, heading: str | None = None) -> None:
    """Put `body` between the `start` and `end` markers of `readme`. Without the markers: a new
    section titled `heading` at the end, or a ValueError when no heading is given."""
    path = Path(readme)
    text = path.read_text()
    block = f"{start}\n{body.rstrip(chr(10))}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    elif heading is not None:
        text = text.rstrip() + f"\n\n## {heading}\n\n{block}\n"
    else:
        raise ValueError(f"{readme} has no {start} ... {end} section")
    path.write_text(text)


def update_readme(readme: str, results_md: str, marker: str) -> None:
    """Replace the text between <!-- {marker}:start --> and <!-- {marker}:end --> in `readme`
    with the body of results.md (its title dropped)."""
    with open(results_md) as f:
        body = f.read().split("\n", 1)[1].strip()
    body = body.replace("\n## ", "\n### ")  # under the README's own section heading
    rel = os.path.relpath(os.path.dirname(os.path.abspath(results_md)), os.path.dirname(os.path.abspath(readme)))
    body = re.sub(r"\]\(([\w.+-]+\.png)\)", lambda m: f"]({rel}/{m.group(1)})".replace(os.sep, "/"), body)
    replace_readme_section(readme, f"<!-- {marker}:start -->", f"<!-- {marker}:end -->", body)
