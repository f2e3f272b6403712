"""memfit.optimize, minimum and tradeoff: the cheapest verified plan for a budget, the least
budget any plan fits, and the curve between them.

Every plan is verified before it is returned (:mod:`memfit.search`): the rewritten module's whole
training step is dry-run under FakeTensorMode with the storage tracker (nothing allocated) and the
kernel workspaces of its nodes are added. A plan whose verified peak exceeds the budget gives way
to the strategy's next cheapest, planned for a lower target of a ladder fixed per model, so a
looser budget never gets a plan predicted costlier.
"""

from __future__ import annotations

import copy
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
from .cost.measurement import measure_wrapped_step
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
# optimize(compile=...): compiled steps measured (each a compilation) before giving up.
COMPILE_ROUNDS = 6

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
    compile: bool | dict[str, Any] = False,  # torch's own word for it (nn.Module.compile)
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
        compile: True, or ``torch.compile``'s keyword arguments: the result is compiled
            (``nn.Module.compile``) and the budget holds for the compiled step. Inductor saves,
            fuses and frees otherwise than the eager step that memfit predicts, so the compiled
            step of a copy is measured (real tensors: compilation, then a few steps) and, while it
            exceeds the budget, planned again for the budget less the excess, up to
            ``COMPILE_ROUNDS`` times. The plan's notes give the measured peak.

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

    options = _compile_options(compile, parallel)
    config = StepConfig(optimizer=optimizer, amp=amp, loss_fn=loss_fn, accumulate=accumulate)

    def fit(budget: Budget) -> PlannedModule:
        try:
            return plan_for(model, budget)
        except MemfitBudgetError as err:
            if compress is None:
                raise
            return _compressed_fit(model, err, compress, config, list(leaf_modules), plan_for)

    planned = fit(spec) if options is None else _compiled_fit(fit, spec, options, example_inputs, config)
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


def _compile_options(value: object, parallel: Parallel | None) -> dict[str, Any] | None:
    """``torch.compile``'s keyword arguments for ``optimize(compile=value)``; None: no compiling."""
    if value is False:
        return None
    if value is not True and not isinstance(value, dict):
        raise MemfitInputError(f"compile={value!r}: give True, False or a dict of torch.compile's keyword arguments")
    if parallel is not None:
        raise MemfitInputError(
            "compile=...: not with parallel= (a compiled step is measured, and that needs the process group); "
            "plan with compile=False, wrap the result, then torch.compile the wrapped module"
        )
    return {} if value is True else dict(value)


def _compiled_fit(
    fit: Callable[[Budget], PlannedModule],
    budget: Budget,
    options: dict[str, Any],
    example_inputs: Any,
    config: StepConfig,
) -> PlannedModule:
    """A plan whose compiled step, measured, fits ``budget``; compiled.

    The compiled peak of the plan for an eager target is erratic in the target: inductor's
    partitioner saves more around some checkpoint regions and less around others (a small GPT:
    its tightest eager plans compile 0.5 MiB above the selective plans of a looser target). So
    after the plan for the budget itself, the eager target moves by multiples of its excess, the
    looser side first (a looser plan recomputes less), within the feasible minimum and the
    unplanned peak, and the first plan whose compiled step fits is returned.
    """
    planned = fit(budget)
    plan = planned.plan
    assert plan.budget_bytes is not None  # every plan optimize makes has its budget
    limit = plan.budget_bytes
    tried: dict[tuple, int] = {}  # compiled peak per distinct plan
    made_for, peak = limit, _compiled_peak(planned, example_inputs, config, options)
    chosen = _signature(planned)
    tried[chosen] = peak
    floor, excess = 1, max(peak - limit, 1)
    probes = (limit + k * excess * sign for k in range(1, COMPILE_ROUNDS) for sign in (1, -1))
    while peak > limit and len(tried) < COMPILE_ROUNDS:
        target = next((t for t in probes if floor <= t <= plan.peak_before_bytes + excess), None)
        if target is None:
            break
        try:
            candidate = fit(Budget(nbytes=target))
        except MemfitBudgetError as err:  # below the feasible minimum: the tightest plan instead
            floor = round(err.minimum_mb * MiB)
            target, candidate = floor, fit(Budget(nbytes=floor))
        key = _signature(candidate)
        if key not in tried:
            tried[key] = _compiled_peak(candidate, example_inputs, config, options)
            if tried[key] <= limit:
                planned, peak, made_for, chosen = candidate, tried[key], target, key
    if peak > limit:
        measured = ", ".join(f"{p / MiB:.2f}" for p in tried.values())
        raise MemfitBudgetError(
            f"budget {limit / MiB:.2f} MiB: compiled, the steps of {len(tried)} plans measured {measured} MiB "
            "(meas), none within it; raise the budget (compiled peaks do not follow the eager plan's, so the "
            "least of these is a guide, not a bound) or plan with compile=False (the eager step keeps it)",
            minimum_mb=min(tried.values()) / MiB,
            budget_mb=limit / MiB,
        )
    planned.plan.budget_bytes = limit
    others = [p for k, p in tried.items() if k != chosen]
    planned.plan.notes.append(
        f"Compiled (torch.compile): the step measured {peak / MiB:.2f} MiB (meas, on a copy) for a budget of "
        f"{limit / MiB:.2f} MiB, the eager plan made for {made_for / MiB:.2f} MiB"
        + (f"; other plans compiled to {', '.join(f'{p / MiB:.2f}' for p in others)} MiB." if others else ".")
    )
    planned.compile(**options)
    return planned


def _signature(planned: PlannedModule) -> tuple:
    """What makes two plans the same: their segments and how each is treated."""
    return tuple((s.nodes, s.kind, tuple(i.nodes for i in s.inner)) for s in planned.plan.segments)


def _compiled_peak(planned: PlannedModule, example_inputs: Any, config: StepConfig, options: dict[str, Any]) -> int:
    """The measured peak of a compiled copy of ``planned``'s step: the model's parameters, buffers
    and gradients, and the global RNG streams, are left as they were."""
    work = copy.deepcopy(planned)
    work.compile(**options)
    cuda = sorted({p.device.index or 0 for p in work.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        peak, _ = measure_wrapped_step(work, example_inputs, config)
    return peak


def _strategy_names(strategy: str) -> Sequence[str]:
    if strategy == "auto":
        return AUTO_ORDER
    if strategy not in STRATEGIES:
        raise MemfitInputError(f"unknown strategy {strategy!r}; use 'auto' or one of {sorted(STRATEGIES)}")
    return (strategy,)
