"""The exact optimum of the segmentation model, as a mixed-integer linear program.

:mod:`memfit.planner.dp` solves the chain model with held memory rounded up to ``BUCKETS`` quanta,
so its plans may leave memory unused or miss the cheapest one; this module solves the same model
without rounding, with ``scipy.optimize.milp`` (HiGHS). It is the yardstick that tells how far
``dp`` and ``selective`` are from the optimum of their model, and a strategy in its own right for
graphs small enough.

A plan is a path through nodes ``(position, class)``: position ``0..m`` on the candidate chain,
class whether the segment that ends there is plain or checkpointed, since a checkpointed segment
keeps its inputs only when it follows a plain one. Every allowed (a, b, kind, class before) is an
arc with a binary ``x`` (chosen or not) and a continuous ``z``: the bytes held when the path
enters the arc, zero when it is not chosen. Along the path ``z`` grows by each arc's ``hold`` (a
flow of held memory, much tighter in the LP relaxation than big-M bounds on per-node variables),
and a chosen arc needs ``z + local + grads_from(a) <= budget - baseline``.

Whether *any* plan fits is a single-resource question that an exact recursion answers (the most a
path may hold on reaching each node and still finish, and the least it can hold there). Those
bounds prune the arcs and tighten each ``z``, answer infeasible budgets without a solve, and find
the least peak by bisection; the MILP is left with what needs it, the cheapest plan that fits.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import MemfitInputError
from .chain import Chain
from .plan import SegmentKind, Spans

__all__ = ["KINDS", "MAX_ARCS", "TIME_LIMIT_S", "UNIT", "cheapest", "lowest_peak"]

# The one-level treatments. Nested segments (dp's second level) would double the arcs past
# MAX_ARCS on full-size chains; with them dp may go below milp's optimum, never above it by more
# than its rounding.
KINDS: tuple[SegmentKind, ...] = ("plain", "selective", "recompute")

# Arcs (binaries) above which a graph is refused: solve time grows quickly with them. At this size
# a chain of 96 candidates with three kinds, memfit's default, still solves within the time limit
# on two cores.
MAX_ARCS = 20_000
# Each HiGHS solve stops here; the best plan found by then is returned with a warning.
TIME_LIMIT_S = 60.0
# Re-solves with the room lowered by the excess, should solver tolerances let a plan graze over.
_RETRIES = 3
# Bytes per unit of memory in the program. HiGHS's tolerances are absolute (about 1e-6), so in MiB
# they are about a byte; in units of the room (some 1e8 bytes) they were a hundred bytes, and
# HiGHS called a densenet_bc_100 plan optimal that cost 3% more than the optimum.
UNIT = 2.0**20


@dataclass
class _Arcs:
    """Every allowed (a, b, kind, class before) with its figures, as parallel arrays sorted by ``a``.

    Node ids are ``2 * position + class`` (class 0 plain, 1 checkpointed); ``2m`` and ``2m + 1``
    end a plan.
    """

    a: np.ndarray
    b: np.ndarray
    kind: np.ndarray  # index into ``kinds``
    tail: np.ndarray
    head: np.ndarray
    hold: np.ndarray
    need: np.ndarray  # local + grads_from(a): bytes on top of the held ones at its backward
    cost: np.ndarray
    m: int

    def __len__(self) -> int:
        return len(self.a)

    def select(self, keep: np.ndarray) -> _Arcs:
        """The arcs where ``keep`` is true."""
        return _Arcs(**{f: getattr(self, f)[keep] for f in _FIELDS}, m=self.m)


_FIELDS = ("a", "b", "kind", "tail", "head", "hold", "need", "cost")


def cheapest(chain: Chain, budget: int, kinds: Sequence[SegmentKind] = KINDS) -> Spans | None:
    """The segmentation of least recomputation cost whose chain-model peak fits ``budget`` bytes, exactly.

    Returns None when no segmentation fits.

    Raises:
        MemfitInputError: scipy is missing, or the chain has too many arcs for a timely solve.
    """
    return _cheapest(chain, _arcs(chain, kinds), budget, kinds)


def lowest_peak(chain: Chain, kinds: Sequence[SegmentKind] = KINDS) -> Spans:
    """The segmentation with the least chain-model peak, exactly; the cheapest of those.

    Raises:
        MemfitInputError: scipy is missing, or the chain has too many arcs for a timely solve.
    """
    arcs = _arcs(chain, kinds)
    # The least room is found by bisection over the exact feasibility test (bytes are integers);
    # a plan holds at most every arc's hold, so that much room plus the largest need always fits.
    low, high = -1, int(arcs.hold.sum() + arcs.need.max())
    while high - low > 1:
        mid = (low + high) // 2
        if _bounds(arcs, mid)[2]:
            high = mid
        else:
            low = mid
    spans = _cheapest(chain, arcs, max(chain.baseline + high, chain.optimizer_peak), kinds)
    assert spans is not None  # the bisection found that this much fits
    return spans


def _cheapest(chain: Chain, arcs: _Arcs, budget: int, kinds: Sequence[SegmentKind]) -> Spans | None:
    room = budget - chain.baseline
    if room <= 0 or chain.optimizer_peak > budget:
        return None
    target = room
    for _ in range(_RETRIES):
        spans = _solve(arcs, target, kinds)
        if spans is None:
            break
        excess = chain.peak(spans) - budget
        if excess <= 0:
            return spans
        target -= excess  # a solver tolerance let the plan over by a byte or so
    # Only a lowered target gets here with a budget that fits: a plan that fits, if not the cheapest.
    return _any_path(arcs, room, kinds) if _bounds(arcs, room)[2] else None


def _arcs(chain: Chain, kinds: Sequence[SegmentKind]) -> _Arcs:
    """The arcs of the path graph, each distinct one once (a selective segment with nothing
    expensive to keep is its recompute twin)."""
    m, seen, rows = chain.m, set(), []
    for a in range(m):
        grads = chain.grads_from(a)
        for before in (0, 1) if a > 0 else (0,):  # the path starts as if after a plain segment
            for b in range(a + 1, m + 1):
                for k, kind in enumerate(kinds):
                    if kind == "plain" and b != a + 1:
                        continue  # consecutive plain intervals behave as one longer plain segment
                    s = chain.segment(a, b, kind, after_plain=before == 0)
                    after = int(kind != "plain")
                    key = (a, b, before, after, s.hold, s.local, s.cost)
                    if key not in seen:
                        seen.add(key)
                        rows.append((a, b, k, 2 * a + before, 2 * b + after, s.hold, s.local + grads, s.cost))
    if len(rows) > MAX_ARCS:
        raise MemfitInputError(
            f"the graph is too large for strategy 'milp': {len(rows)} arcs over {m} candidate intervals "
            f"(at most {MAX_ARCS}); use strategy 'dp' or 'selective'"
        )
    cols = np.array(rows, dtype=np.int64).reshape(-1, len(_FIELDS)).T
    return _Arcs(**dict(zip(_FIELDS, cols, strict=True)), m=m)


def _bounds(arcs: _Arcs, room: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per arc, the most a plan may hold on entering it and still fit ``room`` to the end; per
    node, the least a fitting plan can hold on reaching it; and whether any plan fits.

    From the end backwards, ``most[v]`` is the largest ``h`` from which some path fits: the best,
    over arcs out of ``v``, of ``min(room - need, most[head] - hold)``. Exact, because the only
    state a path carries is what it holds. Then forwards, ``least`` over the arcs a fitting path
    can use.
    """
    m = arcs.m
    first = np.searchsorted(arcs.a, np.arange(m + 1))
    most = np.full(2 * m + 2, -np.inf)
    most[2 * m :] = np.inf
    cap = np.empty(len(arcs))
    for p in range(m - 1, -1, -1):
        s = slice(first[p], first[p + 1])
        cap[s] = np.minimum(room - arcs.need[s], most[arcs.head[s]] - arcs.hold[s])
        np.maximum.at(most, arcs.tail[s], cap[s])
    least = np.full(2 * m + 2, np.inf)
    least[0] = 0.0
    for p in range(m):
        s = slice(first[p], first[p + 1])
        ok = least[arcs.tail[s]] <= cap[s]
        np.minimum.at(least, arcs.head[s][ok], least[arcs.tail[s][ok]] + arcs.hold[s][ok])
    return cap, least, bool(most[0] >= 0)


def _any_path(arcs: _Arcs, room: int, kinds: Sequence[SegmentKind]) -> Spans:
    """A plan that fits ``room``, by following the bounds of :func:`_bounds` (which must allow one)."""
    cap, _, fits = _bounds(arcs, room)
    assert fits
    spans: Spans = []
    node, held = 0, 0
    while node < 2 * arcs.m:
        i = int(np.flatnonzero((arcs.tail == node) & (cap >= held))[0])
        spans.append((int(arcs.a[i]), int(arcs.b[i]), kinds[int(arcs.kind[i])]))
        node, held = int(arcs.head[i]), held + int(arcs.hold[i])
    return spans


def _solve(arcs: _Arcs, room: int, kinds: Sequence[SegmentKind]) -> Spans | None:
    """The cheapest path whose held + needed bytes stay within ``room``; None if there is none.

    Variables are ``x`` (one binary per arc) and ``y = z - least[tail] x``, what an arc holds on
    entry beyond the least its tail allows, between 0 and ``(cap - least[tail]) x``. Memory is in
    ``UNIT`` bytes; costs stay integers, so HiGHS's absolute gap tolerance leaves the optimum exact.
    """
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_array
    except ImportError as err:
        raise MemfitInputError("strategy 'milp' needs scipy: pip install scipy (or memfit[milp])") from err

    cap, least, fits = _bounds(arcs, room)
    if not fits:
        return None
    keep = least[arcs.tail] <= cap  # arcs that some fitting path can take
    sub, cap = arcs.select(keep), cap[keep]
    n, m = len(sub), sub.m
    base, hold, top = least[sub.tail] / UNIT, sub.hold / UNIT, cap / UNIT
    ids = np.arange(n)
    inner = sub.b < m
    nodes = 2 * m  # rows for the nodes before the end: flow, then held memory
    # Flow: one unit leaves the start and is conserved at every node before the end.
    rows = [sub.tail, sub.head[inner]]
    cols = [ids, ids[inner]]
    vals = [np.ones(n), -np.ones(inner.sum())]
    # Held memory: what leaves a node is what came in plus the hold of the arc it came by.
    rows += [nodes + sub.tail] * 2 + [nodes + sub.head[inner]] * 2
    cols += [n + ids, ids, n + ids[inner], ids[inner]]
    vals += [np.ones(n), base, -np.ones(inner.sum()), -(base + hold)[inner]]
    # Each arc: y is zero unless chosen, and held + needed fits the room.
    rows += [2 * nodes + ids] * 2
    cols += [n + ids, ids]
    vals += [np.ones(n), base - top]
    lo = np.concatenate([[1.0], np.zeros(2 * nodes - 1), np.full(n, -np.inf)])
    hi = np.concatenate([[1.0], np.zeros(2 * nodes - 1 + n)])
    matrix = coo_array(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(lo), 2 * n)
    ).tocsr()
    objective = np.concatenate([sub.cost // max(1, int(np.gcd.reduce(sub.cost))), np.zeros(n)])
    result = milp(
        objective,
        constraints=LinearConstraint(matrix, lo, hi),
        integrality=np.concatenate([np.ones(n), np.zeros(n)]),
        bounds=Bounds(np.zeros(2 * n), np.concatenate([np.ones(n), np.full(n, np.inf)])),
        options={"time_limit": TIME_LIMIT_S, "mip_rel_gap": 0.0},
    )
    if result.x is not None:
        if result.status != 0:
            warnings.warn(
                f"milp stopped at its time limit ({TIME_LIMIT_S:.0f} s): the plan may not be the cheapest "
                f"(gap {result.mip_gap:.2%})",
                RuntimeWarning,
                stacklevel=4,
            )
        return _path(sub, result.x[:n] > 0.5, kinds)
    # The bounds proved that a plan fits, so HiGHS ran out of time or failed: return one that fits.
    warnings.warn(
        f"milp found no plan ({result.message}); the plan returned fits but may be far from the cheapest",
        RuntimeWarning,
        stacklevel=4,
    )
    return _any_path(arcs, room, kinds)


def _path(arcs: _Arcs, chosen: np.ndarray, kinds: Sequence[SegmentKind]) -> Spans:
    """The chosen arcs as spans, followed from the start."""
    out = {int(arcs.tail[i]): i for i in np.flatnonzero(chosen)}
    spans: Spans = []
    node = 0
    while node < 2 * arcs.m:
        i = out[node]
        spans.append((int(arcs.a[i]), int(arcs.b[i]), kinds[int(arcs.kind[i])]))
        node = int(arcs.head[i])
    return spans
