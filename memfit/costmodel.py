"""Cost model: the memory of one training step, predicted from a MemGraph.

The step is replayed event by event from the graph's storage log (exact at the dispatcher), and
each node adds the allocator-only workspace its kernels need while it runs (``workspace_fwd`` /
``workspace_bwd``, calibrated by :mod:`memfit.workspace`). The result says where the peak falls
and what holds it up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .graph import CATEGORIES, MemGraph

__all__ = ["Simulation", "simulate"]


@dataclass
class Simulation:
    """The memory timeline of one step.

    Attributes:
        peak_bytes: Highest allocator-level bytes (tensors plus kernel workspace).
        tensor_peak_bytes: Highest bytes of live tensor storage (what the dispatcher sees).
        peak_phase: Phase in which ``peak_bytes`` occurs.
        peak_node: Node running when ``peak_bytes`` occurs.
        peak_workspace_bytes: Kernel workspace included in ``peak_bytes``.
        at_peak: Bytes per category alive at the peak.
        phase_peaks: Highest allocator-level bytes per phase.
        timeline: ``(phase, node, bytes)`` after every event, for plots.
    """

    peak_bytes: int
    tensor_peak_bytes: int
    peak_phase: str
    peak_node: str
    peak_workspace_bytes: int
    at_peak: dict[str, int]
    phase_peaks: dict[str, int]
    timeline: list[tuple[str, str, int]] = field(default_factory=list)


def _workspace(graph: MemGraph, phase: str, node: str) -> int:
    if node not in graph.dag:
        return 0
    info = graph.info(node)
    if phase == "forward":
        return info.workspace_fwd
    if phase == "backward":
        return info.workspace_bwd
    return 0


def simulate(graph: MemGraph) -> Simulation:
    """Replay the step's events and find its peak.

    Args:
        graph: A captured MemGraph.

    Returns:
        The Simulation of the step.
    """
    live = {c: 0 for c in CATEGORIES}
    for nbytes, cat in graph.baseline.values():
        live[cat] += nbytes
    current = sum(live.values())
    tensor_peak = current
    best = (current, "forward", "", 0, dict(live))
    phase_peaks: dict[str, int] = {}
    timeline: list[tuple[str, str, int]] = []
    for e in graph.events:
        live[graph.category_of(e.sid)] += e.delta
        current += e.delta
        tensor_peak = max(tensor_peak, current)
        ws = _workspace(graph, e.phase, e.node)
        total = current + ws
        timeline.append((e.phase, e.node, current))
        phase_peaks[e.phase] = max(phase_peaks.get(e.phase, 0), total)
        if total > best[0]:
            best = (total, e.phase, e.node, ws, dict(live))
    return Simulation(
        peak_bytes=best[0],
        tensor_peak_bytes=tensor_peak,
        peak_phase=best[1],
        peak_node=best[2],
        peak_workspace_bytes=best[3],
        at_peak=best[4],
        phase_peaks=phase_peaks,
        timeline=timeline,
    )
