"""The public functions: estimate (predicted) and measure (measured) a training step's memory."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .capture.dryrun import capture
from .capture.inputs import as_inputs
from .capture.trace import check_model, graph_of, serialized
from .capture.trainstep import OptimizerSpec, StepConfig
from .cost import workspace
from .cost.measurement import measure_step
from .cost.parallel import Parallel
from .errors import MemfitInputError
from .report.build import report_from_graph, with_storage
from .report.memory import MemoryReport

__all__ = ["estimate", "measure"]


def _config(
    optimizer: OptimizerSpec, amp: str | None, loss_fn: Callable[[Any], torch.Tensor] | None, accumulate: bool
) -> StepConfig:
    return StepConfig(optimizer=optimizer, amp=amp, loss_fn=loss_fn, accumulate=accumulate)


@serialized
def estimate(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    optimizer: OptimizerSpec = "sgd",
    amp: str | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    leaf_modules: Iterable[type[torch.nn.Module] | str] = (),
    calibrate: bool = True,
    parallel: Parallel | None = None,
    accumulate: bool = False,
) -> MemoryReport:
    """Predict the memory of one training step without allocating it.

    The model is traced with torch.fx and one steady-state step (forward, loss, backward,
    optimizer step) is dry-run under FakeTensorMode; kernel workspaces are calibrated on small
    real copies of the layers that need them.

    Args:
        model: The network; it is not modified.
        example_inputs: A tensor, a tuple of tensors or a dict of keyword arguments shaped like a
            training batch.
        optimizer: ``"sgd"``, ``"momentum"``, ``"adam"``, ``"adamw"``, a factory
            ``params -> Optimizer``, or None (no optimizer step).
        amp: None (full precision), ``"bf16"`` or ``"fp16"`` (``torch.autocast``).
        loss_fn: Output -> scalar loss; cross-entropy on the last dimension by default.
        leaf_modules: Module types or qualified names torch.fx should not trace into.
        calibrate: Measure kernel workspaces on small real layers (the allocator-level term).
        parallel: DDP or FSDP (:class:`memfit.Parallel`): the figures are then one process's,
            with ``example_inputs`` its batch.
        accumulate: Gradient accumulation: the step of a micro-batch after the first, whose
            gradients exist before its forward (``example_inputs`` is one micro-batch).

    Returns:
        A predicted MemoryReport; ``print`` it for the per-layer table.

    Example:
        >>> import torch, memfit
        >>> net = memfit.models.create("resnet18", stem="cifar", num_classes=10)
        >>> r = memfit.estimate(net, torch.randn(8, 3, 32, 32), optimizer="adam")
        >>> r.source, r.peak_mb > r.parameters_mb
        ('predicted', True)
    """
    config = _config(optimizer, amp, loss_fn, accumulate)
    model = check_model(model)
    inputs = as_inputs(example_inputs)
    gm = graph_of(model, leaf_modules, inputs)
    graph = capture(model, inputs, config, leaf_modules=leaf_modules, gm=gm)
    if calibrate:
        workspace.calibrate(graph, gm, inputs.tensors, config, leaf_modules=leaf_modules)
    return with_storage(report_from_graph(graph, type(model).__name__, parallel=parallel), model)


@serialized
def measure(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    optimizer: OptimizerSpec = "sgd",
    amp: str | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    accumulate: bool = False,
) -> MemoryReport:
    """Measure the memory of one real steady-state training step (on a copy of the model).

    The peak is the allocator's (profiler memory events on CPU, ``max_memory_allocated`` on
    CUDA), which includes kernel workspaces; the breakdown comes from a storage tracker.

    Args:
        model: The network; it is copied, never modified.
        example_inputs: A tensor, a tuple of tensors or a dict of keyword arguments: one real
            training batch.
        optimizer: As in :func:`estimate`.
        amp: As in :func:`estimate`.
        loss_fn: As in :func:`estimate`.
        accumulate: As in :func:`estimate`.

    Returns:
        A measured MemoryReport.

    Example:
        >>> import torch, memfit
        >>> net = memfit.models.create("resnet18", stem="cifar", num_classes=10)
        >>> memfit.measure(net, torch.randn(2, 3, 32, 32)).source
        'measured'
    """
    config = _config(optimizer, amp, loss_fn, accumulate)
    model = check_model(model)
    inputs = as_inputs(example_inputs)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers(), *inputs.tensors)):
        raise MemfitInputError(
            "model or example_inputs are on the meta device, where nothing is allocated, so there is no memory "
            "to measure; use memfit.estimate for a prediction, or materialise the model first "
            "(model.to_empty(device='cpu') and real inputs)"
        )
    m = measure_step(model, inputs, config)
    breakdown = dict(m.at_tensor_peak)
    report = MemoryReport(
        source="measured",
        model=type(model).__name__,
        description=config.describe(),
        batch_size=inputs.batch_size,
        parameters_bytes=m.baseline["parameter"],
        buffers_bytes=m.baseline["buffer"],
        inputs_bytes=m.baseline["input"],
        gradients_bytes=m.gradients_bytes,
        optimizer_bytes=m.optimizer_bytes,
        activations_bytes=m.saved_bytes,
        peak_bytes=m.peak_bytes,
        tensor_peak_bytes=m.tensor_peak_bytes,
        peak_phase=m.peak_phase,
        peak_breakdown=breakdown,
        phase_peaks=m.phase_peaks,
    )
    return with_storage(report, model)
