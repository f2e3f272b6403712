"""``memfit.save`` / ``memfit.load``: a model in a versioned safetensors file, compressed layers packed.

The file is a safetensors file (no pickled code can run on load) with one uint8 tensor, ``data``:
every stored tensor's bytes, back to back, in the order of an index. The metadata holds the format
name and version, a zlib-compressed JSON header (the index: name, dtype, shape of each tensor; how
to rebuild the architecture: a zoo name and options; each compressed layer's method and packing
metadata) and the SHA-256 digest of the format, version, header and data together, so that no
part of the file can change unnoticed. Compressed layers are stored as their generators' packed
fields, so the file is the size the storage accounting gives plus a header of a few KiB, however
many small tensors (BatchNorm statistics, scales) the model has.

Reading trusts nothing before it is checked: the digest first, then every field's type, then every
size against the data the file really holds and the architecture (built on the meta device first)
against the file and this machine's memory, so an edited or crafted header is an error, never a
huge allocation.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import os
import zlib
from typing import Any

import torch
from torch import nn

from ..compressors import generators, get_method
from ..compressors.apply import META_KEY, plain_state, trace_compressed
from ..compressors.layer import generated_layer
from ..errors import MemfitFileError, MemfitInputError
from ..models import create, spec_of
from . import container
from .header import check_header, check_layers_fit

__all__ = ["FORMAT_VERSION", "META_KEY", "architecture_of", "load", "save"]

FORMAT = "memfit"
FORMAT_VERSION = 2  # 1: the digest covered the data only (still read)
_STATE, _PACKED = "state/", "packed/"
_KEYS = {"format", "version", "header", "sha256"}
_MAX_HEADER_BYTES = 64 << 20  # a header is a few KiB per hundred tensors; more is a zip bomb
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _digest(packed_header: str, data: torch.Tensor) -> str:
    """SHA-256 of the format, version, header and data, each framed by its length."""
    h = hashlib.sha256()
    for part in (FORMAT.encode(), str(FORMAT_VERSION).encode(), packed_header.encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    h.update(data.numpy().data)
    return h.hexdigest()


def _flatten(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[list[Any]]]:
    """All tensors' bytes in one uint8 tensor, and the index that splits it again."""
    index, chunks = [], []
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        index.append([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
        chunks.append(t.reshape(-1).view(torch.uint8))
    return (torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)), index


def _unflatten(data: torch.Tensor, index: list[list[Any]], path: str) -> dict[str, torch.Tensor]:
    """Split ``data`` by the index, every size checked against the bytes really there first."""
    tensors, offset = {}, 0
    for name, dtype_name, shape in index:
        dtype = _DTYPES.get(dtype_name)
        if dtype is None or dtype.itemsize < 1:
            raise MemfitFileError(f"{path}: tensor {name} has unknown dtype {dtype_name!r}; the file is corrupted")
        nbytes = math.prod(shape) * dtype.itemsize
        if offset + nbytes > data.numel():
            raise MemfitFileError(
                f"{path}: its index needs more data than the file holds (tensor {name} "
                f"{dtype_name}{shape}); the file is corrupted"
            )
        try:
            tensors[name] = data[offset : offset + nbytes].clone().view(dtype).reshape(shape)
        except RuntimeError as e:
            raise MemfitFileError(f"{path}: tensor {name} cannot be read as {dtype_name}{shape} ({e})") from e
        offset += nbytes
    if offset != data.numel():
        raise MemfitFileError(f"{path}: {data.numel() - offset} bytes of data are not in its index (corrupted?)")
    return tensors


def architecture_of(model: nn.Module) -> dict[str, Any] | None:
    """How to rebuild a model's architecture: the zoo name and options it (or the model it was
    compressed or planned from) was created with; None for models from elsewhere."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and META_KEY in meta:
        return meta[META_KEY].get("architecture")
    return spec_of(model)


def save(model: nn.Module, path: str | os.PathLike) -> int:
    """Write a model, its compressed layers packed, to a safetensors file.

    The write is atomic (a temporary file beside ``path``, then ``os.replace``) and the file's
    mode follows the umask, as ``open`` would give.

    Args:
        model: A model from :func:`memfit.compress`, :func:`memfit.optimize` or any module
            (uncompressed layers are stored at their dtype).
        path: Where to write (``.memfit`` or ``.safetensors`` by convention); its folder must exist.

    Returns:
        The file's size in bytes.

    Raises:
        MemfitInputError: ``model`` is not a module or ``path`` not a path.
        MemfitFileError: ``path`` is a directory, its folder is missing, or it cannot be written.

    Example:
        >>> import torch, memfit, tempfile, os
        >>> dense = memfit.models.create("resnet18", stem="cifar", num_classes=10, width=8)
        >>> path = os.path.join(tempfile.mkdtemp(), "net.memfit")
        >>> memfit.save(memfit.compress(dense, "ternary"), path) < 0.2 * sum(p.numel() * 4 for p in dense.parameters())
        True
    """
    if not isinstance(model, nn.Module):
        raise MemfitInputError(f"memfit.save: model must be an nn.Module, got {type(model).__name__} {model!r:.80}")
    path = container.check_path(path, "memfit.save: path")
    gens = generators(model)
    tensors = {_STATE + k: v.detach().cpu().contiguous().clone() for k, v in plain_state(model).items()}
    layers: dict[str, Any] = {}
    for name, gen in gens.items():
        meta, packed = gen.pack()
        layer = name.removesuffix(".generator")
        layers[layer] = {"method": gen.method, "meta": meta}
        for field, t in packed.items():
            tensors[f"{_PACKED}{layer}/{field}"] = t.detach().cpu().contiguous()
    data, index = _flatten(tensors)
    header = {"architecture": architecture_of(model), "layers": layers, "tensors": index}
    packed_header = base64.b64encode(zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)).decode()
    metadata = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "header": packed_header,
        "sha256": _digest(packed_header, data),
    }
    return container.write(path, metadata, data)


def _unpack_header(packed: str, path: str) -> Any:
    """The JSON header, its decompressed size bounded before it is allocated."""
    try:
        inflate = zlib.decompressobj()
        text = inflate.decompress(base64.b64decode(packed, validate=True), _MAX_HEADER_BYTES)
        if inflate.unconsumed_tail or not inflate.eof:
            raise ValueError(f"it does not inflate to a whole header of at most {_MAX_HEADER_BYTES >> 20} MiB")
        return json.loads(text)
    except (ValueError, zlib.error, RecursionError) as e:
        raise MemfitFileError(f"{path} is corrupted: its header cannot be read ({e})") from e


def _read(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked header and the tensors of a file :func:`save` wrote."""
    meta, data = container.read(path)
    if meta.get("format") != FORMAT:
        raise MemfitFileError(f"{path} is a safetensors file but not one memfit wrote (no '{FORMAT}' format tag)")
    version = meta.get("version", "")
    if version.isdecimal() and int(version) > FORMAT_VERSION:
        raise MemfitFileError(
            f"{path} is format version {version}; this memfit reads up to {FORMAT_VERSION}: upgrade memfit"
        )
    if version == str(FORMAT_VERSION):
        if set(meta) != _KEYS or meta["sha256"] != _digest(meta["header"], data):
            raise MemfitFileError(
                f"{path} is corrupted: its header and data do not match the SHA-256 digest stored with them"
            )
        header = _unpack_header(meta["header"], path)
    elif version == "1" and isinstance(meta.get("header"), str):
        header = _unpack_header(meta["header"], path)
        if not isinstance(header, dict) or header.get("sha256") != hashlib.sha256(data.numpy().data).hexdigest():
            raise MemfitFileError(f"{path} is corrupted: its data does not match the SHA-256 digest stored with it")
    else:
        raise MemfitFileError(
            f"{path} is corrupted: its format version {version!r} and header are not what memfit writes"
        )
    check_header(header, path)
    tensors = _unflatten(data, header["tensors"], path)
    stray = [k for k in tensors if not k.startswith((_STATE, *(f"{_PACKED}{layer}/" for layer in header["layers"])))]
    if stray:
        raise MemfitFileError(f"{path} is corrupted: tensors {stray[:5]} belong to no layer of its header")
    return header, tensors


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save`; its outputs equal the saved model's exactly.

    Args:
        path: The file.
        model: An instance of the original (uncompressed) architecture, needed when the saved
            model was not built by ``memfit.models.create`` (the file names zoo models itself).
            It is copied, not modified.

    Returns:
        The model with the saved parameters, buffers and compressed layers (an fx GraphModule
        when it has compressed layers), in training mode.

    Raises:
        MemfitInputError: ``path`` is not a path or ``model`` not a module instance.
        MemfitFileError: The path is missing, a directory or a file of another kind; the file is
            truncated or corrupted (a single flipped bit anywhere is caught), or it was saved
            from another architecture than ``model``.
    """
    path = container.check_path(path, "memfit.load: path")
    if model is not None and not isinstance(model, nn.Module):
        hint = (
            f"an instance, e.g. {model.__name__}(...)"
            if isinstance(model, type)
            else "an instance of the original architecture (for zoo models, pass nothing: the file names them)"
        )
        raise MemfitInputError(
            f"memfit.load: model must be an nn.Module or None, got {type(model).__name__} {model!r:.80}; pass {hint}"
        )
    header, tensors = _read(path)
    arch, layers = header["architecture"], header["layers"]
    state = {k.removeprefix(_STATE): v for k, v in tensors.items() if k.startswith(_STATE)}
    if model is not None:
        skeleton = copy.deepcopy(model)
        check_layers_fit(skeleton, state, layers, path, "the model given")
    elif arch:
        with torch.device("meta"):  # the header's sizes are checked on an architecture that holds no memory
            check_layers_fit(_build(arch, path), state, layers, path, "the architecture its header names")
        skeleton = _build(arch, path)
    else:
        raise MemfitFileError(
            f"{path} does not say how to build its architecture (the model was not made by "
            "memfit.models.create); pass model=<an instance of the original architecture>"
        )
    skeleton.load_state_dict(state, strict=False)
    for layer, entry in layers.items():
        prefix = f"{_PACKED}{layer}/"
        packed = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        try:  # each method checks its own fields, each in its own way
            gen = get_method(entry["method"]).generator_type.unpack(entry["meta"], packed, skeleton)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as e:
            raise MemfitFileError(
                f"{path}: layer {layer} ({entry['method']}) cannot be unpacked: "
                f"{type(e).__name__}: {e}; the file is corrupted"
            ) from e
        skeleton.set_submodule(layer, generated_layer(skeleton.get_submodule(layer), gen))
    if not layers:
        return skeleton.train()
    gm = trace_compressed(skeleton)
    if arch:
        gm.meta[META_KEY]["architecture"] = arch
    return gm.train()


def _build(arch: dict[str, Any], path: str) -> nn.Module:
    try:
        return create(arch["name"], **arch["options"])
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise MemfitFileError(
            f"{path}: its header's architecture ({arch['name']} with options {arch['options']}) "
            f"cannot be built: {e}; the file is corrupted or from another memfit"
        ) from e
