"""Where this process runs (its rank, the world, its device) and the few collectives the trainer uses."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import memfit

__all__ = ["Context", "all_sum", "gather", "setup", "state_digest", "sync_buffers"]


@dataclasses.dataclass
class Context:
    """Where this process runs: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    started: bool = False  # whether this script initialised the process group

    @property
    def main(self) -> bool:
        """Rank 0, which prints and writes the files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world > 1

    def log(self, *parts: Any, **kwargs: Any) -> None:
        """Print on rank 0 only."""
        if self.main:
            print(*parts, **kwargs, flush=True)


def setup(device_arg: str) -> Context:
    """Read torchrun's environment and start the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise memfit.MemfitInputError(f"--device {device_arg}, but torch sees no CUDA device")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    ctx = Context(rank=rank, world=world, device=device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        ctx.started = True
    return ctx


def all_sum(ctx: Context, values: Sequence[float]) -> list[float]:
    """Sum numbers over the processes (float64, on the device the backend needs)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def gather(ctx: Context, obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def sync_buffers(module: nn.Module, ctx: Context) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every process, as DDP sends them before each
    forward: after a step, every replica holds the statistics of its own last batch."""
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def state_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (replicas of a DDP job must agree)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
