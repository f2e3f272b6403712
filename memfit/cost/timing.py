"""Time cost model: how long every node of a step takes on this machine, forward and backward.

FLOPs misprice recomputation: BatchNorm, activations and concatenation are memory-bound, and a
plan that recomputes them instead of a convolution can cost more time for fewer FLOPs (ResNet-18's
``selective`` plan measured +48% against ``chen``'s +35%). So every distinct layer of a graph runs
alone (the machinery of :mod:`memfit.cost.layers`, as workspace calibration does) on inputs
shaped like the step's, and its forward and backward are timed. On CPU, calibration runs torch on
one intra-op thread and times the CPU time of the calling thread, whatever the step's thread count:
wall time with several threads measures the neighbours' load as much as the layer (a MobileNetV2
calibrated beside a test run cached BatchNorms at 35 ms that take 0.4), while one thread's CPU time
barely moves with it, and a plan is ranked by ratios of these times. The forward is the median of
a few repeats, the backward of fewer. A layer whose
forward would take long is timed at two smaller batches and extrapolated linearly to the step's.
One more forward runs under a dispatch mode that times each operator: the share of the operators
the FLOP counter does not count is what a selective segment recomputes (attention on CPU with
dropout is mostly softmax, masking and dropout), and their number prices checkpointing's own
per-operator work. Last, the layer's forward and backward run again under torch's non-reentrant
checkpoint, paired with plain runs: what checkpointing adds to a layer grows with its tensors, not
only with their number (a Linear on a 2 MiB input takes 0.5 ms more checkpointed, a ReLU on 64
elements 0.12 ms), and the per-tensor price fitted on small chains that this replaces put the
GPT's plan of six short segments at +1.6% of a step where it measured +3.6 to +5.3%. What a
segment costs besides its layers is calibrated once per machine (:mod:`memfit.cost.checkpointing`).
Results are cached per machine and torch build beside the workspaces.

A node that cannot be timed alone (non-tensor arguments, a layer that fails by itself) keeps
``fwd_seconds = None`` and gets ``time_error``; :func:`node_times` then prices it by the FLOP
proxy at a rate fitted to the measured nodes. ``MEMFIT_TIMING=off`` skips calibration, and the
planners fall back to the FLOP proxy alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import flop_registry

from ..capture.graph import MemGraph, NodeInfo
from ..capture.trace import LeafSpec
from ..capture.trainstep import StepConfig
from . import checkpointing, pace
from .checkpointing import CHAIN_NUMEL, SegmentOf
from .layers import DiskCache, LayerRun, LayerSpec, Noise, backward, calibrate_layers, extrapolate

__all__ = [
    "BYTE_WEIGHT",
    "MAX_LAYER_FLOPS",
    "TIMING_ENV",
    "NodeTimes",
    "calibrate_times",
    "enabled",
    "node_times",
    "unmeasured",
]

log = logging.getLogger(__name__)

# "off" (or 0, no, false) skips time calibration: plans are priced by the FLOP proxy.
TIMING_ENV = "MEMFIT_TIMING"
# A memory-bound op costs about this many FLOPs per byte it writes: the proxy that keeps
# recomputing BatchNorm and activations from looking free when nothing is timed.
BYTE_WEIGHT = 4
# A layer of more forward FLOPs is timed at smaller batches (a few hundred milliseconds on one
# core); below it, at the step's own, since time is not linear in the batch (a 16 MiB output may
# come from the heap where a 32 MiB one is fresh pages: a Linear took 13 ms at batch 4, 38 at 8):
# calibration stays a small part of planning for any batch.
MAX_LAYER_FLOPS = 2e10
# Seconds of timed forwards per layer: short layers are repeated until this much, up to MAX_REPEATS.
TARGET_SECONDS = 0.01
MIN_REPEATS, MAX_REPEATS = 3, 9
# Paired plain and checkpointed runs of a layer: the figure is a difference of two noisy times,
# so it takes more samples than the forward, about PAIR_SECONDS of steps within [MIN_PAIRS,
# MAX_PAIRS]. Two calibrations of the GPT's MLP Linear at the old fixed 9 pairs gave 0.49 and
# 0.77 ms, at 25 pairs 0.45 and 0.38 ms; a plan of small segments is priced by these figures.
MIN_PAIRS, MAX_PAIRS, PAIR_SECONDS = 5, 25, 0.1

_OPS = ("placeholder", "get_attr")
# (forward, backward, cheap forward seconds, operators, checkpointed extra seconds) per layer and
# batch; up to "timing-5", checkpointing's own figures too (now memfit.cost.checkpointing's).
# "timing" held wall times taken with the step's threads, entries of a loaded machine kept for
# good; "timing-2" no layer's checkpointed time; "timing-3" took it from 5 to 9 pairs; "timing-4"
# had no figure of the rewrite's own segment module.
_cache = DiskCache("timing-5", lambda v: _entry(*v))


def _entry(*values: float) -> tuple[float, ...]:
    """A cache entry as read back: five figures of a layer (NaN: the layer could not run
    checkpointed alone)."""
    if len(values) != 5:
        raise ValueError(f"a timing entry has 5 figures, not {len(values)}")
    return tuple(float(v) for v in values)


def enabled() -> bool:
    """Whether time calibration runs (``MEMFIT_TIMING`` is not off)."""
    return os.environ.get(TIMING_ENV, "on").strip().lower() not in ("off", "0", "no", "false")


def calibrate_times(
    graph: MemGraph,
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    config: StepConfig,
    *,
    leaf_modules: LeafSpec = (),
    segment_of: SegmentOf | None = None,
) -> None:
    """Fill the times of every compute node of ``graph`` (``fwd_seconds``, ``bwd_seconds``,
    ``cheap_seconds``, ``operators``), its ``checkpoint_cost`` and its ``pace`` (one forward of
    ``model`` on ``inputs``, timed: :mod:`memfit.cost.pace`); a node that cannot be timed alone
    keeps None and gets ``time_error`` (see :func:`unmeasured`). Does nothing when
    :func:`enabled` is false. The global RNG and the model are left untouched. The other
    arguments are :func:`memfit.cost.workspace.calibrate`'s; ``segment_of`` makes a function
    into the rewrite's checkpointed segment of it, whose cost beyond torch's checkpoint is then
    the ``wrapper`` figure (0 without it).
    """
    if not enabled():
        return
    with _one_thread(graph.device):
        _calibrate(graph, model, inputs, config, leaf_modules, segment_of)


def _calibrate(
    graph: MemGraph,
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    config: StepConfig,
    leaf_modules: LeafSpec,
    segment_of: SegmentOf | None,
) -> None:
    def measure(info: NodeInfo, spec: LayerSpec, noise: Noise) -> tuple[float, ...]:
        return _times_for(spec, info, graph.batch_size, config, graph.device, noise)

    for c in calibrate_layers(graph, model, inputs, _cache, measure, leaf_modules=leaf_modules):
        if c.spec is None:
            c.info.time_error = "its arguments are not plain tensors"
        elif c.error is not None:
            c.info.time_error = c.error
            if graph.device != "meta":  # there every node is
                log.warning("time of %s not calibrated, priced by FLOPs: %s", c.info.name, c.error)
        else:
            fwd, bwd, cheap, ops, checkpointed = c.result
            c.info.fwd_seconds, c.info.bwd_seconds, c.info.cheap_seconds, c.info.operators = fwd, bwd, cheap, round(ops)
            c.info.checkpointed_seconds = None if math.isnan(checkpointed) else checkpointed
    graph.checkpoint_cost = checkpointing.cost(_typical_numel(graph), segment_of)
    for info in graph.nodes:
        if info.op not in _OPS and info.fwd_seconds is None and info.time_error is None:
            info.time_error = "it returns no tensor"
    compute = [i for i in graph.nodes if i.op not in _OPS]
    times = node_times(compute)
    if times is not None:
        graph.pace = pace.measure(
            graph.device, compute, times.forward, model, inputs, config, _clock(graph.device), graph.batch_size
        )


def unmeasured(graph: MemGraph) -> dict[str, str]:
    """Compute nodes whose time was not measured: name -> why (they are priced by the FLOP proxy)."""
    return {i.name: i.time_error or "not calibrated" for i in graph.nodes if i.op not in _OPS and i.fwd_seconds is None}


class NodeTimes(NamedTuple):
    """Per node, in seconds: forward, backward, the part of the forward a selective segment
    recomputes, and what checkpointing it alone adds (NaN: not measured); and the operators of its
    forward."""

    forward: np.ndarray
    backward: np.ndarray
    cheap: np.ndarray
    operators: np.ndarray
    checkpointed: np.ndarray


def node_times(infos: list[NodeInfo]) -> NodeTimes | None:
    """The times of each node; None when none was measured.

    An unmeasured node is priced by the FLOP proxy (``fwd_flops + BYTE_WEIGHT * out_bytes``) at
    the machine's rate, seconds per proxy unit fitted to the measured nodes (a ratio of sums, so
    the nodes that take the time set it); its backward at twice that, the usual ratio; its cheap
    part is all of it unless it counts FLOPs; it runs one operator; its checkpointed time is NaN.
    """
    fwd = [i.fwd_seconds for i in infos]
    measured = [k for k, s in enumerate(fwd) if s is not None]
    if not measured:
        return None
    proxy = np.array([i.fwd_flops + BYTE_WEIGHT * i.out_bytes for i in infos], dtype=np.float64)
    rate = sum(s for s in fwd if s is not None) / max(1.0, float(proxy[measured].sum()))
    f = np.array([s if s is not None else rate * p for s, p in zip(fwd, proxy, strict=True)])
    b = np.array([i.bwd_seconds if i.bwd_seconds is not None else 2 * s for i, s in zip(infos, f, strict=True)])
    cheap = np.array(
        [
            i.cheap_seconds if i.cheap_seconds is not None else (0.0 if i.fwd_flops else s)
            for i, s in zip(infos, f, strict=True)
        ]
    )
    ops = np.array([i.operators if i.fwd_seconds is not None else 1 for i in infos], dtype=np.float64)
    checkpointed = np.array(
        [i.checkpointed_seconds if i.checkpointed_seconds is not None else math.nan for i in infos], dtype=np.float64
    )
    return NodeTimes(f, b, cheap, ops, checkpointed)


@contextlib.contextmanager
def _one_thread(device: str) -> Iterator[None]:
    """Torch on one intra-op thread while CPU layers are timed (see the module's docstring)."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _clock(device: str = "cpu") -> Callable[[], float]:
    """CPU time of this thread on CPU (torch computes on it alone under :func:`_one_thread`); on an
    accelerator, wall time once its queued kernels have finished."""
    if device != "cpu":
        module = getattr(torch, device)

        def synchronized() -> float:
            module.synchronize()
            return time.perf_counter()

        return synchronized
    return time.thread_time


def _times_for(
    spec: LayerSpec, info: NodeInfo, batch: int, config: StepConfig, device: str, noise: Noise
) -> tuple[float, ...]:
    if not spec.scaled or info.fwd_flops <= MAX_LAYER_FLOPS:
        return _measured(spec, batch, config, device, noise, info.random)
    # The largest batch under the limit, at most half the step's so that the two runs cost less
    # than one at the step's batch, and half of it; 1 is avoided where possible (some kernels have
    # a special single-sample path).
    hi = min(batch // 2, max(2, int(batch * MAX_LAYER_FLOPS / info.fwd_flops)))
    if hi < 2:
        return _measured(spec, batch, config, device, noise, info.random)
    lo = max(1, hi // 2)
    at_lo = _measured(spec, lo, config, device, noise, info.random)
    at_hi = _measured(spec, hi, config, device, noise, info.random)
    fwd, bwd, cheap = (extrapolate(batch, lo, hi, at_lo[k], at_hi[k]) for k in range(3))
    # extrapolate's floor would make an unmeasured (NaN) figure 0
    checkpointed = math.nan if math.isnan(at_lo[4] + at_hi[4]) else extrapolate(batch, lo, hi, at_lo[4], at_hi[4])
    return fwd, bwd, cheap, at_hi[3], checkpointed


def _measured(
    spec: LayerSpec, batch: int, config: StepConfig, device: str, noise: Noise, random: bool
) -> tuple[float, ...]:
    return _cache.layer(spec, batch, config, device, lambda: _run_layer(spec, batch, config, device, noise, random))


def _run_layer(
    spec: LayerSpec, batch: int, config: StepConfig, device: str, noise: Noise, random: bool
) -> tuple[float, ...]:
    """(forward, backward, cheap forward seconds, operators, checkpointed extra seconds) of one
    layer at one batch size; raises what the layer raises, and the last figure is NaN where only
    its checkpointed run fails."""
    run = LayerRun(spec, batch, config, device, noise)
    clock = _clock(device)
    # warm-up: lazy initialisation and oneDNN primitives (made per shape) are not the step's time
    start = clock()
    out = run.call(run.arguments())
    grads = run.gradients(out)
    backward(out, grads)
    warm = clock() - start
    del out
    run.clear_grads()
    repeats = min(MAX_REPEATS, max(MIN_REPEATS, round(TARGET_SECONDS / max(warm, 1e-9))))
    fwd, bwd = [], []
    for k in range(repeats):
        values = run.arguments()
        start = clock()
        out = run.call(values)
        fwd.append(clock() - start)
        # the backward is only the step's denominator: a third as many samples
        if 3 * k < repeats:
            start = clock()
            backward(out, grads)
            bwd.append(clock() - start)
            run.clear_grads()
        del out
    values = run.arguments()
    with _OperatorClock(clock) as ops:
        out = run.call(values)
    del out
    forward, back = statistics.median(fwd), statistics.median(bwd)
    cheap = forward * ops.cheap / max(ops.total, 1e-12)
    pairs = min(MAX_PAIRS, max(MIN_PAIRS, round(PAIR_SECONDS / max(forward + back, 1e-9))))
    return forward, back, cheap, float(ops.count), _checkpointed(run, grads, pairs, random, clock)


def _checkpointed(
    run: LayerRun, grads: list[torch.Tensor], pairs: int, random: bool, clock: Callable[[], float]
) -> float:
    """What a forward and backward of the layer take more under torch's non-reentrant checkpoint,
    the layer alone a segment: median of paired differences, each pair run back to back so that
    both see the same load. NaN if it cannot run checkpointed alone (an in-place write into its
    input, which the recomputation would see written)."""

    def step(checkpointed: bool) -> float:
        values = run.arguments()
        start = clock()
        if checkpointed:
            out = checkpoint(lambda *v: run.call(list(v)), *values, use_reentrant=False, preserve_rng_state=random)
        else:
            out = run.call(values)
        backward(out, grads)
        took = clock() - start
        run.clear_grads()
        return took

    try:
        step(True)  # its own warm-up: checkpoint's first call sets up more than later ones
        return statistics.median(step(True) - step(False) for _ in range(pairs))
    except Exception:  # noqa: BLE001  priced per saved tensor instead
        return math.nan


class _OperatorClock(TorchDispatchMode):
    """Counts the operators a forward dispatches and times them, apart those the FLOP counter
    counts (what a selective segment keeps)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self.clock = clock
        self.count, self.total, self.cheap = 0, 0.0, 0.0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        start = self.clock()
        out = func(*args, **(kwargs or {}))
        took = self.clock() - start
        self.count += 1
        self.total += took
        if func._overloadpacket not in flop_registry:
            self.cheap += took
        return out


def _typical_numel(graph: MemGraph) -> int:
    """The median element count of the compute nodes' outputs, as a power of two in [64, CHAIN_NUMEL]."""
    sizes = sorted(math.prod(i.output_shapes[0]) for i in graph.nodes if i.op not in _OPS and i.output_shapes)
    median = sizes[len(sizes) // 2] if sizes else 64
    return 2 ** round(math.log2(min(max(median, 64), CHAIN_NUMEL)))
