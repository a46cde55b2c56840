"""Process-group setup shared by precompute-ref and train: one rule for joining, one for leaving.

    info = setup(device)          # torchrun env -> init_process_group (nccl on CUDA, gloo on CPU)
    info.rank, info.world, info.main, info.enabled

The group lives until the process exits (a second call in the same torchrun job reuses it: a
destroyed and re-created default group can hang in its rendezvous on the old store). Workers
started by torchrun die with their launcher (Linux: PR_SET_PDEATHSIG), so a killed launcher
leaves no orphan writing into a run directory.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class DistInfo:
    """This process's place. With tensor parallelism (tp > 1) the ranks form a (data, tp) mesh:
    the tp ranks of a data group hold one model's shards and see the same batches."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    collective: bool = False  # ranks talk through torch.distributed (not just --rank/--world-size)
    tp: int = 1
    mesh: object = None  # the (data, tp) DeviceMesh when tp > 1

    @property
    def enabled(self) -> bool:
        return self.collective and self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        return self.rank // self.tp

    @property
    def data_world(self) -> int:
        return self.world // self.tp

    @property
    def writer(self) -> bool:
        """Writes this data group's files (the first of its tp ranks)."""
        return self.rank % self.tp == 0

    @property
    def tp_mesh(self):
        return None if self.mesh is None else self.mesh["tp"]

    @property
    def data_group(self):
        """The process group across data-parallel replicas (None: the default group, tp == 1)."""
        return None if self.mesh is None else self.mesh["data"].get_group()


def exit_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent (torchrun's agent) dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: nothing to do
        return
    if os.getppid() == 1:  # the launcher died before we asked
        raise SystemExit("dpo_fast: the launching process is gone; exiting")


def setup(device: torch.device, *, rank: int | None = None, world_size: int | None = None, tp: int = 1) -> DistInfo:
    """This process's place: explicit rank/world_size (independent processes, no collectives), an
    initialised process group, the torchrun environment (initialised here), or a single process.
    tp > 1: tensor parallelism over groups of tp consecutive ranks; the world must be a multiple."""
    info = _join(device, rank, world_size)
    if tp == 1:
        return info
    if not info.enabled or info.world % tp:
        raise ValueError(f"--tp {tp} needs torchrun with a world size that is a multiple of it (world size "
                         f"{info.world})")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (info.world // tp, tp), mesh_dim_names=("data", "tp"))
    return DistInfo(info.rank, info.world, info.local_rank, True, tp, mesh)


def _join(device: torch.device, rank, world_size) -> DistInfo:
    if rank is not None or world_size is not None:
        rank, world_size = int(rank or 0), int(world_size or 1)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        return DistInfo(rank, world_size)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        exit_with_parent()
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(_destroy)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
