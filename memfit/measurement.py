"""Measurement: one real training step, seen by the storage tracker and by the allocator.

The tracker gives the per-category breakdown and the bytes saved for backward; the allocator gives
the ground-truth peak, which also counts buffers kernels allocate internally: on CPU from the
profiler's memory events, on CUDA from ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

from .graph import CATEGORIES
from .tracker import StorageTracker, tensors_in
from .trainstep import StepConfig, init_optimizer_state, make_optimizer, run_step, unique_trainable

_KINETO_LINE = re.compile(rb"ActivityProfiler\w*\.cpp:\d+\] profiler_(start|stop)")

__all__ = ["StepMeasurement", "measure_step", "allocator_peak_from_profile", "memory_profile"]


@dataclass
class StepMeasurement:
    """What one real step used.

    Attributes:
        baseline: Bytes per category alive before the step.
        peak_bytes: Allocator-level peak (baseline plus the most the step added at once).
        tensor_peak_bytes: Peak of live tensor storage at the dispatcher.
        at_tensor_peak: Bytes per category at the tensor peak.
        peak_phase: Phase in which the allocator-level peak falls (CPU only; else the tracker's).
        saved_bytes: Non-parameter storage saved for backward (activations).
        gradients_bytes: Parameter gradients after backward.
        optimizer_bytes: Optimizer state after the step.
    """

    baseline: dict[str, int]
    peak_bytes: int
    tensor_peak_bytes: int
    at_tensor_peak: dict[str, int]
    peak_phase: str
    saved_bytes: int
    gradients_bytes: int
    optimizer_bytes: int


@contextlib.contextmanager
def memory_profile() -> Iterator[profile]:
    """The CPU profiler with memory events (one allocation or free per event).

    Kineto writes a start and a stop line to standard error for every session, and memfit runs
    many short sessions; those two lines are dropped and everything else written meanwhile is
    passed on.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                yield prof
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().splitlines(keepends=True) if not _KINETO_LINE.search(line)]
            if kept:
                sys.stderr.write(b"".join(kept).decode(errors="replace"))


def allocator_peak_from_profile(prof: profile) -> tuple[int, float]:
    """The most bytes the allocator held above its starting level, and when (ns), from a profile."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    when = events[0].start_ns() if events else 0
    for e in events:
        current += e.nbytes()
        if current > peak:
            peak, when = current, e.start_ns()
    return peak, when


def measure_step(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    config: StepConfig,
) -> StepMeasurement:
    """Run a warm-up step and then a measured steady-state step on a copy of ``model``."""
    work = copy.deepcopy(model).train()
    params = unique_trainable(work.parameters())
    device = params[0].device.type
    optimizer = make_optimizer(config.optimizer, params)

    init_optimizer_state(optimizer, params)  # steady state, as in the prediction
    gc.collect()

    tracker = StorageTracker()
    tracker.register(work.parameters(), "parameter")
    tracker.register(work.buffers(), "buffer")
    tracker.register(inputs, "input")
    if optimizer is not None:
        tracker.register([t for s in optimizer.state.values() for t in tensors_in(s)], "optimizer")
    baseline = {c: 0 for c in CATEGORIES}
    for nbytes, cat in tracker.baseline.values():
        baseline[cat] += nbytes

    saved: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        sid = tracker.sid_of(t)
        if sid is not None and sid not in tracker.baseline:
            saved.add(sid)
        return t.detach()

    def on_phase(phase: str, node: str) -> None:
        tracker.phase, tracker.node = phase, node
        with torch.profiler.record_function(f"memfit::{phase}"):
            pass  # a marker: the allocator's peak is placed in a phase by time

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        output = _tracked(work, inputs, config, device, optimizer, tracker, pack, on_phase)
        torch.cuda.synchronize()
        added = torch.cuda.max_memory_allocated() - start
        peak_phase = ""
    else:
        with memory_profile() as prof:
            output = _tracked(work, inputs, config, device, optimizer, tracker, pack, on_phase)
        added, when = allocator_peak_from_profile(prof)
        peak_phase = _phase_at(prof, when)
    grads = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
    state = sum(b for b, c in tracker.baseline.values() if c == "optimizer")
    tracker.stop()
    del output

    live = dict(baseline)
    tensor_peak, at_peak, current = sum(live.values()), dict(live), sum(live.values())
    grad_sids = set()
    for p in params:
        if p.grad is not None:
            sid = tracker.sid_of(p.grad)
            if sid is not None:
                grad_sids.add(sid)
    tensor_phase = "forward"
    for e in tracker.events:
        cat = "gradient" if e.sid in grad_sids else "activation" if e.sid in saved else "temporary"
        live[cat] += e.delta
        current += e.delta
        if current > tensor_peak:
            tensor_peak, at_peak, tensor_phase = current, dict(live), e.phase
    return StepMeasurement(
        baseline=baseline,
        peak_bytes=sum(baseline.values()) + added,
        tensor_peak_bytes=tensor_peak,
        at_tensor_peak=at_peak,
        peak_phase=peak_phase or tensor_phase,
        saved_bytes=sum(tracker.nbytes[s] for s in saved),
        gradients_bytes=grads,
        optimizer_bytes=state,
    )


def _tracked(
    work: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    config: StepConfig,
    device: str,
    optimizer: torch.optim.Optimizer | None,
    tracker: StorageTracker,
    pack: Callable[[torch.Tensor], Any],
    on_phase: Callable[[str, str], None],
) -> Any:
    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return run_step(lambda: work(*inputs), config, device, optimizer, on_phase)


def _phase_at(prof: profile, when: int) -> str:
    """The phase whose marker (a ``memfit::PHASE`` profiler range) last began before ``when``."""
    marks = [
        (e.start_ns(), e.name().split("::", 1)[1])
        for e in prof.profiler.kineto_results.events()
        if e.name().startswith("memfit::")
    ]
    found = ""
    for t, phase in sorted(marks):
        if t <= when:
            found = phase
    return found
