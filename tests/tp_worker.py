"""Ranks of the vocab-parallel tests: `python tests/tp_worker.py WORLD OUT_DIR` starts WORLD gloo
processes (file rendezvous: no ports to pick), each runs every case of its world size and saves
what it saw to OUT_DIR/rank{r}.pt; tests/ops/test_vocab_parallel.py compares that with the
single-process op, which it runs itself on the same inputs (`make_case`). A case that raises
records the error: the bad-input cases expect one on every rank. After each bad-input case the
ranks run a small good call, which hangs (and the faulthandler fires) if any rank was left behind.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import traceback
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's dpo_fast
if not torch.cuda.is_available():  # as tests/conftest.py: the Triton backend through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

# (name, world sizes, kind, options): kind picks the call, options the inputs.
CASES = [
    ("padded_f64", (2, 4), "loss", dict(V=29)),
    ("padded_f64_cap_bias", (2, 4), "loss", dict(V=29, cap=3.0, bias=True)),
    ("padded_f32_cap", (2,), "loss", dict(V=29, cap=3.0, dtype=torch.float32)),
    ("padded_bf16_cap_bias", (2,), "loss", dict(V=29, cap=3.0, bias=True, dtype=torch.bfloat16)),
    ("packed_f64_cap", (2,), "loss", dict(V=31, cap=3.0, packed=True)),
    ("explicit_reversed_bias", (2, 4), "loss", dict(V=29, cap=3.0, bias=True, explicit=True)),
    ("tiny_vocab_empty_shard", (4,), "loss", dict(V=3, bias=True)),
    ("logprobs_f64_cap_bias", (2,), "logprobs", dict(V=29, cap=3.0, bias=True)),
    ("packed_logprobs_explicit", (2,), "logprobs", dict(V=31, packed=True, explicit=True)),
    ("mesh_2d_named", (2,), "loss", dict(V=29, mesh_2d=True)),
    ("reference_pass_no_grad", (2,), "no_grad", dict(V=29, cap=3.0)),
    ("backend_reference", (2,), "loss", dict(V=29, cap=3.0, bias=True, backend="reference")),
    ("backend_triton", (2,), "loss", dict(V=29, cap=3.0, bias=True, backend="triton", S=4, T=5)),
    ("hf_tp_plan", (2,), "hf", dict()),
    ("memory", (2,), "memory", dict(V=32767, H=64, S=4, T=33, dtype=torch.float32)),
    ("bad_shard_dim", (2, 4), "bad", dict(V=29, bad="shard_dim")),
    ("bad_mesh_2d", (2,), "bad", dict(V=29, bad="mesh_2d", mesh_2d=True)),
    ("bad_hidden_shape", (2, 4), "bad", dict(V=29, bad="hidden_shape")),
    ("bad_label", (2, 4), "bad", dict(V=29, bad="label")),
    ("bad_labels_one_rank", (2,), "bad", dict(V=29, bad="labels_one_rank")),
    ("bad_dtype_one_rank", (2,), "bad", dict(V=29, bad="dtype_one_rank")),
    ("bad_tiling", (2,), "bad", dict(V=29, bad="tiling", explicit=True)),
    ("bad_grad_one_rank", (2,), "bad", dict(V=29, bad="grad_one_rank")),
]


def make_case(opts: dict, seed: int = 0) -> dict:
    """Full inputs of a case (every rank builds the same ones from the seed)."""
    S, T, H, V = opts.get("S", 6), opts.get("T", 9), opts.get("H", 16), opts["V"]
    dtype = opts.get("dtype", torch.float64)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (3.0 / H ** 0.5)
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if opts.get("bias") else None
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[:, :2] = -100  # a prompt
    labels[torch.rand(S, T, generator=g) < 0.2] = -100
    labels[:, -1] = torch.arange(S) % V  # low ids ...
    labels[:, -2] = V - 1 - torch.arange(S) % V  # ... and high ones: a target in every shard
    labels[1] = -100  # every token of one chosen sequence ignored
    case = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), bias=None if bias is None else bias.to(dtype),
                labels=labels, sequence_ids=None, num_sequences=None, cap=opts.get("cap"),
                backend=opts.get("backend", "auto"))
    P = S // 2
    case["ref"] = (torch.randn(P, generator=g, dtype=torch.float64) - 20.0,
                   torch.randn(P, generator=g, dtype=torch.float64) - 20.0)
    case["grad_out"] = torch.randn(S, generator=g, dtype=torch.float64)
    if opts.get("packed"):  # the same tokens as one packed row, sequences of varying length, some padding
        lengths = [T - (i % 3) for i in range(S)]
        case["hidden"] = torch.cat([case["hidden"][i, :n] for i, n in enumerate(lengths)]
                                   + [case["hidden"][0, :3]]).unsqueeze(0)
        case["labels"] = torch.cat([labels[i, :n] for i, n in enumerate(lengths)] + [labels[0, :3]]).unsqueeze(0)
        case["sequence_ids"] = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]
                                         + [torch.full((3,), -1)]).unsqueeze(0)
        case["num_sequences"] = S
    return case


def call(kind: str, case: dict, hidden, weight, bias, **over):
    """The public call a case exercises: dpo_fast.loss or linear_sequence_logprobs ->
    (a scalar to differentiate, per-sequence log-probs, the loss's mean-logit metrics or None)."""
    import dpo_fast
    kw = dict(bias=bias, logit_softcap=case["cap"], sequence_ids=case["sequence_ids"],
              num_sequences=case["num_sequences"], backend=case["backend"])
    kw.update(over)
    labels = kw.pop("labels", case["labels"])
    if kind == "logprobs":
        lp = dpo_fast.linear_sequence_logprobs(hidden, weight, labels, **kw)
        return (lp.double() * case["grad_out"]).sum(), lp, None
    out = dpo_fast.loss(labels=labels, hidden=hidden, weight=weight, ref_chosen_logps=case["ref"][0].float(),
                        ref_rejected_logps=case["ref"][1].float(), beta=0.5, **kw)
    mean_logits = torch.stack([out.metrics["logits/chosen"], out.metrics["logits/rejected"]])
    return out.loss, torch.cat([out.chosen_logps, out.rejected_logps]), mean_logits


# ---------------------------------------------------------------- ranks


def _shard(case, opts, rank, world):
    """(weight, bias) as the case passes them, the leaves whose .grad the test reads, and the
    rank's first vocabulary row."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import dpo_fast
    w, b = case["weight"], case["bias"]
    if opts.get("explicit"):  # rank r holds the (world - 1 - r)-th torch.chunk piece: any order tiles
        pieces = list(torch.arange(w.shape[0]).chunk(world)) + [torch.arange(0)] * world
        rows = pieces[world - 1 - rank]
        start = int(rows[0]) if rows.numel() else w.shape[0]
        if opts.get("bad") == "tiling" and rank == 0:
            start += 1
        lw = w[rows].clone().requires_grad_(True)
        lb = None if b is None else b[rows].clone().requires_grad_(True)
        return dpo_fast.VocabShard(lw, start), lb, (lw, lb), start
    if opts.get("mesh_2d"):
        mesh, place = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp")), [Replicate(), Shard(0)]
    else:
        mesh, place = init_device_mesh("cpu", (world,)), [Shard(1) if opts.get("bad") == "shard_dim" else Shard(0)]
    dw = torch.nn.Parameter(distribute_tensor(w, mesh, place))
    db = None if b is None else torch.nn.Parameter(distribute_tensor(b, mesh, place))
    if opts.get("bad") == "shard_dim":
        return dw, db, (dw, db), -1
    shard = dpo_fast.VocabShard.from_dtensor(dw, mesh_dim="tp" if opts.get("mesh_2d") else None)
    if opts.get("mesh_2d") and opts.get("bad") != "mesh_2d":  # say which dimension is tensor-parallel
        return shard, None if db is None else db.to_local(), (dw, db), shard.vocab_start
    return dw, db, (dw, db), shard.vocab_start


def _local(t):
    from dpo_fast.tensor_parallel import is_dtensor
    if t is None or t.grad is None:
        return None
    return t.grad.to_local() if is_dtensor(t.grad) else t.grad


def run_good(kind, case, opts, rank, world) -> dict:
    weight, bias, leaves, start = _shard(case, opts, rank, world)
    hidden = case["hidden"].clone().requires_grad_(kind != "no_grad")
    if kind == "no_grad":
        with torch.no_grad():
            _, lp, _ = call("loss", case, hidden, weight, bias)
        return dict(logps=lp, requires_grad=lp.requires_grad or lp.grad_fn is not None, start=start)
    loss, lp, mean_logits = call(kind, case, hidden, weight, bias)
    loss.backward()
    res = dict(loss=loss.detach(), logps=lp.detach(), mean_logits=mean_logits, hidden_grad=hidden.grad,
               weight_grad=_local(leaves[0]), bias_grad=_local(leaves[1]), start=start)
    if leaves[0].grad is not None and hasattr(leaves[0].grad, "placements"):
        res["grad_placements"] = str(leaves[0].grad.placements)
    return res


def run_bad(case, opts, rank, world) -> dict:
    bad = opts["bad"]
    over = {}
    hidden = case["hidden"]
    if bad == "hidden_shape" and rank == world - 1:
        hidden = hidden[:, :-1]
        over["labels"] = case["labels"][:, :-1]
    if bad == "label":
        labels = case["labels"].clone()
        labels[2, 4] = case["weight"].shape[0]  # one past the vocabulary, on every rank
        over["labels"] = labels
    if bad == "labels_one_rank" and rank == 1:
        labels = case["labels"].clone()
        labels[0, 3] = (labels[0, 3] + 1) % case["weight"].shape[0]
        over["labels"] = labels
    if bad == "dtype_one_rank" and rank == 1:
        over["labels"] = case["labels"].float()
    hidden = hidden.clone().requires_grad_(not (bad == "grad_one_rank" and rank == 0))
    try:
        weight, bias, _, _ = _shard(case, opts, rank, world)
        call("loss", case, hidden, weight, bias, **over)
        err = None
    except (ValueError, TypeError) as e:
        err = (type(e).__name__, str(e))
    # Every rank must still be in step: a good call through the default group.
    good = dict(opts, bad=None, explicit=False, mesh_2d=False)
    weight, bias, _, _ = _shard(make_case(good), good, rank, world)
    call("loss", make_case(good), case["hidden"], weight, bias)
    return dict(error=err)


class Meter:
    """Bytes each rank hands to collectives, and the largest buffer one aten op allocates."""

    def __init__(self):
        import torch.distributed as dist
        self.sent = 0
        self.dist = dist
        self.orig = {n: getattr(dist, n) for n in ("all_gather_single", "all_reduce", "all_gather_object")}

    def __enter__(self):
        def wrap(name, orig):
            def f(*a, **k):
                t = a[1] if name == "all_gather_single" else a[0]
                self.sent += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
                return orig(*a, **k)
            return f
        for n, o in self.orig.items():
            setattr(self.dist, n, wrap(n, o))
        return self

    def __exit__(self, *exc):
        for n, o in self.orig.items():
            setattr(self.dist, n, o)


# The chunked kernels' logits buffer is a constant (chunked_linear.CHUNK_ELEMENTS, 32 MiB), not a
# function of V; scaled down with the vocabulary here so the test's V can stay small.
MEMORY_CHUNK_ELEMENTS = 1 << 18


def run_memory(case, opts, rank, world) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from dpo_fast.kernels import chunked_linear
    chunked_linear.CHUNK_ELEMENTS = MEMORY_CHUNK_ELEMENTS
    weight, bias, leaves, start = _shard(case, opts, rank, world)
    hidden = case["hidden"].clone().requires_grad_(True)
    call("loss", case, hidden, weight, bias)[0].backward()  # warm-up: lazy imports, first-call state
    hidden.grad = None
    leaves[0].grad = None
    with Meter() as m, profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = call("loss", case, hidden, weight, bias)[0]
        loss.backward()
    largest = max(max(e.self_cpu_memory_usage for e in prof.events()), 0)
    return dict(sent=m.sent, largest=largest, start=start)


def hf_batch():
    """Token ids, labels and reference log-probs of the Hugging Face case (2 pairs of 10 tokens)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, HF_VOCAB, (4, 10), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels, (torch.full((2,), -30.0), torch.full((2,), -31.0))


HF_VOCAB = 61  # odd: 31 + 30 rows


def hf_loss(model):
    """The DPO loss of hf_batch through the model's final hidden states and lm_head weight."""
    import dpo_fast
    ids, labels, ref = hf_batch()
    hidden = model.model(input_ids=ids).last_hidden_state
    out = dpo_fast.loss(hidden=hidden, weight=model.lm_head.weight, labels=labels, ref_chosen_logps=ref[0],
                        ref_rejected_logps=ref[1])
    return hidden, out


def run_hf(rank, world, out) -> dict:
    """A tiny Llama under transformers' own tensor-parallel plan (tp_plan="auto"), the loss
    straight from its final hidden states and its sharded lm_head weight."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from dpo_fast.tensor_parallel import is_dtensor
    from dpo_fast_tools.tiny import build_tiny_model
    path = os.path.join(out, "hf_model")
    if rank == 0:
        build_tiny_model(HF_VOCAB, hidden_size=32, layers=2, heads=4, seed=0).save_pretrained(path)
    dist.barrier()
    # What torchrun would set; transformers reads them to turn its plan on (the group exists already).
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"),
                                                 dtype=torch.float32)
    w = model.lm_head.weight
    hidden, res = hf_loss(model)
    res.loss.backward()
    # full_tensor() is a collective: every rank gathers every gradient, in the same order.
    grads = {n: p.grad.full_tensor() if is_dtensor(p.grad) else p.grad for n, p in model.named_parameters()}
    return dict(path=path, loss=res.loss.detach(), hidden=hidden.detach(), hidden_is_dtensor=is_dtensor(hidden),
                weight_placements=str(getattr(w, "placements", None)), local_rows=w.to_local().shape[0],
                grads=grads if rank == 0 else None)


def rank_main(rank: int, world: int, out: str, store: str) -> None:
    faulthandler.dump_traceback_later(240, exit=True)
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    results = {}
    for name, worlds, kind, opts in CASES:
        if world not in worlds:
            continue
        try:
            case = None if kind == "hf" else make_case(opts)
            if kind == "bad":
                results[name] = run_bad(case, opts, rank, world)
            elif kind == "hf":
                results[name] = run_hf(rank, world, out)
            elif kind == "memory":
                results[name] = run_memory(case, opts, rank, world)
            else:
                results[name] = run_good(kind, case, opts, rank, world)
        except Exception:  # a good case that raised: the test shows the traceback
            results[name] = dict(crash=traceback.format_exc())
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp
    world, out = int(sys.argv[1]), sys.argv[2]
    mp.spawn(rank_main, args=(world, out, os.path.join(out, "store")), nprocs=world)
