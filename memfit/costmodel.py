"""Cost model: the memory of one training step, predicted from a MemGraph.

The step is replayed event by event from the graph's storage log (exact at the dispatcher), and
each node adds the allocator-only workspace its kernels need while it runs (``workspace_fwd`` /
``workspace_bwd``, calibrated by :mod:`memfit.workspace`). The result says where the peak falls
and what holds it up.
"""

from __future__ import annotations

from .graph import MemGraph
from .timeline import Timeline, replay

__all__ = ["simulate"]


def simulate(graph: MemGraph, inner: MemGraph | None = None) -> Timeline:
    """Predict the memory timeline of the step a MemGraph describes.

    Args:
        graph: A captured (and, for allocator-level figures, calibrated) MemGraph.
        inner: For a planned model, the calibrated graph of the original model: events inside
            checkpointed segments carry the original node names, whose workspaces it knows.
            A recomputation runs forward kernels during backward, so there the larger of a
            node's two workspaces counts.

    Returns:
        The predicted Timeline: peak, where it falls, bytes per category at the peak.
    """

    def workspace(phase: str, node: str) -> int:
        if node in graph.dag:
            info = graph.info(node)
            return {"forward": info.workspace_fwd, "backward": info.workspace_bwd}.get(phase, 0)
        if inner is not None and node in inner.dag:
            info = inner.info(node)
            return {"forward": info.workspace_fwd, "backward": max(info.workspace_fwd, info.workspace_bwd)}.get(phase, 0)
        return 0

    return replay(graph.baseline.values(), graph.events, graph.category_of, workspace)
