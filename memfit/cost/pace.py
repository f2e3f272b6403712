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
measured step's own ratio to about 0.1 over three processes. The planner multiplies
every calibrated time by it (:class:`memfit.capture.graph.Pace`), which leaves the ranking of
plans as it was and moves their predicted times to this process's speed.

The forward runs with its saved tensors dropped as autograd packs them, so it holds no more
memory than an inference forward, yet dispatches what a training forward does (autograd's
nodes, and a recomputation is such a forward). It must leave no trace: the global RNG streams
are forked (dropout draws) and every buffer it changes (BatchNorm's running statistics and
counters) is set back to its value before.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

from ..capture.trainstep import StepConfig

__all__ = ["MAX_REPEATS", "MIN_REPEATS", "TARGET_SECONDS", "forward_seconds"]

# Timed forwards: repeated for about TARGET_SECONDS, within [MIN_REPEATS, MAX_REPEATS], after a
# warm-up (lazy initialisation, oneDNN's per-shape primitives). The evidence above took medians of
# 10; a forward of a second or more averages its own noise, and planning should not wait on it.
TARGET_SECONDS = 0.5
MIN_REPEATS, MAX_REPEATS = 3, 15


def forward_seconds(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    config: StepConfig,
    device: str,
    clock: Callable[[], float],
) -> float:
    """Median seconds of ``model(*inputs)`` under the step's autocast, on ``clock``, its saved
    tensors dropped; the model's buffers and the global RNG are left as they were.

    Raises:
        ValueError: The model or its inputs are on the meta device, where nothing runs.
        Exception: Whatever the model's forward raises on these inputs.
    """
    if device == "meta" or any(t.device.type == "meta" for t in inputs):
        raise ValueError("the model or its inputs are on the meta device, where no kernel runs")
    buffers = list(model.buffers())
    before = [b.clone() for b in buffers]
    cuda = sorted({t.device.index or 0 for t in (*inputs, *buffers) if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda), torch.autograd.graph.saved_tensors_hooks(_drop, _missing):

            def timed() -> float:
                start = clock()
                with config.autocast(device):
                    model(*inputs)
                return clock() - start

            warm = timed()
            repeats = min(MAX_REPEATS, max(MIN_REPEATS, round(TARGET_SECONDS / max(warm, 1e-9))))
            return statistics.median(timed() for _ in range(repeats))
    finally:
        with torch.no_grad():
            for b, value in zip(buffers, before, strict=True):
                if not torch.equal(b, value):
                    b.copy_(value)


def _drop(t: torch.Tensor) -> None:
    """Packs nothing: the forward is never differentiated, and its activations go as they are used."""


def _missing(packed: None) -> torch.Tensor:
    raise RuntimeError("memfit's timed forward keeps no saved tensors: it cannot be differentiated")
