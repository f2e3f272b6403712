"""What recomputing a run of the chain's nodes costs in time, and where torch stops it.

The chain (:mod:`memfit.planner.chain`) prices a segment's bytes from the graph's events; this
module prices its time from the calibrated node times (:mod:`memfit.cost.timing`): the forward of
every node a recomputation reruns, what a selective segment reruns of it, what checkpointing adds
beyond the rerun, and the buffers replayed around it. Nanoseconds as integers, so the planners
compare sums exactly; for a graph whose times were not calibrated, the FLOP proxy instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..capture.graph import CheckpointCost, MemGraph, NodeInfo
from ..cost.timing import NodeTimes, node_times

__all__ = ["NodePrices", "ns", "overhead_table", "prefix", "price_nodes"]


@dataclass(frozen=True)
class NodePrices:
    """Per-node prices of recomputation along the chain.

    Attributes:
        timed: Whether the prices are nanoseconds (else the FLOP proxy).
        forward_seconds: Predicted unplanned forward (0.0 when not timed).
        backward_seconds: Predicted unplanned backward (0.0 when not timed).
        cost: Prefix sums of each node's rerun cost in a plain segment.
        cost_selective: The same in a selective segment (its FLOP-heavy outputs kept).
        overhead: Per node, what checkpointing adds when a segment packs the node beyond the
            segment's fixed cost, in ns.
        segment: The fixed cost of a checkpointed segment (torch's and the rewrite's module) as a
            step pays it, with cold caches, in ns.
        buffers: Prefix sums of the buffer replays each node's writes cost, in ns.
        stop: Per position ``b``: the position before which a recomputation of a segment ending at
            ``b`` stops (torch's early stop).
    """

    timed: bool
    forward_seconds: float
    backward_seconds: float
    cost: np.ndarray
    cost_selective: np.ndarray
    overhead: np.ndarray
    segment: int
    buffers: np.ndarray
    stop: np.ndarray


def price_nodes(
    graph: MemGraph, infos: list[NodeInfo], expensive: np.ndarray, proxy: np.ndarray, prod: dict[int, int]
) -> NodePrices:
    """The chain's per-node prices: nanoseconds when the graph's times were calibrated, else the
    FLOP proxy (nothing per segment; a selective segment recomputes the nodes that count no
    FLOPs; every node is recomputed).

    Args:
        graph: The captured step.
        infos: Its compute nodes in chain order.
        expensive: Per node, whether a selective segment keeps its output.
        proxy: Per node, the FLOP proxy of its forward.
        prod: Producer position of every storage a node allocates in forward.
    """
    n = len(infos)
    times = node_times(infos)
    if times is None:
        zeros = np.zeros(n, dtype=np.int64)
        return NodePrices(
            timed=False,
            forward_seconds=0.0,
            backward_seconds=0.0,
            cost=prefix(proxy),
            cost_selective=prefix(np.where(expensive, 0, proxy)),
            overhead=zeros,
            segment=0,
            buffers=prefix(zeros),
            stop=np.arange(n + 1),
        )
    # Everything at this process's pace (memfit.cost.pace). A rerun is priced at the nodes'
    # forwards in context, the kernels' other figures measured only alone (backward, a forward not
    # timed in context) at the whole forward's in-context ratio; checkpointing's own work is
    # dispatch and bookkeeping, not kernels reading what the layer before wrote, so its figures
    # stay as measured (where the ratio scaled them too, MobileNetV2's, at 1.09-1.19, priced its
    # 30% plans 1.26x their measured extra time in two runs)
    pace, alone = (graph.pace.factor, graph.pace.alone) if graph.pace is not None else (1.0, 1.0)
    solo = pace * times.forward  # what a node's checkpointed figure includes of its forward
    context = np.array([i.context_seconds if i.context_seconds is not None else np.nan for i in infos])
    forward = np.where(np.isnan(context), alone * solo, pace * context)
    share = np.divide(times.cheap, times.forward, out=np.ones(n), where=times.forward > 0)
    backward = pace * alone * times.backward
    times = NodeTimes(forward, backward, share * forward, times.operators, pace * times.checkpointed)
    extra = (graph.checkpoint_cost or CheckpointCost(0.0, 0.0, 0.0)).scaled(pace)
    # torch stops a recomputation once the segment's last saved tensor is packed again: the
    # nodes after the last one that saves, and that one too when it saves only what came
    # before it (a Linear packs its input before its matmul runs; GPT's head is never rerun)
    saves, own = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    stop = np.arange(n + 1)
    last = -1
    for k, info in enumerate(infos):
        if info.saved_sids or info.params:
            saves[k] = True
            own[k] = info.inplace or any(prod.get(sid) == k for sid in info.saved_sids)
            last = k + int(own[k])
        stop[k + 1] = max(last, 0)
    # What checkpointing adds beyond the recomputation grows with what the segment packs: every
    # node that saves a tensor (those it reruns, and the one where it stops, which packs without
    # running) adds what it added alone a segment, less the forward it reran there (one that
    # saves only its inputs is stopped before it computes) and less the segment's fixed cost as
    # that figure includes it (hot), which the segment pays once (cold, as a step runs it).
    # Measured alone as whole segments (kept heap, one thread): MobileNetV2's seven-node
    # inverted-residual block 1.69 ms beyond its rerun, its nodes' figures summing to 1.54 (their
    # largest 0.28); the GPT's GELU+Linear 0.8-1.0 ms, its nodes 0.18 + 0.64. Counting each
    # figure whole paid the 0.13 ms fixed cost twelve times in a 14-node ResNet-50 segment (its
    # plan predicted 25.9 ms, measured 18.5). A node not timed checkpointed is priced per tensor
    # it saves; one that saves nothing packs nothing.
    saved = np.array([i.saved_tensors for i in infos], dtype=np.float64)
    measured = np.maximum(0.0, np.nan_to_num(times.checkpointed - np.where(own, solo, 0.0) - extra.segment, nan=0.0))
    unmeasured = extra.per_saved_tensor * saved
    overhead = np.where(saves, np.where(np.isnan(times.checkpointed), unmeasured, measured), 0.0)
    kept = np.where(expensive, times.cheap, times.forward)
    selective = kept + extra.selective_per_operator * times.operators
    # replayed around the whole recomputation, however early it stops
    buffers = [sum(w in graph.buffer_names for w in i.writes) for i in infos]
    return NodePrices(
        timed=True,
        forward_seconds=float(times.forward.sum()),
        backward_seconds=float(times.backward.sum()),
        cost=prefix(ns(times.forward)),
        cost_selective=prefix(ns(selective)),
        overhead=ns(overhead),
        segment=int(ns(max(extra.in_step, extra.segment + extra.wrapper))),
        buffers=prefix(ns(extra.per_buffer * np.array(buffers, dtype=np.float64))),
        stop=stop,
    )


def overhead_table(prices: NodePrices, cands: np.ndarray) -> np.ndarray:
    """``[a, b]``: what checkpointing candidate interval [a, b) adds beyond its recomputation:
    the segment's fixed cost and the overheads of the nodes it packs (those it reruns, and the
    one it stops at, which packs without running)."""
    sums = prefix(prices.overhead)
    # past an own saver, where it stops, come nodes that save nothing: they add nothing (and a
    # segment that packs nothing pays the fixed cost alone)
    last = np.maximum(np.minimum(prices.stop[cands], cands - 1), cands[:, None] - 1)
    return prices.segment + sums[last + 1] - sums[cands][:, None]


def ns(seconds: np.ndarray | float) -> np.ndarray:
    """Seconds as integer nanoseconds."""
    return np.round(np.asarray(seconds) * 1e9).astype(np.int64)


def prefix(x: np.ndarray) -> np.ndarray:
    """Prefix sums with a leading zero, as integers."""
    return np.concatenate([[0], np.cumsum(x, dtype=np.int64)])
