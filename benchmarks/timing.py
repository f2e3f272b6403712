"""Time cost model benchmark: predicted against measured extra step time of recomputation plans.

For memfit's ``resnet18`` (CIFAR stem, batch 32) and ``gpt`` (4 layers, width 128, batch 8x128),
the step is captured and calibrated (workspaces, then times: :mod:`memfit.cost.timing`), and for
each strategy and budget the chain's cheapest plan, priced by the time model, is enacted. Each plan
row gives its predicted extra time (the recomputed nodes' calibrated forward times) and its
measured one: CPU time of the training step (forward, loss, backward, SGD) on one intra-op thread,
the median over interleaved pairs of unplanned and planned steps of their difference, and the
ratio of the two. Budgets sit at the given fractions of the way from the chain's least peak to the
unplanned peak (predicted). Calibration time is reported with an empty cache (cold).

    .venv/bin/python benchmarks/timing.py                       # both models, about ten minutes
    .venv/bin/python benchmarks/timing.py --models gpt --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

import memfit
from memfit.capture.dryrun import capture
from memfit.capture.inputs import as_inputs
from memfit.capture.trace import graph_of
from memfit.capture.trainstep import StepConfig, make_optimizer, run_step, unique_trainable
from memfit.cost import timing, workspace
from memfit.planner import STRATEGIES, Chain, Plan
from memfit.report.memory import mib
from memfit.rewrite.checkpoint import rewrite

STRATEGY_NAMES = ("chen", "dp", "selective")


def case(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model and a seeded batch."""
    torch.manual_seed(0)
    if name == "gpt":
        model = memfit.models.create("gpt", n_layer=4, n_embd=128)
        return model, torch.randint(0, model.wte.num_embeddings, (8, 128))
    return memfit.models.create(name, stem="cifar", num_classes=10), torch.randn(32, 3, 32, 32)


def stepper(module: nn.Module, x: torch.Tensor) -> Callable[[], float]:
    """One SGD training step of ``module``; returns its CPU time on this thread."""
    config = StepConfig()
    optimizer = make_optimizer("sgd", unique_trainable(module.parameters()))
    module.train()

    def step() -> float:
        start = time.thread_time()
        run_step(lambda: module(x), config, x.device.type, optimizer, lambda phase, node: None)
        optimizer.zero_grad(set_to_none=True)
        return time.thread_time() - start

    return step


def measured_extra(reference: nn.Module, planned: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """Median over interleaved pairs (order alternating) of planned minus unplanned step CPU time,
    the unplanned step's median, and the difference of the two modules' fastest steps, in seconds
    (the least disturbed by other processes)."""
    steps = (stepper(reference, x), stepper(planned, x))
    for step in steps:
        step()  # warm-up: first-call allocations and oneDNN primitives
    diffs, base, planned_s = [], [], []
    for i in range(repeats):
        took = [0.0, 0.0]
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            took[k] = steps[k]()
        diffs.append(took[1] - took[0])
        base.append(took[0])
        planned_s.append(took[1])
    return statistics.median(diffs), statistics.median(base), min(planned_s) - min(base)


def calibrated(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, Chain, float, float]:
    """The traced module, the timed chain, and the wall and CPU seconds time calibration took."""
    inputs = as_inputs(x)
    gm = graph_of(model, [], inputs)
    config = StepConfig()
    graph = capture(model, inputs, config, gm=gm)
    workspace.calibrate(graph, gm, inputs.tensors, config)
    wall, cpu = time.perf_counter(), time.process_time()
    timing.calibrate_times(graph, gm, inputs.tensors, config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    missing = timing.unmeasured(graph)
    print(f"  calibration (cold): {wall:.2f} s wall, {cpu:.2f} s CPU; unmeasured nodes: {len(missing)} {sorted(missing)}")
    return gm, Chain(graph), wall, cpu


def run_model(name: str, fractions: list[float], repeats: int) -> None:
    """Print the plans' table for one model."""
    model, x = case(name)
    print(f"\n{name}, batch {'x'.join(map(str, x.shape))}")
    gm, chain, _, _ = calibrated(model, x)
    unplanned = chain.peak([(i, i + 1, "plain") for i in range(chain.m)])
    cost = chain.graph.checkpoint_cost
    print(f"  predicted step (forward + backward): {1e3 * chain.step_seconds:.0f} ms; checkpointing adds {1e6 * cost.segment:.0f} us a segment, "
          f"{1e6 * cost.per_operator:.1f} us an operator, {1e6 * cost.selective_per_operator:.1f} more if selective")
    header = (
        f"  {'strategy':<10} {'budget':>6} {'peak MiB':>8} {'FLOPs %':>7} {'pred ms':>8} {'meas ms':>8} {'pred %':>7} "
        f"{'meas %':>7} {'pred/meas':>9} {'min ms':>7}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    seen: dict[tuple, str] = {}
    for s in STRATEGY_NAMES:
        strategy = STRATEGIES[s]
        low = chain.peak(strategy.lowest_peak(chain))
        for f in fractions:
            spans = strategy.cheapest(chain, int(low + f * (unplanned - low)))
            if spans is None:
                print(f"  {s:<10} {f:>6.0%} no plan")
                continue
            row = f"  {s:<10} {f:>6.0%}"
            if tuple(spans) in seen:
                print(f"{row} the plan of {seen[tuple(spans)]}")
                continue
            seen[tuple(spans)] = row.strip()
            plan = Plan(segments=chain.to_segments(spans), strategy=s, forward_flops=chain.forward_flops)
            plan.step_seconds = chain.step_seconds
            planned = rewrite(model, gm, plan)
            extra, base, least = measured_extra(copy.deepcopy(model), copy.deepcopy(planned), x, repeats)
            ratio = plan.extra_seconds / extra if extra > 0 else float("nan")
            print(
                f"{row} {mib(chain.peak(spans)):>8.2f} {plan.extra_flops_percent:>7.1f} "
                f"{1e3 * plan.extra_seconds:>8.1f} {1e3 * extra:>8.1f} {plan.extra_time_percent:>7.1f} "
                f"{100 * extra / base:>7.1f} {ratio:>9.2f} {1e3 * least:>7.1f}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "gpt"], choices=["resnet18", "gpt"])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.7], help="budgets between least and unplanned peak")
    p.add_argument("--repeats", type=int, default=7, help="interleaved step pairs per plan")
    args = p.parse_args()
    torch.set_num_threads(1)
    os.environ[workspace.CACHE_ENV] = tempfile.mkdtemp(prefix="memfit-timing-")  # cold calibration
    load = os.getloadavg()[0]
    print(f"memfit {memfit.__version__}, torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs, load {load:.2f}")
    print("pred: the time model (calibrated forward times of the recomputed nodes); meas: CPU time of the SGD step,")
    print(f"median over {args.repeats} interleaved pairs of planned minus unplanned; % of the unplanned step;")
    print("min: the planned module's fastest step minus the unplanned one's")
    for name in args.models:
        run_model(name, args.fractions, args.repeats)


if __name__ == "__main__":
    main()
