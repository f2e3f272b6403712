"""Chen et al. 2016 (mxnet-memonger): greedy segmentation under a threshold, threshold searched.

Faithful to the seed's ``make_mirror_plan``/``search_plan``: walk the candidate boundaries in
order, adding each interval's saved activations to a running sum; when the sum passes the
threshold, close the segment there (its output is kept, its inside recomputed) and start anew.
Thresholds are searched on a grid around sqrt(total activations x largest interval) - the
sublinear choice that makes about sqrt(n) segments - and the plan kept is the cheapest whose
predicted peak fits (or, without a budget, the one of least peak), both by memfit's byte-exact
chain model instead of memonger's per-node estimate.
"""

from __future__ import annotations

import math

import numpy as np

from .chain import Chain
from .plan import Spans

__all__ = ["THRESHOLDS", "cheapest", "greedy", "lowest_peak", "plans"]

THRESHOLDS = 48


def greedy(chain: Chain, threshold: float) -> Spans:
    """memonger's segmentation for one threshold: every segment recomputed, cut when full."""
    spans: Spans = []
    start, acc = 0, 0
    for b in range(1, chain.m + 1):
        acc += chain.segment(b - 1, b, "recompute").recomputed
        if acc > threshold or b == chain.m:
            spans.append((start, b, "recompute"))
            start, acc = b, 0
    return spans


def plans(chain: Chain) -> list[Spans]:
    """memonger's plans for every threshold of the grid, and every interval recomputed alone."""
    total = max(1, chain.total_act)
    largest = max(chain.segment(i, i + 1, "recompute").recomputed for i in range(chain.m))
    guess = math.sqrt(total * max(1, largest))
    grid = np.geomspace(max(1.0, guess / 8), max(guess * 8, 1.0) + total, THRESHOLDS)
    return [greedy(chain, float(t)) for t in grid] + [[(i, i + 1, "recompute") for i in range(chain.m)]]


def cheapest(chain: Chain, budget: int) -> Spans | None:
    """The cheapest searched plan whose chain-model peak fits ``budget``; None if none does."""
    fits = [p for p in plans(chain) if chain.peak(p) <= budget]
    if not fits:
        return None
    return min(fits, key=lambda p: (chain.cost(p), chain.peak(p)))


def lowest_peak(chain: Chain) -> Spans:
    """The searched plan with the least chain-model peak."""
    return min(plans(chain), key=chain.peak)
