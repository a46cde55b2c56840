"""GPU compile audit without a GPU: every kernel compiled for real targets, its resources read.

    python scripts/check_gpu_compile.py [--jobs N] [--targets 80,86,90,100] [--no-autotune] [--no-cuda]
                                        [--out DIR] [--readme]

Triton compiles ahead of time on any machine: each Triton kernel of the package is compiled
(triton.compile, GPUTarget("cuda", cc, 32)) for every variant the dispatcher can pick: kernel x
dtype (float32 with IEEE and TF32 products, bfloat16, float16, float64) x constexpr flags (bias,
soft-cap, the dW kernel's NEED_DW/NEED_DB) x the fixed tile config that
triton_linear.config_for returns for the target, plus (unless --no-autotune) each
DPO_FAST_AUTOTUNE config with every flag on (bfloat16 and float32; sm_80, sm_86, sm_90). The CUDA sources in csrc/ are compiled with
`nvcc -Xptxas -v` for sm_80 and sm_90a. Registers, stack (spills) and shared memory come from
cuobjdump --dump-resource-usage (Triton's bundled one) or the ptxas log; occupancy (blocks and
warps per SM) from each target's limits.

Writes DIR/results.csv and DIR/results.md (default benchmarks/results/gpu_compile/) and, with
--readme, the summary section of README.md. Exits 1 on a compile error, a spill or shared memory
beyond the target's limit in a shipped config, a spill in a shipped config on sm_80 / sm_90 (on
sm_86 / sm_100, which run those tiles untuned, a spill is a WARN row), or a shipped config below
2 blocks / 8 warps per SM on sm_80 / sm_90. An autotune config that fails is a warning, and must be pruned for that
target by triton_linear.autotune_configs (the script says which).
Nothing is cached across runs: Triton's cache goes to a fresh temporary folder.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "gpu_compile"


@dataclass(frozen=True)
class Target:
    """Per-SM limits of a compute capability (CUDA programming guide, table of technical specs)."""
    cc: int
    smem_per_sm: int
    smem_per_block: int  # the opt-in maximum of one block
    max_warps: int
    max_blocks: int
    regs_per_sm: int = 65536
    max_regs: int = 255
    gate: bool = True  # shipped configs must reach 2 blocks or 8 warps per SM here

    @property
    def name(self) -> str:
        return f"sm_{self.cc}"


TARGETS = {
    80: Target(80, 167936, 166912, 64, 32),
    86: Target(86, 102400, 101376, 48, 16, gate=False),
    90: Target(90, 233472, 232448, 64, 32),
    100: Target(100, 233472, 232448, 64, 32, gate=False),
}
NVCC_ARCHS = {"sm_80": 80, "sm_90a": 90}

# Representative scalar arguments (Llama-3-like: V = 128256, H = 4096, an unaligned row count):
# Triton specializes ints on == 1 and on divisibility by 16, so these pick the code a GPU gets.
INT_ARGS = dict(M=4001, V=128256, V_END=128256, HD=4096, v_per_split=8192, v_lo=0, stride_hn=4096,
                stride_hh=1, stride_wv=4096, stride_wh=1, stride_dwv=4096, stride_dwh=1,
                T=1023, stride_s=1023 * 128256, stride_t=128256, gstride_s=1023 * 128256, gstride_t=128256)
TL_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


@dataclass
class Variant:
    family: str  # "linear" or "rows"
    kernel: str
    dtype: str
    flags: dict
    config: tuple  # (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) or (BLOCK, num_warps)
    cc: int
    shipped: bool
    result: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        names = {"HAS_BIAS": "bias", "HAS_SOFTCAP": "softcap", "NEED_DW": "dW", "NEED_DB": "db"}
        on = [names[k] for k, v in self.flags.items() if v is True and k in names]
        prec = "tf32" if self.flags.get("PREC") == "tf32" else ""
        return " ".join([self.dtype] + ([prec] if prec else []) + [k.lower() for k in on])

    @property
    def num_warps(self) -> int:
        return self.config[3] if self.family == "linear" else self.config[1]


# ---------------------------------------------------------------- variants


def _linear_flag_sets(kernel: str):
    for bias in (False, True):
        for cap in (False, True):
            if kernel != "dw":
                yield dict(HAS_BIAS=bias, HAS_SOFTCAP=cap)
                continue
            # db exists only with a bias; a call needs dW or db.
            for need_dw, need_db in ((True, True), (True, False), (False, True)) if bias else ((True, False),):
                yield dict(HAS_BIAS=bias, HAS_SOFTCAP=cap, NEED_DW=need_dw, NEED_DB=need_db)


def variants(ccs, autotune: bool) -> list[Variant]:
    import torch

    from dpo_fast.kernels import triton_linear, triton_rows
    out = []
    for cc in ccs:
        capability = (cc // 10, cc % 10)
        for kernel in triton_linear.KERNELS:
            for dtype in TL_TYPES:
                precs = (False, True) if dtype == "float32" else (False,)
                for tf32 in precs:
                    for flags in _linear_flag_sets(kernel):
                        consts = triton_linear.kernel_constants(getattr(torch, dtype), flags["HAS_BIAS"],
                                                                flags["HAS_SOFTCAP"], on_gpu=True, tf32=tf32)
                        flags = {**consts, **flags, "ACC": None}
                        cfg = triton_linear.config_for(kernel, getattr(torch, dtype), capability)
                        out.append(Variant("linear", kernel, dtype, flags, tuple(cfg), cc, True))
                    # Autotune candidates: bfloat16 stands for float16 (same tile bytes, same code
                    # but for the conversions), float64 is never autotuned, sm_100 has sm_90's limits.
                    if not autotune or tf32 or dtype not in ("bfloat16", "float32") or cc == 100:
                        continue
                    full = list(_linear_flag_sets(kernel))[-1 if kernel != "dw" else -3]
                    consts = triton_linear.kernel_constants(getattr(torch, dtype), True, True, on_gpu=True, tf32=False)
                    for cfg in triton_linear.autotune_configs(getattr(torch, dtype), capability, pruned=False):
                        out.append(Variant("linear", kernel, dtype, {**consts, **full, "ACC": None}, tuple(cfg),
                                           cc, False))
        for kernel in triton_rows.KERNELS:
            for dtype in TL_TYPES:
                cfg = (triton_rows.block_for(kernel, INT_ARGS["V"]), triton_rows.NUM_WARPS)
                flags = {"ROUND_BF16": False} if kernel == "token_grad" else {}
                out.append(Variant("rows", kernel, dtype, flags, cfg, cc, True))
    return out


# ---------------------------------------------------------------- compiling one Triton variant


def _signature(fn, v: Variant):
    """(signature, constexprs, attrs) for triton.compile, as a launch on a GPU would specialize."""
    import triton.language as tl
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    inp = TL_TYPES[v.dtype]
    acc = "fp64" if v.dtype == "float64" else "fp32"
    consts = {k: val for k, val in v.flags.items()}
    if "ACC" in consts or v.family == "rows":
        consts["ACC"] = tl.float64 if acc == "fp64" else tl.float32
    if v.family == "linear":
        consts.update(BLOCK_N=v.config[0], BLOCK_V=v.config[1], BLOCK_H=v.config[2])
    else:
        consts["BLOCK"] = v.config[0]
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name in ("rows_ptr", "tgt_ptr", "targets_ptr"):
                ty = "i64"
            elif name in ("h_ptr", "w_ptr", "b_ptr", "logits_ptr", "grad_ptr"):
                ty = inp
            else:
                ty = acc
            sig[name] = "*" + ty
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "softcap":
            sig[name] = "fp32"
        else:
            ty, spec = native_specialize_impl(BaseBackend, INT_ARGS[name], False, True, True)
            if ty == "constexpr":
                sig[name] = "constexpr"
                consts[name] = spec
            else:
                sig[name] = ty
                if spec == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _cuobjdump() -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else (shutil.which("cuobjdump") or "cuobjdump")


def compile_variant(v: Variant) -> dict:
    """Compile one variant; {"registers", "spill_bytes", "shared_bytes", "seconds"} or {"error"}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dpo_fast.kernels import triton_linear, triton_rows
    fn = (triton_linear.KERNELS if v.family == "linear" else triton_rows.KERNELS)[v.kernel]
    t0 = time.perf_counter()
    try:
        sig, consts, attrs = _signature(fn, v)
        opts = dict(num_warps=v.num_warps)
        if v.family == "linear":
            opts["num_stages"] = v.config[4]
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", v.cc, 32), options=opts)
    except Exception as e:  # noqa: BLE001 - any compiler failure is a result to report
        msg = " | ".join(x.strip() for x in str(e).splitlines() if x.strip().strip("^"))
        return {"error": f"{type(e).__name__}: {msg}"[-300:]}
    seconds = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", dump.stdout)
    if not m:
        return {"error": f"cuobjdump gave no resource line: {dump.stderr.strip()[:200]}"}
    regs, stack, static_smem, local = map(int, m.groups())
    return {"registers": regs, "spill_bytes": stack + local, "shared_bytes": static_smem + k.metadata.shared,
            "seconds": round(seconds, 2)}


# ---------------------------------------------------------------- CUDA sources


def compile_cuda(nvcc: str) -> list[dict]:
    """Per (kernel instantiation, arch): registers, spills, shared memory from `nvcc -Xptxas -v`."""
    rows = []
    for src in sorted((ROOT / "csrc").rglob("*.cu")):
        for arch, cc in NVCC_ARCHS.items():
            cmd = [nvcc, "-std=c++17", "-c", str(src), f"-I{ROOT / 'csrc'}", f"-arch={arch}", "-Xptxas", "-v",
                   "-o", os.devnull]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                rows.append({"kernel": src.name, "variant": "", "cc": cc, "error": p.stderr.strip()[-300:]})
                continue
            rows += _parse_ptxas(p.stderr, src.name, cc, time.perf_counter() - t0)
    return rows


def _parse_ptxas(log: str, src: str, cc: int, seconds: float) -> list[dict]:
    out, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = {"mangled": m.group(1), "spill_bytes": 0, "shared_bytes": 0}
            out.append(cur)
        elif cur is not None:
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m:
                cur["spill_bytes"] = int(m.group(2))
                cur["stack_bytes"] = int(m.group(1))
            m = re.search(r"Used (\d+) registers", line)
            if m:
                cur["registers"] = int(m.group(1))
                s = re.search(r"(\d+) bytes smem", line)
                cur["shared_bytes"] = int(s.group(1)) if s else 0
    names = subprocess.run(["c++filt"], input="\n".join(r["mangled"] for r in out), capture_output=True,
                           text=True).stdout.splitlines() if out else []
    rows = []
    for r, name in zip(out, names):
        # dpo_fast::cuda::(anon)::token_grad_kernel<float, 32, 256>(...): the block size is the last
        # template argument (__launch_bounds__(BLOCK)).
        m = re.search(r"(\w+)<(.*)>\(", name)
        kernel, targs = (m.group(1), [a.strip() for a in m.group(2).split(",")]) if m else (name, [])
        rows.append({"kernel": f"{kernel} ({src})", "variant": " ".join(targs), "cc": cc,
                     "threads": int(targs[-1]) if targs and targs[-1].isdigit() else 0,
                     "registers": r.get("registers", 0), "spill_bytes": r["spill_bytes"],
                     "shared_bytes": r["shared_bytes"], "seconds": round(seconds / max(1, len(out)), 2)})
    return rows


# ---------------------------------------------------------------- occupancy and verdicts


def occupancy(t: Target, regs: int, smem: int, warps: int) -> tuple[int, str]:
    """(resident blocks per SM, the limiting resource), with the hardware's allocation granularity
    (registers per warp in units of 256, 1 KB of shared memory reserved per block)."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits = {"warps": t.max_warps // warps, "blocks": t.max_blocks,
              "registers": (t.regs_per_sm // regs_per_warp) // warps}
    if smem:
        limits["shared memory"] = t.smem_per_sm // (smem + 1024)
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def verdict(t: Target, r: dict, warps: int, shipped: bool) -> tuple[str, str]:
    """('ok' | 'FAIL' | 'pruned', why) for one compiled variant."""
    if "error" in r:
        return ("FAIL" if shipped else "pruned"), r["error"]
    problems = []
    if r["shared_bytes"] > t.smem_per_block:
        problems.append(f"shared memory {r['shared_bytes']} B > {t.smem_per_block} B per block")
    if shipped and t.gate and r["spill_bytes"]:
        problems.append(f"spills {r['spill_bytes']} B")
    if shipped and t.gate and r["blocks"] < 2 and r["blocks"] * warps < 8:
        problems.append(f"{r['blocks']} block(s) of {warps} warps per SM ({r['limiter']})")
    if not problems and shipped and r["spill_bytes"]:
        # sm_86 / sm_100 run the sm_80 / sm_90 tiles, not tuned for them yet: reported, not gated
        return "WARN", f"spills {r['spill_bytes']} B (target not gated yet)"
    if not problems:
        return "ok", ""
    return ("FAIL" if shipped else "pruned"), "; ".join(problems)


def _finish(t: Target, r: dict, warps: int, shipped: bool) -> dict:
    if "error" not in r:
        r["blocks"], r["limiter"] = occupancy(t, r["registers"], r["shared_bytes"], warps)
        r["warps_per_sm"] = r["blocks"] * warps
    r["status"], r["why"] = verdict(t, r, warps, shipped)
    return r


# ---------------------------------------------------------------- reports

COLUMNS = ["kernel", "variant", "target", "config", "shipped", "registers", "spill_bytes", "shared_bytes",
           "blocks_per_sm", "warps_per_sm", "limiter", "status", "why", "compile_s"]


def _row(kernel, variant, target, config, shipped, r) -> dict:
    return dict(kernel=kernel, variant=variant, target=target, config=config, shipped=shipped,
                registers=r.get("registers", ""), spill_bytes=r.get("spill_bytes", ""),
                shared_bytes=r.get("shared_bytes", ""), blocks_per_sm=r.get("blocks", ""),
                warps_per_sm=r.get("warps_per_sm", ""), limiter=r.get("limiter", ""), status=r["status"],
                why=r["why"], compile_s=r.get("seconds", ""))


def _config_text(v: Variant) -> str:
    if v.family == "linear":
        n, vv, h, w, s = v.config
        return f"N{n} V{vv} H{h} w{w} s{s}"
    return f"BLOCK{v.config[0]} w{v.config[1]}"


def write_reports(rows: list[dict], out: Path, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    cols = [c for c in COLUMNS if c not in ("why", "compile_s")]
    lines = [f"# GPU compile audit\n\n{header}\n", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        status = r["status"] + (f" ({r['why']})" if r["why"] else "")
        lines.append("| " + " | ".join(str(status if c == "status" else r[c]) for c in cols) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def summary(rows: list[dict]) -> str:
    """Per (kernel, target), shipped variants only: the worst registers / spills / shared memory
    and the fewest blocks per SM."""
    groups: dict = {}
    for r in rows:
        if r["shipped"] == "yes" and r["registers"] != "":
            groups.setdefault((r["kernel"], r["target"]), []).append(r)
    lines = ["| kernel | target | variants | registers (max) | spill bytes (max) | shared memory (max) |"
             " blocks/SM (min) | warps/SM (min) |", "|---|---|---|---|---|---|---|---|"]
    for (kernel, target), rs in groups.items():
        lines.append(f"| {kernel} | {target} | {len(rs)} | {max(r['registers'] for r in rs)} | "
                     f"{max(r['spill_bytes'] for r in rs)} | {max(r['shared_bytes'] for r in rs)} | "
                     f"{min(r['blocks_per_sm'] for r in rs)} | {min(r['warps_per_sm'] for r in rs)} |")
    return "\n".join(lines)


def update_readme(text: str) -> None:
    from dpo_fast_tools.bench import replace_readme_section

    try:
        replace_readme_section(ROOT / "README.md", "<!-- gpu-compile:begin -->", "<!-- gpu-compile:end -->", text)
    except ValueError as e:
        raise SystemExit(f"check_gpu_compile: {e}") from None


# ---------------------------------------------------------------- main


def _triton_rows(args, ccs) -> tuple[list[dict], list[Variant]]:
    vs = variants(ccs, autotune=not args.no_autotune)
    # Heaviest first, so the last worker is not left with one slow compile.
    order = sorted(range(len(vs)), key=lambda i: (vs[i].family != "linear", vs[i].cc != 100))
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        results = dict(zip(order, pool.map(compile_variant, [vs[i] for i in order])))
    rows = []
    for i, v in enumerate(vs):
        r = _finish(TARGETS[v.cc], results[i], v.num_warps, v.shipped)
        v.result = r
        rows.append(_row(v.kernel, v.label, TARGETS[v.cc].name, _config_text(v), "yes" if v.shipped else "autotune",
                         r))
    return rows, vs


def _cuda_rows(args) -> list[dict]:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists() and not shutil.which(nvcc):
        print("check_gpu_compile: nvcc not found: CUDA sources not audited", file=sys.stderr)
        return []
    rows = []
    for r in compile_cuda(nvcc):
        t = TARGETS[r["cc"]]
        warps = max(1, r.get("threads", 32) // 32)
        r = _finish(t, r, warps, shipped=True)
        rows.append(_row(r["kernel"], r["variant"], "sm_90a" if r["cc"] == 90 else t.name,
                         f"{r.get('threads', '?')} threads", "yes", r))
    return rows


def _prune_advice(vs: list[Variant]) -> list[str]:
    """Autotune configs that fail on a target but are still offered there by the package."""
    import torch

    from dpo_fast.kernels import triton_linear
    notes = set()
    for v in vs:
        if v.shipped or v.result["status"] != "pruned":
            continue
        offered = triton_linear.autotune_configs(getattr(torch, v.dtype), (v.cc // 10, v.cc % 10))
        if triton_linear.TileConfig(*v.config) in offered:
            notes.add(f"autotune config {v.config} ({v.kernel}, {v.dtype}, {TARGETS[v.cc].name}): "
                      f"{v.result['why']}; not pruned by triton_linear.autotune_configs")
    return sorted(notes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all cores)")
    ap.add_argument("--targets", default="80,86,90,100", help="compute capabilities, from: 80,86,90,100")
    ap.add_argument("--no-autotune", action="store_true", help="skip the DPO_FAST_AUTOTUNE configs")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc audit of csrc/")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--readme", action="store_true", help="also rewrite README.md's summary section")
    args = ap.parse_args()
    try:
        ccs = [int(c) for c in args.targets.split(",")]
    except ValueError:
        ap.error(f"--targets: expected comma-separated integers, got {args.targets!r}")
    if bad := [c for c in ccs if c not in TARGETS]:
        ap.error(f"--targets: unknown compute capability {bad[0]} (known: {', '.join(map(str, TARGETS))})")
    if args.jobs < 1:
        ap.error("--jobs: must be >= 1")

    t0 = time.perf_counter()
    rows, vs = _triton_rows(args, ccs)
    if not args.no_cuda:
        rows += _cuda_rows(args)
    elapsed = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime  # the compile workers and their ptxas / nvcc runs

    import triton
    fails = [r for r in rows if r["status"] == "FAIL"]
    header = (f"Triton {triton.__version__}; {len(rows)} variants ({sum(r['shipped'] == 'yes' for r in rows)} "
              f"shipped); {elapsed:.0f} s wall with {args.jobs} parallel compiles, {cpu:.0f} CPU-s. Written by "
              "`python scripts/check_gpu_compile.py`. Spill bytes: the stack frame (Triton: cuobjdump; "
              "CUDA: ptxas spill stores). Occupancy from registers, shared memory and warps per SM.")
    write_reports(rows, args.out, header)
    table = summary(rows)
    if args.readme:
        update_readme(table + f"\n\nFull table: [benchmarks/results/gpu_compile/results.md]"
                      "(benchmarks/results/gpu_compile/results.md).")
    print(table)
    for note in _prune_advice(vs):
        print("WARNING:", note, file=sys.stderr)
    for r in fails:
        print(f"FAIL: {r['kernel']} [{r['variant']}] {r['target']} {r['config']}: {r['why']}", file=sys.stderr)
    print(f"check_gpu_compile: {len(rows)} variants, {len(fails)} failing, {elapsed:.0f} s wall, {cpu:.0f} CPU-s "
          f"-> {args.out}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the package of this checkout, not an installed one
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="dpo_fast_gpu_compile_")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a launch gets by default in Triton 3.9
    try:
        sys.exit(main())
    finally:
        shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
