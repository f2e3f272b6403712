"""The step as a chain of segments: what keeping or recomputing each run of nodes would cost.

Planners see the network as its compute nodes in execution order, cut at *candidate boundaries*
(positions where few bytes cross the cut; in a DenseNet block that is between layers, in a ResNet
between blocks). A segment is the run of nodes between two candidates, treated one of four ways
(see :mod:`memfit.planner.plan`). For any segment this module gives, from the MemGraph's exact
per-node facts and event log:

* ``hold``: bytes that stay alive from the segment's forward until the backward of whoever uses
  them (its outputs that later nodes need; for a plain segment also everything it saves);
* ``local``: bytes the segment adds on top while its backward runs (recomputed activations, the
  largest transient of its nodes, kernel workspace);
* ``cost`` and ``flops`` of the recomputation: ``cost`` is in nanoseconds, the sum of the
  recomputed nodes' forward times as calibrated on this machine (:mod:`memfit.cost.timing`) and
  what checkpointing itself adds (per segment and per operator), priced by
  :mod:`memfit.planner.pricing`; or, for a graph whose times were
  not calibrated, the FLOP proxy ``flops + BYTE_WEIGHT * bytes written``. Integers either way:
  the planners compare sums of them exactly.

The peak of a plan is then ``baseline + max over segments j of (sum of hold of segments before j
+ local_j + gradients of the parameters at or after j)``, and the optimizer phase's own peak: a
model that is additive along the chain, which is what makes dynamic programming possible. The
dry run of the rewritten module (:mod:`memfit.fit`) has the last word.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..capture.graph import MemGraph, NodeInfo
from ..cost.timeline import replay
from ..cost.timing import BYTE_WEIGHT
from .blocks import find_blocks
from .plan import Segment, SegmentKind
from .pricing import overhead_table, prefix, price_nodes

__all__ = ["BYTE_WEIGHT", "MAX_CANDIDATES", "Chain", "SegmentCost", "SegmentTable"]

# Candidate boundaries kept for planning; DP time grows with the square of this.
MAX_CANDIDATES = 96

_SKIPPED_OPS = ("placeholder", "get_attr")


@dataclass(frozen=True)
class SegmentTable:
    """:class:`SegmentCost`'s fields for every candidate pair, as ``[a, b]`` arrays."""

    hold: np.ndarray
    local: np.ndarray
    cost: np.ndarray
    flops: np.ndarray
    recomputed: np.ndarray


@dataclass(frozen=True)
class SegmentCost:
    """What one segment costs under one treatment (bytes, FLOPs and time; see the module docstring).

    ``seconds``: predicted time of its recomputation (0.0 when the chain is not timed).
    """

    hold: int
    local: int
    cost: int
    flops: int
    recomputed: int
    seconds: float = 0.0


class Chain:
    """The compute nodes of a MemGraph in order, with prefix sums for O(1) segment costs."""

    def __init__(self, graph: MemGraph, max_candidates: int = MAX_CANDIDATES) -> None:
        self.graph = graph
        self.names = [n for n in graph.order if graph.info(n).op not in _SKIPPED_OPS]
        self.pos = {n: i for i, n in enumerate(self.names)}
        n = len(self.names)
        infos = [graph.info(x) for x in self.names]
        self.baseline = sum(b for b, _ in graph.baseline.values())

        prod, lastuse = self._lifetimes(infos)
        act = np.zeros(n, dtype=np.int64)
        for sid, p in prod.items():
            if graph.category_of(sid) == "activation":
                act[p] += graph.nbytes(sid)
        self._written: dict[int, set[str]] = {}  # storage -> nodes that write it in place
        for info in infos:
            for sid in info.writes:
                self._written.setdefault(sid, set()).add(info.name)
        # What a selective segment keeps: every output of a FLOP-counted op (torch's selective
        # checkpointing caches them whether or not autograd saves them), except one that an
        # in-place op changes later, which is recomputed instead.
        expensive = np.array([i.fwd_flops > 0 and not self._overwritten(i) for i in infos])
        out_bytes = np.array([i.out_bytes for i in infos], dtype=np.int64)
        flops = np.array([i.fwd_flops for i in infos], dtype=np.int64)
        self.prices = price_nodes(graph, infos, expensive, flops + BYTE_WEIGHT * out_bytes, prod)
        self._act = prefix(act)
        self._act_exp = prefix(np.where(expensive, act, 0))
        self._cached = prefix(np.where(expensive, out_bytes, 0))
        self._flops = prefix(flops)
        self._flops_exp = prefix(np.where(expensive, flops, 0))
        self.total_act = int(act.sum())
        self.forward_flops = int(flops.sum())

        trans, grad_at, self.optimizer_peak = self._transients(infos)
        self._trans = trans
        self._grad_suffix = np.concatenate([np.cumsum(grad_at[::-1])[::-1], [0]])

        cut = np.zeros(n + 1, dtype=np.int64)  # bytes crossing the boundary before position i
        for sid, p in prod.items():
            cut[p + 1 : lastuse[sid] + 1] += graph.nbytes(sid)
        self.cut = cut
        self.blocks = find_blocks(infos, act)
        forced = {p for kind in self.blocks for block in kind for p in block}  # hand-written policies plannable
        self.cands = self._candidates(cut, act, self._forbidden(infos, prod), max_candidates, forced)
        self._crossing_tables(prod, lastuse, expensive)
        self._tables: dict[tuple[SegmentKind, bool], SegmentTable] = {}
        self._overhead_table: np.ndarray | None = None

    # -- facts from the graph ---------------------------------------------------------------
    def _lifetimes(self, infos: list) -> tuple[dict[int, int], dict[int, int]]:
        """Producer position of every storage a compute node allocates in forward, and the last
        position that reads it in forward (``len(names)`` for what reaches the model output)."""
        g, n = self.graph, len(self.names)
        prod: dict[int, int] = {}
        for e in g.events:
            if e.phase != "forward":
                break
            if e.delta > 0 and e.node in self.pos and e.sid not in prod:
                prod[e.sid] = self.pos[e.node]
        lastuse: dict[int, int] = {}
        for i, info in enumerate(infos):
            users = [self.pos[u] for u in g.dag.successors(self.names[i]) if u in self.pos]
            last = max(users) if users else n
            for sid in info.out_sids:
                if sid in prod:
                    lastuse[sid] = max(lastuse.get(sid, prod[sid] + 1), last)
        for sid, p in prod.items():
            lastuse.setdefault(sid, p + 1)
        return prod, lastuse

    def _transients(self, infos: list) -> tuple[np.ndarray, np.ndarray, int]:
        """Per node, the most temporary bytes alive while its backward runs (gradients in flight,
        scratch; kernel workspace added); per node the gradient bytes its backward allocates; the
        optimizer-phase peak."""
        g = self.graph
        n = len(self.names)
        trans = np.zeros(n, dtype=np.int64)
        grad_at = np.zeros(n, dtype=np.int64)
        temp = 0
        for e in g.events:
            cat = g.category_of(e.sid)
            if cat == "temporary":
                temp += e.delta
            p = self.pos.get(e.node)
            if p is None:
                continue
            if cat == "gradient" and e.delta > 0:
                grad_at[p] += e.delta
            if e.phase == "backward":  # forward temporaries are the cut, already in ``hold``
                trans[p] = max(trans[p], temp)
        for i, info in enumerate(infos):
            trans[i] += max(info.workspace_fwd, info.workspace_bwd)
        timeline = replay(g.baseline.values(), g.events, g.category_of)
        return trans, grad_at, timeline.phase_peaks.get("optimizer", 0)

    def _forbidden(self, infos: list, prod: dict[int, int]) -> np.ndarray:
        """Boundaries that would split an in-place op from the tensor it mutates: a checkpoint
        keeps its inputs to recompute from, and one changed after the segment's forward would be
        seen changed (torch refuses it in backward). From the producer of every storage a node
        writes (through any view: the dispatcher saw the write) to the writer."""
        n = len(self.names)
        bad = np.zeros(n + 1, dtype=bool)
        for i, info in enumerate(infos):
            starts = [prod[s] for s in info.writes if s in prod and prod[s] < i]
            if info.inplace:  # the syntactic view, for graphs captured before writes were recorded
                starts += [self.pos[p] for p in self.graph.dag.predecessors(self.names[i]) if p in self.pos]
            if starts:
                bad[min(starts) + 1 : i + 1] = True
        return bad

    def _candidates(self, cut: np.ndarray, act: np.ndarray, bad: np.ndarray, limit: int, forced: set[int]) -> list[int]:
        """Boundary positions, at most ``limit``: ``forced`` ones first (the blocks' boundaries,
        wherever they do not split an in-place write; evenly thinned if they alone are too many),
        then local minima of the crossing bytes, thinned evenly by activation memory when there
        are too many, topped up with the smallest other cuts when too few."""
        n = len(self.names)
        room = max(0, limit - 2)
        kept = sorted(p for p in forced if 0 < p < n and not bad[p])
        if len(kept) > room:
            kept = sorted({kept[round(k)] for k in np.linspace(0, len(kept) - 1, room)}) if room else []
        taken = set(kept)
        room -= len(kept)
        inner = [i for i in range(1, n) if not bad[i] and i not in taken]
        minima = [i for i in inner if cut[i] <= cut[i - 1] and cut[i] <= cut[i + 1]]
        if len(minima) > room:
            cum = np.cumsum(act)
            weight = np.array([cum[i - 1] for i in minima], dtype=np.float64)
            marks = np.linspace(weight[0], weight[-1], room)  # none when room is 0
            chosen = sorted({minima[int(np.argmin(np.abs(weight - m)))] for m in marks})
        else:
            chosen = list(minima)
            rest = sorted((i for i in inner if i not in set(minima)), key=lambda i: (cut[i], i))
            chosen = sorted(chosen + rest[: room - len(chosen)])
        return [0, *sorted(taken | set(chosen)), n]

    def _crossing_tables(self, prod: dict[int, int], lastuse: dict[int, int], expensive: np.ndarray) -> None:
        """Tables over candidate pairs (a, b).

        ``_cross[a, b]``: bytes produced in [a, b) and read at or after b - what a checkpointed
        segment must keep for later ones; ``_cross_cached[a, b]``: those that FLOP-counted ops
        return, which a selective segment caches as well (one storage, kept once).
        ``_inputs[a, b]``: bytes of unsaved values produced before a and read in [a, b) - what a
        checkpointed segment keeps alive as its inputs when the segment before it is plain (after
        a checkpointed one they are already counted).
        """
        g = self.graph
        c = np.array(self.cands)
        m = len(c)
        users = self._users_by_sid()
        cross = np.zeros((m, m), dtype=np.int64)
        cached = np.zeros((m, m), dtype=np.int64)
        inputs = np.zeros((m, m), dtype=np.int64)
        for sid, p in prod.items():
            pi = int(np.searchsorted(c, p, side="right")) - 1
            li = int(np.searchsorted(c, lastuse[sid], side="right")) - 1
            if li <= pi:
                continue
            nbytes = g.nbytes(sid)
            cross[pi, li] += nbytes
            if expensive[p] and sid in g.info(self.names[p]).out_sids:
                cached[pi, li] += nbytes
            if g.category_of(sid) == "activation":
                continue
            uses = np.array(sorted(users.get(sid, ())), dtype=np.int64)
            for a in range(pi + 1, li + 1):
                later = uses[uses >= c[a]]
                if later.size:  # counted for every b past the first use at or after a
                    first = int(np.searchsorted(c, later[0], side="right"))
                    inputs[a, first:] += nbytes
        self._cross = _pair_table(cross)
        self._cross_cached = _pair_table(cached)
        self._inputs = inputs

    def _users_by_sid(self) -> dict[int, set[int]]:
        """Positions of the nodes that read each storage (through any alias)."""
        out: dict[int, set[int]] = {}
        for name in self.names:
            targets = [self.pos[u] for u in self.graph.dag.successors(name) if u in self.pos]
            for sid in self.graph.info(name).out_sids:
                out.setdefault(sid, set()).update(targets)
        return out

    # -- segment costs ----------------------------------------------------------------------
    @property
    def timed(self) -> bool:
        """Whether ``cost`` is in nanoseconds (the graph's times were calibrated)."""
        return self.prices.timed

    @property
    def step_seconds(self) -> float:
        """Predicted time of the unplanned step's forward and backward (0.0 when not timed)."""
        return self.prices.forward_seconds + self.prices.backward_seconds

    @property
    def m(self) -> int:
        """Number of candidate intervals."""
        return len(self.cands) - 1

    def grads_from(self, a: int) -> int:
        """Gradient bytes allocated by the backward of nodes at or after candidate ``a``."""
        return int(self._grad_suffix[self.cands[a]])

    def grads_table(self) -> np.ndarray:
        """:meth:`grads_from` for every candidate, as an array."""
        return self._grad_suffix[np.array(self.cands)]

    def table(self, kind: SegmentKind, after_plain: bool = True) -> SegmentTable:
        """Costs of every candidate interval [a, b) under ``kind`` (entries with a < b are meaningful)."""
        key = (kind, after_plain)
        if key not in self._tables:
            self._tables[key] = self._make_table(kind, after_plain)
        return self._tables[key]

    def _make_table(self, kind: SegmentKind, after_plain: bool) -> SegmentTable:
        c = np.array(self.cands)
        act = _span(self._act, c)
        local = act + self._trans_spans()
        if kind == "plain":
            zero = np.zeros_like(act)
            return SegmentTable(hold=act, local=local, cost=zero, flops=zero, recomputed=zero)
        held = self._cross + (self._inputs if after_plain else 0)
        fixed = self._overheads() + _span(self.prices.buffers, c)
        cost, flops = self._until_stop(self.prices.cost, c) + fixed, _span(self._flops, c)
        if kind == "recompute":
            return SegmentTable(hold=held, local=local, cost=cost, flops=flops, recomputed=act)
        if kind == "nested":  # every part recomputed twice: in the segment's backward and its own
            return SegmentTable(
                hold=held, local=self._nested_local(), cost=2 * cost, flops=2 * flops, recomputed=2 * act
            )
        # at its backward, kept and recomputed activations are all alive: ``local`` is unchanged
        return SegmentTable(
            hold=held + _span(self._cached, c) - self._cross_cached,
            local=local,
            cost=self._until_stop(self.prices.cost_selective, c) + fixed,
            flops=flops - _span(self._flops_exp, c),
            recomputed=act - _span(self._act_exp, c),
        )

    def _until_stop(self, sums: np.ndarray, c: np.ndarray) -> np.ndarray:
        """``[a, b]``: the sum over the nodes of candidate interval [a, b) that its recomputation
        runs, from a prefix sum."""
        stop = np.maximum(c[:, None], self.prices.stop[c][None, :])
        return sums[stop] - sums[c][:, None]

    def _overheads(self) -> np.ndarray:
        """``[a, b]``: what checkpointing candidate interval [a, b) adds beyond its recomputation."""
        if self._overhead_table is None:
            self._overhead_table = overhead_table(self.prices, np.array(self.cands))
        return self._overhead_table

    def recomputed_nodes(self, a: int, b: int) -> list[str]:
        """The nodes a recomputation of candidate interval [a, b) runs (all of them when the chain
        is not timed)."""
        first = self.cands[a]
        return self.names[first : max(first, int(self.prices.stop[self.cands[b]]))]

    def _trans_spans(self) -> np.ndarray:
        """``[a, b]``: the largest transient of a node in candidate interval [a, b)."""
        c, m = self.cands, self.m
        per = np.array([self._trans[c[k] : c[k + 1]].max(initial=0) for k in range(m)], dtype=np.int64)
        out = np.zeros((m + 1, m + 1), dtype=np.int64)
        for a in range(m):
            out[a, a + 1 :] = np.maximum.accumulate(per[a:])
        return out

    def _nested_local(self) -> np.ndarray:
        """``[a, b]``: bytes on top of the held ones while a nested segment's backward runs.

        Its recomputation keeps only what each part (one candidate interval) passes on; then the
        parts' backwards run last to first, each recomputing itself: at part j the parts before it
        hold their outputs and j holds its activations and transient, ``max over j of
        (S[j] - S[a] + L[j])`` with S the prefix sum of the parts' holds and L their locals.
        """
        m = self.m
        units = np.arange(m)
        hold = self._cross[units, units + 1]
        local = self.table("recompute", after_plain=False).local[units, units + 1]
        before = np.concatenate([[0], np.cumsum(hold)])
        reach = before[:m] + local
        out = np.zeros((m + 1, m + 1), dtype=np.int64)
        for a in range(m):
            out[a, a + 1 :] = np.maximum.accumulate(reach[a:]) - before[a]
        return out

    def segment(self, a: int, b: int, kind: SegmentKind, after_plain: bool = True) -> SegmentCost:
        """The cost of candidate interval [a, b) under ``kind``, after a plain or checkpointed one."""
        t = self.table(kind, after_plain)
        hold, local, cost, flops, recomputed = (int(x[a, b]) for x in (t.hold, t.local, t.cost, t.flops, t.recomputed))
        return SegmentCost(hold, local, cost, flops, recomputed, cost / 1e9 if self.timed else 0.0)

    def costs(self, spans: list[tuple[int, int, SegmentKind]]) -> list[SegmentCost]:
        """The cost of every segment of a plan, each knowing what precedes it."""
        out, after_plain = [], True
        for a, b, kind in spans:
            out.append(self.segment(a, b, kind, after_plain))
            after_plain = kind == "plain"
        return out

    def cost(self, spans: list[tuple[int, int, SegmentKind]]) -> int:
        """Recomputation cost of a plan in the chain model's units (what the planners minimise):
        nanoseconds when the chain is timed, else the FLOP proxy."""
        return sum(s.cost for s in self.costs(spans))

    def peak(self, spans: list[tuple[int, int, SegmentKind]]) -> int:
        """Predicted peak bytes of a plan given as candidate spans, by the chain model."""
        held, worst = 0, 0
        for (a, _, _), s in zip(spans, self.costs(spans), strict=True):
            worst = max(worst, held + s.local + self.grads_from(a))
            held += s.hold
        return max(self.baseline + worst, self.optimizer_peak)

    def unplanned(self) -> list[tuple[int, int, SegmentKind]]:
        """The step without recomputation as the chain prices it most closely: every candidate
        interval its own plain segment (one plain span over the whole chain would price every
        gradient alive beside every activation)."""
        return [(k, k + 1, "plain") for k in range(self.m)]

    def to_segments(self, spans: list[tuple[int, int, SegmentKind]]) -> list[Segment]:
        """Plan segments (node names and predicted figures) from candidate spans."""
        out = []
        for (a, b, kind), s in zip(spans, self.costs(spans), strict=True):
            names = tuple(self.names[self.cands[a] : self.cands[b]])
            infos = [self.graph.info(n) for n in names]
            random = any(i.random for i in infos)
            parts = tuple(self.to_segments([(k, k + 1, "recompute") for k in range(a, b)])) if kind == "nested" else ()
            buffers = sorted(
                {self.graph.buffer_names[w] for i in infos for w in i.writes if w in self.graph.buffer_names}
            )
            unsaved = tuple(i.name for i in infos if self._overwritten(i))
            layers = tuple(dict.fromkeys(i.module_path or i.name for i in infos))
            out.append(
                Segment(
                    names,
                    kind,
                    s.hold,
                    s.recomputed,
                    s.flops,
                    random,
                    parts,
                    tuple(buffers),
                    unsaved,
                    layers,
                    s.seconds,
                )
            )
        return out

    def _overwritten(self, info: NodeInfo) -> bool:
        """Whether another node writes in place into a storage this node's output refers to."""
        return any(self._written.get(sid, set()) - {info.name} for sid in info.out_sids)


def _span(sums: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``[a, b]``: the sum over nodes from candidate a to candidate b, from a prefix sum."""
    at = sums[c]
    return at[None, :] - at[:, None]


def _pair_table(w: np.ndarray) -> np.ndarray:
    """T[a, b] = sum of w[p, l] over a <= p < b <= l, for all candidate pairs."""
    suffix = np.cumsum(w[:, ::-1], axis=1)[:, ::-1]  # suffix[p, b] = sum over l >= b of w[p, l]
    down = np.cumsum(suffix[::-1], axis=0)[::-1]  # down[a, b] = sum over p >= a of suffix[p, b]
    return np.triu(down - np.diag(down)[None, :])
