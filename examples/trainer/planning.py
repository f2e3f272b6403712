"""The model, its optimizer, and what memfit makes of them: compressed and planned for the budget."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import memfit

from .distributed import Context, gather

__all__ = ["Prepared", "create_model", "optimizer_factory", "prepare", "summary"]

MiB = 2**20
# A budget nothing exceeds: memfit.optimize then returns the unplanned step with its timeline.
UNBOUNDED_MB = 1e9


def create_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The model ``--model`` names, with ``num_classes`` outputs, initialised from ``--seed``."""
    torch.manual_seed(args.seed)
    return memfit.models.load(args.model, num_classes=num_classes, stem=args.stem, width=args.width)


def optimizer_factory(args: argparse.Namespace) -> Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer]:
    """The optimizer, as a factory: memfit plans with the very optimizer (and state) that trains."""
    lr, wd = args.lr, args.weight_decay
    if args.optimizer == "sgd":
        return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=args.momentum, weight_decay=wd)
    if args.optimizer == "adam":
        return lambda ps: torch.optim.Adam(ps, lr=lr, weight_decay=wd)
    return lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd)


@dataclasses.dataclass
class Prepared:
    """The module that trains (planned and/or compressed) and what its plan predicts."""

    module: nn.Module
    plan: Any  # memfit's plan: printable, with the predicted levels memfit.plot_plan draws
    planned: bool
    budget_mb: float | None  # the budget given (resolved from a percentage)
    parallel: memfit.Parallel | None  # DDP under torchrun: the plan is per process, buckets included
    planning_s: float


def prepare(args: argparse.Namespace, model: nn.Module, x: torch.Tensor, ctx: Context) -> Prepared:
    """Compress (``--compress METHOD``) and plan (``--budget-mb``) the model on its device."""
    started = time.perf_counter()
    model.to(ctx.device)
    net = model
    if args.compress not in (None, "auto"):
        net = memfit.compress(model, args.compress)
    parallel = memfit.Parallel("ddp", ctx.world) if ctx.distributed else None
    factory = optimizer_factory(args)

    def plan(budget: float | str, strategy: str) -> nn.Module:
        compress = "auto" if args.compress == "auto" else None
        # planning draws no random numbers of the run's: a planned and an unplanned run train alike
        with torch.random.fork_rng(devices=[ctx.device.index] if ctx.device.type == "cuda" else []):
            return memfit.optimize(
                net,
                budget,
                x,
                optimizer=factory,
                amp=args.amp,
                strategy=strategy,
                compress=compress,
                parallel=parallel,
                accumulate=args.accumulate > 1,
            )

    if args.budget_mb is None:
        unplanned = plan(UNBOUNDED_MB, "auto")
        unplanned.plan.budget_bytes = None
        return Prepared(net, unplanned.plan, False, None, parallel, time.perf_counter() - started)
    planned = plan(args.budget_mb, args.strategy)
    # plans can differ between ranks (each measures its own kernel workspaces): follow rank 0's strategy
    if ctx.distributed and not memfit.distributed.same_plan(planned):
        strategy = gather(ctx, planned.plan.strategy)[0]
        if not ctx.main:
            planned = plan(args.budget_mb, strategy)
        if not memfit.distributed.same_plan(planned):
            raise memfit.MemfitError("the processes planned the model differently; pass --strategy explicitly")
    budget_mb = planned.plan.budget_bytes / MiB  # a percentage resolved against the unplanned peak
    return Prepared(planned, planned.plan, True, budget_mb, parallel, time.perf_counter() - started)


def summary(prep: Prepared) -> dict[str, Any]:
    """The plan's figures for metrics.json."""
    plan = prep.plan
    return {
        "planned": prep.planned,
        "strategy": plan.strategy,
        "budget_mb": prep.budget_mb,
        "predicted_peak_before_mb": plan.peak_before_bytes / MiB,
        "predicted_peak_after_mb": plan.peak_after_bytes / MiB,
        "extra_flops_percent": plan.extra_flops_percent,
        "checkpointed_segments": len(plan.checkpointed),
        "compressed_layers": list(plan.compressed),
        "planning_s": prep.planning_s,
    }
