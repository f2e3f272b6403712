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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import ProfilerActivity, profile

from ..capture.graph import CATEGORIES
from ..capture.inputs import Inputs, as_inputs
from ..capture.tracker import StorageTracker, tensors_in
from ..capture.trainstep import (
    StepConfig,
    init_gradients,
    init_optimizer_state,
    make_optimizer,
    run_step,
    unique_trainable,
)
from .timeline import replay

if TYPE_CHECKING:
    from torch._C._autograd import _KinetoEvent

_KINETO_LINE = re.compile(rb"ActivityProfiler\w*\.cpp:\d+\] profiler_(start|stop)")

__all__ = [
    "StepMeasurement",
    "allocator_levels",
    "event_bytes",
    "measure_step",
    "measure_wrapped_step",
    "memory_events",
    "memory_profile",
    "profile_events",
]


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
        phase_peaks: Allocator-level peak per phase.
    """

    baseline: dict[str, int]
    peak_bytes: int
    tensor_peak_bytes: int
    at_tensor_peak: dict[str, int]
    peak_phase: str
    saved_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    phase_peaks: dict[str, int]


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


def profile_events(prof: profile) -> list[_KinetoEvent]:
    """The raw events of a finished :func:`memory_profile`, in the order kineto recorded them."""
    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:
        raise RuntimeError("the profiler has no results: read them after its context exits")
    return results.events()


def event_bytes(event: _KinetoEvent) -> int:
    """The bytes a ``[memory]`` event allocates (negative: frees)."""
    return event.nbytes()  # type: ignore[attr-defined]  # torch's _KinetoEvent stub lacks nbytes()


def memory_events(prof: profile) -> list[_KinetoEvent]:
    """The allocator's events of a finished :func:`memory_profile`, in the order they happened."""
    return sorted((e for e in profile_events(prof) if e.name() == "[memory]"), key=lambda e: e.start_ns())


def allocator_levels(prof: profile) -> tuple[int, str, dict[str, int]]:
    """From a profile of one step: the most bytes the allocator held above its starting level,
    the phase where that happened, and the most per phase.

    Phases are told apart by ``memfit::PHASE`` marker ranges recorded as the step advances.
    """
    raw = profile_events(prof)
    marks = sorted((e.start_ns(), e.name().split("::", 1)[1]) for e in raw if e.name().startswith("memfit::"))
    memory = [(e.start_ns(), event_bytes(e)) for e in memory_events(prof)]
    current = peak = 0
    peak_phase, phase, i = "", "forward", 0
    phase_peaks: dict[str, int] = {}
    for t, delta in memory:
        while i < len(marks) and marks[i][0] <= t:
            phase = marks[i][1]
            i += 1
        current += delta
        phase_peaks[phase] = max(phase_peaks.get(phase, 0), current)
        if current > peak:
            peak, peak_phase = current, phase
    return peak, peak_phase, phase_peaks


def measure_step(
    model: torch.nn.Module,
    inputs: Any,
    config: StepConfig,
) -> StepMeasurement:
    """Measure one steady-state step (optimizer state present, no gradients) on a copy of ``model``.

    ``inputs``: the batch, as :func:`memfit.capture.inputs.as_inputs` takes it.
    """
    inputs = as_inputs(inputs)
    work = copy.deepcopy(model).train()
    params = unique_trainable(work.parameters())
    device = params[0].device.type
    optimizer = make_optimizer(config.optimizer, params)

    init_optimizer_state(optimizer, params)  # steady state, as in the prediction

    tracker = StorageTracker()
    tracker.register(work.parameters(), "parameter")
    tracker.register(init_gradients(config, params), "gradient")
    tracker.register(work.buffers(), "buffer")
    tracker.register(inputs.tensors, "input")
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
        _mark_phase(phase)

    start = sum(baseline.values())
    phase_peaks: dict[str, int]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with _collector_paused():
            output = _tracked(work, inputs, config, device, optimizer, tracker, pack, on_phase)
        torch.cuda.synchronize()
        added, peak_phase, phase_peaks = torch.cuda.max_memory_allocated() - before, "", {}
    else:
        with _collector_paused(), memory_profile() as prof:
            output = _tracked(work, inputs, config, device, optimizer, tracker, pack, on_phase)
        added, peak_phase, phase_peaks = allocator_levels(prof)
    grad_sids = {tracker.sid_of(p.grad) for p in params if p.grad is not None}
    grads = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
    tracker.stop()
    del output

    def category_of(sid: int) -> str:
        if sid in tracker.baseline:
            return tracker.baseline[sid][1]
        return "gradient" if sid in grad_sids else "activation" if sid in saved else "temporary"

    tensors = replay(tracker.baseline.values(), tracker.events, category_of)
    return StepMeasurement(
        baseline=baseline,
        peak_bytes=start + added,
        tensor_peak_bytes=tensors.tensor_peak_bytes,
        at_tensor_peak=tensors.at_peak,
        peak_phase=peak_phase or tensors.peak_phase,
        phase_peaks={k: start + v for k, v in phase_peaks.items()} or tensors.phase_peaks,
        saved_bytes=sum(tracker.nbytes[s] for s in saved),
        gradients_bytes=grads,
        optimizer_bytes=baseline["optimizer"],
    )


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a step is measured: garbage of earlier work freed inside
    the window would lower the step's level. Pausing costs nothing, where a full collection before
    each measurement took seconds in a process holding millions of objects (a test session)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _mark_phase(phase: str) -> None:
    """A profiler marker: :func:`allocator_levels` places allocator events in a phase by time."""
    with torch.profiler.record_function(f"memfit::{phase}"):
        pass


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (an FSDP parameter is a DTensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    storages = {}
    for t in tensors:
        s = _local(t).untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def measure_wrapped_step(
    module: torch.nn.Module,
    inputs: Any,
    config: StepConfig,
    *,
    warmup: int = 3,
) -> tuple[int, dict[str, int]]:
    """The allocator-level peak of one process's step of a DDP- or FSDP-wrapped module, or of a
    ``torch.compile``d one.

    Unlike :func:`measure_step` this trains ``module`` itself (``warmup`` steps, then the
    measured one; DDP rebuilds its buckets on the second, compile compiles on the first), since a
    wrapped module cannot be copied and a dispatch-mode tracker would not see compiled code.
    Gradients are set to None after every step, as ``zero_grad()`` does. On CUDA the peak is
    ``torch.cuda.max_memory_allocated`` and there are no per-phase peaks.

    Returns:
        The peak and the peak per phase, in bytes: what was alive before the step (this
        process's parameters, buffers, inputs, optimizer state and DDP's buckets, as DDP reports
        them) plus the most the profiler saw the step add.
    """
    inputs = as_inputs(inputs)
    params = unique_trainable(module.parameters())
    optimizer = make_optimizer(config.optimizer, params)
    device = _local(params[0]).device.type

    def step(on_phase: Callable[[str, str], None]) -> None:
        run_step(lambda: inputs.call(module), config, device, optimizer, on_phase)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        else:
            module.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step(lambda phase, node: None)
    start = _storage_bytes([*module.parameters(), *module.buffers(), *inputs.tensors])
    if optimizer is not None:
        start += _storage_bytes([t for s in optimizer.state.values() for t in tensors_in(s)])
    logging_data = getattr(module, "_get_ddp_logging_data", None)
    if logging_data is not None:
        start += sum(int(b) for b in re.findall(r"\d+", str(logging_data().get("rebuilt_bucket_sizes", ""))))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with _collector_paused():
            step(lambda phase, node: None)
        torch.cuda.synchronize()
        return start + torch.cuda.max_memory_allocated() - before, {}
    with _collector_paused(), memory_profile() as prof:
        step(lambda phase, node: _mark_phase(phase))
        if torch.distributed.is_initialized():
            # the profiler stops only once every process is past the step's collectives
            torch.distributed.barrier()
    added, _, phase_peaks = allocator_levels(prof)
    return start + added, {k: start + v for k, v in phase_peaks.items()}


def _tracked(
    work: torch.nn.Module,
    inputs: Inputs,
    config: StepConfig,
    device: str,
    optimizer: torch.optim.Optimizer | None,
    tracker: StorageTracker,
    pack: Callable[[torch.Tensor], Any],
    on_phase: Callable[[str, str], None],
) -> Any:
    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return run_step(lambda: inputs.call(work), config, device, optimizer, on_phase)
