"""Byte units: memfit counts bytes as integers inside and shows MiB at the edges."""

from __future__ import annotations

__all__ = ["MiB", "mib"]

MiB = 2**20


def mib(nbytes: int) -> float:
    """Bytes to MiB (the unit every ``*_mb`` figure of memfit uses)."""
    return nbytes / MiB
