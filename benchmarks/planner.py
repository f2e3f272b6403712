"""memfit's strategies at budgets between each one's feasible minimum and the unplanned peak.

For each zoo model and strategy, budgets at --levels of the way from the strategy's feasible
minimum (memfit.minimum) to the unplanned predicted peak: predicted and measured peak (and
whether it fits), extra FLOPs, step time against the unplanned model, planning time. The other
parts are files beside this one: policies.py (hand-written checkpointing), compiled.py
(torch.compile), milp.py, depth.py and speed.py.

    .venv/bin/python benchmarks/planner.py --quick                    # one model, one budget: ~1 minute
    .venv/bin/python benchmarks/planner.py                            # the default models
    .venv/bin/python benchmarks/planner.py --models resnet50 gpt --batch 16 --levels 50
"""

from __future__ import annotations

import argparse
import time

from common import Case, MiB, Table, begin, build_case, fmt, footer, level_cell, plans_between, section, time_ratios
from torch import nn

import memfit

STRATEGIES = memfit.list_strategies()  # "auto" picks among them
DEFAULT_MODELS = ["resnet18", "densenet_bc_100", "mobilenet_v2", "vgg11_bn", "gpt"]
# Small enough for a CPU: the per-sample shapes of tests/conftest.py's zoo_case.
IMAGE_BATCH, IMAGE_INPUT, GPT_BATCH, GPT_INPUT = 8, "3x32x32", 2, "128"


def case_of(name: str, batch: int | None, shape: str | None, stem: str | None) -> Case:
    """A zoo case with the small defaults above where options are None."""
    is_lm = name.startswith("gpt")
    options = {"stem": stem} if stem and not is_lm and name != "densenet_bc_100" else {}
    default_batch, default_shape = (GPT_BATCH, GPT_INPUT) if is_lm else (IMAGE_BATCH, IMAGE_INPUT)
    return build_case(name, batch or default_batch, shape or default_shape, **options)


def strategies_table(case: Case, strategies: list[str], levels: list[float], rounds: int) -> None:
    """Plan, measure and time every strategy at every level; print one table for the case."""
    pred = memfit.estimate(case.model, case.x).peak_mb
    meas = memfit.measure(case.model, case.x).peak_mb
    print(f"{case.name} (batch {case.shape}): unplanned peak {pred:.2f} MiB (pred), {meas:.2f} MiB (meas)")
    rows: list[tuple[str, float, float | None, float | None, nn.Module | str]] = []
    for strategy in strategies:
        minimum, plans = plans_between(case, strategy, pred, levels)
        rows += [(strategy, minimum, *plan) for plan in plans]
    timed = {str(i): r[4] for i, r in enumerate(rows) if not isinstance(r[4], str)}
    ratios, ms = time_ratios({"unplanned": case.model, **timed}, "unplanned", case.x, rounds)
    table = Table(
        [
            ("strategy", "", 11),
            ("min MiB", "pred", 9),
            ("level", "given", 7),
            ("budget", "MiB", 9),
            ("peak MiB", "pred", 10),
            ("peak MiB", "meas", 10),
            ("fits", "meas", 6),
            ("+FLOPs %", "pred", 10),
            ("time x", "meas", 8),
            ("plan s", "meas", 8),
        ]
    )
    for i, (strategy, minimum, level, budget, planned) in enumerate(rows):
        if isinstance(planned, str):
            table.row(strategy, fmt(minimum), level_cell(level), fmt(budget), note=planned)
            continue
        plan = planned.plan
        peak = memfit.measure(planned, case.x).peak_mb
        note = "the unplanned step fits: nothing recomputed" if plan.strategy == "none" else ""
        table.row(
            strategy,
            fmt(minimum),
            level_cell(level),
            fmt(budget),
            fmt(plan.peak_after_bytes / MiB),
            fmt(peak),
            "yes" if peak <= budget else "OVER",
            fmt(plan.extra_flops_percent, 1),
            fmt(ratios[str(i)]),
            fmt(plan.planning_seconds, 1),
            note=note,
        )
    print(f"unplanned step: {ms:.0f} ms CPU (meas, median)\n")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and print a table per model."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help=f"zoo names (default {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {IMAGE_BATCH}; GPT {GPT_BATCH})")
    p.add_argument("--input", default=None, help=f"per-sample shape (default {IMAGE_INPUT}; GPT {GPT_INPUT} tokens)")
    p.add_argument(
        "--stem", default=None, choices=["imagenet", "cifar"], help="stem of the image models (default cifar)"
    )
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=STRATEGIES, help="default: all")
    p.add_argument("--levels", nargs="+", type=float, default=None, help="budget levels in %% (default 25 50 75)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5)")
    p.add_argument("--quick", action="store_true", help="resnet18, one budget (50%%), 2 rounds")
    args = p.parse_args(argv)
    models = (args.models or ["resnet18"])[:1] if args.quick else args.models or DEFAULT_MODELS
    levels = [v / 100 for v in (args.levels or ([50] if args.quick else [25, 50, 75]))]
    rounds = args.rounds or (2 if args.quick else 5)
    started = time.perf_counter()
    begin("1 intra-op thread")
    section("Budgets between each strategy's feasible minimum and the unplanned peak")
    print("level: where the budget lies from the strategy's feasible minimum (0%) to the unplanned predicted")
    print(f"peak (100%). time x: planned / unplanned step time, median of {rounds} interleaved rounds after a")
    print("warm-up. fits: measured peak <= budget.\n")
    for name in models:
        strategies_table(case_of(name, args.batch, args.input, args.stem), args.strategies, levels, rounds)
    footer(started)


if __name__ == "__main__":
    main()
