"""The cheapest verified plan: what the strategies propose, enacted, dry-run and kept only if it fits.

A :class:`PlanSearch` holds one captured step (one trace, one calibration, one unplanned
simulation) and answers for it the three questions the public functions ask: the cheapest plan
under a budget (:func:`memfit.optimize`), the feasible minimum (:func:`memfit.minimum`) and the
curve between them (:func:`memfit.tradeoff`). Every plan it returns was enacted by the rewrite and
its whole training step dry-run under FakeTensorMode with the kernel workspaces added; the chain's
prices only decide the order in which plans are tried. A plan tried against a budget stops its dry
run once its live tensors alone pass the budget: most plans the feasible minimum rules out.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from .capture.dryrun import capture
from .capture.graph import MemGraph
from .capture.inputs import Inputs
from .capture.trace import graph_of
from .capture.tracker import LimitExceeded
from .capture.trainstep import StepConfig
from .cost import simulate, timing, workspace
from .cost.parallel import Parallel
from .cost.timeline import Timeline
from .errors import MemfitBudgetError
from .planner import STRATEGIES, Chain, Plan, Spans
from .report.build import report_from_graph, with_storage
from .report.memory import Comparison, MemoryReport, mib
from .rewrite.checkpoint import PlannedModule, rewrite, segment_of

__all__ = ["LADDER", "MARGIN", "MARGIN_BYTES", "PlanSearch", "Verified"]

log = logging.getLogger(__name__)

# Chain targets per strategy whose plans are tried, between its least-peak plan and the unplanned
# step: a budget gets the plan of the highest target that verifies under it, so about 1/LADDER of
# that range is what a budget may lose to the one it would get planned exactly for.
LADDER = 128
# The floor (the least-peak plan) is lowered by searching just below it at most this many times.
FLOOR_ROUNDS = 8
# The lowest rungs of a strategy's ladder, offered to every budget (see :meth:`PlanSearch._offers`).
FLOOR_RUNGS = 8
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
        timing.calibrate_times(self.graph, self.gm, inputs.tensors, config, leaf_modules=leaves, segment_of=segment_of)
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
        # Dry runs by spans alone: two strategies often propose the same plan (dp and selective
        # where no segment is selective: 8 of EfficientNet-B0's 21 dry runs to its minimum), and
        # the module and its step are the same whatever the strategy is called. A failure is its
        # message; a run stopped by a room, that room.
        self._dry_runs: dict[tuple, tuple[MemGraph, Timeline] | str | int] = {}
        self._floors: dict[tuple, Verified] = {}
        self._lists: dict[str, list] = {}  # per strategy: its fixed plans, or its chain targets
        self._rungs: dict[tuple[str, int], tuple[int, Spans] | None] = {}
        self._lowests: dict[str, Spans] = {}

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
        return self._verify(spans, name, None)

    def fits(self, spans: Spans, name: str, room: int) -> Verified | None:
        """The plan verified, if its peak is within ``room``; None if not, or if it cannot run.

        Its dry run stops once the step's live tensors pass ``room``, so a plan that cannot fit
        costs part of one (the floor's search dry-runs many such plans). Whether a plan fits is
        decided as :meth:`verify` decides it: a stopped step's peak is above the room, and one
        that fits is never stopped."""
        found = self._verify(spans, name, room)
        return found if found is not None and found.peak_bytes <= room else None

    def _verify(self, spans: Spans, name: str, room: int | None) -> Verified | None:
        key = (tuple(spans), name)
        if key in self._verified:
            return self._verified[key]
        if self._stopped(key[0], room):  # known not to fit: no module to rewrite for it
            return None
        plan = Plan(
            segments=self.chain.to_segments(spans),
            strategy=name,
            forward_flops=self.chain.forward_flops,
            step_seconds=self.chain.step_seconds,
        )
        try:
            planned = rewrite(self.model, self.gm, plan)
            run = self._dry_run(planned, key[0], room)
        except Exception as e:  # noqa: BLE001  whatever torch raises, the plan is only discarded
            run = self._dry_runs[key[0]] = f"{type(e).__name__}: {e}"
        if isinstance(run, int):  # stopped above the room: not verified in full
            return None
        if isinstance(run, str):
            self.failures.append(f"a {name} plan failed its dry run ({run})")
            log.warning("memfit: %s", self.failures[-1])
            self._verified[key] = None
        else:
            self._verified[key] = Verified(planned, plan, *run, self.chain.cost(spans))
        return self._verified[key]

    def _dry_run(self, planned: PlannedModule, spans: tuple, room: int | None) -> tuple[MemGraph, Timeline] | str | int:
        """The planned step's graph and timeline, or ``room`` if its dry run stopped above it. A
        stop kept from a tighter room is run again (:meth:`_verify` answers a room no looser from
        the stop itself). Under data parallelism a process's step is not the captured one, so no
        run stops."""
        run = self._dry_runs.get(spans)
        if run is None or isinstance(run, int):
            limit = room if self.parallel is None else None
            try:
                vgraph = capture(planned, self.inputs, self.config, limit=limit)
            except LimitExceeded:
                run = cast(int, limit)  # raised only with one
            else:
                _carry_workspace(self.graph, vgraph)
                run = vgraph, simulate.simulate(vgraph, inner=self.graph, parallel=self.parallel)
            self._dry_runs[spans] = run
        return run

    def _stopped(self, spans: tuple, room: int | None) -> bool:
        """Whether the plan's dry run stopped above a room at least as loose as ``room``."""
        run = self._dry_runs.get(spans)
        return isinstance(run, int) and room is not None and room <= run

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
            # the unplanned step matters only below that peak: a run past it stops there
            plain = self.fits([(0, self.chain.m, "plain")], "none", best.peak_bytes - 1)
            if plain is not None:
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
        the budget asked for, for the error when none can run).

        Only the first plan that runs is dry-run whole; each later one with the least peak so
        far as its room, since a plan stopped above it cannot be the least (one of equal peak is
        not stopped, and the cost decides)."""
        results: list[Verified] = []
        for n in names:
            spans = self._lowest(n)
            least = min((r.peak_bytes for r in results), default=None)
            found = self.verify(spans, n) if least is None else self.fits(spans, n, least)
            if found is not None:
                results.append(found)
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
        pace = self.graph.pace
        if pace is not None:
            at = "" if pace.batch is None else f" at batch {pace.batch}"
            plan.notes.append(
                f"Times: priced x{pace.factor:.2f}, this process's pace: the whole forward{at} took "
                f"{1e3 * pace.measured:.1f} ms (meas) against {1e3 * pace.reference:.1f} ms when the prices were made"
                + (f"; in it the layers ran {pace.alone:.2f}x their figures alone." if pace.alone != 1.0 else ".")
            )
        planned.plan = plan
        planned.report = Comparison(before=with_storage(self.before, self.model), after=with_storage(after, self.model))
        return planned

    # -- search ---------------------------------------------------------------------------------
    def _fitting(self, budget_bytes: int, names: Sequence[str], deadline: float = math.inf) -> Verified | None:
        """The cheapest plan the search verifies under ``budget_bytes``, without lowering the floor.

        Each strategy offers its plans cheapest first, from a list that does not depend on the
        budget (:meth:`_offers`); a budget only decides how far down that list a strategy starts,
        and which verified peaks fit. A looser budget starts no later and accepts more, so its plan
        is never predicted costlier. Strategies past ``deadline`` are not started.
        """
        room = self.room(budget_bytes)
        if self.unplanned.peak_bytes <= room:
            plain = self.verify([(0, self.chain.m, "plain")], "none")
            if plain is not None:
                return plain
        best: Verified | None = None
        for i, name in enumerate(names):
            if i > 0 and time.perf_counter() > deadline:
                break
            for cost, spans in self._offers(name, room):
                if best is not None and cost >= best.cost:
                    break  # the rest cost at least as much
                result = self.fits(spans, name, room)
                if result is not None:
                    best = result
                    break
        # The least-peak plans are offered to every budget whatever the chain predicts, so that a
        # looser budget keeps any a tighter one fell back on.
        for name in names:
            spans = self._lowest(name)
            if best is None or self.chain.cost(spans) < best.cost:
                result = self.fits(spans, name, room)
                if result is not None and (best is None or result.cost < best.cost):
                    best = result
        if best is None:
            self.least(names, budget_bytes)  # raises where no plan of these strategies can run
        return best

    def _lowest(self, name: str) -> Spans:
        """A strategy's least-peak plan, solved once: every budget's search offers it."""
        if name not in self._lowests:
            self._lowests[name] = STRATEGIES[name].lowest_peak(self.chain)
        return self._lowests[name]

    def _offers(self, name: str, room: int) -> Iterator[tuple[int, Spans]]:
        """A strategy's plans whose chain peak is within ``room`` (shifted), cheapest first.

        A strategy with a fixed list of plans (hand-written policies, memonger's thresholds)
        offers that list. Any other is asked for its cheapest plan at ``LADDER`` + 1 chain targets
        evenly spaced from its least-peak plan's peak to the unplanned step's, fixed per model:
        from the highest target within the room down (the cost of the dp's plans does not fall as
        its target does). Targets spaced by the budget instead, or lowered by each plan's excess
        over it, made a looser budget's search try plans a tighter one never saw, and return
        costlier ones (4 rises in 34 budgets of ResNet-50).
        """
        chain, strategy, ceiling = self.chain, STRATEGIES[name], room + self.shift
        if strategy.candidates is not None:
            if name not in self._lists:
                plans = [(chain.cost(p), chain.peak(p), p) for p in strategy.candidates(chain)]
                self._lists[name] = sorted(plans, key=lambda t: (t[0], t[1]))
            yield from ((cost, p) for cost, peak, p in self._lists[name] if peak <= ceiling)
            return
        if name not in self._lists:
            low, high = chain.peak(self._lowest(name)), chain.peak(chain.unplanned())
            self._lists[name] = [low + (high - low) * k // LADDER for k in range(LADDER + 1)]
        ladder = self._lists[name]
        # The lowest FLOOR_RUNGS are offered to every budget: near the least-peak plan the chain's
        # error varies from plan to plan by more than the rungs are apart (a ResNet-18 of 1.5 MB:
        # 8 KB, 22 rungs), and a plan a few rungs up verified lower and cheaper than the lowest.
        targets = ladder[: max(FLOOR_RUNGS, sum(t <= ceiling for t in ladder))]
        for target in reversed(targets):
            key = (name, target)
            if key not in self._rungs:
                spans = strategy.cheapest(chain, target)
                self._rungs[key] = None if spans is None else (chain.cost(spans), spans)
            rung = self._rungs[key]
            if rung is None:
                return  # nothing fits a lower target either
            yield rung

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
