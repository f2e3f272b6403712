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
from .cost.parallel import Parallel
from .errors import MemfitBudgetError, MemfitError, MemfitFileError, MemfitInputError, MemfitTraceError
from .fit import minimum, optimize, tradeoff
from .io import checkpoint, datasets
from .io.serialize import load, save
from .planner import list_strategies
from .report.memory import MemoryReport
from .report.plot import plot_plan, plot_tradeoff
from .report.tradeoff import Tradeoff, TradeoffPoint
from .rewrite import distributed
from .rewrite.checkpoint import PlannedModule

__all__ = [
    "Budget",
    "MemfitBudgetError",
    "MemfitError",
    "MemfitFileError",
    "MemfitInputError",
    "MemfitTraceError",
    "MemoryReport",
    "Parallel",
    "PlannedModule",
    "Tradeoff",
    "TradeoffPoint",
    "checkpoint",
    "compress",
    "compressors",
    "datasets",
    "distributed",
    "estimate",
    "list_strategies",
    "load",
    "measure",
    "minimum",
    "models",
    "optimize",
    "plot_plan",
    "plot_tradeoff",
    "save",
    "tradeoff",
]
__version__ = "0.1.0"
