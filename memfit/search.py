"""The cheapest verified plan: what the strategies propose, enacted, dry-run and kept only if it fits.

A :class:`PlanSearch` holds one captured step (one trace, one calibration, one unplanned
simulation) and answers for it the three questions the public functions ask: the cheapest plan
under a budget (:func:`memfit.optimize`), the feasible minimum (:func:`memfit.minimum`) and the
curve between them (:func:`memfit.tradeoff`). Every plan it returns was enacted by the rewrite and
its whole training step dry-run under FakeTensorMode with the kernel workspaces added; the chain's
prices only decide the order in which plans are tried.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .capture.dryrun import capture
from .capture.graph import MemGraph
from .capture.inputs import Inputs
from .capture.trace import graph_of
from .capture.trainstep import StepConfig
from .cost import simulate, timing, workspace
from .cost.parallel import Parallel
from .cost.timeline import Timeline
from .errors import MemfitBudgetError
from .planner import STRATEGIES, Chain, Plan, Spans
from .report.build import report_from_graph, with_storage
from .report.memory import Comparison, MemoryReport, mib
from .rewrite.checkpoint import PlannedModule, rewrite

__all__ = ["BISECT_STEPS", "MARGIN", "MARGIN_BYTES", "VERIFY_ROUNDS", "PlanSearch", "Verified"]

log = logging.getLogger(__name__)

# Plan -> dry run -> tighten by the excess: rounds before giving up on a strategy.
VERIFY_ROUNDS = 4
# When tightening by the excess does not converge (the chain misprices the plans near the budget),
# targets between the least-peak plan and the budget are bisected this many times per strategy.
BISECT_STEPS = 6
# The floor (the least-peak plan) is lowered by searching just below it at most this many times.
FLOOR_ROUNDS = 8
# A verified prediction must stay this fraction below the budget: the cost model's residual error
# against the allocator. The largest measured was 0.13% low, the zoo's ResNet-50 under bf16 autocast
# (a block input read by two bf16 convolutions: their weight-gradient scratch meets the other
# branch's gradient, which calibrating one layer alone does not see; docs/guarantees.md).
MARGIN = 0.0025
# ... and at least these bytes: what is allocated below the dispatcher, where no dry run sees it
# (Adam's CPU step wraps Python scalars as tensors: 20 B at its peak), for steps under 64 KB.
MARGIN_BYTES = 64


@dataclass(frozen=True)
class Verified:
    """A plan enacted and dry-run: the module that runs it, its captured step and its timeline."""

    module: PlannedModule
    plan: Plan
    graph: MemGraph
    timeline: Timeline
    cost: int  # the chain's price of its recomputation: what "cheapest" compares

    @property
    def peak_bytes(self) -> int:
        """The verified (predicted) peak of the planned step."""
        return self.timeline.peak_bytes


class PlanSearch:
    """One model's training step, captured once, and the verified plans made for it.

    Args:
        model: The user's model (read only).
        inputs: The example batch.
        config: The training step.
        leaves: Module types or names torch.fx does not trace into.
        parallel: DDP or FSDP accounting, or None.
    """

    def __init__(
        self, model: torch.nn.Module, inputs: Inputs, config: StepConfig, leaves: list, parallel: Parallel | None
    ) -> None:
        self.model, self.inputs, self.config, self.parallel = model, inputs, config, parallel
        self.gm = graph_of(model, leaves, inputs)  # one trace serves capture, calibration and the rewrite
        self.graph = capture(model, inputs, config, leaf_modules=leaves, gm=self.gm)
        workspace.calibrate(self.graph, self.gm, inputs.tensors, config, leaf_modules=leaves)
        timing.calibrate_times(self.graph, self.gm, inputs.tensors, config, leaf_modules=leaves)
        self.chain = Chain(self.graph)
        self.unplanned = simulate.simulate(self.graph, parallel=parallel)
        self.before: MemoryReport = report_from_graph(
            self.graph, type(model).__name__, self.unplanned, parallel=parallel
        )
        # The chain prices the model's own nodes as one process alone: what runs around them (a
        # large loss's logits and their gradient at the start of backward) and data parallelism's
        # buckets move every plan's peak by about what they move the unplanned one's; chain targets
        # are shifted by that, and verification corrects the rest. (A GPT with an 8192-word vocabulary
        # was planned 11 MiB too low: its plans cost several times what the budget needed.)
        # Measured from the chain's finest unplanned plan (every candidate interval plain): one
        # plain segment over the whole chain holds every gradient beside every activation, which
        # the step never does (EfficientNet-B0: 17 MiB, its gradients, over the unplanned peak,
        # so that every plan was predicted that much low and most failed their dry runs).
        self.shift = self.chain.peak(self.chain.unplanned()) - self.unplanned.peak_bytes
        self.failures: list[str] = []
        self._verified: dict[tuple, Verified | None] = {}
        self._floors: dict[tuple, Verified] = {}

    # -- budgets --------------------------------------------------------------------------------
    @staticmethod
    def room(budget_bytes: int) -> int:
        """What a verified prediction may reach under a budget: ``MARGIN`` (``MARGIN_BYTES`` at least) below it."""
        return budget_bytes - max(math.ceil(budget_bytes * MARGIN), MARGIN_BYTES)

    @classmethod
    def budget_for(cls, peak_bytes: int) -> int:
        """The least budget whose room holds a verified peak (the inverse of :meth:`room`)."""
        budget = max(math.ceil(peak_bytes / (1 - MARGIN)), peak_bytes + MARGIN_BYTES)
        while cls.room(budget - 1) >= peak_bytes:  # the room rises by 0 or 1 a byte: a step or two
            budget -= 1
        while cls.room(budget) < peak_bytes:
            budget += 1
        return budget

    # -- verification ---------------------------------------------------------------------------
    def verify(self, spans: Spans, name: str) -> Verified | None:
        """The plan enacted and dry-run (once per plan); None when that raised: a torch feature
        the plan leans on may refuse the model where another plan or strategy does not. It is then
        discarded like a plan that does not fit."""
        key = (tuple(spans), name)
        if key not in self._verified:
            self._verified[key] = self._enact(spans, name)
        return self._verified[key]

    def _enact(self, spans: Spans, name: str) -> Verified | None:
        plan = Plan(
            segments=self.chain.to_segments(spans),
            strategy=name,
            forward_flops=self.chain.forward_flops,
            step_seconds=self.chain.step_seconds,
        )
        try:
            planned = rewrite(self.model, self.gm, plan)
            vgraph = capture(planned, self.inputs, self.config)
        except Exception as e:  # noqa: BLE001  whatever torch raises, the plan is only discarded
            self.failures.append(f"a {name} plan failed its dry run ({type(e).__name__}: {e})")
            log.warning("memfit: %s", self.failures[-1])
            return None
        _carry_workspace(self.graph, vgraph)
        timeline = simulate.simulate(vgraph, inner=self.graph, parallel=self.parallel)
        return Verified(planned, plan, vgraph, timeline, self.chain.cost(spans))

    # -- the three questions --------------------------------------------------------------------
    def cheapest(self, budget_bytes: int, names: Sequence[str], deadline: float = math.inf) -> Verified:
        """The cheapest verified plan whose peak fits ``budget_bytes`` (less ``MARGIN``).

        Raises:
            MemfitBudgetError: None fits; the message gives the feasible minimum.
        """
        found = self._fitting(budget_bytes, names, deadline)
        if found is not None:
            return found
        floor = self.floor(names, budget_bytes)
        if floor.peak_bytes <= self.room(budget_bytes):
            return floor
        raise self._infeasible(budget_bytes, floor)

    def floor(self, names: Sequence[str], budget_bytes: int | None = None) -> Verified:
        """The plan of least verified peak the search reaches: the least of the strategies'
        least-peak plans (or the unplanned step), lowered while a budget just below its peak still
        finds a plan. Searching is deterministic, so the least budget :meth:`cheapest` accepts
        is exactly ``budget_for(floor.peak_bytes)``: :func:`memfit.minimum` and the error agree.
        ``budget_bytes``: the budget asked for, for the error when no plan can run."""
        key = tuple(names)
        if key not in self._floors:
            best = self.least(names, budget_bytes)
            plain = self.verify([(0, self.chain.m, "plain")], "none")
            if plain is not None and plain.peak_bytes < best.peak_bytes:
                best = plain
            for _ in range(FLOOR_ROUNDS):
                lower = self._fitting(self.budget_for(best.peak_bytes) - 1, names)
                if lower is None:
                    break
                best = lower
            self._floors[key] = best
        return self._floors[key]

    def least(self, names: Sequence[str], budget_bytes: int | None = None) -> Verified:
        """The verified plan of least peak among the strategies' least-peak plans (``budget_bytes``:
        the budget asked for, for the error when none can run)."""
        results = [r for n in names if (r := self.verify(STRATEGIES[n].lowest_peak(self.chain), n)) is not None]
        if not results:
            raise MemfitBudgetError(
                f"no plan of strategies {', '.join(names)} could run: {'; '.join(self.failures)}. Try another "
                f"strategy, or a budget above the unplanned peak, {mib(self.unplanned.peak_bytes):.2f} MiB (predicted)",
                minimum_mb=mib(self.budget_for(self.unplanned.peak_bytes)),
                budget_mb=None if budget_bytes is None else mib(budget_bytes),
            )
        return min(results, key=lambda r: (r.peak_bytes, r.cost))

    def minimum_bytes(self, names: Sequence[str]) -> int:
        """The feasible minimum: the least budget under which :meth:`cheapest` finds a plan."""
        return self.budget_for(self.floor(names).peak_bytes)

    def finish(self, result: Verified, budget_bytes: int) -> PlannedModule:
        """The planned module with its plan's figures and the before/after report filled in."""
        planned, plan, name = result.module, result.plan, type(self.model).__name__
        after = report_from_graph(result.graph, name, result.timeline, inner=self.graph, parallel=self.parallel)
        plan.budget_bytes = budget_bytes
        plan.peak_before_bytes = self.unplanned.peak_bytes
        plan.peak_after_bytes = result.peak_bytes
        plan.activations_before_bytes = _held_into_backward(self.graph)
        plan.activations_after_bytes = _held_into_backward(result.graph)
        plan.levels_before = [(phase, level) for phase, _, level in self.unplanned.levels]
        plan.levels_after = [(phase, level) for phase, _, level in result.timeline.levels]
        if self.parallel is not None:
            plan.notes.append(f"Memory figures: {self.parallel.describe()}.")
        planned.plan = plan
        planned.report = Comparison(before=with_storage(self.before, self.model), after=with_storage(after, self.model))
        return planned

    # -- search ---------------------------------------------------------------------------------
    def _fitting(self, budget_bytes: int, names: Sequence[str], deadline: float = math.inf) -> Verified | None:
        """The cheapest plan the search verifies under ``budget_bytes``, without lowering the floor."""
        room = self.room(budget_bytes)
        if self.unplanned.peak_bytes <= room:
            plain = self.verify([(0, self.chain.m, "plain")], "none")
            if plain is not None:
                return plain
        found, gave_up = self._best_first(names, room, deadline)
        if found is None or gave_up:
            # where the chain misprices the plans near the budget: bisect what was not tried, so
            # that a looser budget does not fall back to the least-peak plan
            between = self._between([n for n in names if found is None or n in gave_up], room)
            if between is not None and (found is None or between.cost < found.cost):
                found = between
        if found is not None:
            return found
        least = self.least(names, budget_bytes)
        return least if least.peak_bytes <= room else None

    def _best_first(self, names: Sequence[str], room: int, deadline: float) -> tuple[Verified | None, set[str]]:
        """Best-first search over strategies and tightenings, in order of predicted cost.

        Every strategy plans for the room first; plans are verified cheapest first, and one whose
        dry run exceeds the room is planned again for a target lowered by the excess (at most
        ``VERIFY_ROUNDS`` times per strategy): usually one dry run in all. No strategy's plan is
        assumed costlier than another's (a hand-written policy can beat dp's where dp's plans
        fail verification). Past ``deadline`` no further strategy starts. Also returns the
        strategies that gave up on the way: their plans between the failed ones and the budget
        were never tried, and may be cheaper than the one found.
        """
        chain = self.chain
        # (cost or its lower bound, strategy index, round, tie-break, target, spans or None: not planned)
        heap: list[tuple[int, int, int, int, int, Spans | None]] = []
        pushes = itertools.count()

        def push(bound: int, i: int, rnd: int, target: int, spans: Spans | None) -> None:
            heapq.heappush(heap, (bound, i, rnd, next(pushes), target, spans))

        for i in range(len(names)):
            push(0, i, 0, room + self.shift, None)
        gave_up: set[str] = set()
        while heap:
            bound, i, rnd, _, target, spans = heapq.heappop(heap)
            if spans is None:
                if rnd == 0 and i > 0 and time.perf_counter() > deadline:
                    continue
                spans = STRATEGIES[names[i]].cheapest(chain, target)
                if spans is not None:
                    push(chain.cost(spans), i, rnd, target, spans)
                elif rnd > 0:
                    gave_up.add(names[i])
                continue
            result = self.verify(spans, names[i])
            if result is None:  # a plan that cannot run is discarded like one that does not fit
                continue
            excess = result.peak_bytes - room
            if excess <= 0:
                return result, gave_up
            if rnd + 1 < VERIFY_ROUNDS:
                # a little more than the excess, so the next round does not graze the budget
                push(bound, i, rnd + 1, target - excess - room // 500, None)
            else:
                gave_up.add(names[i])
        return None, gave_up

    def _between(self, names: Sequence[str], room: int) -> Verified | None:
        """The cheapest verified plan between the least-peak one and the budget, by bisecting the
        chain target: a higher target gives a cheaper plan with a higher verified peak. Without it
        a budget whose own plans all verify over it fell back to the least-peak plan, so a looser
        budget could cost more recomputation than a tighter one."""
        best: Verified | None = None
        for name in names:
            strategy = STRATEGIES[name]
            low, high = self.chain.peak(strategy.lowest_peak(self.chain)), room + self.shift
            for _ in range(BISECT_STEPS):
                if high - low <= room // 1000:
                    break
                target = (low + high) // 2
                spans = strategy.cheapest(self.chain, target)
                result = self.verify(spans, name) if spans is not None else None
                if result is not None and result.peak_bytes <= room:
                    low = target
                    if best is None or result.cost < best.cost:
                        best = result
                else:
                    high = target
        return best

    def _infeasible(self, budget_bytes: int, floor: Verified) -> MemfitBudgetError:
        """The error for a budget below the feasible minimum, with what is held whatever is recomputed."""
        b = self.before
        peak = floor.peak_bytes
        how = "unplanned" if floor.plan.strategy == "none" else f"with strategy {floor.plan.strategy}"
        minimum = self.budget_for(peak)
        held = b.parameters_bytes + b.buffers_bytes + b.inputs_bytes + b.gradients_bytes + b.optimizer_bytes
        return MemfitBudgetError(
            f"no plan fits {mib(budget_bytes):.2f} MiB: the feasible minimum is {mib(minimum):.2f} MiB (predicted: the "
            f"least peak, {mib(peak):.2f} MiB {how}, and a {100 * MARGIN:g}% margin). Parameters "
            f"{mib(b.parameters_bytes):.2f} + gradients {mib(b.gradients_bytes):.2f} + optimizer state "
            f"{mib(b.optimizer_bytes):.2f} + buffers and inputs {mib(b.buffers_bytes + b.inputs_bytes):.2f} = "
            f"{mib(held):.2f} MiB are held whatever is recomputed. Raise the budget, lower the batch size, use a "
            "lighter optimizer, or shrink the weights with compress= (memfit.minimum gives the least budget).",
            minimum_mb=mib(minimum),
            budget_mb=mib(budget_bytes),
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
