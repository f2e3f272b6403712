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
    grads = chain.grads_table()
    # [a, before, b] per kind: a segment's figures after a plain (0) or a checkpointed (1) one
    tables = {
        kind: [
            np.stack(
                [getattr(chain.table(kind, after_plain=True), f), getattr(chain.table(kind, after_plain=False), f)],
                axis=1,
            )
            for f in ("hold", "local", "cost")
        ]
        for kind in kinds
    }
    for b in range(1, m + 1):
        for k, kind in enumerate(kinds):
            lo = b - 1 if kind == "plain" else 0  # consecutive plain intervals are one plain segment
            hold, local, cost = (t[lo:b, :, b, None] for t in tables[kind])
            value0, held0 = best[lo:b], held[lo:b]
            a, before, h = np.nonzero(np.isfinite(value0))
            if not a.size:
                continue
            v0, h0 = value0[a, before, h], held0[a, before, h]
            need = h0 + local[a, before, 0] + grads[lo + a]
            if room is None:
                value, ok = np.maximum(v0, need), np.ones(a.size, dtype=bool)
            else:
                value, ok = v0 + cost[a, before, 0], need <= room
            new_held = h0 + hold[a, before, 0]
            target = np.floor(new_held / quantum).astype(np.int64)
            if room is None:
                target = np.minimum(target, size - 1)
            ok &= target < size
            sel = np.flatnonzero(ok)
            if sel.size:
                c = int(kind != "plain")
                steps = np.stack([lo + a[sel], np.full(sel.size, k), before[sel], h[sel]], axis=1)
                _relax(best[b, c], held[b, c], back[b, c], value[sel], new_held[sel], target[sel], steps)
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


def _relax(
    best: np.ndarray,
    held: np.ndarray,
    back: np.ndarray,
    value: np.ndarray,
    new_held: np.ndarray,
    target: np.ndarray,
    steps: np.ndarray,
) -> None:
    """Improve the entries ``target`` with candidate plans (objective, exact held bytes, and the
    step that made each: a, kind, class before, bucket before)."""
    # Only a candidate that beats its entry can replace it, and the best candidate of a target beats
    # it if any does: dropping the others first picks the same plans from a much shorter sort.
    better = (value < best[target]) | ((value == best[target]) & (new_held < held[target]))
    if not better.any():
        return
    value, new_held, target, steps = value[better], new_held[better], target[better], steps[better]
    order = np.lexsort((new_held, value, target))  # per target: best objective, then least held
    first = np.r_[True, target[order][1:] != target[order][:-1]]
    pick = order[first]
    t = target[pick]
    best[t], held[t] = value[pick], new_held[pick]
    back[t] = steps[pick]
