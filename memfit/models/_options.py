"""Shared option validation for the model factories (internal)."""

from __future__ import annotations

from typing import Literal, cast

__all__ = ["Stem", "check_positive_int", "check_probability", "check_stem"]

Stem = Literal["imagenet", "cifar"]

_STEMS: tuple[str, ...] = ("imagenet", "cifar")


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an ``int`` > 0 (not a bool), else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_probability(name: str, value: object) -> float:
    """Return ``value`` as float if it is a number in [0, 1), else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def check_stem(value: object) -> Stem:
    """Return ``value`` if it is a known stem name, else raise ValueError."""
    if value not in _STEMS:
        raise ValueError(f"stem must be one of {list(_STEMS)}, got {value!r}")
    return cast(Stem, value)  # one of _STEMS, the values of Stem
