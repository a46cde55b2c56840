"""A vocab-parallel lm_head weight as input of linear_sequence_logprobs and loss(hidden=...).

The weight is split by vocabulary rows over a tensor-parallel process group; the op
(dpo_fast.ops.vocab_parallel) runs the fused kernels on each rank's rows only. Two forms:

  DTensor   weight (and bias) DTensors placed Shard(0) on a 1-D device mesh, as transformers'
            tp_plan="auto" leaves lm_head.weight (uneven shards as torch.chunk makes them).
            On a larger mesh, name the tensor-parallel dimension:
            weight=VocabShard.from_dtensor(weight, mesh_dim="tp"). Gradients come back as
            DTensors of the same layout.
  explicit  weight=VocabShard(local_rows, vocab_start, group), bias= this rank's bias rows.
            Gradients land on the local tensors.

hidden is a plain tensor holding the same values on every rank (its gradient comes back summed
over the group, whole on every rank); labels hold global vocabulary ids, the same on every rank.

Every check ends in one all-gather of a few integers per rank, so a problem seen on one rank
(shapes, labels outside the vocabulary, shards that do not tile it, a bad argument) raises the
same error on every rank instead of leaving the others waiting in a collective. DTensor layout
errors need no exchange: placements are the same on every rank.
"""

from __future__ import annotations

import struct
import sys
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .backends import resolve_backend
from .ops.vocab_parallel import all_gather
from .targets import FLOAT_DTYPES, INVALID_NEGATIVE, check_linear_inputs, check_softcap


class VocabShard(NamedTuple):
    """This rank's rows [vocab_start, vocab_start + weight.shape[0]) of a (V, H) lm_head weight.

    group: the tensor-parallel process group (None: the default group). The shards of the group
    must tile [0, V) in any order; V is their total. A shard may hold no rows.
    """

    weight: Tensor
    vocab_start: int
    group: dist.ProcessGroup | None = None

    @classmethod
    def from_dtensor(cls, weight, mesh_dim: int | str | None = None) -> VocabShard:
        """The local shard of a DTensor weight placed Shard(0) on the tensor-parallel mesh
        dimension `mesh_dim` (needed when the mesh has more than one) and Replicate elsewhere.
        The local tensor is weight.to_local(): gradients flow back to the DTensor."""
        if not is_dtensor(weight):
            raise TypeError(f"weight must be a DTensor, got {type(weight).__name__}")
        mesh, dim = weight.device_mesh, _mesh_dim(weight.device_mesh, mesh_dim)
        shard = sys.modules["torch.distributed.tensor"].Shard
        for i, p in enumerate(weight.placements):
            if i == dim and not (type(p) is shard and p.dim == 0):
                what = f"sharded on dim {p.dim}" if p.is_shard() else f"placed {p}"
                raise ValueError(
                    f"weight is {what} on the tensor-parallel mesh dimension; the vocab-parallel loss needs "
                    f"the lm_head weight (V, H) sharded over the vocabulary, Shard(0) (placements "
                    f"{tuple(weight.placements)})")
            if i != dim and not p.is_replicate():
                raise ValueError(
                    f"weight is placed {p} on mesh dimension {i}; only the tensor-parallel dimension ({dim}) may "
                    f"shard it, the others must Replicate (placements {tuple(weight.placements)}; FSDP2 shards "
                    f"parameters on its data dimension: gather them first, e.g. FSDPModule.unshard())")
        V, n = weight.shape[0], mesh.size(dim)
        per = -(-V // n)  # torch.chunk's split, which Shard(0) follows: the checks verify it
        return cls(weight.to_local(), min(mesh.get_local_rank(dim) * per, V), mesh.get_group(dim))


def is_dtensor(x) -> bool:
    # Nothing is a DTensor unless torch.distributed.tensor is loaded: importing dpo_fast stays free of it.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def is_sharded(weight) -> bool:
    """Whether `weight` asks for the vocab-parallel op (a DTensor or a VocabShard)."""
    return isinstance(weight, VocabShard) or is_dtensor(weight)


def _mesh_dim(mesh, mesh_dim) -> int:
    names = mesh.mesh_dim_names
    if mesh_dim is None:
        if mesh.ndim != 1:
            raise ValueError(
                f"weight is a DTensor on a {mesh.ndim}-D device mesh (dimensions {names or tuple(range(mesh.ndim))}); "
                f"say which one is tensor-parallel: weight=dpo_fast.VocabShard.from_dtensor(weight, mesh_dim=...)")
        return 0
    if isinstance(mesh_dim, str):
        if not names or mesh_dim not in names:
            raise ValueError(f"mesh_dim {mesh_dim!r} is not a dimension of the weight's mesh (names {names})")
        return names.index(mesh_dim)
    if not isinstance(mesh_dim, int) or not 0 <= mesh_dim < mesh.ndim:
        raise ValueError(f"mesh_dim must name or index one of the mesh's {mesh.ndim} dimensions, got {mesh_dim!r}")
    return mesh_dim


def resolve(weight, bias) -> tuple[VocabShard, Tensor | None]:
    """The shard and this rank's bias rows of a DTensor or VocabShard weight."""
    if isinstance(weight, VocabShard):
        if is_dtensor(bias):
            raise TypeError("bias: with weight=VocabShard(...) pass this rank's bias rows (bias.to_local()), "
                            "not a DTensor")
        return weight, bias
    shard = VocabShard.from_dtensor(weight)
    if bias is not None:
        if not is_dtensor(bias) or bias.device_mesh != weight.device_mesh or bias.placements != weight.placements:
            raise ValueError(f"bias must be a DTensor placed like the weight ({tuple(weight.placements)} on its "
                             f"mesh), got {tuple(bias.placements) if is_dtensor(bias) else type(bias).__name__}")
        bias = bias.to_local()
    return shard, bias


# ---------------------------------------------------------------- checks every rank agrees on

_FIELDS = ("error", "S", "T", "H", "dtype", "vocab_start", "rows", "num_sequences", "needs_grad", "softcap",
           "scored", "targets_sum", "seq_sum", "max_label", "negative")


def _check_shard(shard: VocabShard, hidden) -> None:
    if not isinstance(shard.weight, Tensor) or is_dtensor(shard.weight):
        raise TypeError(f"VocabShard.weight must be this rank's rows as a plain Tensor, "
                        f"got {type(shard.weight).__name__}")
    if isinstance(shard.vocab_start, bool) or not isinstance(shard.vocab_start, int) or shard.vocab_start < 0:
        raise ValueError(f"VocabShard.vocab_start must be an int >= 0, got {shard.vocab_start!r}")
    if is_dtensor(hidden):
        raise TypeError("hidden must be a plain tensor holding the same values on every rank, got a DTensor "
                        "(hidden.full_tensor() gathers it)")


def _local_row(err, hidden, shard, tg, logit_softcap, device) -> Tensor:
    """This rank's _FIELDS as int64; tensor-derived fields without a host sync."""
    if err is not None:
        return torch.tensor([1] + [-1] * (len(_FIELDS) - 1), dtype=torch.int64, device=device)
    S, T, H = hidden.shape
    cap = 0 if logit_softcap is None else struct.unpack("<q", struct.pack("<d", float(logit_softcap)))[0]
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    host = [0, S, T, H, FLOAT_DTYPES.index(hidden.dtype), shard.vocab_start, shard.weight.shape[0],
            tg.num_sequences, int(needs_grad), cap]
    t, seq = tg.targets.reshape(-1), tg.token_seq.reshape(-1)
    w = torch.arange(t.numel(), device=t.device) % 65521 + 1  # position weights: a permutation changes the sums
    scored = t >= 0
    derived = torch.stack([scored.sum(), (t * w).sum(), (seq * scored * w).sum(), t.max(),
                           (t == INVALID_NEGATIVE).sum()]).to(device)
    return torch.cat([torch.tensor(host, dtype=torch.int64, device=device), derived])


def _disagreement(rows: list[dict], V: int | None) -> tuple[str | None, int]:
    """The first problem in the gathered table (the same verdict on every rank), and V."""
    def differ(*keys):
        return any(tuple(r[k] for k in keys) != tuple(rows[0][k] for k in keys) for r in rows)

    def per_rank(fmt):
        return ", ".join(f"rank {i}: {fmt(r)}" for i, r in enumerate(rows))

    if differ("S", "T", "H"):
        return ("hidden has different shapes across the tensor-parallel group (" +
                per_rank(lambda r: (r["S"], r["T"], r["H"])) + "); every rank needs the same hidden states"), 0
    if differ("dtype"):
        return "hidden has different dtypes across ranks (" + per_rank(lambda r: FLOAT_DTYPES[r["dtype"]]) + ")", 0
    if differ("num_sequences", "scored", "targets_sum", "seq_sum"):
        return ("labels (or sequence_ids / num_sequences) differ across the tensor-parallel group; every rank "
                "needs the same labels"), 0
    if differ("softcap"):
        return "logit_softcap differs across ranks", 0
    if differ("needs_grad"):
        return ("hidden requires grad on some ranks and not on others (" + per_rank(lambda r: bool(r["needs_grad"])) +
                "); the backward all-reduce needs every rank"), 0
    spans = sorted((r["vocab_start"], r["vocab_start"] + r["rows"], i) for i, r in enumerate(rows))
    end = 0
    for a, b, i in spans:
        if a != end:
            return ("the weight shards do not tile the vocabulary (" +
                    per_rank(lambda r: f"rows [{r['vocab_start']}, {r['vocab_start'] + r['rows']})") +
                    f"): {'a gap' if a > end else 'an overlap'} at row {min(a, end)}"), 0
        end = b
    if V is not None and end != V:
        return f"the weight shards cover [0, {end}) but the weight has V = {V} rows", 0
    V = end
    largest, negative = max(r["max_label"] for r in rows), max(r["negative"] for r in rows)
    if negative or largest >= V:
        return (f"labels: scored label(s) outside [0, {V}) that are not ignore_index (largest {largest}, "
                f"{negative} negative; vocab size V = {V}, all shards together)"), V
    return None, V


def agree(shard: VocabShard, bias, hidden, labels, prepare: Callable[[], tuple], *, logit_softcap, sequence_ids,
          num_sequences, backend, vocab: int | None = None) -> tuple[tuple, int, str]:
    """Run the local checks and `prepare` (returns (Targets, ...)) on this rank, then one
    all-gather of a few integers; raise the same error on every rank if any rank found a problem
    or the ranks disagree. Returns (prepare's result, V, the concrete backend)."""
    group = shard.group if shard.group is not None else dist.group.WORLD
    device = next((t.device for t in (shard.weight, hidden) if isinstance(t, Tensor)), torch.device("cpu"))
    err = result = None
    try:
        _check_shard(shard, hidden)
        check_linear_inputs(hidden, shard.weight, labels, bias=bias, logit_softcap=logit_softcap,
                            sequence_ids=sequence_ids, num_sequences=num_sequences, vocab_shard=True)
        backend = resolve_backend(backend, hidden.device)
        result = prepare()
    except Exception as e:  # whatever it is, the other ranks must hear of it rather than wait
        err = e
    row = _local_row(err, hidden, shard, None if err else result[0], logit_softcap, device)
    table = all_gather(row, group).tolist()
    failed = [i for i, r in enumerate(table) if r[0]]
    if failed:
        said = [None] * len(table)
        dist.all_gather_object(said, None if err is None else (type(err).__name__, str(err)), group=group)
        kind, msg = said[failed[0]]
        others = f" (rank(s) {failed[1:]} failed too)" if len(failed) > 1 else ""
        cls = {"TypeError": TypeError, "ValueError": ValueError}.get(kind)
        if cls is None:  # another kind of error: named in the message
            cls, msg = RuntimeError, f"{kind}: {msg}"
        raise cls(f"rank {failed[0]} of the tensor-parallel group: {msg}{others}") from err
    problem, V = _disagreement([dict(zip(_FIELDS, r)) for r in table], vocab)
    if problem:
        raise ValueError(problem)
    return result, V, backend


# ---------------------------------------------------------------- entry points


def logprobs_with_stats(hidden: Tensor, shard: VocabShard, targets: Tensor, token_seq: Tensor, num_sequences: int,
                        *, bias: Tensor | None = None, logit_softcap: float | None = None, backend: str = "auto"):
    """(logps, logit_sums), both (num_sequences,), as functional.linear_logprobs_with_stats, from
    this rank's shard; inputs already agreed across ranks (`agree`), targets global ids."""
    check_softcap(logit_softcap)
    group = shard.group if shard.group is not None else dist.group.WORLD
    H = hidden.shape[-1]
    cap = None if logit_softcap is None else float(logit_softcap)
    logps, logit_sums, _ = torch.ops.dpo_fast.vocab_parallel_logprobs(
        hidden.reshape(-1, H), shard.weight, bias, targets.reshape(-1), token_seq.reshape(-1), num_sequences,
        shard.vocab_start, cap, resolve_backend(backend, hidden.device), group.group_name)
    return logps, logit_sums.detach()


def sharded_logprobs(hidden, weight, bias, labels, prepare: Callable[[], tuple], *, logit_softcap, sequence_ids,
                     num_sequences, backend) -> tuple[tuple, int, Tensor, Tensor]:
    """The vocab-parallel path of linear_sequence_logprobs and loss(hidden=...): resolve the
    weight, agree on the inputs, run the op. Returns (prepare's result, V, logps, logit_sums)."""
    shard, bias = resolve(weight, bias)
    result, V, backend = agree(shard, bias, hidden, labels, prepare, logit_softcap=logit_softcap,
                               sequence_ids=sequence_ids, num_sequences=num_sequences, backend=backend,
                               vocab=None if isinstance(weight, VocabShard) else weight.shape[0])
    tg = result[0]
    logps, logit_sums = logprobs_with_stats(hidden, shard, tg.targets, tg.token_seq, tg.num_sequences, bias=bias,
                                            logit_softcap=logit_softcap, backend=backend)
    return result, V, logps, logit_sums
