"""Planning time: the wall time of memfit.optimize (or memfit.minimum), each call in a fresh
process, cold and warm.

ResNet-152 at batch 64, 224x224, at 40% of the unplanned predicted peak by default. cold: an
empty workspace cache ($MEMFIT_CACHE_DIR); warm: the cache the cold run left. The median and the
fastest of --repeats such pairs, each pair with its own cache. ``--call minimum`` times the
search for the feasible minimum instead (no budget; the floor's rounds of dry runs).

    .venv/bin/python benchmarks/speed.py                    # hours: ResNet-152 at batch 64 (docs/benchmarks.md)
    .venv/bin/python benchmarks/speed.py --models resnet50 --batch 16 --repeats 1
    .venv/bin/python benchmarks/speed.py --call minimum --models densenet_bc_100 --batch 4 --input 3x32x32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_started = time.perf_counter()  # before torch: import time is reported apart from planning time
from common import CACHE_ENV, CIFAR_STEM, Case, MiB, Table, build_case, fmt, footer, section  # noqa: E402  timed: see _started

import memfit  # noqa: E402  timed: see _started

IMPORT_SECONDS = time.perf_counter() - _started
STRATEGIES = ["dp", "selective", "chen", "auto"]
BUDGET = 0.4  # of the unplanned predicted peak
# On a shared two-core machine one run's time says more about the neighbours than about memfit.
REPEATS = 3


def worker(job_json: str) -> None:
    """One timed call in this (fresh) process; prints a JSON line. ``mb``: the planned peak
    (optimize) or the feasible minimum (minimum), both predicted."""
    job = json.loads(job_json)
    case = _case(job["model"], job["batch"], job["input"], job["stem"])
    started = time.perf_counter()
    if job["call"] == "minimum":
        mb = memfit.minimum(case.model, case.x, strategy=job["strategy"])
    else:
        mb = memfit.optimize(case.model, job["budget"], case.x, strategy=job["strategy"]).plan.peak_after_bytes / MiB
    plan_s = time.perf_counter() - started
    print(json.dumps({"import_s": IMPORT_SECONDS, "plan_s": plan_s, "mb": mb}))


def _case(name: str, batch: int, shape: str, stem: str) -> Case:
    """The zoo model; ``stem`` for the models that have one (DenseNet-BC is CIFAR's alone)."""
    return build_case(name, batch, shape, **({"stem": stem} if name.startswith(CIFAR_STEM) else {}))


def timed_runs(job: dict, repeats: int) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Cold and warm runs of one job in fresh processes; their results and failures by state."""
    runs: dict[str, list[dict]] = {"cold": [], "warm": []}
    failures: dict[str, str] = {}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            for state in ("cold", "warm"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(job)],
                    capture_output=True,
                    text=True,
                    env={**os.environ, CACHE_ENV: cache},
                    check=False,
                )
                if proc.returncode:
                    failures[state] = f"failed: {proc.stderr.strip()[-200:]}"
                else:
                    runs[state].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return runs, failures


def main(argv: list[str] | None = None) -> None:
    """Time optimize per model and strategy and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet152"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input", default="3x224x224")
    p.add_argument("--strategies", nargs="+", default=STRATEGIES, help=f"default {' '.join(STRATEGIES)}")
    p.add_argument("--repeats", type=int, default=REPEATS, help=f"cold/warm pairs (default {REPEATS})")
    p.add_argument("--call", choices=["optimize", "minimum"], default="optimize", help="what to time")
    p.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet", help="the zoo CNNs' stem")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return
    started = time.perf_counter()
    minimum = args.call == "minimum"
    at = "" if minimum else f" at {100 * BUDGET:.0f}% of the unplanned peak"
    section(f"Planning time: memfit.{args.call}{at}, batch {args.batch} at {args.input}")
    print(f"Each run is a new process. import: `import memfit` (torch, torch._dynamo); plan: the {args.call}")
    print("call (capture, calibration, planning, the dry runs). cold: empty workspace cache;")
    print(f"warm: the cache the cold run left ({CACHE_ENV}). Median of {args.repeats} cold/warm pairs, each")
    print("with its own cache; best: the fastest of them.\n")
    table = Table(
        [
            ("model", "", 16),
            ("strategy", "", 10),
            ("budget MiB", "given", 11),
            ("cache", "", 6),
            ("import s", "meas", 9),
            ("plan s", "meas", 8),
            ("best s", "meas", 8),
            ("minimum MiB" if minimum else "peak MiB", "pred", 12),
        ],
        left=4,
    )
    for name in args.models:
        budget = None
        if not minimum:
            case = _case(name, args.batch, args.input, args.stem)
            with tempfile.TemporaryDirectory() as scratch:
                os.environ[CACHE_ENV] = scratch  # this process's estimate must not warm the runs' cache
                budget = BUDGET * memfit.estimate(case.model, case.x).peak_mb
        shape = {"model": name, "batch": args.batch, "input": args.input, "stem": args.stem, "call": args.call}
        for strategy in args.strategies:
            job = {**shape, "budget": budget, "strategy": strategy}
            runs, failures = timed_runs(job, args.repeats)
            for state, got in runs.items():
                if state in failures:
                    table.row(name, strategy, fmt(budget) if budget else "-", state, note=failures[state])
                    continue
                plan_s = [g["plan_s"] for g in got]
                table.row(
                    name,
                    strategy,
                    fmt(budget) if budget else "-",
                    state,
                    fmt(statistics.median(g["import_s"] for g in got), 1),
                    fmt(statistics.median(plan_s), 1),
                    fmt(min(plan_s), 1),
                    fmt(got[0]["mb"]),
                )
    footer(started)


if __name__ == "__main__":
    main()
