"""Optimal segmentation by dynamic programming over the chain of candidate boundaries.

The Rotor/Revolve idea for heterogeneous chains, on memfit's byte-exact segment costs: walking the
candidates left to right, the state is the memory held so far (in ``BUCKETS`` quanta, rounded up);
each step closes one segment and chooses its treatment. Two problems share the recursion:

* :func:`cheapest` - least recomputation cost whose predicted peak is at most a budget;
* :func:`lowest_peak` - the least predicted peak of any segmentation (the feasible minimum).

Each runs in O(candidates^2 * BUCKETS), vectorised over the buckets.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .chain import Chain
from .plan import SegmentKind

__all__ = ["cheapest", "lowest_peak", "KINDS", "BUCKETS", "Spans"]

BUCKETS = 256
KINDS: tuple[SegmentKind, ...] = ("plain", "recompute")

Spans = list[tuple[int, int, SegmentKind]]


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
    for b in range(1, m + 1):
        for a in range(b):
            grads = chain.grads_from(a)
            for before in (0, 1):
                live = np.flatnonzero(np.isfinite(best[a, before]))
                if not live.size:
                    continue
                value0, held0 = best[a, before, live], held[a, before, live]
                for k, kind in enumerate(kinds):
                    if kind == "plain" and b != a + 1:
                        continue  # consecutive plain intervals behave as one longer plain segment
                    s = chain.segment(a, b, kind, after_plain=before == 0)
                    need = held0 + s.local + grads
                    if room is None:
                        value, ok = np.maximum(value0, need), np.ones(live.size, dtype=bool)
                    else:
                        value, ok = value0 + s.cost, need <= room
                    new_held = held0 + s.hold
                    target = np.floor(new_held / quantum).astype(np.int64)
                    if room is None:
                        target = np.minimum(target, size - 1)
                    ok &= target < size
                    sel = np.flatnonzero(ok)
                    if sel.size:
                        _relax(best[b, int(kind != "plain")], held[b, int(kind != "plain")],
                               back[b, int(kind != "plain")], value[sel], new_held[sel], target[sel],
                               (a, k, before), live[sel])
    final = best[m]
    if not np.isfinite(final).any():
        return None
    c, j = np.unravel_index(int(np.lexsort((held[m].ravel(), final.ravel()))[0]), final.shape)
    spans: Spans = []
    b = m
    while b > 0:
        a, k, before, j_before = (int(v) for v in back[b, c, j])
        spans.append((a, b, kinds[k]))
        b, c, j = a, before, j_before
    return spans[::-1]


def _relax(
    best: np.ndarray,
    held: np.ndarray,
    back: np.ndarray,
    value: np.ndarray,
    new_held: np.ndarray,
    target: np.ndarray,
    step: tuple[int, int, int],
    source: np.ndarray,
) -> None:
    """Improve the entries ``target`` with candidate plans (objective, exact held bytes)."""
    order = np.lexsort((new_held, value, target))  # per target: best objective, then least held
    first = np.r_[True, target[order][1:] != target[order][:-1]]
    pick = order[first]
    t, v, hb = target[pick], value[pick], new_held[pick]
    better = (v < best[t]) | ((v == best[t]) & (hb < held[t]))
    if not better.any():
        return
    t, v, hb, src = t[better], v[better], hb[better], source[pick][better]
    best[t], held[t] = v, hb
    back[t] = np.stack([np.full_like(t, step[0]), np.full_like(t, step[1]), np.full_like(t, step[2]), src], axis=1)
