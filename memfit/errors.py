"""Exceptions raised by memfit: each names the problem and the fix."""

from __future__ import annotations

__all__ = ["MemfitBudgetError", "MemfitError", "MemfitFileError", "MemfitInputError", "MemfitTraceError"]


class MemfitError(Exception):
    """Base class of every error memfit raises on purpose."""


class MemfitTraceError(MemfitError):
    """The model could not be captured as a torch.fx graph."""


class MemfitInputError(MemfitError, ValueError):
    """The model, the example inputs or an option is not usable as given."""


class MemfitFileError(MemfitInputError):
    """A file memfit reads is not what it should be: truncated, corrupted or of another kind."""


class MemfitBudgetError(MemfitError):
    """No plan fits the budget.

    Attributes:
        minimum_mb: The least budget any plan fits (MiB, verified by a dry run).
        budget_mb: The budget that was asked for, in MiB (a percentage resolved).
    """

    def __init__(self, message: str, minimum_mb: float, budget_mb: float | None = None) -> None:
        super().__init__(message)
        self.minimum_mb = minimum_mb
        self.budget_mb = budget_mb
