"""Planner benchmark: memfit's strategies against budgets, against peers, and with depth.

Prints plain-text tables; every figure is labelled pred (predicted by memfit, nothing allocated),
meas (measured on real tensors) or given (an input of the benchmark).

1. main   per zoo model and strategy, budgets at 25/50/75% of the way from the feasible minimum
          to the unplanned peak: predicted and measured peak, extra FLOPs, step-time ratio against
          the unplanned model, planning time.
2. peers  torch.utils.checkpoint.checkpoint_sequential (sqrt(n) segments) and torch.compile with
          torch._functorch.config.activation_memory_budget, next to memfit at the peer's measured
          peak.
3. milp   extra FLOPs of dp, selective and chen relative to milp at the same budgets.
4. depth  activation memory at the feasible minimum vs unplanned for DenseNet-BC of growing depth,
          and for resnet152 and densenet264 (--depth-study).
5. speed  wall time of memfit.optimize for resnet152 at batch 64, 224x224, each run in a fresh
          process, with an empty workspace cache (cold) and again with the cache it left (warm);
          the median and the fastest of --speed-repeats such pairs.

    .venv/bin/python benchmarks/planner.py --quick                    # about a minute
    .venv/bin/python benchmarks/planner.py                            # main, peers, milp
    .venv/bin/python benchmarks/planner.py --models resnet50 gpt --batch 16 --levels 50
    .venv/bin/python benchmarks/planner.py --parts depth --depths 40 76 100
    .venv/bin/python benchmarks/planner.py --parts speed               # about three minutes
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

_started = time.perf_counter()  # before torch: import time is reported apart from planning time
import torch  # noqa: E402
from torch import nn  # noqa: E402

import memfit  # noqa: E402
from memfit.capture.trainstep import StepConfig, init_optimizer_state, make_optimizer, run_step, unique_trainable  # noqa: E402
from memfit.cli import example_input  # noqa: E402
from memfit.cost import workspace  # noqa: E402
from memfit.cost.measurement import allocator_levels, memory_profile  # noqa: E402
from memfit.models.densenet import DenseNet  # noqa: E402
from memfit.planner import STRATEGIES  # noqa: E402
from memfit.report.memory import MiB, mib  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - _started  # what the speed part reports as import time

DEFAULT_MODELS = ["resnet18", "densenet_bc_100", "mobilenet_v2", "vgg11_bn", "gpt"]
QUICK_MODEL = "resnet18"
PARTS = ("main", "peers", "milp", "depth", "speed")
PEERS = ("checkpoint_sequential", "compile")
DEFAULT_DEPTHS = [40, 76, 100, 124]
QUICK_DEPTHS = [40, 52, 64]
BIG_MODELS = ["resnet152", "densenet264"]
# Small enough for a CPU: per-sample shapes of tests/conftest.py's zoo_case.
IMAGE_BATCH, IMAGE_INPUT, GPT_BATCH, GPT_INPUT = 8, "3x32x32", 2, "128"
DEPTH_BATCH, DEPTH_INPUT = 4, "3x32x32"
SPEED_MODELS, SPEED_BATCH, SPEED_INPUT = ["resnet152"], 64, "3x224x224"
SPEED_STRATEGIES = ["dp", "selective", "chen", "auto"]
SPEED_BUDGET = 0.4  # of the unplanned predicted peak
# Cold/warm pairs per strategy: on a shared two-core machine one run's time says more about the
# neighbours (two intra-op threads stall whenever another process takes a core) than about memfit.
SPEED_REPEATS = 3
# optimize() takes MiB and rounds down to bytes; a byte of slack keeps "the minimum" feasible.
EPS_MB = 1.0 / MiB


# --------------------------------------------------------------------------------------------
# Cases and measurements
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """A model and the batch it trains on.

    Attributes:
        name: Zoo name (or a label for models built here).
        model: The network; every run works on a copy or shares its parameters read-only.
        x: The training batch.
        spec: The build options, so that a subprocess can rebuild the same case.
    """

    name: str
    model: nn.Module
    x: torch.Tensor
    spec: dict = field(default_factory=dict)

    @property
    def shape(self) -> str:
        """The batch's shape as ``8x3x32x32``."""
        return "x".join(str(d) for d in self.x.shape)


def build_case(name: str, batch: int | None, shape: str | None, stem: str | None) -> Case:
    """A zoo model and a seeded batch, with zoo_case's small defaults where options are None.

    The same arguments give the same parameters and batch in any process (the compile peer
    rebuilds the case in a subprocess).
    """
    spec = {"name": name, "batch": batch, "shape": shape, "stem": stem}
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {}
    is_lm = name.startswith("gpt")
    if not is_lm:
        if stem is not None:
            kwargs["stem"] = stem
        elif name.startswith("vgg"):
            kwargs["stem"] = "cifar"  # a 224-pixel VGG classifier cannot take a 32-pixel batch
        kwargs["num_classes"] = 10
    if name == "densenet_bc_100":
        kwargs.pop("stem", None)  # the CIFAR model has its own bare stem
    model = memfit.models.create(name, **kwargs)
    default_batch, default_shape = (GPT_BATCH, GPT_INPUT) if is_lm else (IMAGE_BATCH, IMAGE_INPUT)
    x = example_input(model, batch or default_batch, shape or default_shape)
    return Case(name, model, x, spec)


def densenet_bc(depth: int) -> nn.Module:
    """CIFAR DenseNet-BC of a given depth, k=12, built as densenet_bc_100 is.

    Depth counts the convolutions and the classifier: 3 blocks of (depth - 4) / 6 bottleneck
    layers (two convolutions each), the stem convolution, two transitions and the classifier.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1 (40, 76, 100, ...), not {depth}")
    n = (depth - 4) // 6
    return DenseNet(
        (n, n, n), growth_rate=12, num_init_features=24, bn_size=4, compression=0.5, num_classes=10, stem=None
    )


def first_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= 160 else line[:157] + "..."


def measured_peak_mb(module: nn.Module, x: torch.Tensor) -> float:
    """Allocator-level peak of one real steady-state SGD step (memfit.measure; measured)."""
    return memfit.measure(module, x).peak_mb


def _stepper(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One training step of ``module`` as memfit defines it: forward, loss, backward, SGD."""
    config = StepConfig()
    optimizer = make_optimizer("sgd", unique_trainable(module.parameters()))

    def step() -> None:
        """Forward, loss, backward and SGD, then the gradients go (as memfit's steady state)."""
        run_step(lambda: module(x), config, x.device.type, optimizer, lambda phase, node: None)
        optimizer.zero_grad(set_to_none=True)

    return step


def step_time_ratio(reference: nn.Module, candidate: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median over interleaved pairs of candidate / reference step time, and the reference's ms.

    Both modules must own their parameters (pass deep copies). Interleaving, with the order
    alternating, exposes both to the same load from whatever else runs on the machine; the
    median of per-pair ratios then cancels slow spells that hit a whole pair.
    """
    reference.train()
    candidate.train()
    steps = (_stepper(reference, x), _stepper(candidate, x))
    for step in steps:
        step()  # warm-up: first-call allocations, oneDNN primitive caches, compilation
    ratios, reference_s = [], []
    for i in range(max(1, repeats)):
        took = [0.0, 0.0]
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            steps[k]()
            took[k] = time.perf_counter() - t0
        ratios.append(took[1] / took[0])
        reference_s.append(took[0])
    return statistics.median(ratios), 1000 * statistics.median(reference_s)


def allocator_peak_mb(module: nn.Module, x: torch.Tensor) -> float:
    """Allocator-level peak of one SGD step of ``module`` itself (no copy, no tracker; measured).

    memfit.measure steps a fresh deep copy once, so for a torch.compile'd module it would measure
    the compiling first step, under memfit's dispatch-level tracker. Here the module is stepped
    once first, then a second step is read from the profiler's memory events alone: the bytes alive
    before it (parameters, buffers, batch, optimizer state) plus the most it added.
    """
    module.train()
    params = unique_trainable(module.parameters())
    optimizer = make_optimizer("sgd", params)
    config = StepConfig()
    run_step(lambda: module(x), config, x.device.type, optimizer, lambda p, n: None)
    optimizer.zero_grad(set_to_none=True)
    init_optimizer_state(optimizer, params)
    gc.collect()
    alive = (*module.parameters(), *module.buffers(), x)
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    with memory_profile() as prof:
        run_step(lambda: module(x), config, x.device.type, optimizer, lambda p, n: None)
    optimizer.zero_grad(set_to_none=True)
    added, _, _ = allocator_levels(prof)
    return mib(sum(held.values()) + added)


# --------------------------------------------------------------------------------------------
# Planning, memoised: the peers and milp sections reuse the main table's plans
# --------------------------------------------------------------------------------------------


@dataclass
class PlanRun:
    """One memfit.optimize call and what was measured of its result.

    Attributes:
        strategy: The strategy asked for.
        budget_mb: The budget given.
        planned: The planned module, or None if optimize raised.
        error: Why there is no plan (the feasible minimum when the budget is below it).
        minimum_mb: The feasible minimum (MiB, predicted) when the budget was below it.
        measured_mb: Measured peak of the planned step, once measured.
        ratio: Planned / unplanned step time (measured), once timed.
    """

    strategy: str
    budget_mb: float
    planned: Any = None
    error: str = ""
    minimum_mb: float | None = None
    measured_mb: float | None = None
    ratio: float | None = None

    @property
    def plan(self) -> Any:
        """The plan of the planned module."""
        return self.planned.plan


class Bench:
    """Memoised memfit calls per case: feasible minimum, unplanned peaks and plans by budget."""

    def __init__(self, repeats: int) -> None:
        """Hold the step-timing repeats; caches start empty."""
        self.repeats = repeats
        self._minimum: dict[tuple[str, str], float | str] = {}
        self._plans: dict[tuple[str, str, float], PlanRun] = {}
        self._unplanned: dict[str, tuple[float, float]] = {}
        self.reference_ms: dict[str, list[float]] = {}

    def unplanned(self, case: Case) -> tuple[float, float]:
        """Predicted and measured peak (MiB) of the unplanned step."""
        if case.name not in self._unplanned:
            predicted = memfit.estimate(case.model, case.x).peak_mb
            self._unplanned[case.name] = (predicted, measured_peak_mb(case.model, case.x))
        return self._unplanned[case.name]

    def minimum(self, case: Case, strategy: str) -> float | str:
        """The strategy's feasible minimum (MiB, predicted), or why it has none."""
        key = (case.name, strategy)
        if key not in self._minimum:
            try:
                # No plan fits a 1-byte budget: the error carries the verified minimum.
                memfit.optimize(case.model, EPS_MB, case.x, strategy=strategy)
                self._minimum[key] = "n/a: a 1-byte budget was accepted"
            except memfit.MemfitBudgetError as e:
                self._minimum[key] = e.minimum_mb
            except Exception as e:  # a strategy being developed may fail in any way: report it
                self._minimum[key] = f"n/a: {first_line(e)}"
        return self._minimum[key]

    def plan(self, case: Case, strategy: str, budget_mb: float) -> PlanRun:
        """memfit.optimize at a budget; a budget below the minimum gives a PlanRun with the error."""
        key = (case.name, strategy, round(budget_mb, 6))
        if key not in self._plans:
            run = PlanRun(strategy, budget_mb)
            try:
                run.planned = memfit.optimize(case.model, budget_mb, case.x, strategy=strategy)
            except memfit.MemfitBudgetError as e:
                run.minimum_mb = e.minimum_mb
                run.error = f"below the minimum {e.minimum_mb:.2f} MiB (pred)"
            except Exception as e:
                run.error = f"n/a: {first_line(e)}"
            self._plans[key] = run
        return self._plans[key]

    def measure(self, case: Case, run: PlanRun) -> PlanRun:
        """Fill in the measured peak and the step-time ratio of a plan (once)."""
        if run.planned is not None and run.measured_mb is None:
            run.measured_mb = measured_peak_mb(run.planned, case.x)
            run.ratio, ms = step_time_ratio(copy.deepcopy(case.model), copy.deepcopy(run.planned), case.x, self.repeats)
            self.reference_ms.setdefault(case.name, []).append(ms)
        return run


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


class Table:
    """Fixed-width rows printed as they are computed (a long run shows progress)."""

    def __init__(self, columns: list[tuple[str, str, int]], left: int = 2) -> None:
        """Print the two header lines: column names, then what kind of figure each column holds.

        Args:
            columns: (name, kind, width); kind is "pred", "meas", "given" or "".
            left: How many leading columns are names (left-aligned); the rest are figures.
        """
        self.widths = [w for _, _, w in columns]
        self.left = left
        names = self._fmt([c[0] for c in columns])
        print(names)
        print(self._fmt([c[1] for c in columns]))
        print("-" * len(names))

    def _fmt(self, cells: list[str]) -> str:
        """Cells padded to the column widths: names left-aligned, figures right-aligned."""
        return "".join(
            (f"{c:<{w}}" if i < self.left else f"{c:>{w}}") for i, (c, w) in enumerate(zip(cells, self.widths))
        ).rstrip()

    def row(self, *cells: object, note: str = "") -> None:
        """Print one row; a note (an n/a reason) follows the cells it replaces."""
        text = self._fmt([str(c) for c in cells])
        print(f"{text}  {note}" if note else text, flush=True)


def section(title: str) -> None:
    """A section heading."""
    print(f"\n== {title} ==\n", flush=True)


def _f(value: float | None, digits: int = 2) -> str:
    """A figure with fixed decimals, ``--`` where there is none."""
    return "--" if value is None else f"{value:.{digits}f}"


def _run_cells(run: PlanRun) -> tuple[list[str], str]:
    """Budget, predicted peak, measured peak, fits, extra FLOPs %, time ratio, planning s."""
    if run.planned is None:
        return [_f(run.budget_mb)], run.error
    plan = run.plan
    fits = "--" if run.measured_mb is None else ("yes" if run.measured_mb <= run.budget_mb else "OVER")
    note = "the unplanned step fits: nothing recomputed" if plan.strategy == "none" else ""
    return [
        _f(run.budget_mb),
        _f(mib(plan.peak_after_bytes)),
        _f(run.measured_mb),
        fits,
        _f(plan.extra_flops_percent, 1),
        _f(run.ratio),
        _f(plan.planning_seconds, 1),
    ], note


# --------------------------------------------------------------------------------------------
# 1. Main table
# --------------------------------------------------------------------------------------------


def main_table(bench: Bench, cases: list[Case], strategies: list[str], levels: list[float]) -> None:
    """Per model and strategy: plans at budgets between the feasible minimum and the unplanned peak."""
    section("1. Budgets between each strategy's feasible minimum and the unplanned peak")
    print("level: where the budget lies from the strategy's feasible minimum (0%) to the unplanned")
    print("predicted peak (100%). time x: planned / unplanned step time (forward, backward, SGD),")
    print(f"median of {bench.repeats} interleaved pairs after a warm-up. fits: measured peak <= budget.\n")
    for case in cases:
        pred, meas = bench.unplanned(case)
        print(f"{case.name} (batch {case.shape}): unplanned peak {pred:.2f} MiB (pred), {meas:.2f} MiB (meas)")
        table = Table(
            [
                ("strategy", "", 11), ("min MiB", "pred", 9), ("level", "given", 7), ("budget", "MiB", 9),
                ("peak MiB", "pred", 10), ("peak MiB", "meas", 10), ("fits", "meas", 6),
                ("+FLOPs %", "pred", 10), ("time x", "meas", 8), ("plan s", "meas", 8),
            ],
            left=1,
        )
        for strategy in strategies:
            minimum = bench.minimum(case, strategy)
            if isinstance(minimum, str):
                table.row(strategy, note=minimum)
                continue
            if minimum >= pred:
                table.row(strategy, _f(minimum), note="the unplanned step is already at the minimum: nothing to plan")
                continue
            for level in levels:
                run = bench.measure(case, bench.plan(case, strategy, minimum + level * (pred - minimum)))
                cells, note = _run_cells(run)
                table.row(strategy, _f(minimum), f"{100 * level:.0f}%", *cells, note=note)
        if bench.reference_ms.get(case.name):
            ms = statistics.median(bench.reference_ms[case.name])
            print(f"unplanned step: {ms:.0f} ms (meas; median over the reference steps timed above)")
        print()


# --------------------------------------------------------------------------------------------
# 2. Peers
# --------------------------------------------------------------------------------------------


def _flat_children(module: nn.Module) -> list[nn.Module]:
    """Top-level children, with plain nn.Sequential containers (forward not overridden) expanded."""
    out: list[nn.Module] = []
    for child in module.children():
        if type(child).forward is nn.Sequential.forward:
            out.extend(_flat_children(child))
        else:
            out.append(child)
    return out


def _first_leaf(module: nn.Module) -> nn.Module:
    """The first module without children inside ``module`` (itself if it has none)."""
    return next((m for m in module.modules() if not any(True for _ in m.children())), module)


def as_sequential(model: nn.Module, x: torch.Tensor) -> tuple[nn.Sequential | None, str]:
    """The model's children in order as an nn.Sequential (of a copy), or None and the reason.

    An nn.Flatten goes where a 2-D layer (Linear) follows a >2-D output, standing in for the
    torch.flatten a forward usually does there. The result counts only if it gives the model's
    output, in eval mode and in train mode from the same seed (dropout, BatchNorm statistics).
    """
    # Eval mode for the shape pass: in train mode BatchNorm would move the running statistics.
    work = copy.deepcopy(model).eval()
    layers: list[nn.Module] = []
    try:
        with torch.no_grad():
            h = x
            for child in _flat_children(work):
                if isinstance(_first_leaf(child), nn.Linear) and h.dim() > 2:
                    layers.append(nn.Flatten(1))
                    h = layers[-1](h)
                layers.append(child)
                h = child(h)
    except Exception as e:
        return None, f"its children do not run in sequence ({first_line(e)})"
    seq = nn.Sequential(*layers).train(model.training)
    # The comparison runs on copies, so that its train-mode pass leaves seq's statistics alone.
    reference, candidate = copy.deepcopy(model), copy.deepcopy(seq)
    with torch.no_grad():
        for train in (False, True):
            reference.train(train)
            candidate.train(train)
            torch.manual_seed(1)
            want = reference(x)
            torch.manual_seed(1)
            got = candidate(x)
            if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
                mode = "train" if train else "eval"
                return None, f"its children in sequence do not compute its output ({mode} mode)"
    return seq, ""


class CheckpointSequential(nn.Module):
    """An nn.Sequential run through torch.utils.checkpoint.checkpoint_sequential."""

    def __init__(self, seq: nn.Sequential, segments: int) -> None:
        """Wrap ``seq``; ``segments`` as checkpoint_sequential takes it."""
        super().__init__()
        self.seq = seq
        self.segments = segments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Checkpointed forward (non-reentrant)."""
        return torch.utils.checkpoint.checkpoint_sequential(self.seq, self.segments, x, use_reentrant=False)


def compile_peer(case: Case, budget: float, repeats: int, timeout_s: float) -> dict:
    """Run the torch.compile peer in a subprocess, killed after ``timeout_s``.

    A subprocess keeps a hung or crashing compiler, and the memory compilation takes, out of this
    process; it rebuilds the same case from its spec (same seed, same parameters and batch).
    """
    job = json.dumps({**case.spec, "budget": budget, "repeats": repeats})
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--compile-worker", job],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so compile workers go with it on timeout
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended just now
        proc.communicate()
        return {"error": f"timed out after {timeout_s:.0f} s (--compile-timeout)"}
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = [line for line in err.splitlines() if line.strip()]
    return {"error": f"worker exited with {proc.returncode}: {tail[-1] if tail else 'no output'}"}


def compile_worker(job_json: str) -> None:
    """Subprocess side of :func:`compile_peer`: prints one ``RESULT {json}`` line."""
    job = json.loads(job_json)
    try:
        import torch._functorch.config as functorch_config

        if not hasattr(functorch_config, "activation_memory_budget"):
            raise RuntimeError(f"torch {torch.__version__} has no torch._functorch.config.activation_memory_budget")
        functorch_config.activation_memory_budget = job["budget"]
        case = build_case(job["name"], job["batch"], job["shape"], job["stem"])
        eager_mb = allocator_peak_mb(copy.deepcopy(case.model), case.x)
        compiled = torch.compile(copy.deepcopy(case.model))
        t0 = time.perf_counter()
        _stepper(compiled, case.x)()  # compiles forward and backward
        compile_s = time.perf_counter() - t0
        peak_mb = allocator_peak_mb(compiled, case.x)
        ratio, _ = step_time_ratio(copy.deepcopy(case.model), compiled, case.x, job["repeats"])
        result = {"peak_mb": peak_mb, "eager_mb": eager_mb, "ratio": ratio, "compile_s": compile_s}
    except Exception as e:
        result = {"error": first_line(e)}
    print("RESULT " + json.dumps(result), flush=True)


def peers_table(
    bench: Bench, cases: list[Case], strategies: list[str], peers: list[str], compile_budgets: list[float],
    compile_timeout: float,
) -> None:
    """Each peer's measured peak and step time, and memfit's strategies at that peak as budget."""
    section("2. Peers, and memfit at the peer's measured peak as budget")
    print("checkpoint_sequential: torch.utils.checkpoint.checkpoint_sequential(use_reentrant=False) over the")
    print("model's children (nn.Sequential containers expanded), round(sqrt(n)) segments. compile:")
    print("torch.compile (inductor) with torch._functorch.config.activation_memory_budget = B, in a subprocess;")
    print("its peak is of a step after the compiling one, read from the profiler's memory events alone, and")
    print("'eager check' is that same reading of the uncompiled model next to memfit.measure's.")
    print("time x: step time / unplanned eager step time (measured, interleaved).\n")
    table = Table(
        [
            ("model", "", 17), ("who", "", 28), ("budget", "MiB", 9), ("peak MiB", "pred", 10),
            ("peak MiB", "meas", 10), ("fits", "meas", 6), ("+FLOPs %", "pred", 10), ("time x", "meas", 8),
            ("plan s", "meas", 8),
        ]
    )
    for case in cases:
        _, unplanned_meas = bench.unplanned(case)
        for peer in peers:
            if peer == "checkpoint_sequential":
                seq, reason = as_sequential(case.model, case.x)
                if seq is None:
                    table.row(case.name, peer, note=f"n/a: {reason}")
                    continue
                segments = max(1, round(math.sqrt(len(seq))))
                wrapped = CheckpointSequential(seq, segments)
                peak = measured_peak_mb(wrapped, case.x)
                ratio, _ = step_time_ratio(copy.deepcopy(case.model), copy.deepcopy(wrapped), case.x, bench.repeats)
                label = f"ckpt_seq n={len(seq)} seg={segments}"
                table.row(case.name, label, "--", "--", _f(peak), "--", "--", _f(ratio), "--")
                _memfit_at(bench, table, case, strategies, peak)
            elif peer == "compile":
                for b in compile_budgets:
                    result = compile_peer(case, b, bench.repeats, compile_timeout)
                    label = f"compile amb={b:g}"
                    if "error" in result:
                        table.row(case.name, label, note=f"n/a: {result['error']}")
                        continue
                    table.row(
                        case.name, label, "--", "--", _f(result["peak_mb"]), "--", "--", _f(result["ratio"]), "--",
                        note=f"eager check {result['eager_mb']:.2f} vs memfit.measure {unplanned_meas:.2f} MiB (meas); "
                        f"first step (compiling) {result['compile_s']:.0f} s (meas)",
                    )
                    _memfit_at(bench, table, case, strategies, result["peak_mb"])
        print(flush=True)


def _memfit_at(bench: Bench, table: Table, case: Case, strategies: list[str], budget: float) -> None:
    """Rows of memfit's strategies with the peer's measured peak as budget."""
    for strategy in strategies:
        run = bench.measure(case, bench.plan(case, strategy, budget))
        cells, note = _run_cells(run)
        table.row("", f"  memfit {strategy}", *cells, note=note)


# --------------------------------------------------------------------------------------------
# 3. milp as the yardstick
# --------------------------------------------------------------------------------------------


# milp over plain and recompute only, the yardstick of dp and chen: the library's milp strategy
# optimises over selective's treatments too, which dp and chen cannot use. (dp's nested segments are
# outside both, so dp may come out below it.)
FLAT_MILP = "milp over plain and recompute"
FLAT_KINDS = ("plain", "recompute")
# strategy -> its yardstick
YARDSTICKS = {"dp": FLAT_MILP, "chen": FLAT_MILP, "selective": "milp"}


def _register_flat_milp() -> None:
    """Make FLAT_MILP a strategy for this process, so that optimize verifies its plans as any other."""
    from memfit.planner import Strategy, milp

    STRATEGIES.setdefault(
        FLAT_MILP,
        Strategy(FLAT_MILP, lambda c, b: milp.cheapest(c, b, FLAT_KINDS), lambda c: milp.lowest_peak(c, FLAT_KINDS)),
    )


def milp_table(bench: Bench, cases: list[Case], levels: list[float]) -> None:
    """Extra FLOPs of dp, chen and selective over the exact optimum of the same treatments."""
    section("3. dp, chen and selective against milp (extra FLOPs, predicted)")
    if "milp" not in STRATEGIES:
        print(f"milp is not registered (memfit.planner.STRATEGIES: {', '.join(sorted(STRATEGIES))}); skipped.")
        return
    _register_flat_milp()
    others = [s for s in YARDSTICKS if s in STRATEGIES]
    print("Each strategy against milp over the same treatments: dp and chen against milp over plain and")
    print("recompute, selective against milp over plain, recompute and selective. Budgets lie between the")
    print("highest feasible minimum of all of them and the unplanned predicted peak, so all plan for the same")
    print("budget; plans are verified by optimize. A ratio above 1: milp recomputes fewer FLOPs; 0/0 is 1.\n")
    table = Table(
        [("model", "", 17), ("level", "given", 7), ("budget", "MiB", 9), ("milp plain+rec", "GFLOP", 15)]
        + [(f"{s}/it", "pred", 14) for s in others if YARDSTICKS[s] == FLAT_MILP]
        + [("milp", "GFLOP", 10)]
        + [(f"{s}/it", "pred", 14) for s in others if YARDSTICKS[s] == "milp"]
    )
    order = [s for s in others if YARDSTICKS[s] == FLAT_MILP] + [s for s in others if YARDSTICKS[s] == "milp"]
    solved, failed = [], []
    ratios: dict[str, list[float]] = {s: [] for s in others}
    flops: dict[str, list[int]] = {s: [] for s in others}  # at the budgets every strategy met
    for case in cases:
        pred, _ = bench.unplanned(case)
        minima = {s: bench.minimum(case, s) for s in [FLAT_MILP, "milp", *others]}
        bad = {s: m for s, m in minima.items() if isinstance(m, str)}
        if FLAT_MILP in bad or "milp" in bad:
            failed.append(f"{case.name} ({bad.get('milp') or bad[FLAT_MILP]})")
            table.row(case.name, note=f"milp {bad.get('milp') or bad[FLAT_MILP]}")
            continue
        floor = max(m for m in minima.values() if not isinstance(m, str))
        if floor >= pred:
            solved.append(case.name)
            table.row(case.name, note="the unplanned step is already at the minimum: nothing to plan")
            continue
        solved_all = True
        for level in levels:
            budget = floor + level * (pred - floor)
            sticks = {m: bench.plan(case, m, budget) for m in (FLAT_MILP, "milp")}
            if any(r.planned is None for r in sticks.values()):
                solved_all = False
                why = next(r.error for r in sticks.values() if r.planned is None)
                table.row(case.name, f"{100 * level:.0f}%", _f(budget), note=f"milp {why}")
                continue
            runs = {s: bench.plan(case, s, budget) for s in others}
            cells = {}
            for s, run in runs.items():
                base = sticks[YARDSTICKS[s]].plan.extra_flops
                if run.planned is None:
                    cells[s] = "below its min" if run.minimum_mb is not None else "n/a"
                    continue
                got = run.plan.extra_flops
                ratio = 1.0 if got == base == 0 else (got / base if base else float("inf"))
                ratios[s].append(ratio)
                cells[s] = f"{ratio:.3f}" if base or not got else f"inf ({got / 1e9:.3f}G)"
            if all(r.planned is not None for r in runs.values()):
                for s, r in runs.items():
                    flops[s].append(r.plan.extra_flops)
            flat, sel = (sticks[m].plan.extra_flops / 1e9 for m in (FLAT_MILP, "milp"))
            row = [cells[s] for s in order if YARDSTICKS[s] == FLAT_MILP] + [f"{sel:.3f}"]
            row += [cells[s] for s in order if YARDSTICKS[s] == "milp"]
            table.row(case.name, f"{100 * level:.0f}%", _f(budget), f"{flat:.3f}", *row)
        if solved_all:
            solved.append(case.name)
        else:
            failed.append(f"{case.name} (not at every budget)")
    print(f"\nmilp solves: {', '.join(solved) or 'none'}" + (f"; not: {', '.join(failed)}" if failed else ""))
    for s, values in ratios.items():
        if values:
            print(f"{s}: worst ratio to its milp {max(values):.3f} over {len(values)} budgets (pred)")
    if flops.get("chen"):
        for s in ("dp", "selective"):
            if flops.get(s):
                wins = sum(a <= c for a, c in zip(flops[s], flops["chen"]))
                print(f"{s} recomputes no more FLOPs than chen at {wins} of {len(flops[s])} budgets (pred)")


# --------------------------------------------------------------------------------------------
# 4. Depth study
# --------------------------------------------------------------------------------------------


def _at_minimum(model: nn.Module, x: torch.Tensor, strategy: str) -> tuple[Any, str]:
    """The plan at the feasible minimum (optimize at the minimum the error reports), or why not."""
    try:
        memfit.optimize(model, EPS_MB, x, strategy=strategy)
        return None, "a 1-byte budget was accepted"
    except memfit.MemfitBudgetError as e:
        minimum = e.minimum_mb
    except Exception as e:
        return None, first_line(e)
    try:
        return memfit.optimize(model, minimum + EPS_MB, x, strategy=strategy), ""
    except Exception as e:
        return None, first_line(e)


def _growth(depths: list[int], values: list[float]) -> str:
    """How activation memory grows with n, the layers per block, from the smallest to the largest depth.

    A DenseNet layer's input concatenates every earlier output of its block, so keeping every
    concatenation costs ~n^2 per block while keeping only the new features costs ~n: with k times
    the layers, linear growth multiplies the memory by at most k (a fixed part such as the stem
    makes it less), quadratic growth by up to k^2. The verdict compares the growth with k. (A
    least-squares fit of a + b n + c n^2 was tried first: over four depths of the feasible minimum
    it came out with b < 0 and called a sublinear curve quadratic.)
    """
    n = [(d - 4) / 6 for d in depths]
    if len(depths) < 2 or min(values) <= 0:
        return "need two depths or more"
    k, growth = n[-1] / n[0], values[-1] / values[0]
    exponent = math.log(growth) / math.log(k)
    verdict = "at most linear" if growth <= k else "faster than linear"
    return (
        f"{verdict}: x{growth:.2f} from n={n[0]:g} to n={n[-1]:g}, with x{k:.2f} the layers (linear: at most "
        f"x{k:.2f}, quadratic: up to x{k * k:.1f}); effective exponent {exponent:.2f}"
    )


def depth_study(depths: list[int], big_models: list[str], batch: int, shape: str, strategy: str) -> None:
    """Activation memory at the feasible minimum vs unplanned, with depth and for big models."""
    section(f"4. Activation memory at the feasible minimum (strategy {strategy}), batch {batch} at {shape}")
    print("act: activations kept from the forward for backward, unplanned and at the feasible minimum (min);")
    print("pred: plan.activations_before/after_bytes; meas: memfit.measure(...).activations_mb of a real step.")
    print("x less: unplanned / minimum. peak: of the whole step (pred: plan; meas: memfit.measure).\n")
    columns = [
        ("model", "", 17), ("params M", "given", 10), ("act MiB", "pred", 10), ("act min", "pred", 10),
        ("x less", "pred", 8), ("act MiB", "meas", 10), ("act min", "meas", 10), ("x less", "meas", 8),
        ("peak MiB", "pred", 10), ("peak min", "pred", 10), ("peak min", "meas", 10), ("+FLOPs %", "pred", 10),
    ]
    table = Table(columns, left=1)
    pred_before, pred_after, meas_before, meas_after, done = [], [], [], [], []

    def one(label: str, model: nn.Module, x: torch.Tensor) -> tuple[float, float, float, float] | None:
        """Print one model's row; its activations (pred before, after; meas before, after) or None."""
        params = sum(p.numel() for p in model.parameters()) / 1e6
        planned, why = _at_minimum(model, x, strategy)
        if planned is None:
            table.row(label, f"{params:.2f}", note=f"n/a: {why}")
            return None
        plan = planned.plan
        pb, pa = mib(plan.activations_before_bytes), mib(plan.activations_after_bytes)
        before, after = memfit.measure(model, x), memfit.measure(planned, x)
        mb, ma = before.activations_mb, after.activations_mb
        table.row(
            label, f"{params:.2f}", _f(pb), _f(pa), f"{pb / max(pa, 1e-9):.1f}", _f(mb), _f(ma),
            f"{mb / max(ma, 1e-9):.1f}", _f(mib(plan.peak_before_bytes)), _f(mib(plan.peak_after_bytes)),
            _f(after.peak_mb), _f(plan.extra_flops_percent, 1),
        )
        return pb, pa, mb, ma

    for depth in depths:
        torch.manual_seed(0)
        model = densenet_bc(depth)
        x = example_input(model, batch, shape)
        got = one(f"densenet_bc_{depth}", model, x)
        if got is not None:
            for store, value in zip((pred_before, pred_after, meas_before, meas_after), got):
                store.append(value)
            done.append(depth)
    if done:
        print("\nGrowth with depth (n = layers per block):")
        print(f"  unplanned, pred:          {_growth(done, pred_before)}")
        print(f"  unplanned, meas:          {_growth(done, meas_before)}")
        print(f"  feasible minimum, pred:   {_growth(done, pred_after)}")
        print(f"  feasible minimum, meas:   {_growth(done, meas_after)}")
    if big_models:
        print()
    for name in big_models:
        torch.manual_seed(0)
        model = memfit.models.create(name, num_classes=10)
        x = example_input(model, batch, shape)
        got = one(name, model, x)
        if got is not None:
            pb, pa, mb, ma = got
            print(
                f"  {name}: {pb / max(pa, 1e-9):.1f}x less activation memory at the feasible minimum (pred), "
                f"{mb / max(ma, 1e-9):.1f}x (meas)",
                flush=True,
            )


# --------------------------------------------------------------------------------------------
# 5. Planning time
# --------------------------------------------------------------------------------------------


def planning_speed(models: list[str], batch: int, shape: str, strategies: list[str], repeats: int) -> None:
    """memfit.optimize's wall time in fresh processes, with an empty and with a filled cache."""
    section(f"5. Planning time: memfit.optimize at {100 * SPEED_BUDGET:.0f}% of the unplanned peak, batch {batch} at {shape}")
    print("Each run is a new process. import: `import memfit` (torch, torch._dynamo); plan: the optimize")
    print("call (capture, calibration, planning, the verifying dry run). cold: empty workspace cache;")
    print(f"warm: the cache the cold run left (MEMFIT_CACHE_DIR). Median of {repeats} cold/warm pairs, each")
    print("with its own cache; best: the fastest of them.\n")
    columns = [
        ("model", "", 11), ("strategy", "", 10), ("budget MiB", "given", 11), ("cache", "", 6),
        ("import s", "meas", 9), ("plan s", "meas", 8), ("best s", "meas", 8), ("peak MiB", "pred", 10),
    ]
    table = Table(columns, left=4)
    for name in models:
        case = build_case(name, batch, shape, None)
        with tempfile.TemporaryDirectory() as scratch:
            os.environ[workspace.CACHE_ENV] = scratch  # this process's estimate must not warm the runs' cache
            budget = SPEED_BUDGET * memfit.estimate(case.model, case.x).peak_mb
        for strategy in strategies:
            runs: dict[str, list[dict]] = {"cold": [], "warm": []}
            failures: dict[str, str] = {}
            for _ in range(repeats):
                with tempfile.TemporaryDirectory() as cache:
                    for state in ("cold", "warm"):
                        job = {"case": case.spec, "budget": budget, "strategy": strategy}
                        env = {**os.environ, workspace.CACHE_ENV: cache}
                        proc = subprocess.run(
                            [sys.executable, __file__, "--speed-worker", json.dumps(job)],
                            capture_output=True, text=True, env=env,
                        )
                        if proc.returncode:
                            failures[state] = f"failed: {proc.stderr.strip()[-200:]}"
                        else:
                            runs[state].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            for state, got in runs.items():
                if state in failures:
                    table.row(name, strategy, _f(budget), state, note=failures[state])
                    continue
                plan_s = [g["plan_s"] for g in got]
                table.row(name, strategy, _f(budget), state, _f(statistics.median(g["import_s"] for g in got), 1),
                          _f(statistics.median(plan_s), 1), _f(min(plan_s), 1), _f(got[0]["peak_mb"]))


def speed_worker(job_json: str) -> None:
    """One timed optimize in this (fresh) process; prints a JSON line."""
    job = json.loads(job_json)
    case = build_case(**job["case"])
    started = time.perf_counter()
    planned = memfit.optimize(case.model, job["budget"], case.x, strategy=job["strategy"])
    plan_s = time.perf_counter() - started
    print(json.dumps({"import_s": IMPORT_SECONDS, "plan_s": plan_s, "peak_mb": mib(planned.plan.peak_after_bytes)}))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; --quick fills in whatever was not given with the one-minute settings."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help=f"zoo names (default {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {IMAGE_BATCH}; GPT {GPT_BATCH})")
    p.add_argument("--input", default=None, help=f"per-sample shape (default {IMAGE_INPUT}; GPT {GPT_INPUT} tokens)")
    p.add_argument("--stem", default=None, choices=["imagenet", "cifar"], help="stem of the image models")
    p.add_argument("--strategies", nargs="+", default=None, help="default: every registered strategy")
    p.add_argument("--levels", nargs="+", type=float, default=None, help="budget levels in %% (default 25 50 75)")
    p.add_argument("--repeats", type=int, default=None, help="timed step pairs (default 5)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=None, help="default: main peers milp")
    p.add_argument("--depth-study", action="store_true", help="add part 4 (depth) to the parts")
    p.add_argument("--peers", nargs="+", choices=PEERS, default=None, help="default: both (--quick: no compile)")
    p.add_argument("--compile-budgets", nargs="+", type=float, default=[0.5], help="activation_memory_budget values")
    p.add_argument("--compile-timeout", type=float, default=600, help="seconds before a compile peer is given up")
    p.add_argument("--depths", nargs="*", type=int, default=None, help=f"DenseNet-BC depths (default {DEFAULT_DEPTHS})")
    p.add_argument("--big-models", nargs="*", default=None, help=f"default {' '.join(BIG_MODELS)}")
    p.add_argument("--depth-strategy", default="auto", choices=["auto", *STRATEGIES], help="default auto")
    p.add_argument("--quick", action="store_true", help="one model, one budget (50%%), 2 repeats, no compile, no depth")
    p.add_argument("--speed-models", nargs="+", default=SPEED_MODELS, help=f"default {' '.join(SPEED_MODELS)}")
    p.add_argument("--speed-batch", type=int, default=SPEED_BATCH, help=f"default {SPEED_BATCH}")
    p.add_argument("--speed-input", default=SPEED_INPUT, help=f"default {SPEED_INPUT}")
    p.add_argument("--speed-repeats", type=int, default=SPEED_REPEATS, help=f"cold/warm pairs, default {SPEED_REPEATS}")
    p.add_argument("--compile-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--speed-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    args.models = args.models or ([QUICK_MODEL] if args.quick else DEFAULT_MODELS)
    if args.quick:
        args.models = args.models[:1]
    args.levels = [v / 100 for v in (args.levels or ([50] if args.quick else [25, 50, 75]))]
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.peers = args.peers or (["checkpoint_sequential"] if args.quick else list(PEERS))
    args.parts = list(args.parts or ["main", "peers", "milp"])
    if args.depth_study and "depth" not in args.parts:
        args.parts.append("depth")
    if args.depths is None:
        args.depths = QUICK_DEPTHS if args.quick else DEFAULT_DEPTHS
    bad = [d for d in args.depths if d < 10 or (d - 4) % 6]
    if bad:
        p.error(f"DenseNet-BC depths are 6n + 4 with n >= 1 (40, 52, 64, 76, 100, ...), not {bad}")
    if args.big_models is None:
        args.big_models = [] if args.quick else BIG_MODELS
    registered = list(STRATEGIES)
    asked = args.strategies or registered
    args.strategies = [s for s in asked if s in registered]
    # A strategy still being written (milp) may be asked for before it lands: skip it, say so.
    args.skipped = [s for s in asked if s not in registered]
    if not args.strategies:
        p.error(f"none of the strategies {asked} is registered; registered: {registered}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the selected parts and print their tables."""
    args = parse_args(argv)
    if args.compile_worker is not None:
        compile_worker(args.compile_worker)
        return
    if args.speed_worker is not None:
        speed_worker(args.speed_worker)
        return
    started = time.perf_counter()
    print(f"memfit {memfit.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"strategies registered: {', '.join(STRATEGIES)}; step: SGD, fp32")
    if args.skipped:
        print(f"not registered, skipped: {', '.join(args.skipped)}")
    bench = Bench(args.repeats)
    needs_cases = any(p in args.parts for p in ("main", "peers", "milp"))
    cases = [build_case(n, args.batch, args.input, args.stem) for n in args.models] if needs_cases else []
    if "main" in args.parts:
        main_table(bench, cases, args.strategies, args.levels)
    if "peers" in args.parts:
        peers_table(bench, cases, args.strategies, args.peers, args.compile_budgets, args.compile_timeout)
    if "milp" in args.parts:
        milp_table(bench, cases, args.levels)
    if "depth" in args.parts:
        depth_study(
            args.depths, args.big_models, args.batch or DEPTH_BATCH, args.input or DEPTH_INPUT, args.depth_strategy
        )
    if "speed" in args.parts:
        speed = [s for s in SPEED_STRATEGIES if s == "auto" or s in args.strategies]
        planning_speed(args.speed_models, args.speed_batch, args.speed_input, speed, args.speed_repeats)
    print("\npred = predicted by memfit (nothing allocated); meas = measured on real tensors (allocator level,")
    print(f"profiler memory events on CPU; wall-clock times). Total {time.perf_counter() - started:.0f} s (meas).")


if __name__ == "__main__":
    main()
