"""Cost model: the memory of one training step, predicted from a MemGraph.

The step is replayed event by event from the graph's storage log (exact at the dispatcher), and
each node adds the allocator-only workspace its kernels need while it runs (``workspace_fwd`` /
``workspace_bwd``, calibrated by :mod:`memfit.cost.workspace`). Under data parallelism the step is
first rewritten into one process's (:mod:`memfit.cost.parallel`). The result says where the peak falls
and what holds it up.
"""

from __future__ import annotations

from ..capture.graph import MemGraph
from .parallel import Parallel, Step, distribute
from .timeline import Timeline, replay

__all__ = ["process_step", "simulate"]


def process_step(graph: MemGraph, inner: MemGraph | None = None, parallel: Parallel | None = None) -> Step:
    """One process's step of a captured graph (the graph's own step without ``parallel``).

    ``inner`` names the parameters of the nodes inside a planned model's segments.
    """

    def node_params(node: str) -> tuple[str, ...]:
        for g in (graph, inner):
            if g is not None and node in g.dag:
                return g.info(node).params
        return ()

    return distribute(graph, parallel, node_params)


def simulate(
    graph: MemGraph, inner: MemGraph | None = None, parallel: Parallel | None = None, step: Step | None = None
) -> Timeline:
    """Predict the memory timeline of the step a MemGraph describes.

    Args:
        graph: A captured (and, for allocator-level figures, calibrated) MemGraph.
        inner: For a planned model, the calibrated graph of the original model: events inside
            checkpointed segments carry the original node names, whose workspaces it knows.
            A recomputation runs forward kernels during backward, so there the larger of a
            node's two workspaces counts.
        parallel: DDP or FSDP: the timeline of one process.
        step: That process's step, when the caller already has it (:func:`process_step`).

    Returns:
        The predicted Timeline: peak, where it falls, bytes per category at the peak.
    """

    def workspace(phase: str, node: str) -> int:
        if node in graph.dag:
            info = graph.info(node)
            return {"forward": info.workspace_fwd, "backward": info.workspace_bwd}.get(phase, 0)
        if inner is not None and node in inner.dag:
            info = inner.info(node)
            largest = max(info.workspace_fwd, info.workspace_bwd)
            return {"forward": info.workspace_fwd, "backward": largest}.get(phase, 0)
        return 0

    step = step or process_step(graph, inner, parallel)
    return replay(step.baseline, step.events, step.category_of, workspace)
