"""Training checkpoints that cannot lie: a torch file behind a SHA-256 digest of its bytes.

A checkpoint file is ``MAGIC``, the 32-byte digest of the rest, then what ``torch.save`` wrote.
:func:`load` checks the digest before unpickling anything (with ``weights_only=True``), so a
flipped bit anywhere is an error rather than a weight of 1e37 that trains to NaN. :func:`save`
writes beside the target and renames over it, so a crash leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import MemfitFileError
from .container import write_atomically

__all__ = ["MAGIC", "load", "save"]

MAGIC = b"memfit-checkpoint-v1\n"
_DIGEST_BYTES = hashlib.sha256().digest_size


def save(obj: Any, path: str | os.PathLike) -> int:
    """Write ``obj`` (tensors, containers of tensors, numbers, strings) to ``path`` atomically.

    The file is created with the process's umask, like any file the user writes.

    Args:
        obj: What ``torch.save`` can write and ``torch.load(weights_only=True)`` can read back.
        path: The checkpoint file; its folder must exist.

    Returns:
        The file's size in bytes.

    Raises:
        MemfitFileError: If ``path`` cannot be written (a missing or unwritable folder, a directory).

    Example:
        >>> import torch, memfit, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.pt")
        >>> n = memfit.checkpoint.save({"w": torch.ones(2)}, path)
        >>> memfit.checkpoint.load(path)["w"]
        tensor([1., 1.])
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    body = buffer.getvalue()
    return write_atomically(os.fspath(path), (MAGIC, hashlib.sha256(body).digest(), body), "memfit.checkpoint.save")


def load(path: str | os.PathLike, *, map_location: Any = None, plain: bool = False) -> Any:
    """Read a checkpoint :func:`save` wrote, after checking its digest.

    Args:
        path: The checkpoint file.
        map_location: As in ``torch.load``: where the tensors go.
        plain: Also accept a plain ``torch.save`` file (a state dict from elsewhere), which has no
            digest to check; it is read with ``weights_only=True`` all the same.

    Raises:
        FileNotFoundError: If there is no file at ``path``.
        MemfitFileError: If the file is not a memfit checkpoint (nor, with ``plain``, a torch
            file), or its bytes are not the ones written (truncated, or changed by one bit).
    """
    data = Path(path).read_bytes()
    start = len(MAGIC) + _DIGEST_BYTES
    if data.startswith(MAGIC):
        body = data[start:]
        if len(data) < start or hashlib.sha256(body).digest() != data[len(MAGIC) : start]:
            raise MemfitFileError(
                f"{path} is corrupted: its SHA-256 digest does not match its contents (truncated or changed since it "
                "was written); restore it from a copy or start again without it"
            )
    elif plain:
        body = data
    else:
        raise MemfitFileError(f"{path} is not a memfit checkpoint (it does not start with {MAGIC!r})")
    try:
        return torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as e:  # torch reports a file it cannot read in many ways, none of them short
        raise MemfitFileError(
            f"{path} is neither a memfit checkpoint nor a torch file of tensors (torch.load with weights_only=True "
            f"failed: {type(e).__name__})"
        ) from e
