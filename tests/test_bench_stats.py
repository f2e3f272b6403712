"""The statistics the timing benchmarks report: the measured extra time and its interval.

benchmarks/timing.py judges the time model by them; an interval that missed its own figure, or
that did not shrink to a point on noiseless rounds, would misjudge it.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common
import timing as bench_timing
from common import extra_interval, median_ratio, step_times


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


def test_a_verdict_is_settled_only_where_the_interval_decides_it() -> None:
    reference = [0.2, 0.21, 0.19, 0.2, 0.22]
    exact = [t + 0.01 for t in reference]  # 10 ms more in every round
    assert bench_timing.judge(0.011, exact, reference)[3] == bench_timing.Verdict(True, True, False)
    assert bench_timing.judge(0.02, exact, reference)[3] == bench_timing.Verdict(False, False, True)
    noisy = [t + 0.01 + d for t, d in zip(reference, (-0.006, 0.004, 0.0, 0.006, -0.004), strict=True)]
    verdict = bench_timing.judge(0.011, noisy, reference)[3]
    assert verdict.within and not verdict.settled


def test_settling_times_only_the_open_plans_and_keeps_their_rounds_paired(monkeypatch) -> None:
    """A plan whose interval already decides gets no more rounds; an open one gets rounds in
    SETTLE_ROUNDS steps, each against the unplanned step of the same round, until the time is spent."""
    rng = random.Random(0)
    calls: list[list[str]] = []

    def timer(rounds, names):
        calls.append(sorted(names))
        reference = [0.2 * rng.uniform(0.9, 1.1) for _ in range(rounds)]
        took = {"unplanned": reference, "exact": [t + 0.01 for t in reference]}
        took["open"] = [t + 0.01 + rng.uniform(-0.02, 0.02) for t in reference]
        return {name: took[name] for name in names}

    planned = {}
    for name in ("exact", "open"):
        planned[name] = torch.nn.Identity()
        planned[name].plan = SimpleNamespace(extra_seconds=0.0105)
    first = timer(5, ["unplanned", "exact", "open"])
    pairs = {k: (first[k], list(first["unplanned"])) for k in planned}
    bench_timing.settle(timer, planned, pairs, seconds=1.0)
    assert len(calls) > 2 and all(c == ["open", "unplanned"] for c in calls[1:])
    assert len(pairs["exact"][0]) == len(pairs["exact"][1]) == 5
    took, reference = pairs["open"]
    assert len(took) == len(reference) == 5 + bench_timing.SETTLE_ROUNDS * (len(calls) - 1)
    assert all(-0.0101 < a - b < 0.0301 for a, b in zip(took, reference, strict=True))  # same rounds


def test_copies_step_one_a_round_in_turn(monkeypatch) -> None:
    """With copies=K every module is K deep copies (parameters not shared, one of every module in
    turn, the module given never stepped), all warmed up, and each round steps one of them: a
    round's figure is that copy's CPU time, and every copy gets its share of the rounds."""
    stepped: list[int] = []

    class Costly(torch.nn.Module):
        """A step whose CPU time the clock below reads as one more than this copy's index."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))
            self.index = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            stepped.append(self.index)
            clock[0] += 1.0 + self.index
            return (x * self.weight).sum().reshape(1, 1)

    clock = [0.0]
    monkeypatch.setattr(common.time, "process_time", lambda: clock[0])
    original = Costly()
    real_deepcopy = common.copy.deepcopy
    made: list[Costly] = []

    def numbered(module):  # each copy made steps one unit slower than the one before
        twin = real_deepcopy(module)
        made.append(twin)
        twin.index = len(made)
        return twin

    monkeypatch.setattr(common.copy, "deepcopy", numbered)
    took = step_times({"m": original, "n": torch.nn.Linear(3, 1)}, torch.ones(1, 3), rounds=12, copies=3)
    # made in turn, m's copy then n's: m's copies are the 1st, 3rd and 5th made
    assert [twin.index for twin in made if isinstance(twin, Costly)] == [1, 3, 5]
    # two modules: a copy steps for two rounds (both orders), then the next
    assert took["m"] == [2.0, 2.0, 4.0, 4.0, 6.0, 6.0] * 2
    warmup = [1, 3, 5] * common.WARMUP_STEPS
    assert stepped == warmup + [1, 1, 3, 3, 5, 5] * 2
    assert all(twin.weight is not original.weight for twin in made if isinstance(twin, Costly))
    assert all(p.grad is None for twin in made for p in twin.parameters())  # steps free their gradients
    assert original.index == 0 and original.weight.grad is None  # never stepped
    # Rounds called again goes on: no new copies, no second warm-up, the rotation continued
    made.clear()
    stepped.clear()
    timer = common.Rounds({"m": original, "n": torch.nn.Linear(3, 1)}, torch.ones(1, 3), copies=3)
    first, second = timer(5), timer(7, ["m", "n"])
    assert first["m"] + second["m"] == took["m"] and len(made) == 6  # three copies of each, made once
    assert stepped == warmup + [1, 1, 3, 3, 5, 5] * 2


def test_no_copies_is_refused_by_name(capsys) -> None:
    with pytest.raises(SystemExit):
        bench_timing.main(["--copies", "0"])
    assert "--copies 0: give at least 1 copy" in capsys.readouterr().err


def test_every_table_times_a_control_that_recomputes_nothing(monkeypatch, capsys, tmp_path) -> None:
    """Each model's rounds include the unplanned model rewritten with nothing recomputed, predicted
    at 0 extra, and an eager copy of the model; their rows and the summary give what they measured
    (here exactly the unplanned step's time, so +0.0), the floor under the plans' figures."""
    monkeypatch.setenv("MEMFIT_TIMING", "off")
    monkeypatch.setenv("MEMFIT_CACHE_DIR", str(tmp_path))
    timed: dict[str, torch.nn.Module] = {}

    class FakeRounds:
        def __init__(self, modules, x, copies=1):
            timed.update(modules)

        def __call__(self, rounds, names=None):
            return {name: [0.2] * rounds for name in names or timed}

    monkeypatch.setattr(bench_timing, "Rounds", FakeRounds)
    bench_timing.main(["--quick", "--models", "gpt", "--strategies", "chen", "--levels", "50", "--rounds", "2"])
    control = timed["control"]
    assert control.plan.extra_seconds == 0.0
    assert all(s.kind == "plain" for s in control.plan.segments)
    twin = timed["copy"]
    assert type(twin) is type(timed["unplanned"]) and twin is not timed["unplanned"]
    assert all(a is not b for a, b in zip(twin.parameters(), timed["unplanned"].parameters(), strict=True))
    plans = [m.plan for k, m in timed.items() if k not in ("unplanned", "control", "copy")]
    assert any(s.kind != "plain" for plan in plans for s in plan.segments)
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("none (control)")]
    cells = row.split()  # name (2 words), budget, peak, extra ms pred, extra % pred, extra ms meas, interval
    assert cells[4] == "0.0" and cells[6:8] == ["0.0", "0.0..0.0"] and "the run's floor" in row
    (row,) = [line for line in out.splitlines() if line.startswith("none (eager copy)")]
    cells = row.split()  # name (3 words), budget, peak, extra ms pred, extra % pred, extra ms meas, interval
    assert cells[3] == "--" and cells[5] == "0.0" and cells[7:9] == ["0.0", "0.0..0.0"]
    assert "the control (nothing recomputed, predicted 0) measured +0.0 ms (0.0..0.0), an eager copy" in out
