"""Compressors: weights stored in less memory by generating them at every forward.

``memfit.compress(model, "ternary" | "generated" | "shared", config)`` returns a copy of the model
whose chosen conv/linear weights come from :class:`WeightGenerator` modules; their exact storage is
in :func:`storage_table` and ``memfit.save`` writes them packed. :class:`Recipe` fine-tunes the
result the way the methods' papers do (distillation, orthonormality, EC2T's freeze phase,
BatchNorm recalibration).
"""

from __future__ import annotations

from ..errors import MemfitInputError
from .accounting import StorageReport, storage_table
from .apply import compress, generators
from .base import CompressConfig, Field, Method, WeightGenerator
from .generated import GeneratedConfig, GeneratedMethod
from .recipe import Recipe
from .shared import SharedConfig, SharedMethod
from .ternary import TernaryConfig, TernaryMethod

__all__ = [
    "CompressConfig",
    "Field",
    "GeneratedConfig",
    "Method",
    "Recipe",
    "SharedConfig",
    "StorageReport",
    "TernaryConfig",
    "WeightGenerator",
    "compress",
    "generators",
    "get_method",
    "list_methods",
    "storage_table",
]

_METHODS: dict[str, type[Method]] = {m.name: m for m in (GeneratedMethod, SharedMethod, TernaryMethod)}


def list_methods() -> list[str]:
    """Names of the compression methods."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """A fresh instance of the method registered under ``name``."""
    if not isinstance(name, str) or name not in _METHODS:
        raise MemfitInputError(
            f"unknown compression method {name!r}: method= takes one of {list_methods()} (or a Method)"
        )
    return _METHODS[name]()
