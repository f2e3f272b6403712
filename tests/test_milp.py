"""The milp strategy: the exact optimum of the chain model, never worse than dp or selective."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch
from torch import nn

import memfit
from memfit.capture.dryrun import capture
from memfit.capture.graph import MemGraph
from memfit.capture.trainstep import StepConfig
from memfit.fit import AUTO_ORDER
from memfit.planner import STRATEGIES, dp, milp, selective
from memfit.planner.chain import Chain
from memfit.planner.dp import Spans

FRACTIONS = (0.25, 0.5, 0.75)


@pytest.fixture(scope="module")
def graph() -> MemGraph:
    """resnet18 at a batch where activations, not weights, set the peak."""
    torch.manual_seed(0)
    model = memfit.models.create("resnet18", stem="cifar", num_classes=10)
    return capture(model, torch.randn(16, 3, 32, 32), StepConfig())


@pytest.fixture(scope="module")
def chain(graph: MemGraph) -> Chain:
    # Fewer candidates than the default keep each solve well under a second.
    return Chain(graph, max_candidates=24)


def _cost(chain: Chain, spans: Spans) -> int:
    return chain.cost(spans)


def _unplanned(chain: Chain) -> int:
    """Peak with every interval plain: the most any plan needs."""
    return chain.peak([(i, i + 1, "plain") for i in range(chain.m)])


def _budgets(chain: Chain) -> list[int]:
    low, high = chain.peak(milp.lowest_peak(chain)), _unplanned(chain)
    assert low < high
    return [int(low + f * (high - low)) for f in FRACTIONS]


def assert_covers(chain: Chain, spans: Spans) -> None:
    assert spans[0][0] == 0 and spans[-1][1] == chain.m
    assert all(b == a2 for (_, b, _), (a2, _, _) in itertools.pairwise(spans))
    assert all(a < b and (kind != "plain" or b == a + 1) for a, b, kind in spans)


def _every_plan(chain: Chain, kinds: tuple[str, ...]) -> list[tuple[int, int, Spans]]:
    """Every segmentation of the chain as (peak, cost, spans), by exhaustive search."""
    out: list[tuple[int, int, Spans]] = []

    def walk(a: int, after_plain: bool, held: int, worst: int, cost: int, spans: Spans) -> None:
        if a == chain.m:
            out.append((max(chain.baseline + worst, chain.optimizer_peak), cost, spans))
            return
        for b in range(a + 1, chain.m + 1):
            for kind in kinds:
                if kind == "plain" and b != a + 1:
                    continue
                s = chain.segment(a, b, kind, after_plain)
                top = max(worst, held + s.local + chain.grads_from(a))
                walk(b, kind == "plain", held + s.hold, top, cost + s.cost, [*spans, (a, b, kind)])

    walk(0, True, 0, 0, 0, [])
    return out


@pytest.mark.parametrize("kinds", [dp.KINDS, selective.KINDS], ids=["dp-kinds", "selective-kinds"])
def test_cheapest_fits_and_is_never_dearer_than_dp(chain: Chain, kinds: tuple[str, ...]) -> None:
    for budget in _budgets(chain):
        spans = milp.cheapest(chain, budget, kinds)
        assert spans is not None
        assert_covers(chain, spans)
        assert {kind for _, _, kind in spans} <= set(kinds)
        assert chain.peak(spans) <= budget
        rival = dp.cheapest(chain, budget, kinds)
        if rival is not None:  # dp rounds held memory up, so it may find nothing where milp does
            assert _cost(chain, spans) <= _cost(chain, rival)


def test_cheapest_is_never_dearer_than_selective(chain: Chain) -> None:
    for budget in _budgets(chain):
        spans = milp.cheapest(chain, budget)
        rival = selective.cheapest(chain, budget)
        assert spans is not None and chain.peak(spans) <= budget
        if rival is not None:
            assert _cost(chain, spans) <= _cost(chain, rival)


def test_lowest_peak_is_never_above_dp_and_selective(chain: Chain) -> None:
    spans = milp.lowest_peak(chain)
    assert_covers(chain, spans)
    assert chain.peak(spans) <= chain.peak(dp.lowest_peak(chain, milp.KINDS))
    for kinds in (dp.KINDS, selective.KINDS):  # nested segments included
        assert chain.peak(milp.lowest_peak(chain, kinds)) <= chain.peak(dp.lowest_peak(chain, kinds))


def test_matches_exhaustive_search(graph: MemGraph) -> None:
    small = Chain(graph, max_candidates=9)
    plans = _every_plan(small, selective.KINDS)
    least = min(p for p, _, _ in plans)
    spans = milp.lowest_peak(small, selective.KINDS)
    assert small.peak(spans) == least
    assert _cost(small, spans) == min(c for p, c, _ in plans if p == least)
    for budget in [least, *_budgets(small)]:
        spans = milp.cheapest(small, budget, selective.KINDS)
        assert spans is not None and small.peak(spans) <= budget
        assert _cost(small, spans) == min(c for p, c, _ in plans if p <= budget)
    assert milp.cheapest(small, least - 1, selective.KINDS) is None


def test_infeasible_budgets_give_none(chain: Chain) -> None:
    least = chain.peak(milp.lowest_peak(chain))
    assert milp.cheapest(chain, least - 1) is None
    assert milp.cheapest(chain, chain.baseline) is None
    assert milp.cheapest(chain, chain.optimizer_peak - 1) is None


def test_too_many_arcs_is_refused(chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(milp, "MAX_ARCS", 10)
    with pytest.raises(memfit.MemfitInputError, match=r"too large for strategy 'milp'.*'dp' or 'selective'"):
        milp.cheapest(chain, _unplanned(chain))
    with pytest.raises(memfit.MemfitInputError, match="too large"):
        milp.lowest_peak(chain)


def test_missing_scipy_says_how_to_install(chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # makes the import fail
    with pytest.raises(memfit.MemfitInputError, match="pip install scipy"):
        milp.cheapest(chain, _unplanned(chain))


def test_out_of_time_still_returns_a_plan_that_fits(chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    budget = _budgets(chain)[0]
    monkeypatch.setattr(milp, "TIME_LIMIT_S", 0.0)
    with pytest.warns(RuntimeWarning, match="may be"):
        spans = milp.cheapest(chain, budget)
    assert spans is not None
    assert_covers(chain, spans)
    assert chain.peak(spans) <= budget


def test_registered_but_not_in_auto() -> None:
    assert STRATEGIES["milp"].name == "milp"
    assert "milp" not in AUTO_ORDER


def test_optimize_with_milp_fits_when_measured() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    x = torch.randn(8, 3, 32, 32)
    lowest, unplanned = memfit.minimum(model, x, strategy="milp"), memfit.estimate(model, x).peak_mb
    assert lowest < unplanned
    budget = lowest + 0.5 * (unplanned - lowest)
    planned = memfit.optimize(model, budget, x, strategy="milp")
    assert planned.plan.strategy == "milp"
    assert planned.plan.checkpointed
    assert memfit.measure(planned, x).peak_mb <= budget


@pytest.mark.parametrize("kinds", [dp.KINDS, selective.KINDS], ids=["dp", "selective"])
def test_dp_is_within_five_percent_of_the_optimum_on_the_full_chain(graph: MemGraph, kinds: tuple[str, ...]) -> None:
    """The DP's quanta only decide which plans compete; its cost stays near the exact optimum."""
    full = Chain(graph)
    for budget in _budgets(full):
        exact = _cost(full, milp.cheapest(full, budget, kinds))
        approx = dp.cheapest(full, budget, kinds)
        assert approx is not None and full.peak(approx) <= budget
        assert _cost(full, approx) <= 1.05 * exact
