"""The statistics the timing benchmarks report: the measured extra time and its interval.

benchmarks/timing.py judges the time model by them; an interval that missed its own figure, or
that did not shrink to a point on noiseless rounds, would misjudge it.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import extra_interval, median_ratio


def test_noiseless_rounds_give_a_point_interval() -> None:
    reference = [0.2, 0.21, 0.19, 0.2, 0.22]
    took = [1.1 * t for t in reference]
    low, high = extra_interval(took, reference)
    assert median_ratio(took, reference) == pytest.approx(1.1)
    # every resample has ratio 1.1; its reference median is one of the rounds'
    assert 0.1 * min(reference) == pytest.approx(low) and high == pytest.approx(0.1 * max(reference))


def test_the_interval_holds_the_figure_and_narrows_with_rounds() -> None:
    rng = random.Random(1)

    def rounds(n: int) -> tuple[list[float], list[float]]:
        reference = [0.2 * rng.uniform(0.9, 1.2) for _ in range(n)]
        return [t * 1.05 + rng.gauss(0.0, 0.004) for t in reference], reference

    widths = []
    for n in (20, 400):
        took, reference = rounds(n)
        low, high = extra_interval(took, reference)
        figure = (median_ratio(took, reference) - 1) * sorted(reference)[n // 2]
        assert low <= figure <= high
        assert low < 0.0105 < high  # the true extra: 5% of the median reference step, 0.21 s
        widths.append(high - low)
    assert widths[1] < widths[0] / 2
