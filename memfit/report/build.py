"""Reports from results: a captured (and calibrated) graph becomes a predicted MemoryReport."""

from __future__ import annotations

import torch

from ..capture.graph import MemGraph
from ..compressors import generators, storage_table
from ..cost import simulate
from ..cost.parallel import Parallel
from ..cost.timeline import Timeline
from .memory import LayerRow, MemoryReport

__all__ = ["report_from_graph", "with_storage"]

_SHOWN_OPS = ("call_module", "call_function", "call_method")


def report_from_graph(
    graph: MemGraph,
    model_name: str,
    sim: Timeline | None = None,
    *,
    inner: MemGraph | None = None,
    parallel: Parallel | None = None,
) -> MemoryReport:
    """The predicted MemoryReport of a captured (and calibrated) MemGraph.

    ``sim`` is its simulated timeline when the caller has one; ``inner`` is the original
    model's graph for a planned model (it knows the nodes inside its segments); under
    ``parallel`` the figures are one process's.
    """
    step = simulate.process_step(graph, inner, parallel)
    sim = sim or simulate.simulate(graph, inner, step=step)
    layers = [
        LayerRow(
            name=info.module_path or info.name,
            kind=info.module_type or info.target,
            output_shape=" ".join(str(list(s)) for s in info.output_shapes) or "--",
            params=info.param_numel,
            saved_bytes=info.saved_bytes,
            flops=info.fwd_flops,
        )
        for info in graph.nodes
        if info.op in _SHOWN_OPS and info.output_shapes
    ]
    breakdown = dict(sim.at_peak)
    breakdown["workspace"] = sim.peak_workspace_bytes
    return MemoryReport(
        source="predicted",
        model=model_name,
        description=graph.description + (f", {parallel.describe()}" if parallel else ""),
        batch_size=graph.batch_size,
        parameters_bytes=step.baseline_bytes("parameter"),
        buffers_bytes=step.baseline_bytes("buffer"),
        inputs_bytes=step.baseline_bytes("input"),
        gradients_bytes=step.held_at_end("gradient"),
        optimizer_bytes=step.baseline_bytes("optimizer"),
        activations_bytes=graph.allocated_bytes("activation"),
        peak_bytes=sim.peak_bytes,
        tensor_peak_bytes=sim.tensor_peak_bytes,
        peak_phase=sim.peak_phase,
        peak_breakdown=breakdown,
        phase_peaks=sim.phase_peaks,
        layers=layers,
        notes=[f"Peak while running: {sim.peak_node or '(start of step)'} in {sim.peak_phase}"]
        + ([] if graph.capture == "torch.fx" else [f"Captured with {graph.capture}"])
        + _uncalibrated_note(graph)
        + _opaque_note(graph),
    )


def _opaque_note(graph: MemGraph) -> list[str]:
    if not graph.opaque:
        return []
    shown = ", ".join(f"{path} ({kind})" for path, kind in list(graph.opaque.items())[:4])
    more = f" and {len(graph.opaque) - 4} more" if len(graph.opaque) > 4 else ""
    return [f"Opaque (leaf_modules, one node each, never cut inside): {shown}{more}"]


def _uncalibrated_note(graph: MemGraph) -> list[str]:
    failed = [(i.name, i.workspace_error) for i in graph.nodes if i.workspace_error is not None]
    if not failed:
        return []
    name, error = failed[0]
    return [f"Kernel workspace not measured for {len(failed)} node(s), counted as 0 (e.g. {name}: {error})"]


def with_storage(report: MemoryReport, model: torch.nn.Module) -> MemoryReport:
    """Add a compressed model's packed weight storage (computed exactly) to its report."""
    if generators(model):
        table = storage_table(model)
        report.stored_weights_bytes = table.parameter_bytes
        report.original_weights_bytes = table.original_parameter_bytes
    return report
