"""Files memfit is asked to write, checked before the work whose result they would hold."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MemfitInputError

__all__ = ["writable_file"]


def writable_file(path: str | os.PathLike, argument: str) -> Path:
    """``path`` if a file can be written there; otherwise a MemfitInputError naming ``argument``.

    Called before planning or compressing, so that a typo in a folder name costs nothing rather
    than the result of minutes of work.

    Example:
        >>> writable_file("/no/such/folder/plan.png", "--plot")
        Traceback (most recent call last):
        ...
        memfit.errors.MemfitInputError: --plot /no/such/folder/plan.png: the folder /no/such/folder does not exist; create it first or pick another path
    """
    target = Path(path)
    folder = target.parent
    where = f"{argument} {os.fspath(path)}"
    if target.is_dir():
        raise MemfitInputError(f"{where} is a folder; give a file name inside it")
    if not folder.exists():
        raise MemfitInputError(f"{where}: the folder {folder} does not exist; create it first or pick another path")
    if not folder.is_dir():
        raise MemfitInputError(f"{where}: {folder} is a file, not a folder; pick another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise MemfitInputError(f"{where}: no permission to write there; pick another path")
    return target
