"""torch.compile of memfit's plan against torch.compile with activation_memory_budget, at equal peaks.

For each model: torch.compile(model) (inductor) with torch._functorch.config.activation_memory_budget
at each of --ratios (1 is compile's default: its own min-cut, no extra recomputation); then, at
each such compiled step's measured peak as the budget, memfit.optimize's plan, eager and with
compile=True (compiled plans measured until one keeps the budget; "warm s" then excludes that
search, which is planning time). Peaks are measured on the module itself after warm-up steps
(memfit.distributed.measure, made for wrapped modules: a compiled one cannot be copied either, and
its first steps compile); the unplanned eager step is measured both ways as a check. Step time: CPU
time on one intra-op thread, median over interleaved rounds of the ratio to the unplanned eager
step. Every compiled variant runs in its own process with a time limit, so that compile caches, a
crash or a hung compiler stay there.

    .venv/bin/python benchmarks/compiled.py --quick                # GPT, ratio 0.5: several minutes
    .venv/bin/python benchmarks/compiled.py                        # gpt and resnet18, ratios 1 0.5 0.2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import torch
import torch._functorch.config as functorch_config
from common import (
    PLAN_QUALITY_MODELS,
    MiB,
    Table,
    begin,
    build_case,
    first_line,
    fmt,
    footer,
    keep_freed_memory,
    percent,
    section,
    time_ratios,
)

import memfit

# name -> (batch, per-sample shape, options of memfit.models.create)
MODELS = {"gpt": PLAN_QUALITY_MODELS["gpt"], "resnet18": (8, "3x32x32", {})}
RATIOS = [1.0, 0.5, 0.2]


def worker(job: dict) -> dict:
    """Build one variant, step it, and return its measured peak and time ratio (or the error)."""
    keep_freed_memory()  # the worker times steps: its heap as begin() keeps the parent's
    batch, shape, options = MODELS[job["model"]]
    case = build_case(job["model"], batch, shape, **options)
    functorch_config.activation_memory_budget = job.get("ratio", 1.0)
    if job["budget"] is None:
        module = torch.compile(case.model) if job["compile"] else case.model
    else:  # compile=True: memfit measures compiled plans until one keeps the budget
        module = memfit.optimize(case.model, job["budget"], case.x, compile=job["compile"])
    started = time.perf_counter()
    peak = memfit.distributed.measure(module, case.x)[0] / MiB  # its warm-up steps compile
    warm_s = time.perf_counter() - started
    reference = build_case(job["model"], batch, shape, **options).model
    ratios, _ = time_ratios({"eager": reference, "variant": module}, "eager", case.x, job["rounds"])
    return {"peak": peak, "ratio": ratios["variant"], "warm_s": warm_s}


def in_process(job: dict, timeout_s: float) -> dict:
    """Run :func:`worker` in a fresh process, killed (its compile workers too) after ``timeout_s``."""
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"timed out after {timeout_s:.0f} s (--timeout)"}
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = [line for line in err.splitlines() if line.strip()]
    return {"error": f"exited with {proc.returncode}: {tail[-1] if tail else 'no output'}"}


def compare(name: str, ratios: list[float], rounds: int, timeout_s: float, table: Table) -> None:
    """Rows for one model: each compile ratio, then memfit at its measured peak, eager and compiled."""
    batch, shape, options = MODELS[name]
    case = build_case(name, batch, shape, **options)
    eager = memfit.measure(case.model, case.x).peak_mb
    job = {"model": name, "rounds": rounds, "budget": None, "compile": False}
    check = in_process(job, timeout_s)
    table.row(
        name,
        "eager, unplanned",
        "--",
        fmt(eager),
        "+0.0",
        "--",
        note=f"in place: {fmt(check.get('peak'))} MiB" if "peak" in check else check["error"],
    )
    for ratio in ratios:
        got = in_process({**job, "compile": True, "ratio": ratio}, timeout_s)
        label = f"compile amb={ratio:g}"
        if "error" in got:
            table.row(name, label, note=f"n/a: {got['error']}")
            continue
        table.row(name, label, "--", fmt(got["peak"]), percent(got["ratio"]), fmt(got["warm_s"], 0))
        for compiled in (False, True):
            mine = in_process({**job, "budget": got["peak"], "compile": compiled}, timeout_s)
            label = "  memfit compile=True" if compiled else "  memfit, eager"
            if "error" in mine:
                table.row(name, label, fmt(got["peak"]), note=f"n/a: {mine['error']}")
                continue
            over = "" if mine["peak"] <= got["peak"] else "OVER the budget"
            table.row(
                name,
                label,
                fmt(got["peak"]),
                fmt(mine["peak"]),
                percent(mine["ratio"]),
                fmt(mine["warm_s"], 0),
                note=over,
            )


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--ratios", nargs="+", type=float, default=RATIOS, help="activation_memory_budget values")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per variant (default 7)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a variant is given up")
    p.add_argument("--quick", action="store_true", help="gpt, ratio 0.5, 3 rounds")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        try:
            result = worker(json.loads(args.worker))
        except Exception as e:  # noqa: BLE001  (a compiler failure of any kind is a row of the table, not a crash)
            result = {"error": first_line(e)}
        print("RESULT " + json.dumps(result), flush=True)
        return
    models, ratios, rounds = (["gpt"], [0.5], 3) if args.quick else (args.models, args.ratios, args.rounds)
    started = time.perf_counter()
    begin("1 intra-op thread")
    section("torch.compile with activation_memory_budget, and memfit at the same measured peak")
    print("amb: torch._functorch.config.activation_memory_budget. budget: memfit's, the compiled step's peak.")
    print("time %: step time over the unplanned eager step's, minus 1. warm s: the warm-up steps (compiling).\n")
    table = Table(
        [
            ("model", "", 10),
            ("who", "", 20),
            ("budget", "MiB", 9),
            ("peak MiB", "meas", 10),
            ("time %", "meas", 8),
            ("warm s", "meas", 8),
        ],
        left=2,
    )
    for name in models:
        compare(name, ratios, rounds, args.timeout, table)
    footer(started)


if __name__ == "__main__":
    main()
