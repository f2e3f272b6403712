"""memfit: make PyTorch training fit a memory budget.

Example:
    >>> import torch, memfit
    >>> net = memfit.models.create("resnet18", stem="cifar", num_classes=10)
    >>> print(memfit.estimate(net, torch.randn(8, 3, 32, 32), optimizer="adam"))  # doctest: +SKIP
"""

from __future__ import annotations

from . import compressors, models
from .api import estimate, measure
from .budget import Budget
from .compressors import compress
from .cost.measurement import measure_wrapped
from .cost.parallel import Parallel
from .errors import MemfitBudgetError, MemfitError, MemfitInputError, MemfitTraceError
from .fit import optimize
from .io.serialize import load, save
from .report.memory import MemoryReport
from .rewrite import distributed

__all__ = [
    "Budget",
    "MemfitBudgetError",
    "MemfitError",
    "MemfitInputError",
    "MemfitTraceError",
    "MemoryReport",
    "Parallel",
    "compress",
    "compressors",
    "distributed",
    "estimate",
    "load",
    "measure",
    "measure_wrapped",
    "models",
    "optimize",
    "save",
]
__version__ = "0.1.0"
