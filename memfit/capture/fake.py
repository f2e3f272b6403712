"""Fake copies of a model for the dry run: its structure, with parameters and buffers replaced by
FakeTensors, so that a step runs on them without real memory and the user's model is untouched."""

from __future__ import annotations

import copy
from typing import Any, TypeVar

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .attrs import lookup

__all__ = ["fake_copy", "on_fake"]

_M = TypeVar("_M", bound=torch.nn.Module)


def fake_copy(model: _M, mode: FakeTensorMode) -> _M:
    """A structural copy whose parameters and buffers are fake: no real memory, user model untouched."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in memo:
            memo[id(t)] = mode.from_tensor(t, static_shapes=True)
    clone = copy.deepcopy(model, memo)
    clone.train()
    return clone


def on_fake(gm: fx.GraphModule, fmodel: torch.nn.Module, mode: FakeTensorMode) -> fx.GraphModule:
    """``gm``'s graph over the fake copy of its model: the copy's modules and tensors, and fake
    copies of what only the capture created (tensor constants, export's region bodies)."""
    root: dict[str, Any] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            target = str(n.target)
            found = lookup(fmodel, target)
            if found is None:
                found = lookup(gm, target)
                if isinstance(found, torch.Tensor):
                    found = mode.from_tensor(found, static_shapes=True)
            root[target] = found
    out = fx.GraphModule(root, copy.deepcopy(gm.graph), type(fmodel).__name__)
    out.meta.update(gm.meta)
    out.train()
    return out
