"""Data parallelism: one process's memory of a training step under DDP or FSDP.

memfit captures the step as one process running alone. Data parallelism changes what each
process holds, and :func:`distribute` rewrites the captured step (the storages alive before it
and its event log) into one process's step:

* DDP (``DistributedDataParallel(model, gradient_as_bucket_view=True)``): gradients live in
  communication buckets, allocated once and alive all step; a gradient autograd produces is
  copied into its bucket by DDP's hook and freed.
* FSDP (``fully_shard`` applied to each unit, then to the root): each process keeps a shard of
  every parameter (dim 0 split in ``world_size`` equal rows, padded), of its gradient and of its
  optimizer state. Before a unit runs its parameters are all-gathered (a flat buffer of the padded
  size, copied out into whole parameters); they are freed after its forward (the root's stay
  until its backward ends) and gathered again for its backward, prefetching the next unit's.
  After its backward its whole gradients go through a flat reduce-scatter buffer and leave a
  shard. The optimizer step works on shards.

Each process's activations are those of its own batch, so they do not change: ``example_inputs``
is one process's batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..capture.graph import MemGraph
from ..capture.tracker import Event
from ..errors import MemfitInputError

__all__ = ["Parallel", "Step", "distribute"]

KINDS = ("ddp", "fsdp")


@dataclass(frozen=True)
class Parallel:
    """How the training step is spread over processes; memfit's figures are then per process.

    Attributes:
        kind: ``"ddp"`` (replicated parameters, gradients in DDP's buckets) or ``"fsdp"``
            (``torch.distributed.fsdp.fully_shard``: parameters, gradients and optimizer state
            sharded over ``world_size`` processes).
        world_size: Number of processes. DDP's per-process memory does not depend on it.
        units: FSDP only: qualified names of the modules ``fully_shard`` is applied to before the
            root, e.g. ``("layer1.0", "layer1.1")``; parameters outside every unit belong to the
            root. None: every direct child of the model that holds parameters.

    Example:
        >>> import torch, memfit
        >>> net = memfit.models.create("resnet18", stem="cifar", num_classes=10)
        >>> x = torch.randn(8, 3, 32, 32)
        >>> one = memfit.estimate(net, x, optimizer="adam", calibrate=False)
        >>> eight = memfit.estimate(net, x, optimizer="adam", calibrate=False,
        ...                         parallel=memfit.Parallel("fsdp", world_size=8))
        >>> eight.optimizer_bytes * 8 >= one.optimizer_bytes > eight.optimizer_bytes * 7
        True
    """

    kind: str = "ddp"
    world_size: int = 1
    units: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MemfitInputError(f"Parallel kind must be one of {KINDS}, not {self.kind!r}")
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise MemfitInputError(f"world_size must be a positive integer, got {self.world_size!r}")
        if self.units is not None:
            if self.kind != "fsdp":
                raise MemfitInputError("units name FSDP's fully_shard modules; leave them out for DDP")
            object.__setattr__(self, "units", tuple(self.units))

    def unit_names(self, param_names: Iterable[str]) -> tuple[str, ...]:
        """The FSDP units for a model with these parameters (the default resolved), checked.

        A parameter belongs to the innermost unit whose name prefixes it, else to the root.
        """
        names = list(param_names)
        units = self.units
        if units is None:
            units = tuple(dict.fromkeys(n.split(".", 1)[0] for n in names if "." in n))
        for u in units:
            if not any(n.startswith(u + ".") for n in names):
                example = ", ".join(repr(n.rsplit(".", 1)[0]) for n in names[:3])
                raise MemfitInputError(
                    f"FSDP unit {u!r} holds no parameters of the model; units are qualified module names "
                    f"such as {example}"
                )
        return units

    def describe(self) -> str:
        """The parallelism, as reports print it."""
        return f"{self.kind.upper()}, {self.world_size} process{'es' if self.world_size > 1 else ''}, per process"


@dataclass
class Step:
    """One process's training step: what is alive before it and what it allocates and frees.

    Attributes:
        baseline: ``(bytes, category)`` of every storage alive before the step.
        events: Allocation and free events in order.
        categories: Category of every storage the events touch.
    """

    baseline: list[tuple[int, str]]
    events: list[Event]
    categories: dict[int, str] = field(default_factory=dict)

    def category_of(self, sid: int) -> str:
        """Category of a storage the events touch."""
        return self.categories.get(sid, "temporary")

    def baseline_bytes(self, category: str) -> int:
        """Bytes of one category alive before the step."""
        return sum(b for b, c in self.baseline if c == category)

    def held_at_end(self, category: str) -> int:
        """Bytes of one category alive when the step ends (gradients: what the optimizer read)."""
        return self.baseline_bytes(category) + sum(e.delta for e in self.events if self.category_of(e.sid) == category)


def single(graph: MemGraph) -> Step:
    """The captured step as it is: one process alone."""
    return Step(
        baseline=list(graph.baseline.values()),
        events=list(graph.events),
        categories={s: graph.category_of(s) for s in graph.storage_bytes},
    )


def distribute(graph: MemGraph, parallel: Parallel | None, node_params: Callable[[str], Iterable[str]]) -> Step:
    """One process's step of ``graph`` under ``parallel`` (the step as it is for None).

    Args:
        graph: The captured step.
        parallel: The parallelism.
        node_params: Qualified names of the parameters a node (by the name events carry) uses.
    """
    if parallel is None:
        return single(graph)
    if parallel.kind == "ddp":
        return _ddp(graph)
    return _Fsdp(graph, parallel, node_params).step()


def _ddp(graph: MemGraph) -> Step:
    step = single(graph)
    grads = graph.sids_of("gradient")
    step.baseline.append((sum(graph.storage_bytes[s] for s in grads), "gradient"))  # the buckets
    events: list[Event] = []
    for e in graph.events:
        if e.sid not in grads:
            events.append(e)
        elif e.delta > 0:  # produced, copied into its bucket by DDP's hook, freed
            events += [e, Event(e.sid, -e.delta, e.phase, e.node)]
    step.events = events
    return step


class _Fsdp:
    """The rewrite for FSDP (see the module docstring); ``""`` is the root unit."""

    def __init__(self, graph: MemGraph, parallel: Parallel, node_params: Callable[[str], Iterable[str]]) -> None:
        self.graph, self.world = graph, parallel.world_size
        self.units = ["", *parallel.unit_names(graph.param_shapes)]
        self.unit_of_param = {name: self._unit_of(name) for name in graph.param_shapes}
        self.node_units: dict[str, set[str]] = {}
        self.node_params = node_params
        self.full = dict.fromkeys(self.units, 0)
        self.shard = dict.fromkeys(self.units, 0)
        for name, (shape, size) in graph.param_shapes.items():
            numel = math.prod(shape)
            self.full[self.unit_of_param[name]] += numel * size
            self.shard[self.unit_of_param[name]] += self.sharded(name, numel * size)
        self.fresh = itertools.count(-1, -1)  # storages the rewrite adds get negative ids
        self.categories = {s: graph.category_of(s) for s in graph.storage_bytes}
        self.sizes = dict(graph.storage_bytes)
        self.gloo = graph.device == "cpu"
        # the walk's state
        self.out: list[Event] = []
        self.flats: dict[str, int] = {}  # unit -> its all-gather's flat output, issued, not copied out
        self.gathered: dict[str, int] = {}  # unit -> its whole parameters
        self.lingering: int | None = None  # the last all-gather's flat output
        self.grads: dict[str, list[int]] = {}  # unit -> its whole gradients
        self.pending: list[int] = []  # the last reduce-scatter's flat input (and gloo's copy)
        self.backward_started = False
        self.late: int | None = None  # see reserve_late_release

    def _unit_of(self, param: str) -> str:
        return max((u for u in self.units if u and param.startswith(u + ".")), key=len, default="")

    def sharded(self, param: str, nbytes: int) -> int:
        """Bytes of one process's shard of a parameter-shaped storage (dim 0 padded to the world)."""
        shape = self.graph.param_shapes[param][0]
        rows = shape[0] if shape else 1
        return nbytes // rows * math.ceil(rows / self.world)

    def units_of(self, node: str) -> set[str]:
        if node not in self.node_units:
            self.node_units[node] = {self.unit_of_param[p] for p in self.node_params(node) if p in self.unit_of_param}
        return self.node_units[node]

    def _spans(self, events: list[Event], phase: str) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
        """Per unit, the first and last event of the phase that runs its nodes: index -> units."""
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for i, e in enumerate(events):
            if e.phase == phase:
                for u in self.units_of(e.node):
                    first.setdefault(u, i)
                    last[u] = i
        starts: dict[int, list[str]] = {}
        ends: dict[int, list[str]] = {}
        for u, i in first.items():
            starts.setdefault(i, []).append(u)
            ends.setdefault(last[u], []).append(u)
        return starts, ends

    def _new(self, nbytes: int, category: str) -> int:
        sid = next(self.fresh)
        self.categories[sid], self.sizes[sid] = category, nbytes
        return sid

    def step(self) -> Step:
        g = self.graph
        baseline = []
        for sid, (nbytes, cat) in g.baseline.items():
            owner = g.owners.get(sid)
            baseline.append(
                (self.sharded(owner, nbytes) if owner and cat in ("parameter", "optimizer") else nbytes, cat)
            )
        events = g.events
        grads = g.sids_of("gradient")
        fwd_starts, fwd_ends = self._spans(events, "forward")
        bwd_starts, bwd_ends = self._spans(events, "backward")
        last_backward = max((i for i, e in enumerate(events) if e.phase == "backward"), default=-1)
        # a unit's pre-backward prefetches the next unit's all-gather; the root's, the first unit's
        order = ["", *(u for i in sorted(bwd_starts) for u in bwd_starts[i] if u)]
        prefetch = dict(itertools.pairwise(order))
        ratio = sum(self.shard.values()) / max(sum(self.full.values()), 1)
        scratch = {e.sid for e in events if e.phase == "optimizer" and e.delta > 0 and e.sid not in g.baseline}
        for i, e in enumerate(events):
            if i == 0:
                self.unshard("", e)
            if e.phase == "forward":
                for u in fwd_starts.get(i, []):
                    self.unshard(u, e)
            elif e.phase == "backward" and i in bwd_starts:
                if not self.backward_started:
                    self.backward_started = True
                    self.reserve_late_release(e)
                    self.issue(prefetch[""], e)
                for u in bwd_starts[i]:
                    # a node inside a checkpointed segment is first recomputed: FSDP's pre-forward
                    self.unshard(u, e, by_forward=e.node not in g.dag)
                    if u in prefetch:
                        self.issue(prefetch[u], e)
            if e.sid in grads:
                if e.delta > 0:  # whole until its unit's reduce-scatter
                    self.out.append(e)
                    self.grads.setdefault(self.unit_of_param[g.owners[e.sid]], []).append(e.sid)
            elif e.sid in scratch:  # the optimizer's scratch is shaped like what it updates: shards
                size = round(g.storage_bytes[e.sid] * ratio)
                self.out.append(Event(e.sid, size if e.delta > 0 else -size, e.phase, e.node))
            else:
                self.out.append(e)
            if e.phase == "forward":
                for u in fwd_ends.get(i, []):
                    if u:  # the root keeps its parameters for its backward
                        self.reshard(u, e)
            elif e.phase == "backward":
                for u in bwd_ends.get(i, []):
                    if u:
                        self.reduce(u, e)
                if i == last_backward:
                    self.reduce("", e)
                    if self.late is not None:
                        self._emit(self.late, -1, e, "late release", "")
        return Step(baseline=baseline, events=self.out, categories=self.categories)

    def _emit(self, sid: int, sign: int, e: Event, what: str, u: str) -> None:
        self.out.append(Event(sid, sign * self.sizes[sid], e.phase, f"{what} {u or '(root)'}"))

    def _transient(self, nbytes: int, e: Event, what: str, u: str) -> None:
        """gloo's collectives copy their flat buffer once more (NCCL's work in place)."""
        if self.gloo:
            tmp = self._new(nbytes, "temporary")
            self._emit(tmp, 1, e, what, u)
            self._emit(tmp, -1, e, what, u)

    def reserve_late_release(self, e: Event) -> None:
        """gloo's worker thread lets go of a finished collective's buffers when it gets to it: on
        a busy machine the measured backward peak of the same step rises by up to a unit's flat
        buffer. The largest is reserved through backward, so that the prediction bounds it."""
        if self.gloo:
            self.late = self._new(self.world * max(self.shard.values()), "temporary")
            self._emit(self.late, 1, e, "late release", "")

    def issue(self, u: str, e: Event) -> None:
        """Start a unit's all-gather: its flat output buffer (padded shards of every process)."""
        if u in self.gathered or u in self.flats:
            return
        flat = self.flats[u] = self._new(self.world * self.shard[u], "temporary")
        self._emit(flat, 1, e, "all-gather", u)
        self._transient(self.sizes[flat], e, "all-gather", u)

    def unshard(self, u: str, e: Event, by_forward: bool = True) -> None:
        """A unit's parameters made whole, copied out of the flat buffer.

        Copied in a (re)computation's forward, the flat buffer lives until the next unit's copy;
        before the unit's backward, it is freed at once (measured on FSDP2 with gloo).
        """
        if u in self.gathered:
            return
        self.issue(u, e)
        self.gathered[u] = self._new(self.full[u], "parameter")
        self._emit(self.gathered[u], 1, e, "all-gather", u)
        flat = self.flats.pop(u)
        if not by_forward:
            self._emit(flat, -1, e, "all-gather", u)
            return
        if self.lingering is not None:
            self._emit(self.lingering, -1, e, "all-gather", u)
        self.lingering = flat

    def reshard(self, u: str, e: Event) -> None:
        """Free a unit's whole parameters."""
        sid = self.gathered.pop(u, None)
        if sid is not None:
            self._emit(sid, -1, e, "reshard", u)

    def reduce(self, u: str, e: Event) -> None:
        """After a unit's backward: whole gradients -> flat reduce-scatter input -> this process's shard.

        The flat input (and gloo's copy of it) lives until the next unit's reduce-scatter.
        """
        self.reshard(u, e)
        whole = self.grads.pop(u, [])
        if not whole:
            return
        for sid in self.pending:
            self._emit(sid, -1, e, "reduce-scatter", u)
        shards = sum(self.sharded(self.graph.owners[s], self.sizes[s]) for s in whole)
        self.pending = [self._new(self.world * shards, "temporary")]
        self._emit(self.pending[0], 1, e, "reduce-scatter", u)
        for sid in whole:
            self._emit(sid, -1, e, "reduce-scatter", u)
        self._emit(self._new(shards, "gradient"), 1, e, "reduce-scatter", u)
        if self.gloo:
            self.pending.append(self._new(self.world * shards, "temporary"))
            self._emit(self.pending[-1], 1, e, "reduce-scatter", u)
