"""Storage of ternary codes: three exactly counted formats, the smallest chosen per layer.

``dense``: 2-bit codes; ``bitmask``: one bit per weight plus a sign bit per nonzero; ``csr``: per
nonzero a column index and a sign bit, plus one end pointer per row of the weight viewed as
``[shape[0], -1]``. The scales are stored by the generator beside the codes.
"""

from __future__ import annotations

import math

import torch

from .base import Field
from .bits import index_bits, pack_bits, unpack_bits

__all__ = ["FORMATS", "code_formats", "decode", "encode", "smallest_format"]

# Ties between formats go to the earlier, simpler one.
FORMATS = ("dense", "bitmask", "csr")


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0] if shape else 1
    return rows, math.prod(shape) // max(rows, 1)


def code_formats(codes: torch.Tensor) -> dict[str, list[Field]]:
    """The exact fields of each storage format for a tensor of ternary codes (scales excluded).

    Args:
        codes: Integer codes in ``{-1, 0, 1}``, shaped like the weight.

    Returns:
        ``{format name: fields}`` for every name in :data:`FORMATS`.
    """
    n = codes.numel()
    nnz = int(torch.count_nonzero(codes))
    rows, cols = _rows_cols(tuple(codes.shape))
    return {
        "dense": [Field("codes", n, 2)],
        "bitmask": [Field("mask", n, 1), Field("signs", nnz, 1)],
        "csr": [
            Field("cols", nnz, index_bits(cols)),
            Field("signs", nnz, 1),
            Field("row_ends", rows, index_bits(nnz + 1)),
        ],
    }


def smallest_format(codes: torch.Tensor) -> tuple[str, list[Field]]:
    formats = code_formats(codes)
    name = min(FORMATS, key=lambda f: (sum(x.total_bits for x in formats[f]), FORMATS.index(f)))
    return name, formats[name]


def encode(codes: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    codes = codes.detach().to(torch.int64).cpu()
    if fmt == "dense":
        # -1 -> 2 so the 2-bit code is unsigned.
        return {"codes": pack_bits(torch.remainder(codes, 3), 2)}
    nonzero = codes != 0
    signs = pack_bits((codes[nonzero] < 0).to(torch.int64), 1)
    if fmt == "bitmask":
        return {"mask": pack_bits(nonzero.to(torch.int64), 1), "signs": signs}
    rows, cols = _rows_cols(tuple(codes.shape))
    nz2d = nonzero.reshape(rows, cols)
    nnz = int(nz2d.sum())
    col_index = nz2d.nonzero()[:, 1]
    row_ends = nz2d.sum(dim=1).cumsum(0)
    return {
        "cols": pack_bits(col_index, index_bits(cols)),
        "signs": signs,
        "row_ends": pack_bits(row_ends, index_bits(nnz + 1)),
    }


def decode(fmt: str, shape: tuple[int, ...], nnz: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    n = math.prod(shape)
    if fmt == "dense":
        raw = unpack_bits(tensors["codes"], 2, n)
        if bool((raw == 3).any()):
            raise ValueError("dense ternary codes hold the invalid 2-bit value 3")
        if int(torch.count_nonzero(raw)) != nnz:
            raise ValueError(f"dense codes hold {int(torch.count_nonzero(raw))} nonzeros, meta says nnz={nnz}")
        return torch.where(raw == 2, -1, raw).to(torch.int8).reshape(shape)
    negative = unpack_bits(tensors["signs"], 1, nnz)
    values = 1 - 2 * negative
    if fmt == "bitmask":
        mask = unpack_bits(tensors["mask"], 1, n).bool()
        if int(mask.sum()) != nnz:
            raise ValueError(f"bitmask holds {int(mask.sum())} nonzeros, meta says nnz={nnz}")
        codes = torch.zeros(n, dtype=torch.int64)
        codes[mask] = values
        return codes.to(torch.int8).reshape(shape)
    rows, cols = _rows_cols(shape)
    col_index = unpack_bits(tensors["cols"], index_bits(cols), nnz)
    row_ends = unpack_bits(tensors["row_ends"], index_bits(nnz + 1), rows)
    counts = torch.diff(row_ends, prepend=torch.zeros(1, dtype=torch.int64))
    if bool((counts < 0).any()) or (rows and int(row_ends[-1]) != nnz) or bool((col_index >= cols).any()):
        raise ValueError(f"corrupt csr ternary codes for shape {list(shape)} with nnz={nnz}")
    row_index = torch.repeat_interleave(torch.arange(rows), counts)
    codes = torch.zeros(rows, cols, dtype=torch.int64)
    codes[row_index, col_index] = values
    return codes.to(torch.int8).reshape(shape)
