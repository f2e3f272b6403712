"""Budgets as users write them, with one rule for the API, the command line and the examples.

A budget is a number of MiB (``300``, ``"300"``), a size with its unit (``"1.5GiB"``, ``"800MiB"``,
``"2GB"``; KiB/MiB/GiB are powers of 2, KB/MB/GB of 10), or a percentage of the unplanned step's
predicted peak (``"85%"``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import MemfitInputError
from .units import MiB

__all__ = ["Budget"]

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(%|[a-z]+)?\s*$", re.IGNORECASE)
_FORMS = "MiB as a number (300), a size with a unit (1.5GiB, 800MiB, 2GB) or a percentage of the unplanned peak (85%)"


@dataclass(frozen=True)
class Budget:
    """A peak budget: ``nbytes`` exactly, or ``fraction`` of the unplanned step's predicted peak.

    Example:
        >>> Budget.parse("1.5GiB").nbytes == 1536 * 2**20
        True
        >>> Budget.parse("85%").resolve(1000)
        850
    """

    nbytes: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, value: object, argument: str = "budget_mb") -> Budget:
        """A Budget from what a user wrote; a clear MemfitInputError naming ``argument`` otherwise."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise MemfitInputError(f"{argument}={value!r} is not a budget; give {_FORMS}")
        if isinstance(value, (int, float)):
            return cls(nbytes=_positive(float(value) * MiB, value, argument))
        match = _PATTERN.match(value)
        if match is None:
            raise MemfitInputError(f"{argument}={value!r} is not a budget; give {_FORMS}")
        number, unit = float(match.group(1)), (match.group(2) or "mib").lower()
        if unit == "%":
            if not 0 < number <= 100:
                raise MemfitInputError(f"{argument}={value!r}: a percentage of the unplanned peak is in (0, 100]")
            return cls(fraction=number / 100)
        if unit not in _UNITS:
            raise MemfitInputError(f"{argument}={value!r}: unknown unit {match.group(2)!r}; give {_FORMS}")
        return cls(nbytes=_positive(number * _UNITS[unit], value, argument))

    def resolve(self, unplanned_bytes: int) -> int:
        """The budget in bytes, given the unplanned step's predicted peak."""
        if self.nbytes is not None:
            return self.nbytes
        assert self.fraction is not None
        return int(self.fraction * unplanned_bytes)

    def __str__(self) -> str:
        return (
            f"{self.nbytes / MiB:.2f} MiB"
            if self.nbytes is not None
            else f"{100 * (self.fraction or 0):g}% of the unplanned peak"
        )


def _positive(nbytes: float, given: object, argument: str) -> int:
    if not math.isfinite(nbytes) or nbytes < 1:
        raise MemfitInputError(f"{argument}={given!r}: a budget is a positive, finite size; give {_FORMS}")
    return int(nbytes)
