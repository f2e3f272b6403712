"""Attributes by dotted path (``layer1.0.bn1.running_mean``), as fx targets name them."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["lookup"]


def lookup(obj: Any, dotted: str) -> Any:
    """``obj.a.b.c`` for ``"a.b.c"``, or None where the path does not exist. A submodule wins over
    a plain attribute of the same name, as in ``nn.Module.__getattr__``'s registries."""
    for part in dotted.split("."):
        if isinstance(obj, torch.nn.Module) and part in obj._modules:
            obj = obj._modules[part]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            return None
    return obj
