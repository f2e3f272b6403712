"""What checkpointing a segment costs on this machine beyond rerunning its layers.

The layers' own checkpointed figures (:mod:`memfit.cost.timing`) are measured one layer a segment;
this module calibrates, once per machine and cached, what the chain's pricing needs beside them
(:class:`~memfit.capture.graph.CheckpointCost`): the fixed cost of a segment, what one more saved
tensor costs where a layer has no figure of its own, a selective segment's cost per operator, a
written buffer's replay, and what the rewrite's own segment module adds to torch's checkpoint (the
search hands down the rewrite's maker of segments, since this package sits below the rewrite).

A segment in a step pays its fixed cost with cold caches, twice: the layers between two segments
leave the caches full of their own data, and the segment's code, objects and autograd records come
back from memory in its forward, and again in its backward, which runs after the rest of the
forward and the later layers' backward. In a hot loop the rewrite's segment of a 64-element ReLU
cost 0.19 ms over the ReLU, after a 64 MiB write before each run 0.46-0.58 ms, and 0.74-0.93 ms
with the write repeated between its forward and its backward; in the GPT's steps a segment of
three layers took 0.25-0.38 ms more in its forward call than its layers run plainly, and its
recomputation 0.2 ms more than in a hot loop, where its plan was priced at the hot figure (2.2-2.4
ms predicted, 3.0-3.7 measured). So the fixed cost is measured both ways: hot, what the layers'
own figures include, and cold, what each segment of a step pays.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..capture.graph import CheckpointCost
from .layers import DiskCache

__all__ = ["CHAIN_NUMEL", "SegmentOf", "cost"]

# Makes a one-tensor function into what the rewrite runs for a checkpointed segment of it (the
# rewrite sits above this package, so the search hands its maker down).
SegmentOf = Callable[[Callable[[torch.Tensor], torch.Tensor]], Callable[[torch.Tensor], torch.Tensor]]

# A segment of one ReLU on _TINY elements (the fixed cost), and a chain of _CHAIN_LENGTH operator
# pairs on tensors the size of the step's typical activation, up to CHAIN_NUMEL elements (per
# saved tensor, for layers not timed alone), this many pairs each.
_TINY, _CHAIN_LENGTH, _CHAIN_RUNS, CHAIN_NUMEL = 64, 8, 25, 2**17
# Written over before each run of the cold pair and between its forward and backward: more than
# the last-level cache one core sees on most machines (a 32 MiB write gave 0.46 ms above, a 64 MiB
# one 0.55). The cold pair is the noisier (0.57 to 0.82 ms in three calibrations of 25 pairs), so
# it takes more pairs.
_FLUSH_BYTES, _COLD_RUNS = 64 * 2**20, 60

# Per segment maker, the figures of CheckpointCost that no tensor size enters (segment, per_buffer,
# wrapper, in_step); per element count, the chain's (per_saved_tensor, selective_per_operator).
# ("checkpoint-1": the cold fixed cost ran its backward hot; "checkpoint-2": all six per element
# count, so each model of another typical size paid the cold fixed cost's 2 s again.)
_fixed = DiskCache("checkpoint-3", lambda v: _figures(4, v))
_chains = DiskCache("checkpoint-chain-1", lambda v: _figures(2, v))


def _figures(count: int, values: Any) -> tuple[float, ...]:
    if len(values) != count:
        raise ValueError(f"a checkpoint cost entry has {count} figures, not {len(values)}")
    return tuple(float(v) for v in values)


def cost(numel: int, segment_of: SegmentOf | None = None) -> CheckpointCost:
    """What checkpointing adds beyond recomputation on this machine for tensors of ``numel``
    elements, and what ``segment_of``'s segments add to torch's checkpoint, measured once and
    cached (CPU time of this thread)."""
    fixed, chain = repr(("segment", segment_of is not None)), repr(("chain", numel))
    with _fixed.session(), _chains.session():
        if fixed not in _fixed:
            wrapper = 0.0 if segment_of is None else _wrapper_overhead(segment_of)
            _fixed[fixed] = (_segment(), _buffer_replay(), wrapper, _in_step(segment_of))
        segment, per_buffer, wrapper, in_step = _fixed[fixed]
        if chain not in _chains:
            _chains[chain] = _chain_overheads(numel, segment)
        per_saved, selective = _chains[chain]
    return CheckpointCost(segment, per_saved, selective, per_buffer, wrapper, in_step)


def _tiny() -> torch.Tensor:
    return torch.randn(_TINY, generator=torch.Generator().manual_seed(0)).requires_grad_()


def _torch_segment(fn: Callable[[torch.Tensor], torch.Tensor], **kw: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    return functools.partial(checkpoint, fn, use_reentrant=False, preserve_rng_state=False, **kw)


def _wrapper_overhead(segment_of: SegmentOf) -> float:
    """Median of paired differences: a ReLU of _TINY elements as ``segment_of``'s segment against
    it under torch's checkpoint alone."""
    tiny = _tiny()
    plain = functools.partial(_torch_segment(torch.relu), tiny)
    return max(0.0, _paired(plain, functools.partial(segment_of(torch.relu), tiny)))


def _in_step(segment_of: SegmentOf | None) -> float:
    """Median of paired differences, with a write over _FLUSH_BYTES before each forward and each
    backward: a ReLU of _TINY elements as ``segment_of``'s segment (torch's checkpoint without
    one) against plain."""
    tiny, flush = _tiny(), torch.zeros(_FLUSH_BYTES // 4)
    segment = (segment_of or _torch_segment)(torch.relu)
    plain, checkpointed = functools.partial(torch.relu, tiny), functools.partial(segment, tiny)
    return max(0.0, _paired(plain, checkpointed, lambda: flush.add_(1), cold=True, runs=_COLD_RUNS))


def _buffer_replay() -> float:
    """Seconds per buffer of what the rewrite does to a buffer its segment writes: a snapshot in
    the forward, and around the recomputation a snapshot, a restore and a restore (unpriced, they
    put plans that recompute many BatchNorms low)."""
    buffers = [torch.zeros(64), torch.ones(64), torch.zeros((), dtype=torch.long)]
    samples = []
    with torch.no_grad():
        for _ in range(_CHAIN_RUNS):
            start = time.thread_time()
            for b in buffers:
                before, after = b.clone(), b.clone()
                b.copy_(before)
                b.copy_(after)
            samples.append(time.thread_time() - start)
    return min(samples) / len(buffers)


def _segment() -> float:
    """Per segment: a median of paired differences of runs back to back, a ReLU of _TINY elements
    checkpointed against plain (its recomputation is negligible)."""
    tiny = _tiny()
    return max(0.0, _paired(functools.partial(torch.relu, tiny), functools.partial(_torch_segment(torch.relu), tiny)))


def _chain_overheads(numel: int, segment: float) -> tuple[float, float]:
    """(per saved tensor, more per operator when selective), each a median of paired differences
    of runs back to back: a chain of ReLU(t * 1.5) of ``numel`` elements checkpointed against
    plain, less ``segment`` and one more forward, per tensor the chain saves for backward
    (counted, not assumed); the chain under a selective policy that recomputes everything against
    plain checkpointing, per operator."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1)).requires_grad_()

    def body(t: torch.Tensor) -> torch.Tensor:
        for _ in range(_CHAIN_LENGTH):
            t = torch.relu(t * 1.5)  # two operators
        return t

    def recompute_all(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.PREFER_RECOMPUTE

    packed: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        body(x)
    again = statistics.median(_timed(functools.partial(body, x), backward=False) for _ in range(_CHAIN_RUNS))
    chain = _paired(functools.partial(body, x), functools.partial(_torch_segment(body), x))
    contexts = functools.partial(create_selective_checkpoint_contexts, recompute_all)
    selective = _paired(
        functools.partial(_torch_segment(body), x), functools.partial(_torch_segment(body, context_fn=contexts), x)
    )
    per_saved = max(0.0, (chain - segment - again) / max(len(packed), 1))
    return per_saved, max(0.0, selective / (2 * _CHAIN_LENGTH))


def _timed(
    run: Callable[[], torch.Tensor], backward: bool = True, between: Callable[[], object] | None = None
) -> float:
    """Seconds of one call of ``run``, and of a backward from its output's sum; ``between`` runs,
    untimed, between the two."""
    start = time.thread_time()
    out = run()
    if not backward:
        return time.thread_time() - start
    loss = out.sum()
    took = time.thread_time() - start
    if between is not None:
        between()
    start = time.thread_time()
    loss.backward()
    return took + time.thread_time() - start


def _paired(
    first: Callable[[], torch.Tensor],
    then: Callable[[], torch.Tensor],
    before: Callable[[], object] = lambda: None,
    cold: bool = False,
    runs: int = _CHAIN_RUNS,
) -> float:
    """Median over ``runs`` pairs, run back to back after one warm-up each, of how much longer
    ``then`` takes than ``first``; ``before`` runs, untimed, before every run, and with ``cold``
    between its forward and its backward too."""

    def timed(run: Callable[[], torch.Tensor]) -> float:
        before()
        return _timed(run, between=before if cold else None)

    timed(first), timed(then)
    return statistics.median(-timed(first) + timed(then) for _ in range(runs))
