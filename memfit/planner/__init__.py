"""Planners: which activations a training step keeps and which it recomputes.

Every strategy reads a :class:`~memfit.planner.chain.Chain` (the MemGraph as segments with exact
costs) and answers two questions: the cheapest plan whose predicted peak fits a budget, and the
plan of least predicted peak (the feasible minimum). :mod:`memfit.fit` verifies what they return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import chen, dp, handwritten, milp, selective
from .chain import Chain
from .plan import Plan, Segment, Spans

__all__ = ["STRATEGIES", "Chain", "Plan", "Segment", "Spans", "Strategy", "list_strategies"]


@dataclass(frozen=True)
class Strategy:
    """A planner: ``cheapest(chain, budget_bytes)`` and ``lowest_peak(chain)``; ``candidates(chain)``
    where its plans are a fixed list whatever the budget (``cheapest`` then picks among them)."""

    name: str
    cheapest: Callable[[Chain, int], Spans | None]
    lowest_peak: Callable[[Chain], Spans]
    candidates: Callable[[Chain], list[Spans]] | None = None


STRATEGIES: dict[str, Strategy] = {
    "chen": Strategy("chen", chen.cheapest, chen.lowest_peak, chen.plans),
    "dp": Strategy("dp", lambda c, b: dp.cheapest(c, b), lambda c: dp.lowest_peak(c)),
    "selective": Strategy("selective", selective.cheapest, selective.lowest_peak),
    "milp": Strategy("milp", lambda c, b: milp.cheapest(c, b), lambda c: milp.lowest_peak(c)),
    "handwritten": Strategy("handwritten", handwritten.cheapest, handwritten.lowest_peak, handwritten.policies),
}


def list_strategies() -> list[str]:
    """Names ``memfit.optimize(strategy=...)`` takes besides ``"auto"`` (the cheapest verified plan of several)."""
    return sorted(STRATEGIES)
