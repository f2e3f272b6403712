"""The network's repeated blocks, as people checkpoint them by hand: transformer layers, residual
blocks, inverted residuals.

A block is one instance of a module class that has at least two instances in the step, of more
than one node each, whose nodes run one after another (nothing of another module interleaved) and do not overlap another
instance. Every class whose instances hold at least half the activation memory that the best
class's hold is a kind of block people checkpoint: ResNet's BasicBlocks and the ``layer1`` ..
``layer4`` containers that hold them, MobileNet's inverted residuals and their conv-BN-ReLU units.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from ..capture.graph import NodeInfo

__all__ = ["MIN_COVER", "find_blocks"]

# A class of blocks must hold at least this share of what the best class's instances hold.
MIN_COVER = 0.5


def find_blocks(infos: Sequence[NodeInfo], act: np.ndarray) -> list[list[tuple[int, int]]]:
    """Per kind of block, the [start, end) node positions of its instances in order, the kind
    holding the most activation memory first; empty when nothing repeats."""
    positions: dict[str, list[int]] = {}
    classes: dict[str, str] = {}
    for i, info in enumerate(infos):
        for path, kind in info.module_stack:
            positions.setdefault(path, []).append(i)
            classes[path] = kind
    instances: dict[str, list[tuple[int, int]]] = {}
    for path, pos in positions.items():
        # contiguous: it can be checkpointed whole; one node is a layer, not a block
        if len(pos) > 1 and pos[-1] + 1 - pos[0] == len(pos):
            instances.setdefault(classes[path], []).append((pos[0], pos[-1] + 1))
    choices = []
    for spans in instances.values():
        spans.sort()
        if len(spans) >= 2 and all(a[1] <= b[0] for a, b in itertools.pairwise(spans)):
            choices.append((int(sum(act[a:b].sum() for a, b in spans)), spans))
    choices.sort(key=lambda c: (-c[0], -len(c[1])))
    return [spans for cover, spans in choices if cover >= MIN_COVER * choices[0][0]]
