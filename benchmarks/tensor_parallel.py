"""The DPO loss from hidden states under tensor parallelism (CPU, gloo ranks), side by side:

  one_process     dpo_fast.loss(hidden=, weight=) on the whole weight, one process, no communication
  gather_weight   each rank gathers the weight, weight.full_tensor() (what TRL's fused lm_head does
                  with a sharded weight), then the same single-device fused op
  vocab_parallel  dpo_fast.loss(hidden=, weight=<DTensor Shard(0)>): each rank its own rows only

Per rank: peak RSS growth of one forward + backward beyond the inputs (every approach in fresh
processes), median wall time of a step over --repeats, and the bytes each rank receives through
collectives per step (an all-gather: the other ranks' pieces; an all-reduce: the tensor's size,
which a ring moves about twice of). The weight's shards are made on each rank without ever
building the whole weight. Outputs are checked first: every approach's loss, dH and each rank's
dW rows against one_process.

    python benchmarks/tensor_parallel.py                  # small, a quick check: 1024 tokens, H=512, V=32000
    python benchmarks/tensor_parallel.py --tokens 4x512 --hidden 1024 --vocab 128256 --dtype bfloat16

Writes benchmarks/results/cpu/tensor_parallel/{results.md,results.csv} (or --output-dir).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

APPROACHES = ("one_process", "gather_weight", "vocab_parallel")
BLOCK = 4096  # weight rows generated per seed: every rank makes its own rows only
MB = 1e6


# ---------------------------------------------------------------- inputs


def weight_rows(v0: int, v1: int, H: int, dtype) -> torch.Tensor:
    """Rows [v0, v1) of the benchmark's (V, H) weight, the same whichever rank makes them."""
    out = torch.empty(v1 - v0, H, dtype=dtype)
    for b in range(v0 // BLOCK, -(-v1 // BLOCK)):
        g = torch.Generator().manual_seed(1000 + b)
        block = torch.randn(BLOCK, H, generator=g) * (2.0 / H ** 0.5)
        lo, hi = max(v0, b * BLOCK), min(v1, (b + 1) * BLOCK)
        out[lo - v0:hi - v0] = block[lo - b * BLOCK:hi - b * BLOCK]
    return out


def batch(S: int, T: int, H: int, V: int, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(S, T, H, generator=g).to(dtype)
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[:, : T // 4] = -100  # a prompt
    P = S // 2
    return hidden, labels, (torch.randn(P, generator=g) - 50.0, torch.randn(P, generator=g) - 50.0)


# ---------------------------------------------------------------- measuring


class Received:
    """Bytes this rank receives through collectives: dist.* calls (the vocab-parallel op and its
    checks) and DTensor's functional collectives (full_tensor), counted once each."""

    def __init__(self, world: int):
        import torch.distributed as dist
        from torch.utils._python_dispatch import TorchDispatchMode
        self.dist, self.world, self.bytes = dist, world, 0
        self.orig = {n: getattr(dist, n) for n in ("all_gather_single", "all_reduce")}
        counter = self

        class Funcol(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if str(func).startswith("_c10d_functional.all_gather_into_tensor"):
                    counter.bytes += (counter.world - 1) * args[0].numel() * args[0].element_size()
                elif str(func).startswith("_c10d_functional.all_reduce"):
                    counter.bytes += args[0].numel() * args[0].element_size()
                return func(*args, **(kwargs or {}))

        self.mode = Funcol()

    def __enter__(self):
        def gather(out, inp, *a, **k):
            self.bytes += (self.world - 1) * inp.numel() * inp.element_size()
            return self.orig["all_gather_single"](out, inp, *a, **k)

        def reduce(t, *a, **k):
            self.bytes += t.numel() * t.element_size()
            return self.orig["all_reduce"](t, *a, **k)
        self.dist.all_gather_single, self.dist.all_reduce = gather, reduce
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for n, f in self.orig.items():
            setattr(self.dist, n, f)


def rank_main(rank: int, world: int, approach: str, cfg: dict, store: str, out: str) -> None:
    import torch.distributed as dist

    import dpo_fast
    from dpo_fast_tools.bench import CpuMeter
    torch.set_num_threads(cfg["threads"])
    dtype = getattr(torch, cfg["dtype"])
    S, T, H, V = cfg["S"], cfg["T"], cfg["H"], cfg["V"]
    if approach not in ("one_process", "truth64"):
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)

    def inputs(S, T, V):
        hidden, labels, ref = batch(S, T, H, V, dtype)
        if approach == "truth64":  # the same values, computed in float64: what the others are checked against
            return (hidden.double().requires_grad_(True), weight_rows(0, V, H, dtype).double().requires_grad_(True),
                    labels, ref)
        if approach == "one_process":
            return hidden.requires_grad_(True), weight_rows(0, V, H, dtype).requires_grad_(True), labels, ref
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard
        per = -(-V // world)  # torch.chunk's split, as Shard(0) makes it
        v0, v1 = min(rank * per, V), min((rank + 1) * per, V)
        weight = DTensor.from_local(weight_rows(v0, v1, H, dtype), init_device_mesh("cpu", (world,)), [Shard(0)],
                                    shape=(V, H), stride=(H, 1), run_check=False)
        return hidden.requires_grad_(True), torch.nn.Parameter(weight), labels, ref

    def step(hidden, weight, labels, ref):
        w = weight.full_tensor() if approach == "gather_weight" else weight
        res = dpo_fast.loss(hidden=hidden, weight=w, labels=labels, ref_chosen_logps=ref[0],
                            ref_rejected_logps=ref[1])
        res.loss.backward()
        return res.loss.detach()

    if approach == "truth64":  # values only: no warm-up, memory or time
        hidden, leaf, labels, ref = args = inputs(S, T, V)
        loss = step(*args)
        torch.save(dict(loss=loss, hidden_grad=hidden.grad, weight_grad=leaf.grad, rows=V),
                   os.path.join(out, f"{approach}_rank{rank}.pt"))
        return
    # Warm-up on a tiny problem (libraries, thread pools, gloo buffers): a step on the real
    # weight would leave its freed buffers resident and hide the next step's peak.
    step(*inputs(2, 8, 4 * world))
    hidden, leaf, labels, ref = args = inputs(S, T, V)

    def fresh():
        hidden.grad = leaf.grad = None
        gc.collect()
        if world > 1:
            dist.barrier()

    fresh()
    meter = CpuMeter()
    meter.start()
    with Received(world) as recv:
        loss = step(*args)
    peak = meter.window()
    grads = (hidden.grad.clone(), leaf.grad.to_local().clone() if approach != "one_process" else leaf.grad.clone())
    times = []
    for _ in range(cfg["repeats"]):
        fresh()
        t0 = time.perf_counter()
        step(*args)
        times.append(time.perf_counter() - t0)
    torch.save(dict(loss=loss, hidden_grad=grads[0], weight_grad=grads[1], peak=peak, received=recv.bytes,
                    time=statistics.median(times), rows=grads[1].shape[0]),
               os.path.join(out, f"{approach}_rank{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------- driver


def run_approach(approach: str, world: int, cfg: dict, tmp: str) -> list[dict]:
    import torch.multiprocessing as mp
    n = 1 if approach in ("one_process", "truth64") else world
    store = os.path.join(tmp, f"store_{approach}")
    mp.spawn(rank_main, args=(n, approach, cfg, store, tmp), nprocs=n)
    return [torch.load(os.path.join(tmp, f"{approach}_rank{r}.pt")) for r in range(n)]


def check(results: dict, truth: dict) -> list[str]:
    """Every approach's loss, dH and dW rows against the float64 truth of the same inputs: the error
    may be at most 2x the one-process op's own (summed log-probs of hundreds of tokens carry float32
    rounding that depends on the summation order, so the approaches are not compared bit for bit).
    Returns the disagreements."""
    def err(x, want):
        return ((x.double() - want).abs().max() / want.abs().max().clamp(min=1e-300)).item()

    base = results["one_process"][0]
    bad = []
    for name, ranks in results.items():
        v0 = 0
        for r, got in enumerate(ranks):
            for key in ("loss", "hidden_grad", "weight_grad"):
                want = truth[key] if key != "weight_grad" else truth[key][v0:v0 + got["rows"]]
                mine = base[key] if key != "weight_grad" else base[key][v0:v0 + got["rows"]]
                e, e_base = err(got[key], want), err(mine, want)
                if not (e <= 2 * e_base + 1e-7 and e_base < 1e-3):
                    bad.append(f"{name} rank {r} {key}: error {e:.3g} against float64, one process {e_base:.3g}")
            v0 += got["rows"]
    return bad


def report(results: dict, cfg: dict, world: int, command: str, load: tuple) -> tuple[list[dict], str]:
    from dpo_fast_tools.bench import environment
    env = environment("cpu")
    S, T, H, V = cfg["S"], cfg["T"], cfg["H"], cfg["V"]
    elt = torch.finfo(getattr(torch, cfg["dtype"])).bits // 8
    rows = []
    for name, ranks in results.items():
        rows.append(dict(approach=name, ranks=len(ranks), time_s=max(r["time"] for r in ranks),
                         peak_mb=max(r["peak"] for r in ranks) / MB,
                         received_mb=max(r["received"] for r in ranks) / MB,
                         weight_rows=max(r["rows"] for r in ranks)))
    lines = [
        "# Vocab-parallel fused DPO loss: per-rank memory, time and communication (cpu, gloo)",
        "",
        f"Measured on **{env['device_name']}**, {cfg['threads']} thread(s) per rank, on "
        f"{datetime.date.today()}; torch {env['torch']}, dpo_fast {env['dpo_fast']}, Python {env['python']}.",
        f"1-minute load average before / after: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} cores"
        + (" (above the core count: other work competed for the CPU, times are inflated)."
           if max(load) > (os.cpu_count() or 1) else "."),
        "",
        f"Command: `{command}`",
        "",
        f"Shape: {S}x{T} tokens ({S // 2} pairs), H = {H}, V = {V}, {cfg['dtype']}, {world} ranks; "
        f"the whole weight is {V * H * elt / MB:.1f} MB, the whole logits {S * T * V * 4 / MB:.1f} MB in float32. "
        f"Step = forward + backward of the sigmoid DPO loss; time: median of {cfg['repeats']}, slowest rank; "
        "peak: RSS growth beyond the inputs, largest rank; received: bytes per rank per step through "
        "collectives. Outputs checked against a float64 computation of the same inputs (loss, dH, each "
        "rank's dW rows): every approach's error is at most 2x one_process's.",
        "",
        "| approach | ranks | weight rows per rank | step time (s) | peak per rank (MB) | received per rank (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['approach']} | {r['ranks']} | {r['weight_rows']} | {r['time_s']:.3f} | "
                     f"{r['peak_mb']:.1f} | {r['received_mb']:.3f} |")
    return rows, "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="4x256", help="SxT: S sequences (chosen then rejected) of T tokens")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--world", type=int, default=2, help="tensor-parallel ranks")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (and for one_process)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output-dir", default=os.path.join(HERE, "results", "cpu", "tensor_parallel"))
    a = ap.parse_args(argv)
    S, T = (int(x) for x in a.tokens.lower().split("x"))
    if S % 2 or S < 2:
        ap.error("--tokens: S must be even (P chosen sequences, then P rejected)")
    cfg = dict(S=S, T=T, H=a.hidden, V=a.vocab, dtype=a.dtype, threads=a.threads, repeats=a.repeats)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    # A fixed glibc mmap threshold (the ranks inherit it): every buffer over 128 KiB is its own
    # mapping, returned on free, so the RSS high-water mark is the step's peak of live buffers.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    command = "python benchmarks/tensor_parallel.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run_approach(name, a.world, cfg, tmp) for name in APPROACHES}
        truth = run_approach("truth64", a.world, cfg, tmp)[0]
    load1 = os.getloadavg()[0]
    bad = check(results, truth)
    if bad:
        print("outputs disagree, nothing written:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    rows, md = report(results, cfg, a.world, command.strip(), (load0, load1))
    os.makedirs(a.output_dir, exist_ok=True)
    with open(os.path.join(a.output_dir, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.output_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(cfg))
        w.writeheader()
        for r in rows:
            w.writerow({**r, **cfg})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
