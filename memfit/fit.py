"""memfit.optimize: plan what to recompute, rewrite the model, and prove the budget holds.

Every plan is verified before it is returned: the rewritten module's whole training step is dry-run
under FakeTensorMode with the storage tracker (nothing allocated) and the kernel workspaces of its
nodes are added. A plan whose verified peak exceeds the budget is tightened and planned again.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from .budget import Budget
from .capture.dryrun import capture
from .capture.graph import MemGraph
from .capture.inputs import Inputs, as_inputs
from .capture.trace import check_model, graph_of, serialized
from .capture.trainstep import OptimizerSpec, StepConfig
from .compressors.apply import META_KEY
from .cost import simulate, workspace
from .cost.parallel import Parallel
from .cost.timeline import Timeline
from .errors import MemfitBudgetError, MemfitInputError
from .io.serialize import architecture_of
from .planner import STRATEGIES, Chain, Plan, Spans
from .report.build import report_from_graph, with_storage
from .report.memory import Comparison, MiB, mib
from .rewrite.checkpoint import rewrite

__all__ = ["optimize", "AUTO_ORDER", "VERIFY_ROUNDS", "MARGIN"]

log = logging.getLogger(__name__)

# A plan enacted and dry-run: the module, its Plan, its captured graph and simulated timeline.
Verified = tuple[fx.GraphModule, Plan, MemGraph, Timeline]

# auto tries these in turn, best first, and keeps the cheapest verified plan within its time.
AUTO_ORDER = ("selective", "dp", "chen")
# Plan -> dry run -> tighten by the excess: rounds before giving up on a strategy.
VERIFY_ROUNDS = 4
# When tightening by the excess does not converge (the chain misprices the plans near the budget),
# targets between the least-peak plan and the budget are bisected this many times per strategy.
BISECT_STEPS = 6
# A verified prediction must stay this fraction below the budget: the cost model's residual error
# against the allocator. The largest excess the zoo matrix measured was 0.01% (VGG-16, dp).
MARGIN = 0.001


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
    leaf_modules: Iterable[type[torch.nn.Module] | str] = (),
    time_limit_s: float = 60.0,
    compress: str | None = None,
    parallel: Parallel | None = None,
    accumulate: bool = False,
) -> fx.GraphModule:
    """A module that trains like ``model`` and whose training step peaks at most ``budget_mb``.

    Args:
        model: The network; it is not modified. Its parameters are shared with the result.
        budget_mb: Budget for the peak of one training step (forward, backward, optimizer
            step), allocator-level (kernel workspaces included): MiB, a size with its unit
            (``"1.5GiB"``) or a percentage of the unplanned step's predicted peak (``"85%"``);
            see :class:`memfit.Budget`. The verified prediction stays ``MARGIN`` (0.1%) below
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
        An ``fx.GraphModule`` with ``.plan`` (print it for the table) and ``.report``
        (predicted memory before and after).

    Raises:
        MemfitBudgetError: No plan fits; the message gives the feasible minimum.

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
    config = StepConfig(optimizer=optimizer, amp=amp, loss_fn=loss_fn, accumulate=accumulate)
    names = _strategy_names(strategy)
    model = check_model(model)
    budget = Budget.parse(budget_mb)
    inputs = as_inputs(example_inputs)
    leaves = list(leaf_modules)
    plan_for = lambda net, b: _fit(net, b, inputs, config, names, leaves, started + time_limit_s, parallel)  # noqa: E731
    try:
        planned = plan_for(model, budget)
    except MemfitBudgetError as err:
        if compress is None:
            raise
        planned = _compressed_fit(model, err, compress, config, leaves, plan_for)
    planned.meta[META_KEY] = {"architecture": architecture_of(model)}
    planned.plan.planning_seconds = time.perf_counter() - started
    return planned


def _fit(
    model: torch.nn.Module,
    budget_spec: Budget,
    inputs: Inputs,
    config: StepConfig,
    names: Sequence[str],
    leaves: list,
    deadline: float,
    parallel: Parallel | None,
) -> fx.GraphModule:
    """Plan, enact and verify for one model (see :func:`optimize`)."""
    gm = graph_of(model, leaves, inputs)  # one trace serves capture, calibration and the rewrite
    graph = capture(model, inputs, config, leaf_modules=leaves, gm=gm)
    workspace.calibrate(graph, gm, inputs.tensors, config, leaf_modules=leaves)
    chain = Chain(graph)
    before = report_from_graph(graph, type(model).__name__, parallel=parallel)
    budget = budget_spec.resolve(before.peak_bytes)
    room = budget - math.ceil(budget * MARGIN)  # what a verified prediction may reach
    # The chain prices plans as one process alone; data parallelism moves every plan's peak by
    # about what it moves the unplanned one's, and verification corrects the rest.
    shift = simulate.simulate(graph).peak_bytes - before.peak_bytes if parallel else 0

    failures: list[str] = []

    def verify(spans: Spans, name: str) -> Verified | None:
        """The plan enacted and dry-run; None when that raised: a torch feature the plan leans on
        may refuse the model where another plan or strategy does not. It is then discarded like
        a plan that does not fit."""
        plan = Plan(segments=chain.to_segments(spans), strategy=name, budget_bytes=budget)
        try:
            planned = rewrite(model, gm, plan)
            vgraph = capture(planned, inputs, config)
        except Exception as e:  # noqa: BLE001  whatever torch raises, the plan is only discarded
            failures.append(f"a {name} plan failed its dry run ({type(e).__name__}: {e})")
            log.warning("memfit: %s", failures[-1])
            return None
        _carry_workspace(graph, vgraph)
        return planned, plan, vgraph, simulate.simulate(vgraph, inner=graph, parallel=parallel)

    result = verify([(0, chain.m, "plain")], "none") if before.peak_bytes <= room else None
    if result is None:
        result = _search(chain, names, room, shift, verify, deadline)
    if result is None:
        result = _between(chain, names, room, shift, verify)
    if result is None:
        result = _at_minimum(chain, names, budget, room, verify, before, failures)
    planned, plan, vgraph, timeline = result
    after = report_from_graph(vgraph, type(model).__name__, timeline, inner=graph, parallel=parallel)
    plan.peak_before_bytes = before.peak_bytes
    plan.peak_after_bytes = timeline.peak_bytes
    plan.activations_before_bytes = _held_into_backward(graph)
    plan.activations_after_bytes = _held_into_backward(vgraph)
    plan.forward_flops = chain.forward_flops
    plan.levels_before = [(phase, level) for phase, _, level in simulate.simulate(graph, parallel=parallel).levels]
    plan.levels_after = [(phase, level) for phase, _, level in timeline.levels]
    if parallel is not None:
        plan.notes.append(f"Memory figures: {parallel.describe()}.")
    planned.plan = plan
    planned.report = Comparison(before=with_storage(before, model), after=with_storage(after, model))
    return planned


# Optimizer state per parameter byte, for the saving a compressed layer is expected to bring.
_STATE_PER_BYTE = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}


def _compressed_fit(
    model: torch.nn.Module,
    err: MemfitBudgetError,
    method: str,
    config: StepConfig,
    leaves: list,
    plan_for: Callable[[torch.nn.Module, Budget], fx.GraphModule],
) -> fx.GraphModule:
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

    name = "generated" if method == "auto" else method
    impl = get_method(name)
    base = impl.config_type()
    candidates = sorted(choose_layers(model, base, leaves), key=lambda n: -model.get_submodule(n).weight.numel())
    if not candidates:
        raise err
    per_byte = 2 + _STATE_PER_BYTE.get(config.optimizer if isinstance(config.optimizer, str) else "adam", 2)
    saving = [model.get_submodule(n).weight.numel() * 4 * per_byte for n in candidates]
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


def _search(
    chain: Chain,
    names: Sequence[str],
    budget: int,
    shift: int,
    verify: Callable[[Spans, str], Verified | None],
    deadline: float,
) -> Verified | None:
    """The cheapest plan that verifies, by best-first search over strategies and tightenings.

    Plans are verified in order of predicted cost; one whose dry run exceeds the budget is planned
    again for a target lowered by the excess (at most ``VERIFY_ROUNDS`` times per strategy).
    ``names`` run from the richest strategy down (selective's choices include dp's, dp is optimal
    where chen is greedy), so a strategy's plan costs at least its predecessor's and is made only
    when that bound is reached: usually one plan and one dry run. Past ``deadline`` no further
    strategy is started. ``shift`` is added to the budget for the chain's own (one-process) prices.
    """
    # (cost or its lower bound, strategy index, round, tie-break, target, spans or None: not planned)
    heap: list[tuple[int, int, int, int, int, Spans | None]] = []
    pushes = itertools.count()

    def push(bound: int, i: int, rnd: int, target: int, spans: Spans | None) -> None:
        heapq.heappush(heap, (bound, i, rnd, next(pushes), target, spans))

    push(0, 0, 0, budget + shift, None)
    excesses: dict[tuple, int] = {}
    while heap:
        bound, i, rnd, _, target, spans = heapq.heappop(heap)
        if spans is None:
            spans = STRATEGIES[names[i]].cheapest(chain, target)
            if spans is not None:
                bound = chain.cost(spans)
                push(bound, i, rnd, target, spans)
            if rnd == 0 and i + 1 < len(names) and time.perf_counter() < deadline:
                push(bound, i + 1, 0, budget + shift, None)
            continue
        key = tuple(spans)
        if key not in excesses:
            result = verify(spans, names[i])
            if result is None:  # a plan that cannot run is discarded like one that does not fit
                continue
            excesses[key] = result[3].peak_bytes - budget
            if excesses[key] <= 0:
                return result
        if rnd + 1 < VERIFY_ROUNDS:
            # a little more than the excess, so the next round does not graze the budget
            push(bound, i, rnd + 1, target - excesses[key] - budget // 500, None)
    return None


def _between(
    chain: Chain, names: Sequence[str], room: int, shift: int, verify: Callable[[Spans, str], Verified | None]
) -> Verified | None:
    """The cheapest verified plan between the least-peak one and the budget, by bisecting the
    chain target: a higher target gives a cheaper plan with a higher verified peak. Without it a
    budget whose own plans all verify over it fell back to the least-peak plan, so a looser
    budget could cost more recomputation than a tighter one."""
    best: tuple[int, Verified] | None = None
    for name in names:
        strategy = STRATEGIES[name]
        low, high = chain.peak(strategy.lowest_peak(chain)), room + shift
        for _ in range(BISECT_STEPS):
            if high - low <= room // 1000:
                break
            target = (low + high) // 2
            spans = strategy.cheapest(chain, target)
            result = verify(spans, name) if spans is not None else None
            if spans is not None and result is not None and result[3].peak_bytes <= room:
                low = target
                if best is None or chain.cost(spans) < best[0]:
                    best = chain.cost(spans), result
            else:
                high = target
    return best[1] if best is not None else None


def _at_minimum(
    chain: Chain, names: Sequence[str], budget: int, room: int, verify: Callable, before: Any, failures: list[str]
) -> Any:
    """The plan of least verified peak, if it fits after all; otherwise the error that says why."""
    results = [r for n in names if (r := verify(STRATEGIES[n].lowest_peak(chain), n)) is not None]
    if not results:
        raise MemfitBudgetError(
            f"no plan of strategies {', '.join(names)} could run for {mib(budget):.2f} MiB: {'; '.join(failures)}. "
            "Try another strategy, or a budget above the unplanned peak, "
            f"{mib(before.peak_bytes):.2f} MiB (predicted)",
            minimum_mb=mib(math.ceil((before.peak_bytes + 1) / (1 - MARGIN))),
            budget_mb=mib(budget),
        )
    best = min(results, key=lambda r: r[3].peak_bytes)
    if best[3].peak_bytes <= room:
        return best
    # recomputation can raise a peak it cannot lower (weights' gradients at the end of backward):
    # then the least is the model as it is
    least, how = min((best[3].peak_bytes, f"with strategy {best[1].strategy}"), (before.peak_bytes, "unplanned"))
    minimum = math.ceil((least + 1) / (1 - MARGIN))  # the least budget whose room holds that peak
    floor = (
        before.parameters_bytes + before.buffers_bytes + before.inputs_bytes + before.gradients_bytes + before.optimizer_bytes
    )
    raise MemfitBudgetError(
        f"no plan fits {mib(budget):.2f} MiB: the feasible minimum is {mib(minimum):.2f} MiB (predicted: the "
        f"least peak, {mib(least):.2f} MiB {how}, and a {100 * MARGIN:g}% margin). Parameters {mib(before.parameters_bytes):.2f} + gradients "
        f"{mib(before.gradients_bytes):.2f} + optimizer state {mib(before.optimizer_bytes):.2f} + buffers and "
        f"inputs {mib(before.buffers_bytes + before.inputs_bytes):.2f} = {mib(floor):.2f} MiB are held whatever is "
        "recomputed. Raise the budget, lower the batch size, use a lighter optimizer, or shrink the weights "
        "with compress=.",
        minimum_mb=mib(minimum),
        budget_mb=mib(budget),
    )


def _carry_workspace(graph: MemGraph, vgraph: MemGraph) -> None:
    """Kernel workspaces of the planned graph's inline nodes, from the calibrated originals."""
    for info in vgraph.nodes:
        if info.name in graph.dag:
            src = graph.info(info.name)
            info.workspace_fwd, info.workspace_bwd = src.workspace_fwd, src.workspace_bwd
            info.workspace_error = src.workspace_error


def _held_into_backward(graph: MemGraph) -> int:
    """Bytes the forward leaves alive for backward, beyond what was there before the step."""
    level = 0
    for e in graph.events:
        if e.phase != "forward":
            break
        level += e.delta
    return level
