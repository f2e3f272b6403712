"""The file layer under ``.memfit`` files: a safetensors file written atomically, read strictly.

A safetensors file is an 8-byte little-endian header length, a JSON header and the tensor
bytes. memfit's files hold one uint8 tensor, ``data``, and string metadata. The layout is parsed
here rather than by safetensors so that every length is checked against the file's real size
before anything is allocated, any deviation (a flipped bit in the framing included) is a
:class:`~memfit.errors.MemfitFileError` naming the file, and files of another kind (a
``torch.save`` archive, a directory) are named as what they are.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import secrets
import zipfile
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import MemfitFileError, MemfitInputError

__all__ = ["check_folder", "check_path", "read", "write", "write_atomically"]

_TENSOR = "data"
_ALIGN = 8  # safetensors pads its header so that the data starts 8-byte aligned
_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"  # torch.save's archive, and its legacy pickle (protocol >= 2)
_TRIES = 100  # random temporary names tried before giving up (each a 32-bit name)


def check_path(value: Any, argument: str) -> str:
    """``value`` as a ``str`` path, or a MemfitInputError naming ``argument`` (e.g. ``"memfit.load: path"``)."""
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if isinstance(path, str) and path:
            return path
    raise MemfitInputError(f"{argument} must be a file path (a non-empty str or pathlib.Path), got {value!r}")


def _what_it_is(path: str, raw: bytes) -> str | None:
    """What a file that is not a safetensors file is, with how to read it; None if not recognised."""
    if not raw:
        return "is empty (0 bytes): the program that wrote it stopped before finishing; save the model again"
    if raw.startswith(_ZIP):
        with contextlib.suppress(zipfile.BadZipFile, OSError), zipfile.ZipFile(path) as archive:
            if any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist()):
                return f"is a torch.save file, not a memfit file: load it with torch.load({path!r}, weights_only=True)"
        return "is a zip archive, not a memfit file (memfit.save writes safetensors files)"
    if raw.startswith(_PICKLE):
        return (
            f"is a pickle (torch.save's legacy format?), not a memfit file: load it with "
            f"torch.load({path!r}, weights_only=True)"
        )
    return None


def read(path: str) -> tuple[dict[str, str], torch.Tensor]:
    """The string metadata and the ``data`` tensor of a safetensors file memfit wrote.

    Raises:
        MemfitFileError: The path is missing or a directory, the file is of another kind, or it is
            truncated or its framing is corrupted.
    """
    try:
        with open(path, "rb") as f:
            return _parse(path, f, os.fstat(f.fileno()).st_size)
    except FileNotFoundError:
        raise MemfitFileError(f"{path}: no such file; check the path (memfit.save writes these files)") from None
    except IsADirectoryError:
        raise MemfitFileError(
            f"{path} is a directory, not a memfit file: pass the path of a file memfit.save wrote"
        ) from None
    except OSError as e:
        raise MemfitFileError(f"{path} cannot be read ({e.strerror}): check the path and its permissions") from e


def _read_exactly(f: io.BufferedIOBase, n: int) -> bytearray:
    buffer = bytearray(n)
    if f.readinto(buffer) != n:
        raise OSError(errno.EIO, "the file got shorter while it was read")
    return buffer


def _parse(path: str, f: io.BufferedIOBase, size: int) -> tuple[dict[str, str], torch.Tensor]:
    """Read the layout, each length checked against ``size`` before its bytes are read."""
    start = _read_exactly(f, min(size, 8))
    kind = _what_it_is(path, bytes(start))
    if kind:
        raise MemfitFileError(f"{path} {kind}")
    n = int.from_bytes(start, "little")
    if size < 8 or 8 + n > size:
        raise MemfitFileError(
            f"{path} is not a readable memfit file: it holds {size} bytes, fewer than the header it "
            "starts with announces (truncated, or not a safetensors file)"
        )
    try:
        head = json.loads(_read_exactly(f, n).decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise MemfitFileError(
            f"{path} is not a readable memfit file: its safetensors header is not JSON ({e}); "
            "the file is corrupted or of another kind"
        ) from e
    metadata = head.pop("__metadata__", None) if isinstance(head, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MemfitFileError(f"{path} is a safetensors file but not one memfit wrote (no string metadata)")
    m = size - 8 - n
    if head != {_TENSOR: {"dtype": "U8", "shape": [m], "data_offsets": [0, m]}}:
        entry = head.get(_TENSOR)
        end = entry.get("data_offsets", [0, 0])[-1] if isinstance(entry, dict) else 0
        if isinstance(end, int) and end > m:
            raise MemfitFileError(
                f"{path} is truncated: it holds {size} bytes, its header needs {8 + n + end}; "
                "the write or copy did not finish: save the model again"
            )
        raise MemfitFileError(
            f"{path} is corrupted or not one memfit wrote: its safetensors header does not "
            f"describe one uint8 tensor {_TENSOR!r} of the {m} bytes after it"
        )
    data = torch.frombuffer(_read_exactly(f, m), dtype=torch.uint8) if m else torch.zeros(0, dtype=torch.uint8)
    return metadata, data


def _encode(metadata: dict[str, str], data: torch.Tensor) -> bytes:
    head = json.dumps(
        {
            "__metadata__": metadata,
            _TENSOR: {"dtype": "U8", "shape": [data.numel()], "data_offsets": [0, data.numel()]},
        },
        separators=(",", ":"),
    ).encode()
    head += b" " * (-len(head) % _ALIGN)
    return len(head).to_bytes(8, "little") + head


def write(path: str, metadata: dict[str, str], data: torch.Tensor) -> int:
    """Write a safetensors file holding the uint8 tensor ``data`` and ``metadata``, atomically.

    Returns:
        The file's size in bytes.
    """
    return write_atomically(path, [_encode(metadata, data), data.numpy().data], "memfit.save")


def check_folder(path: str, caller: str) -> str:
    """The folder ``path`` is written into, refusing a directory or a missing folder up front (the
    command line checks ``--plot`` and ``--save`` so, before the work whose result they hold)."""
    if os.path.isdir(path):
        raise MemfitFileError(f"{caller}: {path} is a directory; give a file name inside it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise MemfitFileError(
            f"{caller}: cannot write {path}: the folder {folder} {what}; create it first "
            "(os.makedirs) or choose another path"
        )
    return folder


def write_atomically(path: str, chunks: Iterable[Any], caller: str) -> int:
    """Write ``chunks`` (bytes-like) to ``path`` through a temporary file beside it and ``os.replace``:
    readers see the old file or the whole new one, never a part. The file's mode follows the umask,
    as ``open`` would give; a failed write leaves no temporary file behind.

    Returns:
        The file's size in bytes.

    Raises:
        MemfitFileError: ``path`` is a directory, its folder is missing, or it cannot be written;
            the message names ``path`` and ``caller``.
    """
    folder = check_folder(path, caller)
    base = os.path.basename(path)
    for _ in range(_TRIES):
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(4)}.tmp")
        try:
            # os.open with mode 0o666 lets the kernel apply the umask; mkstemp would force 0o600
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise MemfitFileError(
                f"{caller}: cannot write {path} ({e.strerror}): choose a folder you can write to"
            ) from e
    else:
        raise MemfitFileError(f"{caller}: cannot write {path}: {_TRIES} temporary names beside it are taken")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise MemfitFileError(
                f"{caller}: writing {path} failed ({e.strerror}); nothing was written: free "
                "space or choose another path"
            ) from e
        raise
    return os.path.getsize(path)
