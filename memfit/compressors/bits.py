"""Packing small unsigned integers into bytes: the storage format behind every compressed field."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["index_bits", "pack_bits", "packed_nbytes", "unpack_bits"]


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take once packed."""
    return math.ceil(count * bits / 8)


def index_bits(choices: int) -> int:
    """Bits of an index that can name any of ``choices`` values (at least 1)."""
    return max(1, math.ceil(math.log2(max(choices, 1))))


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers below ``2**bits`` into a flat uint8 tensor, little-endian bits.

    Args:
        values: Integer tensor of any shape (flattened in row-major order).
        bits: Width of each value, 1 to 32.

    Returns:
        ``packed_nbytes(values.numel(), bits)`` bytes.

    Example:
        >>> unpack_bits(pack_bits(torch.tensor([3, 0, 2]), 2), 2, 3).tolist()
        [3, 0, 2]
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    v = values.detach().reshape(-1).to(torch.int64).cpu().numpy()
    if v.size and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"values must lie in [0, {2**bits}) to pack into {bits} bits, got {v.min()}..{v.max()}")
    shifts = np.arange(bits, dtype=np.int64)
    bitmat = ((v[:, None] >> shifts) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(bitmat.reshape(-1), bitorder="little").copy())


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` int64 values of ``bits`` bits each."""
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(count, bits):
        raise ValueError(
            f"expected {packed_nbytes(count, bits)} packed uint8 bytes for {count} values of {bits} bits, "
            f"got {packed.numel()} of {packed.dtype}"
        )
    flat = np.unpackbits(packed.cpu().numpy(), bitorder="little")[: count * bits].astype(np.int64)
    weights = np.int64(1) << np.arange(bits, dtype=np.int64)
    return torch.from_numpy(flat.reshape(count, bits) @ weights)
