"""memfit.optimize, minimum and tradeoff: the cheapest verified plan for a budget, the least
budget any plan fits, and the curve between them.

Every plan is verified before it is returned (:mod:`memfit.search`): the rewritten module's whole
training step is dry-run under FakeTensorMode with the storage tracker (nothing allocated) and the
kernel workspaces of its nodes are added. A plan whose verified peak exceeds the budget is
tightened and planned again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .budget import Budget
from .capture.inputs import as_inputs
from .capture.trace import check_model, serialized
from .capture.trainstep import OptimizerSpec, StepConfig
from .compressors import list_methods
from .compressors.apply import META_KEY
from .cost.parallel import Parallel
from .errors import MemfitBudgetError, MemfitInputError
from .io.serialize import architecture_of
from .planner import STRATEGIES
from .report.memory import MiB
from .report.tradeoff import Tradeoff, TradeoffPoint
from .rewrite.checkpoint import PlannedModule
from .search import MARGIN, PlanSearch

__all__ = ["AUTO_ORDER", "MARGIN", "minimum", "optimize", "tradeoff"]

# auto tries these in turn, best first, and keeps the cheapest verified plan within its time.
AUTO_ORDER = ("selective", "dp", "chen", "handwritten")
# Budgets of a tradeoff curve, from the feasible minimum to the unplanned peak.
CURVE_POINTS = 8

LeafSpec = Iterable[type[torch.nn.Module] | str]


@serialized
def optimize(
    model: torch.nn.Module,
    budget_mb: float | str,
    example_inputs: Any,
    *,
    optimizer: OptimizerSpec = "sgd",
    amp: str | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    strategy: str = "auto",
    leaf_modules: LeafSpec = (),
    time_limit_s: float = 60.0,
    compress: str | None = None,
    parallel: Parallel | None = None,
    accumulate: bool = False,
) -> PlannedModule:
    """A module that trains like ``model`` and whose training step peaks at most ``budget_mb``.

    Args:
        model: The network; it is not modified. Its parameters are shared with the result.
        budget_mb: Budget for the peak of one training step (forward, backward, optimizer
            step), allocator-level (kernel workspaces included): MiB, a size with its unit
            (``"1.5GiB"``) or a percentage of the unplanned step's predicted peak (``"85%"``);
            see :class:`memfit.Budget`. The verified prediction stays ``MARGIN`` (0.25%) below
            it, the cost model's residual error.
        example_inputs: A tensor, a tuple of tensors or a dict of keyword arguments shaped like a
            training batch. A Hugging Face model's batch with ``labels`` trains on its ``.loss``.
        optimizer: The optimizer of the step, as in :func:`memfit.estimate`.
        amp: None, ``"bf16"`` or ``"fp16"`` (``torch.autocast``).
        loss_fn: Output -> scalar loss, as in :func:`memfit.estimate`.
        strategy: ``"auto"`` or one of ``"chen"``, ``"dp"``, ``"selective"``, ``"milp"`` (exact, small
            graphs only).
        leaf_modules: Module types or qualified names torch.fx should not trace into.
        time_limit_s: For ``"auto"``: strategies are not started after this much planning time.
        compress: None (recompute only), a compression method (``"generated"``, ``"shared"``,
            ``"ternary"``) or ``"auto"`` (``"generated"``: it shrinks the parameters, gradients and
            optimizer state that recomputation cannot touch). Layers are compressed, largest
            first, only when recomputation alone cannot reach the budget; the plan's notes say
            which and why. The result is then a compressed copy (see :func:`memfit.compress`):
            its compact parameters are new, the rest are copies of the model's.
        parallel: DDP or FSDP (:class:`memfit.Parallel`): ``budget_mb`` is then per process and
            ``example_inputs`` one process's batch; wrap the result as the Parallel says.
        accumulate: Gradient accumulation (``example_inputs`` one micro-batch): the budget holds
            for every micro-batch, whose gradients of the earlier ones exist through its forward.

    Returns:
        A :class:`~memfit.rewrite.checkpoint.PlannedModule` (an ``fx.GraphModule``) with ``.plan``
        (print it for the table) and ``.report`` (predicted memory before and after).

    Raises:
        MemfitBudgetError: No plan fits; the message gives the feasible minimum
            (:func:`minimum` gives it without asking for a plan).

    Example:
        >>> import torch, memfit
        >>> net = memfit.models.create("resnet18", stem="cifar", num_classes=10)
        >>> x = torch.randn(8, 3, 32, 32)
        >>> before = memfit.estimate(net, x).peak_mb
        >>> fitted = memfit.optimize(net, before * 0.93, x)
        >>> fitted.plan.peak_after_bytes <= before * 0.93 * 2**20
        True
    """
    started = time.perf_counter()
    model = check_model(model)
    names = _strategy_names(strategy)
    spec = Budget.parse(budget_mb)
    if compress not in (None, "auto") and (not isinstance(compress, str) or compress not in list_methods()):
        # before planning: a misspelt method would otherwise surface only once recomputation fails
        raise MemfitInputError(f"compress={compress!r}: use None, 'auto' or one of {list_methods()}")

    def plan_for(net: torch.nn.Module, budget: Budget) -> PlannedModule:
        search = _search_for(net, example_inputs, optimizer, amp, loss_fn, leaf_modules, parallel, accumulate)
        budget_bytes = budget.resolve(search.unplanned.peak_bytes)
        return search.finish(search.cheapest(budget_bytes, names, started + time_limit_s), budget_bytes)

    try:
        planned = plan_for(model, spec)
    except MemfitBudgetError as err:
        if compress is None:
            raise
        config = StepConfig(optimizer=optimizer, amp=amp, loss_fn=loss_fn, accumulate=accumulate)
        planned = _compressed_fit(model, err, compress, config, list(leaf_modules), plan_for)
    planned.meta[META_KEY] = {"architecture": architecture_of(model)}
    planned.plan.planning_seconds = time.perf_counter() - started
    return planned


@serialized
def minimum(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    optimizer: OptimizerSpec = "sgd",
    amp: str | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    strategy: str = "auto",
    leaf_modules: LeafSpec = (),
    parallel: Parallel | None = None,
    accumulate: bool = False,
) -> float:
    """The feasible minimum: the least budget (MiB, predicted) for which :func:`optimize` (same
    arguments) returns a plan, recomputation only.

    It is the least verified peak of the strategies' least-peak plans (or the unplanned peak,
    when recomputation cannot lower it) plus ``MARGIN``; what no plan can lower (parameters,
    gradients, optimizer state, the batch) is in it.

    Example:
        >>> import torch, memfit
        >>> net = memfit.models.create("resnet18", stem="cifar", num_classes=10)
        >>> x = torch.randn(8, 3, 32, 32)
        >>> least = memfit.minimum(net, x)
        >>> memfit.optimize(net, least, x).plan.peak_after_bytes <= least * 2**20
        True
    """
    names = _strategy_names(strategy)
    search = _search_for(model, example_inputs, optimizer, amp, loss_fn, leaf_modules, parallel, accumulate)
    return search.minimum_bytes(names) / MiB


@serialized
def tradeoff(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    points: int = CURVE_POINTS,
    optimizer: OptimizerSpec = "sgd",
    amp: str | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    strategy: str = "auto",
    leaf_modules: LeafSpec = (),
    parallel: Parallel | None = None,
    accumulate: bool = False,
) -> Tradeoff:
    """Memory against recomputation over the feasible range: how a user picks a budget.

    ``points`` budgets evenly spaced from :func:`minimum` to the unplanned step's peak, each with
    the plan :func:`optimize` returns for it (same arguments): its verified peak, its predicted
    extra work and its strategy, all predicted. One capture serves every point.

    Example:
        >>> import torch, memfit
        >>> net = memfit.models.create("resnet18", stem="cifar", num_classes=10)
        >>> curve = memfit.tradeoff(net, torch.randn(8, 3, 32, 32), points=3)
        >>> [round(p.extra_flops_percent) for p in curve.points][-1]
        0
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise MemfitInputError(f"points={points!r}: a tradeoff curve needs an integer of at least 2 budgets")
    names = _strategy_names(strategy)
    search = _search_for(model, example_inputs, optimizer, amp, loss_fn, leaf_modules, parallel, accumulate)
    low = search.minimum_bytes(names)
    high = max(low, search.budget_for(search.unplanned.peak_bytes))
    curve = []
    for k in range(points):
        budget = low + (high - low) * k // (points - 1)
        found = search.cheapest(budget, names)
        curve.append(
            TradeoffPoint(
                budget_mb=budget / MiB,
                peak_mb=found.peak_bytes / MiB,
                extra_flops_percent=found.plan.extra_flops_percent,
                extra_seconds=found.plan.extra_seconds if found.plan.step_seconds > 0 else None,
                extra_time_percent=found.plan.extra_time_percent,
                strategy=found.plan.strategy,
                checkpointed=len(found.plan.checkpointed),
            )
        )
    return Tradeoff(
        model=type(check_model(model)).__name__,
        minimum_mb=low / MiB,
        unplanned_mb=search.unplanned.peak_bytes / MiB,
        points=curve,
    )


def _search_for(
    model: torch.nn.Module,
    example_inputs: Any,
    optimizer: OptimizerSpec,
    amp: str | None,
    loss_fn: Callable[[Any], torch.Tensor] | None,
    leaf_modules: LeafSpec,
    parallel: Parallel | None,
    accumulate: bool,
) -> PlanSearch:
    """The checked arguments, captured once."""
    config = StepConfig(optimizer=optimizer, amp=amp, loss_fn=loss_fn, accumulate=accumulate)
    return PlanSearch(check_model(model), as_inputs(example_inputs), config, list(leaf_modules), parallel)


# Optimizer state per parameter byte, for the saving a compressed layer is expected to bring.
_STATE_PER_BYTE = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}


def _compressed_fit(
    model: torch.nn.Module,
    err: MemfitBudgetError,
    method: str,
    config: StepConfig,
    leaves: list,
    plan_for: Callable[[torch.nn.Module, Budget], PlannedModule],
) -> PlannedModule:
    """Compress the largest layers, as few as the budget needs, then plan the compressed model.

    Each compressed layer is expected to free its weight, its gradient and its optimizer state
    (the compact factors are small); layers are added, largest first, until that expected saving
    covers what recomputation alone misses, and more (doubling) while the verified plan still
    does not fit.
    """
    from .compressors import compress as compress_model
    from .compressors import get_method
    from .compressors.apply import choose_layers

    budget_mb = err.budget_mb  # resolved against the uncompressed model's peak, as given
    if budget_mb is None:  # the search's budget errors all say their budget
        raise err

    name = "generated" if method == "auto" else method
    impl = get_method(name)
    base = impl.config_type()

    def size(layer: str) -> int:  # the chosen layers' weights are plain parameters (none parametrized)
        return model.get_parameter(f"{layer}.weight").numel()

    candidates = sorted(choose_layers(model, base, leaves), key=lambda n: -size(n))
    if not candidates:
        raise err
    per_byte = 2 + _STATE_PER_BYTE.get(config.optimizer if isinstance(config.optimizer, str) else "adam", 2)
    saving = [size(n) * 4 * per_byte for n in candidates]
    missing = (err.minimum_mb - budget_mb) * MiB
    count = next((i + 1 for i in range(len(saving)) if sum(saving[: i + 1]) >= missing), len(saving))
    while True:
        chosen = candidates[:count]
        compressed = compress_model(model, impl, dataclasses.replace(base, include=tuple(chosen)), leaf_modules=leaves)
        try:
            planned = plan_for(compressed, Budget(nbytes=int(budget_mb * MiB)))
        except MemfitBudgetError as again:
            if count == len(candidates):
                raise MemfitBudgetError(
                    f"{again} (with {name} compression of all {count} compressible layers: recomputation alone "
                    f"reaches {err.minimum_mb:.2f} MiB at least)",
                    minimum_mb=again.minimum_mb,
                    budget_mb=budget_mb,
                ) from again
            count = min(2 * count, len(candidates))
            continue
        shown = ", ".join(chosen[:4]) + (f" and {len(chosen) - 4} more" if len(chosen) > 4 else "")
        planned.plan.notes.append(
            f"Compressed {len(chosen)} of {len(candidates)} layers with {name} ({shown}): recomputation alone "
            f"cannot go below {err.minimum_mb:.2f} MiB (feasible minimum, predicted), above the budget of "
            f"{budget_mb:.2f} MiB."
        )
        planned.plan.compressed = chosen
        return planned


def _strategy_names(strategy: str) -> Sequence[str]:
    if strategy == "auto":
        return AUTO_ORDER
    if strategy not in STRATEGIES:
        raise MemfitInputError(f"unknown strategy {strategy!r}; use 'auto' or one of {sorted(STRATEGIES)}")
    return (strategy,)
