"""``memfit.save`` / ``memfit.load``: a model in a versioned safetensors file, compressed layers packed.

The file is a safetensors file (no pickled code can run on load) with one uint8 tensor, ``data``:
every stored tensor's bytes, back to back, in the order of an index. The metadata holds the format
name and version, and a zlib-compressed JSON header: the index (name, dtype, shape of each tensor),
how to rebuild the architecture (a zoo name and options), each compressed layer's method and
packing metadata, and the SHA-256 digest of ``data``. Compressed layers are stored as their
generators' packed fields, so the file is the size the storage accounting gives plus a header of
a few KiB, however many small tensors (BatchNorm statistics, scales) the model has.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import zlib
from typing import Any

import torch
from torch import nn

from ..compressors import generators, get_method
from ..compressors.apply import META_KEY, plain_state, trace_compressed
from ..compressors.layer import generated_layer
from ..errors import MemfitInputError
from ..models import create, spec_of

__all__ = ["save", "load", "architecture_of", "FORMAT_VERSION", "META_KEY"]

FORMAT = "memfit"
FORMAT_VERSION = 1
_STATE, _PACKED = "state/", "packed/"


def _digest(data: torch.Tensor) -> str:
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def _flatten(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[list[Any]]]:
    """All tensors' bytes in one uint8 tensor, and the index that splits it again."""
    index, chunks = [], []
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        index.append([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
        chunks.append(t.reshape(-1).view(torch.uint8))
    return (torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)), index


def _unflatten(data: torch.Tensor, index: list[list[Any]], path: Any) -> dict[str, torch.Tensor]:
    tensors, offset = {}, 0
    for name, dtype_name, shape in index:
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise MemfitInputError(f"{path}: tensor {name} has unknown dtype {dtype_name!r}")
        count = 1
        for d in shape:
            count *= d
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if offset + nbytes > data.numel():
            raise MemfitInputError(f"{path} is truncated: its index needs more data than the file holds")
        tensors[name] = data[offset : offset + nbytes].clone().view(dtype).reshape(shape)
        offset += nbytes
    if offset != data.numel():
        raise MemfitInputError(f"{path}: {data.numel() - offset} bytes of data are not in its index (corrupted?)")
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

    Args:
        model: A model from :func:`memfit.compress`, :func:`memfit.optimize` or any module
            (uncompressed layers are stored at their dtype).
        path: Where to write (``.memfit`` or ``.safetensors`` by convention).

    Returns:
        The file's size in bytes.

    Example:
        >>> import torch, memfit, tempfile, os
        >>> net = memfit.compress(memfit.models.create("resnet18", stem="cifar", width=8), "ternary")
        >>> path = os.path.join(tempfile.mkdtemp(), "net.memfit")
        >>> memfit.save(net, path) < 0.2 * sum(p.numel() * 4 for p in net.parameters())
        True
    """
    from safetensors.torch import save_file

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
    header = {
        "architecture": architecture_of(model),
        "layers": layers,
        "tensors": index,
        "sha256": _digest(data),
    }
    packed_header = base64.b64encode(zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)).decode()
    metadata = {"format": FORMAT, "version": str(FORMAT_VERSION), "header": packed_header}
    save_file({"data": data}, os.fspath(path), metadata=metadata)
    return os.path.getsize(path)


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            data = f.get_tensor("data") if "data" in f.keys() else None
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors reports a truncated or garbled file in several ways
        raise MemfitInputError(f"{path} is not a readable memfit file (truncated or corrupted?): {e}") from e
    if meta.get("format") != FORMAT or data is None:
        raise MemfitInputError(f"{path} is a safetensors file but not one memfit wrote (no '{FORMAT}' format tag)")
    if not meta.get("version", "").isdigit() or int(meta["version"]) > FORMAT_VERSION:
        raise MemfitInputError(
            f"{path} is format version {meta.get('version')!r}; this memfit reads up to {FORMAT_VERSION}: upgrade memfit"
        )
    try:
        header = json.loads(zlib.decompress(base64.b64decode(meta["header"])))
    except (KeyError, ValueError, zlib.error) as e:
        raise MemfitInputError(f"{path} is corrupted: its header cannot be read ({e})") from e
    if _digest(data) != header.get("sha256"):
        raise MemfitInputError(f"{path} is corrupted: its data does not match the SHA-256 digest stored with it")
    return header, _unflatten(data, header["tensors"], path)


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
        MemfitInputError: A truncated, corrupted or foreign file, or one saved from another
            architecture than ``model``.
    """
    header, tensors = _read(path)
    arch = header.get("architecture")
    if model is not None:
        skeleton = copy.deepcopy(model)
    elif arch:
        skeleton = create(arch["name"], **arch["options"])
    else:
        raise MemfitInputError(
            f"{path} does not say how to build its architecture (the model was not made by "
            "memfit.models.create); pass model=<an instance of the original architecture>"
        )
    layers: dict[str, Any] = header["layers"]
    state = {k.removeprefix(_STATE): v for k, v in tensors.items() if k.startswith(_STATE)}
    _load_plain(skeleton, state, layers, path)
    for layer, entry in layers.items():
        prefix = f"{_PACKED}{layer}/"
        packed = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        gen = get_method(entry["method"]).generator_type.unpack(entry["meta"], packed, skeleton)
        if tuple(gen.shape) != tuple(skeleton.get_submodule(layer).weight.shape):
            raise MemfitInputError(f"{path}: layer {layer} was saved with weight shape {list(gen.shape)}, "
                                   f"the model's is {list(skeleton.get_submodule(layer).weight.shape)}")
        skeleton.set_submodule(layer, generated_layer(skeleton.get_submodule(layer), gen))
    if not layers:
        return skeleton.train()
    gm = trace_compressed(skeleton)
    if arch:
        gm.meta[META_KEY]["architecture"] = arch
    return gm.train()


def _load_plain(skeleton: nn.Module, state: dict[str, torch.Tensor], layers: dict[str, Any], path: Any) -> None:
    """Load the uncompressed tensors; compressed layers' weights are the only keys allowed missing."""
    expected = skeleton.state_dict()
    for layer in layers:
        try:
            mod = skeleton.get_submodule(layer)
        except AttributeError:
            mod = None
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            raise MemfitInputError(f"{path} compresses layer {layer!r}, which the model has no Conv2d/Linear for: "
                                   "the file belongs to another architecture")
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
        raise MemfitInputError(f"{path} was saved from a different architecture than the model given ({detail})")
    skeleton.load_state_dict(state, strict=False)
