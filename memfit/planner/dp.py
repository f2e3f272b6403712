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

    ``best[b][c][h]`` is the best objective over plans of the first ``b`` intervals that hold
    ``h`` quanta and whose last segment is plain (c = 0) or checkpointed (c = 1): a checkpointed
    segment keeps its inputs only when they come from a plain one. ``back`` rebuilds the plan.
    """
    m, size = chain.m, BUCKETS + 1
    h = np.arange(size, dtype=np.float64) * quantum
    best = np.full((m + 1, 2, size), np.inf)
    back = np.full((m + 1, 2, size, 4), -1, dtype=np.int64)  # (a, kind, class before, h before)
    best[0, 0, 0] = 0.0
    for b in range(1, m + 1):
        for a in range(b):
            grads = chain.grads_from(a)
            for before in (0, 1):
                src = best[a, before]
                live = np.flatnonzero(np.isfinite(src))
                if not live.size:
                    continue
                top = int(live[-1])
                for k, kind in enumerate(kinds):
                    if kind == "plain" and b != a + 1:
                        continue  # consecutive plain intervals behave as one longer plain segment
                    s = chain.segment(a, b, kind, after_plain=before == 0)
                    shift = chain.bucket(s.hold, quantum)
                    upto = min(top, size - 1 - shift)
                    if room is not None:
                        upto = min(upto, int(np.floor((room - s.local - grads) / quantum + 1e-9)))
                    if upto < 0:
                        continue
                    if room is None:
                        value = np.maximum(src[: upto + 1], h[: upto + 1] + s.local + grads)
                    else:
                        value = src[: upto + 1] + s.cost
                    after = 0 if kind == "plain" else 1
                    dst = best[b, after, shift : shift + upto + 1]
                    idx = np.flatnonzero(value < dst)
                    if not idx.size:
                        continue
                    dst[idx] = value[idx]
                    back[b, after, shift + idx] = np.stack(
                        [np.full_like(idx, a), np.full_like(idx, k), np.full_like(idx, before), idx], axis=1
                    )
    final = best[m]
    if not np.isfinite(final).any():
        return None
    c, j = np.unravel_index(int(np.argmin(final)), final.shape)
    spans: Spans = []
    b = m
    while b > 0:
        a, k, before, j_before = (int(v) for v in back[b, c, j])
        spans.append((a, b, kinds[k]))
        b, c, j = a, before, j_before
    return spans[::-1]
