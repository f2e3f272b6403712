"""Selective recomputation: inside checkpointed segments keep what is expensive to recompute.

The efficient-DenseNet trick, generalised: in a checkpointed segment the outputs of FLOP-heavy ops
(convolution, matmul, attention: the ops ``torch.utils.flop_counter`` counts) are kept, and only
the cheap, memory-hungry ops between them (BatchNorm, activations, concatenation, pooling) are
recomputed. A DenseNet layer then keeps its bottleneck and new features, linear in depth, while
the concatenations and normalisations, quadratic in depth, are recomputed. The segmentation is
the dynamic program of :mod:`memfit.planner.dp` with this third treatment added, so it is never
worse than ``dp`` under the chain model. It is enacted with torch's selective checkpoint contexts
(``torch.utils.checkpoint.create_selective_checkpoint_contexts``).
"""

from __future__ import annotations

from . import dp
from .chain import Chain
from .plan import SegmentKind, Spans

__all__ = ["KINDS", "cheapest", "lowest_peak"]

KINDS: tuple[SegmentKind, ...] = ("plain", "selective", "recompute", "nested")


def cheapest(chain: Chain, budget: int) -> Spans | None:
    """The least-cost plan with selective segments whose chain-model peak fits ``budget``."""
    return dp.cheapest(chain, budget, KINDS)


def lowest_peak(chain: Chain) -> Spans:
    """The plan with selective segments of least chain-model peak."""
    return dp.lowest_peak(chain, KINDS)
