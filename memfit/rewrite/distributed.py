"""Wrap a model for data parallelism the way memfit's cost model assumes (:class:`memfit.Parallel`).

A planned model is an fx GraphModule: its forward calls the leaf modules (convolutions, norms,
linears) directly and never the blocks that held them, so ``fully_shard(block)`` would never
see its block run. An FSDP unit is therefore the group of the leaf modules under the unit's
name, sharded together (``fully_shard([...])``), and the root takes the rest. The same wrapping
works for an unplanned model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, cast

import torch

from ..capture.trainstep import OptimizerSpec, StepConfig
from ..cost.measurement import measure_wrapped_step
from ..cost.parallel import Parallel
from ..errors import MemfitInputError
from ..planner import Plan

__all__ = ["measure", "same_plan", "wrap"]


def _leaves_with_parameters(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]


def wrap(module: torch.nn.Module, parallel: Parallel, **kwargs: Any) -> torch.nn.Module:
    """Apply DDP or FSDP (FSDP2's ``fully_shard``) to ``module`` as ``parallel`` describes.

    The default process group must be initialised (``torch.distributed.init_process_group``),
    with ``parallel.world_size`` processes.

    Args:
        module: The model, planned or not, on this process's device.
        parallel: What memfit planned for.
        kwargs: Passed on to ``DistributedDataParallel`` (DDP) or to each ``fully_shard`` call.

    Returns:
        The DDP wrapper (gradients as views of its buckets, as memfit assumes) or ``module``
        itself, sharded in place. A planned module shares its layers with the model it was
        planned from, so FSDP shards that model's layers too, as ``fully_shard`` would.

    Example (run under ``torchrun --nproc_per_node=2``)::

        parallel = memfit.Parallel("fsdp", world_size=2, units=("layer1.0", "layer1.1"))
        planned = memfit.optimize(net, 300, x, optimizer="adam", parallel=parallel)
        planned = memfit.rewrite.distributed.wrap(planned, parallel)
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise MemfitInputError(
            "torch.distributed is not initialised; call init_process_group first (torchrun sets it up)"
        )
    if dist.get_world_size() != parallel.world_size:
        raise MemfitInputError(
            f"memfit planned for {parallel.world_size} processes but the process group has {dist.get_world_size()}; "
            "plan with Parallel(world_size=torch.distributed.get_world_size())"
        )
    if parallel.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, **{"gradient_as_bucket_view": True, **kwargs})
    from torch.distributed.fsdp import fully_shard

    claimed: set[int] = set()
    # innermost units first: a leaf belongs to the innermost unit that holds it, as in the cost model
    for name in sorted(parallel.unit_names(n for n, _ in module.named_parameters()), key=lambda u: -u.count(".")):
        leaves = [m for m in _leaves_with_parameters(module.get_submodule(name)) if id(m) not in claimed]
        claimed.update(map(id, leaves))
        if leaves:
            fully_shard(leaves, **kwargs)
    fully_shard(module, **kwargs)
    return module


def measure(
    wrapped: torch.nn.Module,
    example_inputs: Any,
    *,
    optimizer: OptimizerSpec = "sgd",
    amp: str | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    accumulate: bool = False,
) -> tuple[int, dict[str, int]]:
    """Measure one process's real training step of a module :func:`wrap` returned (CPU).

    A wrapped module cannot be copied, so this trains ``wrapped`` itself: a few warm-up steps
    (DDP rebuilds its buckets on the second), then the measured one. Every process of the group
    must call it, as each step's collectives need them all. Wrap a copy to keep the model as it is.

    Args:
        wrapped: A DDP- or FSDP-wrapped module.
        example_inputs: This process's batch, as in :func:`memfit.measure`.
        optimizer: As in :func:`memfit.estimate`.
        amp: As in :func:`memfit.estimate`.
        loss_fn: As in :func:`memfit.estimate`.
        accumulate: As in :func:`memfit.estimate`.

    Returns:
        The allocator-level peak of the step and the peak per phase, in bytes: what was alive
        before it (this process's parameters, buffers, inputs, optimizer state and DDP's buckets)
        plus the most the profiler saw the step add.
    """
    config = StepConfig(optimizer=optimizer, amp=amp, loss_fn=loss_fn, accumulate=accumulate)
    return measure_wrapped_step(wrapped, example_inputs, config)


def same_plan(planned: torch.nn.Module) -> bool:
    """Whether every process of the default group holds the same plan over the same parameters.

    DDP and FSDP need identical replicas, but each process plans on its own (its kernel
    workspaces measured on its own), so plans near a budget can differ. A collective: every
    process calls it, with the module :func:`memfit.optimize` returned.
    """
    import torch.distributed as dist

    h = hashlib.sha256()
    for segment in cast(Plan, planned.plan).segments:  # optimize sets .plan; nn.Module does not declare it
        h.update(f"{segment.kind}:{','.join(segment.nodes)};".encode())
    for name, p in planned.named_parameters():
        h.update(f"{name}{tuple(p.shape)};".encode())
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    return len(set(digests)) == 1
