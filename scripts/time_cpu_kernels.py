"""Ad-hoc timing of the compiled CPU kernels (dpo_fast._C): token_stats then token_grad.

    python scripts/time_cpu_kernels.py [--S 8 --T 512 --V 128256 --dtype float32 --repeat 3 --reference]

Cases (each repeated, min and median reported; the cases are interleaved so that load from
other processes hits them alike):
  stats            token_stats
  grad_fresh       token_grad into a new torch.empty_like buffer (first-touch page faults included)
  grad_touched     token_grad into an already written buffer
  grad_inplace     token_grad with grad = logits (in-place backward)
  reference        PyTorch log_softmax(float32) + gather + backward (with --reference)
The project's benchmarks/ hold the side-by-side measurements; this is a quick kernel check.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dpo_fast._C as _C  # noqa: F401  (registers torch.ops.dpo_fast_C)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=8)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--V", type=int, default=128256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reference", action="store_true", help="also time PyTorch log_softmax+gather+backward")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    op = torch.ops.dpo_fast_C
    print(f"cpu_capability={_C.cpu_capability()} threads={torch.get_num_threads()} "
          f"S={a.S} T={a.T} V={a.V} dtype={a.dtype} torch={torch.__version__}")
    torch.manual_seed(0)
    logits = (torch.randn(a.S, a.T, a.V) * 2).to(dtype)
    targets = torch.randint(0, a.V, (a.S, a.T))
    g = torch.randn(a.S, a.T, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    touched = torch.zeros_like(logits)
    work = logits.clone()
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    for _ in range(a.repeat):
        lse, _, _ = timed("stats", lambda: op.token_stats(logits, targets))

        def fresh():
            buf = torch.empty_like(logits)
            op.token_grad(logits, targets, lse, g, buf)
            return buf

        fresh_out = timed("grad_fresh", fresh)
        timed("grad_touched", lambda: op.token_grad(logits, targets, lse, g, touched))
        assert torch.equal(fresh_out, touched)
        del fresh_out
        timed("grad_inplace", lambda: op.token_grad(work, targets, lse, g, work))
        assert torch.equal(work, touched)
        work.copy_(logits)
        if a.reference:
            def reference():
                x = logits.detach().requires_grad_(True)
                lp = torch.log_softmax(x.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
                (lp * g.float()).sum().backward()
                return x.grad

            timed("reference", reference)

    for name, v in times.items():
        print(f"{name:13s} min {min(v):6.3f} s  median {statistics.median(v):6.3f} s  "
              f"all {' '.join(f'{x:.3f}' for x in v)}")
    s, f, t, i = (min(times[k]) for k in ("stats", "grad_fresh", "grad_touched", "grad_inplace"))
    print(f"stats + grad: fresh buffer {s + f:.3f} s | touched buffer {s + t:.3f} s | "
          f"in-place {s + i:.3f} s (min times)")


if __name__ == "__main__":
    main()
