"""The step's pace: one forward of the whole model, timed where it is planned.

Layers are calibrated alone (:mod:`memfit.cost.timing`), often in another process (the figures
are cached per machine), at whatever speed the machine had then; and a layer alone does not see
what its neighbours leave in the caches. Priced from those figures as they are, plans missed
their measured extra time by one factor per run: the same code predicted MobileNetV2's unplanned
step at 110, 123 and 158 ms in three processes, and the large plans' predicted over measured
extra time, divided by the same run's predicted over measured unplanned step, came within 25%
for all 18 of three runs, where undivided 4 of one run's 6 did not (docs/benchmarks.md). One
forward of the whole model, timed in the planning process on the calibration's clock, follows
that factor: measured against the sum of its layers' calibrated forwards, it went with the
measured step's own ratio to about 0.1 over three processes.

The layers' shares of the step move too, not only its speed: inside a whole forward, a layer
reads inputs the previous one just wrote, and MobileNetV2's depthwise convolutions ran 1.4-2x
their figure alone while its BatchNorms ran 0.9-1.2x. A planner that recomputes what is cheapest
alone picks exactly the layers that are dearer in the step: its 97% plan recomputed four nodes
whose calibrated forwards summed 1.48 ms and took 2.09 inside the forward (its whole forward
1.05x the calibrated sum). So each node's forward is also timed inside whole forwards (an fx
interpreter that times each node), once per graph and cached like the layers; a recomputation
is priced at those times, and the kernels' figures only measured alone (backward) at the
in-context over alone ratio of the whole forward. The whole forward, timed again in every
planning process against its time when the nodes were, then moves every price by one factor
(:class:`memfit.capture.graph.Pace`), which leaves the ranking of plans as it was (plans stay
the same for the same cache) and moves their predicted times to this process's speed. It is a
sample of that speed, so a long forward is sampled on the first samples of the batch (both
times at the same batch), and a process times it once per graph.

The forward runs with its saved tensors dropped as autograd packs them, so it holds no more
memory than an inference forward, yet dispatches what a training forward does (autograd's
nodes, and a recomputation is such a forward). It must leave no trace: the global RNG streams
are forked (dropout draws) and every buffer it changes (BatchNorm's running statistics and
counters) is set back to its value before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx

from ..capture.graph import NodeInfo, Pace
from ..capture.trainstep import StepConfig
from .layers import DiskCache

__all__ = [
    "LONG_SECONDS",
    "MAX_REPEATS",
    "MIN_REPEATS",
    "SAMPLE_SECONDS",
    "TARGET_SECONDS",
    "forward_seconds",
    "measure",
    "node_seconds",
]

log = logging.getLogger(__name__)

# Timed forwards: repeated for about TARGET_SECONDS, within [MIN_REPEATS, MAX_REPEATS], after a
# warm-up (lazy initialisation, oneDNN's per-shape primitives). The evidence above took medians of
# 10; a forward of a second or more averages its own noise, and planning should not wait on it.
TARGET_SECONDS = 0.5
MIN_REPEATS, MAX_REPEATS = 3, 15
# A warm-up this long is followed by one timed forward: it averages its own noise over thousands of
# kernels, and every repeat is planning time (ResNet-152 at batch 64, 224x224, one thread: four
# forwards of about a minute were most of a warm optimize's 265 s).
LONG_SECONDS = 1.0

_CALLS = ("call_module", "call_function", "call_method")

# A forward whose nodes took longer than this in context is sampled at a smaller batch, the same one
# each time (kept with the entry), of about SAMPLE_SECONDS: the sample is of the process's speed,
# and a forward of thousands of kernels at any batch gives it (ResNet-152 at batch 64, 224x224, one
# thread: a minute a forward, two per planning process).
SAMPLE_SECONDS = 0.25

# Per captured forward: each node's forward timed in context, and the whole forward then, at the
# batch _BATCH ("context-1" held the whole forward's median, not its least; "context-2" always at
# the step's batch)
_context = DiskCache("context-3", lambda v: {str(k): float(x) for k, x in v.items()})
_WHOLE, _BATCH = "<the whole forward>", "<its batch>"
# Per captured forward: its time in this process. One sample of the process's speed serves every
# later plan of the same graph here (the factor scales every price alike, so plans rank the same
# whatever it is): a second optimize, or minimum then optimize, does not time it again.
_this_process: dict[str, float] = {}


def measure(
    device: str,
    compute: list[NodeInfo],
    calibrated: np.ndarray,
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    config: StepConfig,
    clock: Callable[[], float],
    batch_size: int,
) -> Pace | None:
    """The step's pace, and each compute node's ``context_seconds`` where ``model`` is a
    GraphModule (timed once per graph and cached); None where the forward cannot run (the plans
    are then priced at the calibrated times as they are, and a warning says why).

    Args:
        device: Where the model runs (on ``meta`` nothing is timed).
        compute: The graph's compute nodes, in order.
        calibrated: Their calibrated forwards, in seconds (those priced by FLOPs included).
        model: What runs the forward: the captured GraphModule, or the model itself.
        inputs: The batch's tensors, flat.
        config: The training step (its autocast).
        clock: The calibration's clock.
        batch_size: The step's batch: a long forward is timed on the first samples of it
            (``SAMPLE_SECONDS``).
    """
    if device == "meta":
        return None
    context: dict[str, float] | None = None
    try:
        if not isinstance(model, fx.GraphModule):  # the interpreter needs its nodes
            measured = forward_seconds(model, inputs, config, device, clock)
        else:
            key = _graph_key(compute, config, device)
            with _context.session():
                fresh = key not in _context
                if fresh:
                    nodes = node_seconds(model, inputs, config, device, clock)
                    batch, seconds = _sampled(model, inputs, batch_size, sum(nodes.values()), config, device, clock)
                    _context[key] = {**nodes, _BATCH: batch, _WHOLE: seconds}
                context = _context[key]
            sampled = round(context[_BATCH])
            if key not in _this_process:  # when just measured, this process's pace is that forward's
                sample = _batch_of(inputs, batch_size, sampled)
                _this_process[key] = context[_WHOLE] if fresh else forward_seconds(model, sample, config, device, clock)
            measured = _this_process[key]
    except Exception as e:  # noqa: BLE001  only the correction is lost
        log.warning("memfit: the whole forward could not be timed, times are the layers' alone: %s", e)
        return None
    if context is None:
        return Pace(measured, float(calibrated.sum()))
    timed = [k for k, i in enumerate(compute) if i.name in context and i.fwd_seconds is not None]
    for k in timed:
        compute[k].context_seconds = context[compute[k].name]
    alone = sum(context[compute[k].name] for k in timed) / max(float(calibrated[timed].sum()), 1e-12)
    return Pace(measured, context[_WHOLE], alone if timed else 1.0, sampled if sampled < batch_size else None)


def _sampled(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    batch_size: int,
    estimate: float,
    config: StepConfig,
    device: str,
    clock: Callable[[], float],
) -> tuple[int, float]:
    """The batch the process's pace is sampled at, and the whole forward's seconds at it: the
    step's batch, unless a forward of ``estimate`` seconds is longer than ``SAMPLE_SECONDS`` and a
    smaller one runs (2 at least: some kernels have a one-sample path, and BatchNorm refuses one)."""
    batch = max(2, int(batch_size * SAMPLE_SECONDS / max(estimate, 1e-12)))
    if batch < batch_size:
        try:
            return batch, forward_seconds(model, _batch_of(inputs, batch_size, batch), config, device, clock)
        except Exception as e:  # noqa: BLE001  a model with its batch written in: sampled whole
            log.info("memfit: the forward does not run at batch %d (%s); its pace is timed at %d", batch, e, batch_size)
    return batch_size, forward_seconds(model, inputs, config, device, clock)


def _batch_of(inputs: Sequence[torch.Tensor], batch_size: int, batch: int) -> list[torch.Tensor]:
    """The first ``batch`` samples of every input whose leading dimension is the step's batch."""
    return [t[:batch] if t.dim() and t.shape[0] == batch_size else t for t in inputs]


def _graph_key(compute: list[NodeInfo], config: StepConfig, device: str) -> str:
    """What makes two captured forwards the same to time: their nodes, what each calls and on what."""
    nodes = [
        (i.name, i.target, i.module_type, i.output_shapes, i.output_strides, i.output_dtypes, i.fwd_flops)
        for i in compute
    ]
    return repr((hashlib.sha1(repr(nodes).encode()).hexdigest(), config.amp, device, torch.get_num_threads()))


def forward_seconds(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    config: StepConfig,
    device: str,
    clock: Callable[[], float],
) -> float:
    """The least seconds of several ``model(*inputs)`` under the step's autocast, on ``clock``,
    its saved tensors dropped; the model's buffers and the global RNG are left as they were.

    The least, not the median: the figure is one sample of the machine's speed, which every price
    is then scaled by, and a slow spell only adds time (one such spell put a GPT's forward at
    125.9 ms by the median where the prices had been made at 81.8, and its plan at 1.5x).

    Raises:
        ValueError: The model or its inputs are on the meta device, where nothing runs.
        Exception: Whatever the model's forward raises on these inputs.
    """

    def run() -> None:
        with config.autocast(device):
            model(*inputs)

    with _traceless(model, inputs, device):
        return min(_repeated(run, clock))


def node_seconds(
    gm: fx.GraphModule,
    inputs: Sequence[torch.Tensor],
    config: StepConfig,
    device: str,
    clock: Callable[[], float],
) -> dict[str, float]:
    """Per compute node of ``gm``: the median seconds of its call inside whole forwards (an
    :class:`torch.fx.Interpreter` that times each node), as :func:`forward_seconds` runs them.

    Raises:
        As :func:`forward_seconds`.
    """
    interpreter = _NodeClock(gm, clock)

    def run() -> None:
        with config.autocast(device):
            interpreter.run(*inputs)

    with _traceless(gm, inputs, device):
        _repeated(run, clock)
    # the warm-up's figures are not the step's (oneDNN makes its primitives on first use)
    return {name: statistics.median(times[1:]) for name, times in interpreter.times.items()}


class _NodeClock(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, clock: Callable[[], float]) -> None:
        super().__init__(gm)
        self.clock = clock
        self.times: dict[str, list[float]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in _CALLS:
            return super().run_node(n)
        start = self.clock()
        out = super().run_node(n)
        self.times.setdefault(n.name, []).append(self.clock() - start)
        return out


def _repeated(run: Callable[[], None], clock: Callable[[], float]) -> list[float]:
    """Seconds of each timed call of ``run``, after a warm-up whose length sets how many."""
    start = clock()
    run()
    warm = clock() - start
    samples = []
    repeats = 1 if warm >= LONG_SECONDS else min(MAX_REPEATS, max(MIN_REPEATS, round(TARGET_SECONDS / max(warm, 1e-9))))
    for _ in range(repeats):
        start = clock()
        run()
        samples.append(clock() - start)
    return samples


@contextlib.contextmanager
def _traceless(model: torch.nn.Module, inputs: Sequence[torch.Tensor], device: str) -> Iterator[None]:
    """Saved tensors dropped, the global RNG forked, and the model's buffers set back at the end."""
    if device == "meta" or any(t.device.type == "meta" for t in inputs):
        raise ValueError("the model or its inputs are on the meta device, where no kernel runs")
    buffers = list(model.buffers())
    before = [b.clone() for b in buffers]
    cuda = sorted({t.device.index or 0 for t in (*inputs, *buffers) if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda), torch.autograd.graph.saved_tensors_hooks(_drop, _missing):
            yield
    finally:
        with torch.no_grad():
            for b, value in zip(buffers, before, strict=True):
                if not torch.equal(b, value):
                    b.copy_(value)


def _drop(t: torch.Tensor) -> None:
    """Packs nothing: the forward is never differentiated, and its activations go as they are used."""


def _missing(packed: None) -> torch.Tensor:
    raise RuntimeError("memfit's timed forward keeps no saved tensors: it cannot be differentiated")
