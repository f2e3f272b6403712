"""Time cost model: predicted against measured extra step time of memfit's plans.

For memfit's ``resnet18`` (CIFAR stem, batch 32) and ``gpt`` (4 layers, n_embd 128, batch 8x128),
and on request ``resnet50`` and ``mobilenet_v2`` at the shapes of benchmarks/policies.py,
memfit.optimize plans for every strategy (and auto) at budgets --levels of the way from that
strategy's feasible minimum (memfit.minimum) to the unplanned predicted peak (memfit.estimate).
Each row gives the plan's predicted peak and its predicted extra step time (``plan.extra_seconds``:
the calibrated times of what it recomputes; % of ``plan.step_seconds``, the unplanned forward and
backward), and the extra time measured: CPU time of the training step (forward, loss, backward,
SGD) on one intra-op thread, median over interleaved rounds of the planned step over the unplanned
one (benchmarks/common.py's Rounds and median_ratio), its 90% bootstrap interval over the
rounds (how far one run's figure can be trusted), predicted over measured, and whether the
prediction is within 25% of the measured figure (the time model's target). Every table ends with
two controls predicted at 0 extra and timed in the same rounds: the model rewritten with nothing
recomputed (a budget above its peak), and an eager copy of the model itself. What the rewrite
measures is the run's floor, the figure a plan's cannot be told apart from (where each module's
activations lie, the rewrite's own dispatch, noise); what the copy measures is that floor without
the rewrite: how far two identical modules' steps differ in this run.
Planning runs on one intra-op thread too, so the time model is calibrated as the steps are
measured. Each distinct plan is timed once; a row whose plan another row has already made says
which. With ``--settle SECONDS``, a plan whose interval straddles an edge of the 25% band gets
more interleaved rounds (SETTLE_ROUNDS at a time, against the unplanned step in the same
rounds) until the interval decides or the seconds are spent; the rounds column says how many it
had. (Stopping once the interval decides leans a little toward deciding: a settled row is one
run's verdict.) With
``--copies K`` every timed module (the unplanned model too) is K deep copies, one stepped a
round in turn: where a module lies in memory moves a small plan's figure more than rounds of one
copy average out, and the modules given are not alike (a plan shares the model's parameters, the
eager copy has its own), so none of them is stepped (docs/benchmarks.md).

    .venv/bin/python benchmarks/timing.py --quick             # smaller shapes, 2 budgets, 3 rounds
    .venv/bin/python benchmarks/timing.py                     # both models, 3 budgets, 7 rounds
    .venv/bin/python benchmarks/timing.py --models gpt --levels 50 --rounds 9 --cold
    .venv/bin/python benchmarks/timing.py --models gpt resnet50 mobilenet_v2 --strategies auto \
        --levels 30 60 90 97 --rounds 80 --settle 300       # the plan-quality shapes: ~10-25 minutes
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from common import (
    CACHE_ENV,
    PLAN_QUALITY_MODELS,
    Case,
    MiB,
    Rounds,
    Table,
    begin,
    build_case,
    extra_interval,
    fmt,
    footer,
    level_cell,
    median_ratio,
    percent,
    plans_between,
    section,
)
from torch import nn

import memfit

STRATEGIES = ["chen", "dp", "selective", "handwritten", "auto"]
# name -> (batch, per-sample shape, options of memfit.models.create), full and --quick.
MODELS = {"resnet18": (32, "3x32x32", {}), **PLAN_QUALITY_MODELS}
QUICK = {
    "resnet18": (8, "3x32x32", {"width": 32}),
    "gpt": (4, "64", {"n_layer": 2, "n_embd": 64}),
    "resnet50": (2, "3x32x32", {}),
    "mobilenet_v2": (4, "3x32x32", {}),
}
DEFAULT_MODELS = ["resnet18", "gpt"]
LEVELS, QUICK_LEVELS = [25, 50, 75], [30, 70]
ROUNDS, QUICK_ROUNDS = 7, 3
# The time model's target (issue 12): predicted extra time within this fraction of the measured.
WITHIN = 0.25
# Rounds at a time that --settle adds to the plans whose verdict the interval leaves open.
SETTLE_ROUNDS = 20


@dataclass
class Row:
    """One strategy at one budget: the plan, or why there is none, and the row whose plan it is."""

    strategy: str
    level: float | None
    budget: float | None
    planned: nn.Module | str
    same_as: int | None = None


def plan_key(segments: tuple) -> tuple:
    """What makes two plans the same plan: their segments' nodes and treatments (not their timed
    figures, which a recalibration may move)."""
    return tuple((s.nodes, s.kind, plan_key(s.inner)) for s in segments)


def plans(case: Case, strategies: list[str], levels: list[float]) -> tuple[float, list[Row]]:
    """The unplanned predicted peak, and every strategy's plan at every level."""
    unplanned = memfit.estimate(case.model, case.x, optimizer=None).peak_mb
    rows: list[Row] = []
    seen: dict[tuple, int] = {}
    for strategy in strategies:
        for level, budget, planned in plans_between(case, strategy, unplanned, levels, optimizer=None)[1]:
            if isinstance(planned, str):
                rows.append(Row(strategy, level, budget, planned))
                continue
            key = plan_key(tuple(planned.plan.segments))
            rows.append(Row(strategy, level, budget, planned, seen.get(key)))
            seen.setdefault(key, len(rows) - 1)
    return unplanned, rows


class Verdict(NamedTuple):
    """Whether a prediction is within WITHIN of the measured figure, and whether the measured
    figure's 90% interval lies all inside or all outside the band where it would be."""

    within: bool
    surely: bool
    surely_not: bool

    @property
    def settled(self) -> bool:
        """Whether the interval decides it."""
        return self.surely or self.surely_not


def within(predicted: float, measured: float) -> bool:
    """Whether a prediction is within WITHIN of the measured figure."""
    return abs(predicted - measured) <= WITHIN * measured


def judge(predicted: float, took: list[float], reference: list[float]) -> tuple[float, float, float, Verdict]:
    """The measured extra seconds of a plan's paired rounds, its 90% interval, and the verdict."""
    measured = (median_ratio(took, reference) - 1) * statistics.median(reference)
    low, high = extra_interval(took, reference)
    # the measured figures the prediction would be within WITHIN of, against the interval
    lo, hi = predicted / (1 + WITHIN), predicted / (1 - WITHIN)
    return measured, low, high, Verdict(within(predicted, measured), lo <= low and high <= hi, high < lo or low > hi)


def floor_cell(measured: float, low: float, high: float) -> str:
    """A control's measured extra time and its 90% interval, in ms, for the summary line."""
    return f"{1e3 * measured:+.1f} ms ({1e3 * low:.1f}..{1e3 * high:.1f})"


def measured_cells(measured: float, low: float, high: float, reference: list[float]) -> list[str]:
    """A row's measured cells: extra ms, its 90% interval, extra % of the unplanned step, rounds."""
    return [
        fmt(1e3 * measured, 1),
        f"{1e3 * low:.1f}..{1e3 * high:.1f}",
        percent(1 + measured / statistics.median(reference)),
        str(len(reference)),
    ]


def settle(
    timer: Rounds,
    timed: dict[str, nn.Module],
    pairs: dict[str, tuple[list[float], list[float]]],
    seconds: float,
) -> None:
    """More interleaved rounds of ``timer``, SETTLE_ROUNDS at a time for ``seconds`` at most, of
    the plans whose interval leaves their verdict open, each against the unplanned step in the
    same rounds."""
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        unsettled = [k for k, m in timed.items() if not judge(m.plan.extra_seconds, *pairs[k])[3].settled]
        if not unsettled:
            return
        more = timer(SETTLE_ROUNDS, ["unplanned", *unsettled])
        for k in unsettled:
            pairs[k][0].extend(more[k])
            pairs[k][1].extend(more["unplanned"])


def model_table(
    case: Case, strategies: list[str], levels: list[float], rounds: int, settling: float, copies: int = 1
) -> None:
    """Plan, time every distinct plan against the unplanned step and print the table for one case."""
    unplanned, rows = plans(case, strategies, levels)
    timed = {str(i): r.planned for i, r in enumerate(rows) if not isinstance(r.planned, str) and r.same_as is None}
    # A budget no step reaches: the rewritten module with nothing recomputed, predicted at 0 extra.
    # Whatever it measures is what this run cannot tell from nothing (where each module's
    # activations lie, the rewrite's own dispatch, noise): the floor under every plan's figure.
    control = memfit.optimize(case.model, 2 * unplanned, case.x, optimizer=None)
    controls = {"control": control, "copy": copy.deepcopy(case.model)}
    # built once: settling goes on with the same warm copies and the rotation where it stopped
    timer = Rounds({"unplanned": case.model, **controls, **timed}, case.x, copies)
    took = timer(rounds)
    pairs = {k: (took[k], list(took["unplanned"])) for k in timed}
    settle(timer, timed, pairs, settling)
    ms = 1e3 * statistics.median(took["unplanned"])
    made = [r.planned.plan for r in rows if not isinstance(r.planned, str)]
    step_s = made[0].step_seconds if made else 0.0
    # each plan's search timed the whole forward once: the factor its calibrated times were priced at
    paces = [n.split(":", 1)[1].strip() for p in made[:1] for n in p.notes if n.startswith("Times:")]
    print(
        f"{case.name} (batch {case.shape}): unplanned peak {unplanned:.2f} MiB (pred); unplanned step "
        f"{1e3 * step_s:.0f} ms forward and backward (pred), {ms:.0f} ms with loss and SGD (meas, median); "
        f"{len(timed)} distinct plans timed" + "".join(f"\nfirst plan's times: {t}" for t in paces) + "\n"
    )
    table = Table(
        [
            ("strategy", "", 18),
            ("level", "given", 7),
            ("budget", "MiB", 9),
            ("peak MiB", "pred", 10),
            ("extra ms", "pred", 10),
            ("extra %", "pred", 9),
            ("extra ms", "meas", 10),
            ("90% interval", "meas", 14),
            ("extra %", "meas", 9),
            ("rounds", "", 7),
            ("pred/meas", "", 10),
            (f"{WITHIN:.0%}", "", 5),
        ]
    )
    verdicts: dict[str, Verdict] = {}
    for i, row in enumerate(rows):
        if isinstance(row.planned, str):
            table.row(row.strategy, level_cell(row.level), fmt(row.budget), note=row.planned)
            continue
        plan = row.planned.plan
        name = row.strategy if row.strategy != "auto" else f"auto ({plan.strategy})"
        timed_at = i if row.same_as is None else row.same_as
        predicted = plan.extra_seconds
        measured, low, high, verdicts[str(timed_at)] = judge(predicted, *pairs[str(timed_at)])
        reference = pairs[str(timed_at)][1]
        first = rows[timed_at]
        note = "" if first is row else f"timed above: the plan of {first.strategy} at {level_cell(first.level)}"
        table.row(
            name,
            level_cell(row.level),
            fmt(row.budget),
            fmt(plan.peak_after_bytes / MiB),
            fmt(1e3 * predicted, 1),
            fmt(plan.extra_time_percent, 1),
            *measured_cells(measured, low, high, reference),
            fmt(predicted / measured) if measured > 0 else "--",
            "yes" if verdicts[str(timed_at)].within else "no",
            note=note,
        )
    # each control's budget and predicted peak (MiB) and predicted extra seconds
    floors = {}
    for key, label, cells, note in (
        (
            "control",
            "none (control)",
            (control.plan.budget_bytes / MiB, control.plan.peak_after_bytes / MiB, control.plan.extra_seconds),
            "nothing recomputed: the run's floor",
        ),
        (
            "copy",
            "none (eager copy)",
            (None, unplanned, 0.0),
            "the model itself, copied: the floor without the rewrite",
        ),
    ):
        budget, peak, predicted = cells
        floors[key] = judge(predicted, took[key], took["unplanned"])[:3]
        table.row(
            label,
            "",
            fmt(budget),
            fmt(peak),
            fmt(1e3 * predicted, 1),
            fmt(100 * predicted / step_s if step_s > 0 else None, 1),
            *measured_cells(*floors[key], took["unplanned"]),
            "--",
            "--",
            note=note,
        )
    hits = list(verdicts.values())
    print(
        f"\n{sum(v.within for v in hits)} of {len(hits)} distinct plans predicted within {WITHIN:.0%} of the "
        f"measured extra time; by the 90% intervals {sum(v.surely for v in hits)} surely within, "
        f"{sum(v.surely_not for v in hits)} surely not, the rest unsettled by this run; the control "
        f"(nothing recomputed, predicted 0) measured {floor_cell(*floors['control'])}, an eager copy of "
        f"the model {floor_cell(*floors['copy'])}\n"
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and print a table per model."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=DEFAULT_MODELS, help="default: resnet18 gpt")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=STRATEGIES, help="default: all")
    p.add_argument("--levels", nargs="+", type=float, default=None, help="budget levels in %% (default 25 50 75)")
    p.add_argument(
        "--rounds", "--repeats", type=int, default=None, help=f"interleaved timing rounds (default {ROUNDS})"
    )
    p.add_argument(
        "--settle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="per model, time the plans whose interval leaves the verdict open for up to this long more (default 0)",
    )
    p.add_argument(
        "--copies",
        type=int,
        default=1,
        help="independent copies of every timed module, one stepped a round in turn (default 1)",
    )
    p.add_argument("--quick", action="store_true", help="smaller shapes, levels 30 70, 3 rounds")
    p.add_argument("--cold", action="store_true", help=f"calibrate in an empty cache (${CACHE_ENV}), not the user's")
    args = p.parse_args(argv)
    if args.copies < 1:
        p.error(f"--copies {args.copies}: give at least 1 copy of each module (1 is the module itself)")
    shapes = QUICK if args.quick else MODELS
    levels = [v / 100 for v in (args.levels or (QUICK_LEVELS if args.quick else LEVELS))]
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    if args.cold:
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="memfit-timing-")
    torch.set_num_threads(1)  # the time model calibrates on the thread count it will be compared at
    started = time.perf_counter()
    begin(f"1 intra-op thread, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    section("Extra step time of recomputation: the time model against the step")
    print("level: where the budget lies from the strategy's feasible minimum (0%) to the unplanned predicted peak")
    print("(100%). extra %: of the unplanned step, pred of its forward and backward, meas of the whole SGD step;")
    more = " (--settle: more where the rounds column says)" if args.settle else ""
    print(f"meas: median over {rounds} interleaved rounds{more} of planned over unplanned step CPU time,")
    rotated = f" (each module as {args.copies} copies, one a round in turn)" if args.copies > 1 else ""
    print(f"after a warm-up{rotated};", end=" ")
    print("90% interval: of the rounds resampled (bootstrap). 25%: whether pred is within 25% of meas.")
    print("Last rows, timed in the same rounds: none (control), the model rewritten with nothing recomputed;")
    print("and none (eager copy), a deep copy of the model itself.\n")
    for name in args.models:
        batch, shape, options = shapes[name]
        case = build_case(name, batch, shape, **options)
        model_table(case, args.strategies, levels, rounds, args.settle, args.copies)
    footer(started)


if __name__ == "__main__":
    main()
