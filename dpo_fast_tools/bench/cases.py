"""What is measured: the shapes of a sweep, shapes given on the command line, and the target
cases with their thresholds (each stated once, here). No torch: `dpo-fast --help` reads this."""

from __future__ import annotations

import dataclasses

OPS = ("logits", "loss", "linear")
PASSES = ("fwd", "bwd", "fwd+bwd")
VOCABS = (32000, 128256, 151936, 256000)
DTYPES = ("float32", "bfloat16", "float16")
BETA = 0.1
IGNORE_INDEX = -100
SEED = 1234
MB = 1e6  # memory columns are in MB = 10^6 bytes


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark point: every implementation of `op` runs on the same inputs of this shape."""

    op: str
    dtype: str
    batch: int  # S sequences = 2P (P chosen rows, then P rejected rows)
    seqlen: int  # T
    vocab: int  # V
    hidden: int = 0  # H, for op == "linear"
    sweep: str = ""  # which sweeps the point belongs to, "|"-joined (vocab, tokens, hidden, dtype, target)

    @property
    def tokens(self) -> int:
        return self.batch * self.seqlen

    @property
    def scored(self) -> int:  # rows that score a token: the shift drops each sequence's last position
        return self.batch * (self.seqlen - 1)

    def key(self) -> tuple:
        return (self.op, self.dtype, self.batch, self.seqlen, self.vocab, self.hidden)

    def label(self) -> str:
        h = f" H={self.hidden}" if self.op == "linear" else ""
        return f"{self.op} {self.dtype} S={self.batch} T={self.seqlen}{h} V={self.vocab}"


def element_size(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[dtype]


def grad_bytes(s: Shape) -> int:
    """The unavoidable output of a backward: d logits, or d hidden + d weight."""
    if s.op == "linear":
        return (s.tokens * s.hidden + s.vocab * s.hidden) * element_size(s.dtype)
    return s.tokens * s.vocab * element_size(s.dtype)


def work_model(s: Shape, pas: str) -> tuple[float | None, float]:
    """(useful FLOPs, minimal bytes moved) of one pass, the same for every implementation.

    From logits: the reads and writes of the vocab-sized tensors, forward 1 read, backward 1 read
    + 1 write (the "three passes"). Linear: 2NHV FLOPs forward and 4NHV backward (dH and dW,
    without recomputation), bytes = hidden + weight read per pass, gradients written in backward.
    """
    e = element_size(s.dtype)
    mult = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[pas]
    if s.op == "linear":
        n = s.scored
        fl = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[pas] * n * s.hidden * s.vocab
        return float(fl), float(mult * (s.tokens + s.vocab) * s.hidden * e)
    return None, float(mult * s.tokens * s.vocab * e)


# ================================================================ sweeps


def _sweep_points(op, dtype, base, vocabs, token_points, hiddens) -> list[Shape]:
    """One-factor-at-a-time sweeps around a base point (batch, seqlen, vocab, hidden)."""
    S, T, V, H = base
    pts: dict[tuple, set] = {}

    def add(tag, batch, seqlen, vocab, hidden, dt=dtype):
        pts.setdefault((dt, batch, seqlen, vocab, hidden), set()).add(tag)

    for v in vocabs:
        add("vocab", S, T, v, H)
    for (b, t) in token_points:
        add("tokens", b, t, V, H)
    if op == "linear":
        for h in hiddens:
            add("hidden", S, T, V, h)
    return [Shape(op, dt, b, t, v, h if op == "linear" else 0, "|".join(sorted(tags)))
            for (dt, b, t, v, h), tags in pts.items()]


# Base point (S, T, V, H), token points (S, T) and hidden sizes of each sweep, by device, size and op.
# The CUDA sweep has no quick variant of its own: --quick drops its largest points.
_SWEEPS = {
    ("cuda", "linear"): ((8, 2048, 128256, 4096), [(2, 2048), (4, 2048), (8, 2048), (16, 2048)], [2048, 4096, 8192]),
    ("cuda", "other"): ((8, 2048, 128256, 0), [(2, 2048), (4, 2048), (8, 2048), (16, 2048)], []),
    ("cpu-quick", "linear"): ((2, 64, 128256, 256), [(2, 32), (2, 64), (4, 64)], [256, 512]),
    ("cpu-quick", "other"): ((2, 256, 128256, 0), [(2, 128), (2, 256), (4, 256)], []),
    ("cpu", "linear"): ((2, 512, 128256, 1024), [(2, 256), (2, 512), (4, 512)], [512, 1024, 2048]),
    ("cpu", "other"): ((4, 512, 128256, 0), [(2, 512), (4, 512), (8, 512)], []),
}


def plan(device: str, quick: bool, ops, dtypes=None, vocabs=None) -> list[Shape]:
    """The sweep: vocab sizes, token counts, hidden sizes (linear) and dtypes, per op. `dtypes` and
    `vocabs`, when given, are exactly what is measured: the first of each is the base point the
    other sweeps run at."""
    cuda = device == "cuda"
    base_dtype = "bfloat16" if cuda else "float32"
    chosen_dtypes = bool(dtypes)
    dtypes = list(dtypes) if dtypes else ([base_dtype, "float32"] if cuda else [base_dtype, "bfloat16"])
    size = "cuda" if cuda else ("cpu-quick" if quick else "cpu")
    shapes: list[Shape] = []
    for op in ops:
        base, toks, hid = _SWEEPS[(size, "linear" if op == "linear" else "other")]
        if cuda and quick:
            toks, hid = toks[:-1], hid[:-1]
        extra_dtypes = dtypes[1:]
        if quick and op == "loss":  # the loss op costs what the logits op costs: vocab sweep only
            toks, extra_dtypes = [], extra_dtypes if chosen_dtypes else []
        if vocabs:
            base = (base[0], base[1], vocabs[0], base[3])
        pts = _sweep_points(op, dtypes[0], base, vocabs or VOCABS, toks, hid)
        S, T, V, H = base
        for dt in extra_dtypes:
            pts.append(Shape(op, dt, S, T, V, H if op == "linear" else 0, "dtype"))
        shapes += pts
    return shapes


def parse_shapes(text: str) -> list[Shape]:
    """"op:dtype:SxT:V[:H]" items, comma-separated (S = 2P sequences, even)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        parts = item.split(":")
        try:
            op, dtype, st, v = parts[:4]
            S, T = (int(x) for x in st.lower().split("x"))
            H = int(parts[4]) if len(parts) > 4 else 0
            V = int(v)
        except ValueError:
            raise ValueError(f"--shapes: cannot read {item!r}; expected op:dtype:SxT:V[:H]") from None
        if op not in OPS or dtype not in DTYPES:
            raise ValueError(f"--shapes: {item!r}: op must be one of {OPS} and dtype one of {DTYPES}")
        if S < 2 or S % 2 or T < 2 or V < 2 or (op == "linear") != (H > 0):
            raise ValueError(f"--shapes: {item!r}: need an even S >= 2, T >= 2, V >= 2, and H > 0 exactly for linear")
        out.append(Shape(op, dtype, S, T, V, H, "custom"))
    return out


# ================================================================ targets


@dataclasses.dataclass(frozen=True)
class Target:
    """One stated target: `metric` of `impl` on `shape`, held against `bound` (None: shown for context).

    `text` is formatted with {b} (the bound), {pct} (100 x the bound) and {grad} (the gradient's
    size), so each threshold is written once. Metrics (fwd+bwd rows):
      report       time and memory, no verdict
      time         time, no verdict (timing floors)
      time_vs      time(impl) / time(vs) <= b
      mem_vs       peak(impl) / peak(vs) <= b
      mem_vs_grad  peak(impl) <= b x the gradient
      mem_beyond   peak(impl) - the gradient <= b MiB
      pct_peak_bw  percent of the device's memory bandwidth >= b
      speedup      speed-up over the reference >= b
    optional: left out when `impl` did not run (a backend or peer absent from the machine).
    """

    text: str
    shape: Shape
    impl: str
    metric: str
    bound: float | None = None
    vs: str = "pytorch"
    optional: bool = False

    @property
    def name(self) -> str:
        b = self.bound
        return self.text.format(b=f"{b:g}" if b is not None else "", pct=f"{100 * b:g}" if b is not None else "",
                                grad=f"{grad_bytes(self.shape) / 1e9:.2f} GB")


def _cpu_targets() -> list[Target]:
    lg = Shape("logits", "float32", 8, 512, 128256, 0, "target")
    out = [
        Target("logits fp32 8x512 V=128256 fwd+bwd: PyTorch reference (stated ~4.4 s, ~6.0 GB)", lg, "pytorch",
               "report"),
        Target("logits: dpo_fast cpu time <= {b}x reference", lg, "dpo_fast:cpu", "time_vs", 0.4),
        Target("logits: dpo_fast cpu peak extra <= {b}x the gradient ({grad})", lg, "dpo_fast:cpu", "mem_vs_grad", 1.1),
        Target("logits: dpo_fast cpu inplace_backward peak extra near zero (<= {pct}% of the gradient)", lg,
               "dpo_fast:cpu+inplace", "mem_vs_grad", 0.05),
    ]
    for dt, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        ln = Shape("linear", dt, 4, 512, 128256, 1024, "target")
        p = "linear" if dt == "float32" else f"linear {short}"
        if dt == "float32":
            out += [
                Target("linear fp32 4x512 H=1024 V=128256 fwd+bwd: PyTorch reference (stated ~8.0 s, 2.55 GB)", ln,
                       "pytorch", "report"),
                Target("linear: dpo_fast peak extra <= {b}x the gradients dH + dW ({grad})", ln, "dpo_fast:cpu",
                       "mem_vs_grad", 1.25),
                Target("linear: dpo_fast time <= {b}x reference", ln, "dpo_fast:cpu", "time_vs", 1.25),
            ]
        else:
            out.append(Target(f"{p} 4x512 H=1024 V=128256 fwd+bwd: PyTorch reference", ln, "pytorch", "report"))
        out += [
            Target(f"{p}: dpo_fast time <= {{b}}x TRL's fused LM head", ln, "dpo_fast:cpu", "time_vs", 1.0, vs="trl",
                   optional=True),
            Target(f"{p}: dpo_fast peak extra <= {{b}}x TRL's", ln, "dpo_fast:cpu", "mem_vs", 1.0, vs="trl",
                   optional=True),
            Target(f"{p}: logits_memory_mb=600 time <= {{b}}x the O(tokens) path (3 GEMM passes, not 4)", ln,
                   "dpo_fast:cpu+budget600", "time_vs", 0.8, vs="dpo_fast:cpu", optional=True),
            Target(f"{p}: logits_memory_mb=600 peak extra <= the gradients + the budget ({{b}} MiB beyond them)", ln,
                   "dpo_fast:cpu+budget600", "mem_beyond", 600e6 / 2**20, optional=True),
            Target(f"{p}: 3-GEMM floor (6NHV FLOPs, logits kept), for context", ln, "gemm3", "time", optional=True),
            Target(f"{p}: 4-GEMM floor (8NHV FLOPs), for context", ln, "gemm4", "time", optional=True),
        ]
    return out


def _cuda_targets() -> list[Target]:
    out = []
    for dt in ("bfloat16", "float32"):
        lg = Shape("logits", dt, 8, 2048, 128256, 0, "target")
        for be in ("triton", "cuda"):
            out += [
                Target(f"logits {dt} 8x2048 V=128256 fwd+bwd, dpo_fast {be}: >= {{b}}% of HBM bandwidth (3 passes)",
                       lg, f"dpo_fast:{be}", "pct_peak_bw", 80, optional=True),
                Target(f"logits {dt} 8x2048 V=128256 fwd+bwd, dpo_fast {be}: >= {{b}}x the reference", lg,
                       f"dpo_fast:{be}", "speedup", 3, optional=True),
            ]
    ln = Shape("linear", "bfloat16", 8, 2048, 128256, 4096, "target")
    out += [
        Target("linear bf16 16384 tokens H=4096 V=128256: extra memory <= {b} MB beyond dH and dW", ln,
               "dpo_fast:triton", "mem_beyond", 64),
        Target("linear bf16: time <= {b}x four cuBLAS GEMMs (8NHV FLOPs)", ln, "dpo_fast:triton", "time_vs", 1.3,
               vs="gemm4"),
        Target("linear bf16: dpo_fast triton time against TRL's fused LM head, for context", ln, "dpo_fast:triton",
               "time_vs", vs="trl", optional=True),
        Target("linear bf16: 3-GEMM floor (6NHV FLOPs, logits kept), for context", ln, "gemm3", "time", optional=True),
    ]
    return out


TARGETS: dict[str, list[Target]] = {"cpu": _cpu_targets(), "cuda": _cuda_targets()}


def target_shapes(device: str) -> list[Shape]:
    """The distinct shapes the device's targets are stated on, in order."""
    seen: dict[tuple, Shape] = {}
    for t in TARGETS[device]:
        seen.setdefault(t.shape.key(), t.shape)
    return list(seen.values())


TARGET_SHAPES = {device: target_shapes(device) for device in TARGETS}


def _fmt_time(r) -> str:
    return "not run" if r is None else (f"{r['time_ms'] / 1e3:.2f} s" if r.get("time_ms") else r["status"])


def _fmt_mem(r) -> str:
    return "not run" if r is None or r.get("peak_mem_mb") is None else f"{r['peak_mem_mb'] / 1e3:.2f} GB"


def _judge(t: Target, r: dict | None, other: dict | None) -> tuple[str, bool | None]:
    """(what was measured, met?) of one target; met is None when it cannot be told."""
    b, g = t.bound, grad_bytes(t.shape)
    m = None if r is None else r.get("peak_mem_mb")
    checked = r is not None and bool(r.get("agrees"))  # memory of a wrong answer proves nothing
    if t.metric == "report":
        return f"{_fmt_time(r)}, {_fmt_mem(r)} extra", None
    if t.metric == "time":
        return _fmt_time(r), None
    if t.metric in ("time_vs", "mem_vs"):
        key, fmt = ("time_ms", _fmt_time) if t.metric == "time_vs" else ("peak_mem_mb", _fmt_mem)
        a, c = (None if x is None else x.get(key) for x in (r, other))
        ratio = a / c if a is not None and c else None
        if ratio is None:
            return fmt(r), None
        return f"{fmt(r)} vs {fmt(other)} = {ratio:.2f}x", (None if b is None else ratio <= b)
    if t.metric == "mem_vs_grad":
        if m is None:
            return _fmt_mem(r), None
        return f"{_fmt_mem(r)} = {m * MB / g:.{3 if b < 0.1 else 2}f}x", (m * MB <= b * g if checked else None)
    if t.metric == "mem_beyond":
        if m is None:
            return _fmt_mem(r), None
        return f"{(m * MB - g) / MB:.0f} MB beyond {g / MB:.0f} MB", (m * MB - g <= b * 2**20 if checked else None)
    if r is None:
        return "not run", None
    if t.metric == "pct_peak_bw":
        bw = r.get("pct_peak_bw")
        return (f"{bw}% ({r.get('gbps')} GB/s)", bw >= b) if bw is not None else (r["status"], None)
    if t.metric == "speedup":
        sp = r.get("speedup_vs_ref")
        return (f"{sp}x ({_fmt_time(r)} vs {_fmt_time(other)})", sp >= b) if sp else (r["status"], None)
    raise ValueError(f"target {t.text!r}: unknown metric {t.metric!r}")


def evaluate_targets(rows: list[dict], device: str) -> list[dict]:
    """Each stated target: the measured numbers and whether it is met (None: cannot tell)."""

    def pick(shape: Shape, impl: str) -> dict | None:
        for r in rows:
            if (r["op"], r["dtype"], r["tokens"], r["vocab"], r["implementation"], r["pass"]) == \
                    (shape.op, shape.dtype, shape.tokens, shape.vocab, impl, "fwd+bwd") and \
                    (shape.op != "linear" or r["hidden"] == shape.hidden):
                return r
        return None

    out = []
    for t in TARGETS[device]:
        r, other = pick(t.shape, t.impl), pick(t.shape, t.vs)
        if t.optional and (r is None or (t.metric == "time" and not r.get("time_ms"))
                           or (t.metric.endswith("_vs") and other is None)):
            continue
        measured, met = _judge(t, r, other)
        out.append({"target": t.name, "measured": measured, "met": met})
    return out
