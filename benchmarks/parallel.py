"""Data-parallel memory: memfit's per-process prediction against a real DDP / FSDP job (CPU, gloo).

Run under torchrun; every process plans the same model for a budget between the feasible
minimum and the unplanned peak (per process), wraps it with ``memfit.distributed.wrap`` and
measures one steady-state step with the profiler's memory events. Rank 0 prints the table (the
measured column is the largest over the processes) and, with ``--json``, writes the rows.

    .venv/bin/python -m torch.distributed.run --nproc_per_node=2 benchmarks/parallel.py

gloo releases collective buffers from its own thread, so an FSDP step's measured peak varies
from run to run by up to a unit's flat buffer; memfit's prediction reserves one and bounds it.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import memfit

MiB = 2**20


def _model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    options: dict = {"num_classes": 10} if args.model == "densenet_bc_100" else {"num_classes": 10, "stem": "cifar"}
    if args.model.startswith("resnet"):
        options["width"] = args.width
    return memfit.models.create(args.model, **options)


def _parallels(args: argparse.Namespace, world: int) -> list[memfit.Parallel]:
    model = _model(args)  # the blocks: modules one level inside the model's children, with parameters
    blocks = tuple(n for n, m in model.named_modules() if n.count(".") == 1 and next(m.parameters(), None) is not None)
    return [memfit.Parallel("ddp", world), memfit.Parallel("fsdp", world), memfit.Parallel("fsdp", world, units=blocks)]


def run(args: argparse.Namespace) -> list[dict]:
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(rank)
    x = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    for parallel in _parallels(args, world):
        unplanned = memfit.estimate(_model(args), x, optimizer=args.optimizer, parallel=parallel).peak_mb
        lowest = memfit.minimum(_model(args), x, optimizer=args.optimizer, parallel=parallel, strategy=args.strategy)
        for fraction in [None, *args.fractions]:
            if fraction is None:
                module, budget = torch.fx.symbolic_trace(_model(args)), None
                predicted = unplanned
            else:
                budget = lowest + fraction * (unplanned - lowest)
                module = memfit.optimize(
                    _model(args), budget, x, optimizer=args.optimizer, parallel=parallel, strategy=args.strategy
                )
                predicted = module.plan.peak_after_bytes / MiB
            wrapped = memfit.distributed.wrap(module, parallel)
            peak, phases = memfit.distributed.measure(wrapped, x, optimizer=args.optimizer)
            measured = [0.0] * world
            dist.all_gather_object(measured, peak / MiB)
            forward = [0.0] * world
            dist.all_gather_object(forward, phases.get("forward", 0) / MiB)
            rows.append(
                {
                    "parallel": parallel.kind,
                    "units": "default" if parallel.units is None else f"{len(parallel.units)} blocks",
                    "world_size": world,
                    "fraction": fraction,
                    "budget_mb": budget,
                    "predicted_mb": predicted,
                    "measured_mb": max(measured),
                    "measured_forward_mb": max(forward),
                    "measured_per_rank_mb": measured,
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    head = (
        f"{'parallel':<9}{'units':<11}{'budget':>10}{'at':>6}{'peak MiB':>11}{'peak MiB':>11}{'fits':>6}\n"
        f"{'':<9}{'':<11}{'MiB':>10}{'':>6}{'pred':>11}{'meas max':>11}{'':>6}"
    )
    lines = [head, "-" * 64]
    for r in rows:
        budget = "--" if r["budget_mb"] is None else f"{r['budget_mb']:.2f}"
        at = "--" if r["fraction"] is None else f"{r['fraction']:.0%}"
        fits = "--" if r["budget_mb"] is None else ("yes" if r["measured_mb"] <= r["budget_mb"] else "NO")
        lines.append(
            f"{r['parallel']:<9}{r['units']:<11}{budget:>10}{at:>6}{r['predicted_mb']:>11.2f}"
            f"{r['measured_mb']:>11.2f}{fits:>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=int, default=16, help="ResNets: channels of the first stage")
    parser.add_argument("--batch", type=int, default=4, help="per process")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--strategy", default="dp")
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.25, 0.75])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    faulthandler.enable()  # a crash in a native thread still shows where Python was
    dist.init_process_group("gloo")
    try:
        rows = run(args)
        if dist.get_rank() == 0:
            width = f"width {args.width}, " if args.model.startswith("resnet") else ""
            print(
                f"{args.model} ({width}CIFAR stem), batch {args.batch} per process, {args.size}x{args.size}, "
                f"{args.optimizer}, {dist.get_world_size()} processes (gloo); pred = memfit, meas = profiler"
            )
            print(table(rows))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
    finally:
        dist.barrier()  # no process tears gloo down while another still talks to it
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
