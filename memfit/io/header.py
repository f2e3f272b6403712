"""Checks on a ``.memfit`` header before anything it describes is built.

A header that passed the digest was still written by someone: a crafted or hand-edited file can
carry a matching digest. So its fields' types are checked (a wrong type is a
:class:`~memfit.errors.MemfitFileError`, not a ``KeyError`` deep inside ``load``), and the
architecture it names is compared, shape by shape, with the tensors the file really holds and
with this machine's memory while it is still on the meta device.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..errors import MemfitFileError

__all__ = ["check_header", "check_layers_fit"]

_UNKNOWN_MEMORY = 1 << 40  # where the OS does not say, a bound no workstation reaches


def _fail(path: str, where: str, expected: str, value: Any) -> MemfitFileError:
    return MemfitFileError(f"{path} is corrupted: its header's {where} should be {expected}, got {value!r:.80}")


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_header(header: Any, path: str) -> None:
    """Raise a MemfitFileError unless ``header`` has the fields, and field types, ``save`` writes."""
    if not isinstance(header, dict) or not {"architecture", "layers", "tensors"} <= set(header):
        raise _fail(path, "top level", "an object with architecture, layers and tensors", header)
    arch = header["architecture"]
    if arch is not None and not (
        isinstance(arch, dict) and isinstance(arch.get("name"), str) and isinstance(arch.get("options"), dict)
    ):
        raise _fail(path, "architecture", "null or {name: str, options: object}", arch)
    layers = header["layers"]
    if not isinstance(layers, dict):
        raise _fail(path, "layers", "an object", layers)
    for layer, entry in layers.items():
        if not (
            isinstance(entry, dict) and isinstance(entry.get("method"), str) and isinstance(entry.get("meta"), dict)
        ):
            raise _fail(path, f"layer {layer}", "{method: str, meta: object}", entry)
    index = header["tensors"]
    if not isinstance(index, list):
        raise _fail(path, "tensors", "a list", index)
    for item in index:
        if not (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and isinstance(item[1], str)
            and isinstance(item[2], list)
            and all(_is_size(d) for d in item[2])
        ):
            raise _fail(path, "tensor entry", "[name, dtype, [sizes >= 0]]", item)
    if len({item[0] for item in index}) != len(index):
        raise _fail(path, "tensors", "distinct names", [item[0] for item in index])


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return _UNKNOWN_MEMORY


def check_layers_fit(
    skeleton: nn.Module, state: dict[str, torch.Tensor], layers: dict[str, Any], path: str, source: str
) -> None:
    """Raise a MemfitFileError unless the file's tensors and compressed layers fit ``skeleton``
    (``source`` says where it came from, for the message) exactly, compressed layers' weights being
    the only keys allowed missing, and the model fits in this machine's memory. Cheap on a
    meta-device skeleton, before anything is allocated."""
    expected = skeleton.state_dict()
    for layer, entry in layers.items():
        try:
            mod = skeleton.get_submodule(layer)
        except AttributeError:
            mod = None
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            raise MemfitFileError(
                f"{path} compresses layer {layer!r}, which {source} has no Conv2d/Linear for: "
                "the file belongs to another architecture"
            )
        if entry["meta"].get("shape") != list(mod.weight.shape):
            raise MemfitFileError(
                f"{path}: layer {layer} was saved with weight shape {entry['meta'].get('shape')}, "
                f"{source} has {list(mod.weight.shape)}"
            )
    allowed_missing = {f"{layer}.weight" for layer in layers}
    missing = set(expected) - set(state) - allowed_missing
    unexpected = set(state) - set(expected)
    mismatched = [k for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        detail = "; ".join(
            f"{what}: {sorted(keys)[:5]}{' ...' if len(keys) > 5 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        )
        raise MemfitFileError(f"{path} was saved from a different architecture than {source} ({detail})")
    need, have = sum(t.numel() * t.element_size() for t in expected.values()), _memory_bytes()
    if need > have:
        raise MemfitFileError(
            f"{path}: the architecture its header names needs {need / 2**30:.1f} GiB of weights, "
            f"more than this machine's {have / 2**30:.1f} GiB of memory; the header is corrupted "
            "or was edited"
        )
