"""dp, chen and selective against milp, the exact optimum: extra FLOPs at the same budgets (predicted).

Budgets lie at --levels of the way from the highest feasible minimum of all four strategies
(memfit.minimum) to the unplanned predicted peak, so that all plan for the same budget; optimize
verifies every plan. A ratio is the strategy's extra FLOPs over milp's; above 1, milp recomputes
less. milp optimises over every treatment (plain, recompute, selective), while dp and chen only
recompute: their ratios include what the selective treatment saves, not only their search.

    .venv/bin/python benchmarks/milp.py --batch 4 --models resnet18 densenet_bc_100 mobilenet_v2
"""

from __future__ import annotations

import argparse
import time

from common import Table, begin, build_case, first_line, fmt, footer, levels_between, section

import memfit

OTHERS = ["dp", "chen", "selective"]
DEFAULT_MODELS = ["resnet18", "densenet_bc_100", "mobilenet_v2"]


def ratio_cell(flops: int, base: int) -> tuple[str, float]:
    """The cell and the ratio of extra FLOPs to milp's; 0/0 is 1."""
    if flops == base == 0:
        return "1.000", 1.0
    if base == 0:
        return f"inf ({flops / 1e9:.3f}G)", float("inf")
    return f"{flops / base:.3f}", flops / base


def main(argv: list[str] | None = None) -> None:
    """Plan every strategy at shared budgets and print the ratios to milp."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help=f"default {' '.join(DEFAULT_MODELS)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--input", default="3x32x32", help="per-sample shape (GPT: tokens)")
    p.add_argument("--levels", nargs="+", type=float, default=[25, 50, 75], help="budget levels in %%")
    args = p.parse_args(argv)
    started = time.perf_counter()
    begin()
    section("dp, chen and selective against milp (extra FLOPs, predicted)")
    table = Table(
        [("model", "", 17), ("level", "given", 7), ("budget", "MiB", 9), ("milp", "GFLOP", 10)]
        + [(f"{s}/milp", "pred", 16) for s in OTHERS]
    )
    worst: dict[str, float] = {}
    for name in args.models:
        case = build_case(name, args.batch, args.input)
        pred = memfit.estimate(case.model, case.x).peak_mb
        try:
            floor = max(memfit.minimum(case.model, case.x, strategy=s) for s in ["milp", *OTHERS])
        except memfit.MemfitError as e:
            table.row(name, note=f"n/a: {first_line(e)}")
            continue
        if floor >= pred:
            table.row(name, note="the unplanned step is already at the minimum: nothing to plan")
            continue
        for level, budget in zip(args.levels, levels_between(floor, pred, [v / 100 for v in args.levels]), strict=True):
            try:
                plans = {s: memfit.optimize(case.model, budget, case.x, strategy=s).plan for s in ["milp", *OTHERS]}
            except memfit.MemfitError as e:
                table.row(name, f"{level:.0f}%", fmt(budget), note=f"n/a: {first_line(e)}")
                continue
            base = plans["milp"].extra_flops
            cells = []
            for s in OTHERS:
                cell, ratio = ratio_cell(plans[s].extra_flops, base)
                worst[s] = max(worst.get(s, 0.0), ratio)
                cells.append(cell)
            table.row(name, f"{level:.0f}%", fmt(budget), f"{base / 1e9:.3f}", *cells)
    print()
    for s, ratio in worst.items():
        print(f"{s}: worst ratio to milp {ratio:.3f} (pred)")
    footer(started)


if __name__ == "__main__":
    main()
