"""The policies people write by hand, as a strategy: so that memfit can always return the best of
them when its own segments are no cheaper.

Over the network's repeated blocks (:mod:`memfit.planner.blocks`): every k-th block checkpointed
(k = 1 is whole-block checkpointing), ``torch.utils.checkpoint.checkpoint_sequential`` with g
groups of blocks (each group one checkpoint, the last group not checkpointed, as torch does), and
each of those with selective checkpointing instead (keep matmul/conv/attention outputs).
Everything outside the blocks runs plain. Each policy is priced by the chain like any plan.
"""

from __future__ import annotations

from .chain import Chain
from .plan import SegmentKind, Spans

__all__ = ["cheapest", "lowest_peak", "policies"]


def policies(chain: Chain) -> list[Spans]:
    """Every hand-written policy over each kind of block whose boundaries are candidates."""
    index = {pos: k for k, pos in enumerate(chain.cands)}
    out: list[Spans] = []
    for kind_of_block in chain.blocks:
        blocks = [(index[a], index[b]) for a, b in kind_of_block if a in index and b in index]
        n = len(blocks)
        kinds: tuple[SegmentKind, ...] = ("recompute", "selective")
        for kind in kinds:
            for k in range(1, n + 1):
                out.append(_cover(chain.m, [(a, b, kind) for j, (a, b) in enumerate(blocks) if j % k == 0]))
            for groups in range(2, n + 1):
                cut = [n * g // groups for g in range(groups + 1)]
                chosen = [(blocks[cut[g]][0], blocks[cut[g + 1] - 1][1], kind) for g in range(groups - 1)]
                out.append(_cover(chain.m, chosen))
    return out


def cheapest(chain: Chain, budget: int) -> Spans | None:
    """The cheapest hand-written policy whose chain-model peak fits ``budget``; None if none does."""
    fits = [s for s in policies(chain) if chain.peak(s) <= budget]
    return min(fits, key=chain.cost) if fits else None


def lowest_peak(chain: Chain) -> Spans:
    """The hand-written policy of least chain-model peak (the unplanned step when there are no blocks)."""
    return min(policies(chain), key=lambda s: (chain.peak(s), chain.cost(s)), default=[(0, chain.m, "plain")])


def _cover(m: int, chosen: list[tuple[int, int, SegmentKind]]) -> Spans:
    """``chosen`` segments (in order, disjoint) with plain segments filling the rest of [0, m)."""
    spans: Spans = []
    at = 0
    for a, b, kind in chosen:
        if a > at:
            spans.append((at, a, "plain"))
        spans.append((a, b, kind))
        at = b
    if at < m:
        spans.append((at, m, "plain"))
    return spans
