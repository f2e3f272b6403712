"""Optimal segmentation by dynamic programming over the chain of candidate boundaries.

The Rotor/Revolve idea for heterogeneous chains, on memfit's byte-exact segment costs: walking the
candidates left to right, the state is the memory held so far (in ``BUCKETS`` quanta, rounded up);
each step closes one segment and chooses its treatment. Two problems share the recursion:

* :func:`cheapest` - least recomputation cost whose predicted peak is at most a budget;
* :func:`lowest_peak` - the least predicted peak of any segmentation (the feasible minimum).

Each runs in O(candidates^2 * BUCKETS), vectorised over the segment's start and the buckets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .chain import Chain
from .plan import SegmentKind, Spans

__all__ = ["BUCKETS", "KINDS", "cheapest", "lowest_peak"]

BUCKETS = 256
KINDS: tuple[SegmentKind, ...] = ("plain", "recompute", "nested")


def cheapest(chain: Chain, budget: int, kinds: Sequence[SegmentKind] = KINDS) -> Spans | None:
    """The segmentation of least recomputation cost whose chain-model peak fits ``budget`` bytes.

    Returns None when no segmentation fits.
    """
    room = budget - chain.baseline
    if room <= 0 or chain.optimizer_peak > budget:
        return None
    return _solve(chain, kinds, quantum=room / BUCKETS, room=room)


def lowest_peak(chain: Chain, kinds: Sequence[SegmentKind] = KINDS) -> Spans:
    """The segmentation with the least chain-model peak (ties: the cheapest found first)."""
    spans = _solve(chain, kinds, quantum=max(1, chain.total_act) / BUCKETS, room=None)
    assert spans is not None  # without a budget every chain has a plan
    return spans


def _solve(chain: Chain, kinds: Sequence[SegmentKind], quantum: float, room: int | None) -> Spans | None:
    """Shared recursion. With ``room`` the objective is cost under the bound; without it, the peak.

    ``best[b, c, h]`` is the best objective over plans of the first ``b`` intervals whose last
    segment is plain (c = 0) or checkpointed (c = 1) - a checkpointed segment keeps its inputs
    only when they come from a plain one - and which hold between ``h`` and ``h + 1`` quanta;
    ``held`` keeps the exact bytes of that plan, so feasibility is tested exactly and the quanta
    only decide which plans compete (ties go to the plan that holds less). ``back`` rebuilds it.
    """
    m, size = chain.m, BUCKETS + 1
    best = np.full((m + 1, 2, size), np.inf)
    held = np.full((m + 1, 2, size), np.inf)
    back = np.full((m + 1, 2, size, 4), -1, dtype=np.int64)  # (a, kind, class before, h before)
    best[0, 0, 0] = held[0, 0, 0] = 0.0
    grads = np.repeat(chain.grads_table(), 2)  # [a * 2 + before], as the tables' columns
    # [b, a * 2 + before] per kind: a segment [a, b)'s figures after a plain (0) or a checkpointed
    # (1) one, laid out so that one take gathers them for every state of the rows before b
    tables = {
        kind: [
            np.stack(
                [getattr(chain.table(kind, after_plain=True), f), getattr(chain.table(kind, after_plain=False), f)],
                axis=1,
            )
            .transpose(2, 0, 1)
            .reshape(m + 1, -1)
            for f in ("hold", "local", "cost")
        ]
        for kind in kinds
    }
    # The reachable states of the rows done so far, in the order (a, before, h): a row is final
    # once its b has passed, so each is listed once instead of searched for at every later b.
    states = _States()
    states.add_row(0, best[0], held[0])
    for b in range(1, m + 1):
        for k, kind in enumerate(kinds):
            # consecutive plain intervals are one plain segment: a plain one starts at b - 1 only
            first = states.starts[b - 1] if kind == "plain" else 0
            end = states.n
            row, h = states.row[first:end], states.h[first:end]
            v0, h0 = states.v[first:end], states.held[first:end]
            if not row.size:
                continue
            hold, local, cost = (t[b].take(row) for t in tables[kind])
            need = h0 + local + grads.take(row)
            if room is None:
                value, ok = np.maximum(v0, need), np.ones(row.size, dtype=bool)
            else:
                value, ok = v0 + cost, need <= room
            new_held = h0 + hold
            target = np.floor(new_held / quantum).astype(np.int64)
            if room is None:
                target = np.minimum(target, size - 1)
            ok &= target < size
            sel = np.flatnonzero(ok)
            if sel.size:
                c = int(kind != "plain")
                pick = sel[_relax(best[b, c], held[b, c], value[sel], new_held[sel], target[sel])]
                start, before = np.divmod(row[pick], 2)
                back[b, c, target[pick]] = np.stack([start, np.full(pick.size, k), before, h[pick]], axis=1)
        states.add_row(b, best[b], held[b])
    final = best[m]
    if not np.isfinite(final).any():
        return None
    c, j = (int(v) for v in np.unravel_index(int(np.lexsort((held[m].ravel(), final.ravel()))[0]), final.shape))
    spans: Spans = []
    end = m
    while end > 0:
        start, k, c_before, j_before = (int(v) for v in back[end, c, j])
        spans.append((start, end, kinds[k]))
        end, c, j = start, c_before, j_before
    return spans[::-1]


class _States:
    """The finite entries of the rows of ``best``, appended row by row (arrays grown by doubling)."""

    def __init__(self) -> None:
        self.row = np.empty(0, dtype=np.int64)  # a * 2 + before: the tables' column
        self.h = np.empty(0, dtype=np.int64)
        self.v = np.empty(0)
        self.held = np.empty(0)
        self.n = 0
        self.starts: list[int] = []  # where each row's states begin

    def add_row(self, a: int, best: np.ndarray, held: np.ndarray) -> None:
        before, h = np.nonzero(np.isfinite(best))
        lo, hi = self.n, self.n + before.size
        if hi > self.row.size:  # grown by doubling: appending stays linear in the states
            grow = max(hi, 2 * self.row.size) - self.row.size
            for name in ("row", "h", "v", "held"):
                old = getattr(self, name)
                setattr(self, name, np.concatenate([old, np.empty(grow, dtype=old.dtype)]))
        self.starts.append(lo)
        self.row[lo:hi] = 2 * a + before
        self.h[lo:hi] = h
        self.v[lo:hi] = best[before, h]
        self.held[lo:hi] = held[before, h]
        self.n = hi


def _relax(
    best: np.ndarray, held: np.ndarray, value: np.ndarray, new_held: np.ndarray, target: np.ndarray
) -> np.ndarray:
    """Improve the entries ``target`` with candidate plans (objective, exact held bytes); the
    candidates that replaced an entry, one per entry (the caller records how each was made)."""
    # Only a candidate that beats its entry can replace it, and the best candidate of a target beats
    # it if any does: dropping the others first leaves fewer to compare.
    better = np.flatnonzero((value < best[target]) | ((value == best[target]) & (new_held < held[target])))
    if not better.size:
        return better
    # per target: the least objective, then the least held, then the first candidate (as a stable
    # sort by the three would pick), by three reductions instead of a sort
    least = np.full(best.size, np.inf)
    np.minimum.at(least, target[better], value[better])
    keep = better[value[better] == least[target[better]]]
    least[:] = np.inf
    np.minimum.at(least, target[keep], new_held[keep])
    keep = keep[new_held[keep] == least[target[keep]]]
    first = np.full(best.size, keep.size)
    np.minimum.at(first, target[keep], np.arange(keep.size))
    pick = keep[first[first < keep.size]]
    best[target[pick]], held[target[pick]] = value[pick], new_held[pick]
    return pick
