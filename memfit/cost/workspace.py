"""Kernel workspace: allocator bytes that kernels take internally, beyond what the dispatcher sees.

Convolution on CPU (oneDNN) reorders weights and writes through a scratch output; many backward
kernels make their incoming gradient contiguous; these buffers never appear as tensors, yet they
count towards the real peak. memfit measures them per distinct layer: the layer runs forward and
backward on small real inputs under both the storage tracker and the allocator's profiler, and
the difference of the two peaks is its workspace. Layers are deduplicated by signature and run at
the step's batch while their inputs stay within ``CALIBRATION_BYTES``; larger batches are
extrapolated linearly from the two largest that do (buffers scale with the batch or not at all).
Each input has the strides, dtype and
requires_grad it has in the step: kernels make hidden contiguous copies of channels-last or
permuted inputs (ConvNeXt's LayerNorm between permutes), and a layer priced on contiguous inputs
misses them. A layer that cannot be run alone is logged and named in its node's
``workspace_error``; its workspace stays 0, unmeasured. Random numbers come from a private generator
and the global RNG state is restored, so calibration leaves no trace but a cache: results are kept
in a JSON file per machine and torch build (``$MEMFIT_CACHE_DIR``, default ``~/.cache/memfit``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch

from ..capture.graph import MemGraph, NodeInfo
from ..capture.trace import LeafSpec
from ..capture.tracker import StorageTracker, tensors_in
from ..capture.trainstep import StepConfig
from .layers import CACHE_ENV, DiskCache, LayerRun, LayerSpec, Noise, backward, calibrate_layers, extrapolate
from .measurement import event_bytes, memory_events, memory_profile

__all__ = ["CACHE_ENV", "CALIBRATION_BATCH", "CALIBRATION_BYTES", "calibrate", "uncalibrated"]

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8
# A layer is calibrated at the step's own batch while its batch-scaled inputs stay within these
# bytes: oneDNN picks other kernels, with other scratch, at other batches (the zoo's ResNet-50 at
# batch 64 takes 8 MiB more than the line through batches 2 and 4 says, 0.43% of its step).
# Beyond, the workspace is extrapolated from the largest batches within them, so that predicting
# a step never allocates its activations (64 MiB took ResNet-50's estimate at batch 256 and 224 px
# past 2 GiB of resident memory: a layer's outputs and gradients are many times its inputs).
CALIBRATION_BYTES = 8 * 2**20
# the name changes with the method: entries measured another way would be read as this one's
# ("workspace-2" split one profile at a marker, see _run_layer)
_cache = DiskCache("workspace-3", lambda v: (int(v[0]), int(v[1])))


def calibrate(
    graph: MemGraph,
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    config: StepConfig,
    *,
    leaf_modules: LeafSpec = (),
) -> None:
    """Fill ``workspace_fwd`` and ``workspace_bwd`` of every node of ``graph``; a node whose layer
    fails to run alone keeps 0 and gets ``workspace_error`` (see :func:`uncalibrated`).

    Args:
        graph: The MemGraph captured from ``model``.
        model: The real model, or its GraphModule (only copies of single layers are run).
        inputs: The example inputs the graph was captured with.
        config: The step configuration (autocast matters).
        leaf_modules: As given to capture, so node names agree.
    """
    allocating = {e.node for e in graph.events if e.delta > 0}

    def measure(info: NodeInfo, spec: LayerSpec, noise: Noise) -> tuple[int, int]:
        return _workspace_for(spec, graph.batch_size, config, graph.device, noise)

    for c in calibrate_layers(
        graph, model, inputs, _cache, measure, leaf_modules=leaf_modules, keep=lambda i: i.name in allocating
    ):
        if c.error is not None:  # a failure must not pass for 0
            c.info.workspace_error = c.error
            if graph.device != "meta":  # there every node is, and the report says so once
                log.warning("kernel workspace of %s not calibrated, counted as 0: %s", c.info.name, c.error)
        elif c.result is not None:
            c.info.workspace_fwd, c.info.workspace_bwd = c.result


def uncalibrated(graph: MemGraph) -> dict[str, str]:
    """Nodes whose workspace calibration failed: name -> error (their workspace is counted as 0)."""
    return {i.name: i.workspace_error for i in graph.nodes if i.workspace_error is not None}


def _workspace_for(spec: LayerSpec, batch: int, config: StepConfig, device: str, noise: Noise) -> tuple[int, int]:
    if not spec.scaled or batch <= CALIBRATION_BATCH:
        return _measured(spec, batch, config, device, noise)
    per_sample = sum(math.prod(m.shape[1:]) * m.dtype.itemsize for m in spec.metas if m.scales)
    largest = CALIBRATION_BYTES // max(per_sample, 1)
    if batch <= largest:
        return _measured(spec, batch, config, device, noise)
    # the line through the two largest powers of two within the bytes; never below batch 4 and 8
    # (batch 1 has special single-sample kernels)
    hi = max(CALIBRATION_BATCH, 1 << max(largest.bit_length() - 1, 0))
    lo = hi // 2
    f_lo, b_lo = _measured(spec, lo, config, device, noise)
    f_hi, b_hi = _measured(spec, hi, config, device, noise)
    return round(extrapolate(batch, lo, hi, f_lo, f_hi)), round(extrapolate(batch, lo, hi, b_lo, b_hi))


def _measured(spec: LayerSpec, batch: int, config: StepConfig, device: str, noise: Noise) -> tuple[int, int]:
    return _cache.layer(spec, batch, config, device, lambda: _run_layer(spec, batch, config, device, noise))


def _run_layer(spec: LayerSpec, batch: int, config: StepConfig, device: str, noise: Noise) -> tuple[int, int]:
    """(forward, backward) workspace bytes of one layer at one batch size; raises what the layer
    raises."""
    if device != "cpu":
        return 0, 0  # the CUDA caching allocator is measured whole; see measurement.py
    run = LayerRun(spec, batch, config, device, noise)
    out = run.call(run.arguments())  # warm-up: lazy initialisation and primitive caches are not workspace
    grad_tensors = run.gradients(out)
    backward(out, grad_tensors)
    del out
    run.clear_grads()
    values = run.arguments()
    tracker = StorageTracker()
    tracker.register(values + run.params + run.buffers + grad_tensors, "input")
    # One profiler session per phase, not one profile split at a marker's timestamp: an event
    # stamped a hair off the marker lands in the wrong phase. The same Conv2d measured 16636 B
    # of backward workspace once and 17656 B every other time in one long process, short by the
    # size of the backward's first allocation (the incoming gradient's copy), and a plan that
    # trusted the cached figure broke its budget by as much.
    with tracker:
        with memory_profile() as fwd_prof:
            out = run.call(values)
            sink = _Handover.apply(grad_tensors, *tensors_in(out))
        tracker.phase = "backward"
        with memory_profile() as bwd_prof:
            if sink.requires_grad:
                sink.backward(torch.empty(0))
        tracker.stop()
    del out
    alloc_fwd, alloc_bwd = ([event_bytes(e) for e in memory_events(p)] for p in (fwd_prof, bwd_prof))
    disp_fwd = [e.delta for e in tracker.events if e.phase == "forward"]
    disp_bwd = [e.delta for e in tracker.events if e.phase == "backward"]
    return (
        max(0, _rise(alloc_fwd) - _rise(disp_fwd)),
        max(0, _rise(alloc_bwd) - _rise(disp_bwd)),
    )


class _Handover(torch.autograd.Function):
    """Hands the layer's backward fresh copies of its incoming gradients, owned by autograd alone.

    In the step the engine frees a node's incoming gradient as soon as the node's backward has
    used it, so the dispatcher-level peak of the node can fall before the allocator's does (a
    convolution's scratch comes before its weight gradient is cast). Gradients held by the caller
    would stay alive through the backward, put the dispatcher's peak of the layer alone higher
    than the step's and so shrink the workspace by what was freed early (8 KiB per bf16
    convolution, 36 KiB over a ResNet-18).
    """

    @staticmethod
    def forward(ctx: Any, grads: list[torch.Tensor], *outs: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        ctx.wanted = [o.requires_grad for o in outs]
        return torch.empty(0)  # nothing allocated: the layer's own bytes are all the window sees

    @staticmethod
    def backward(ctx: Any, _: torch.Tensor) -> tuple[Any, ...]:
        given = iter(ctx.grads)
        return (None, *(_owned(next(given)) if wanted else None for wanted in ctx.wanted))


def _owned(grad: torch.Tensor) -> torch.Tensor:
    """A copy of ``grad`` laid out as it is: ``clone`` makes a slice of a larger gradient (a
    concatenation's) contiguous, and the layer's kernel would then skip the contiguous copy of it
    that it makes in the step. A broadcast gradient (stride 0: a sum's, expanded from one value)
    stays broadcast over a copy of the one slice it holds; copying into it would write one element
    many times, which torch refuses."""
    shape = [1 if s == 0 else n for n, s in zip(grad.shape, grad.stride(), strict=True)]
    held = grad[tuple(slice(0, n) for n in shape)]
    base = torch.empty_strided(shape, grad.stride(), dtype=grad.dtype, device=grad.device).copy_(held)
    return base.expand(grad.shape)


def _rise(deltas: Iterable[int]) -> int:
    """The most a running sum of deltas rises above its start."""
    current = peak = 0
    for d in deltas:
        current += d
        peak = max(peak, current)
    return peak
