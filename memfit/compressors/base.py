"""What every compressor provides: a generator module per layer, its exact storage, its packed form.

A compressor replaces a conv/linear layer's weight by a :class:`WeightGenerator`: a small module
whose ``forward()`` produces the weight from compact trainable parameters at every step. The
generator knows, field by field, how many bits its stored form takes (:class:`Field`), and packs
itself into plain integer/float tensors that a file holds and :meth:`WeightGenerator.unpack`
turns back into a generator producing the very same weight.
"""

from __future__ import annotations

import abc
import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["CompressConfig", "Field", "Method", "WeightGenerator", "storage_bits"]


@dataclass(frozen=True)
class Field:
    """One stored field of a compressed layer.

    Attributes:
        name: What it is (``codes``, ``indices``, ``scale``, ``basis`` ...).
        count: Number of values.
        bits: Bits per value.
    """

    name: str
    count: int
    bits: int

    @property
    def total_bits(self) -> int:
        """Bits the field takes."""
        return self.count * self.bits


def storage_bits(fields: list[Field]) -> int:
    """Total bits of a list of fields."""
    return sum(f.total_bits for f in fields)


@dataclass(frozen=True)
class CompressConfig:
    """Which layers a compressor takes; every method's config extends it.

    Attributes:
        include: Glob patterns of layer names (``"layer1.*"``) to compress; None means every
            Conv2d and Linear except those the two flags below skip.
        exclude: Glob patterns of layer names never to compress.
        skip_first_conv: Keep the first convolution uncompressed (the seeds do: it is small and
            sensitive).
        skip_classifier: Keep the last Linear uncompressed.
    """

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    skip_first_conv: bool = True
    skip_classifier: bool = True

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
                raise ValueError(f"{name} must be a tuple of glob patterns, got {value!r}")

    def selects(self, name: str) -> bool:
        """Whether a layer name passes ``include`` and ``exclude``."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        return self.include is None or any(fnmatch.fnmatchcase(name, p) for p in self.include)


class WeightGenerator(nn.Module, abc.ABC):
    """Produces one layer's weight at forward time from compact trainable parameters.

    Subclasses set ``method`` and implement ``forward``, ``storage``, ``pack`` and ``unpack``.
    ``forward`` must be traceable by torch.fx (no Python branches on tensor values or on state that
    changes after tracing): a compressed model is a GraphModule and the planner sees the generated
    weight as a node it may recompute instead of keeping.

    Attributes:
        shape: Shape of the weight it generates.
    """

    method: ClassVar[str]
    # Distinct nonzero weight values per layer, when a layer has so few that a kernel can add up
    # its inputs per value and multiply once per value (ternary: 2); None for dense multiplies.
    codebook_size: ClassVar[int | None] = None

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    @abc.abstractmethod
    def forward(self) -> torch.Tensor:
        """The weight, shaped ``self.shape``."""

    @abc.abstractmethod
    def storage(self) -> list[Field]:
        """Every field its packed form stores, with exact bit widths."""

    @abc.abstractmethod
    def pack(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """JSON-able metadata and plain tensors (packed integer codes, float scales) that
        :meth:`unpack` turns back into a generator producing exactly the same weight."""

    @classmethod
    @abc.abstractmethod
    def unpack(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module) -> WeightGenerator:
        """Rebuild a trainable generator from :meth:`pack`'s output. ``model`` is the module being
        rebuilt, its uncompressed parameters already loaded, for generators that refer to another
        layer's weights."""

    def density(self) -> float:
        """Fraction of nonzero weights it generates (sparsity-aware operation counts use it)."""
        return 1.0

    @property
    def original_bits(self) -> int:
        """Bits of the fp32 weight it replaces."""
        return 32 * int(torch.Size(self.shape).numel())

    @property
    def stored_bits(self) -> int:
        """Bits of its packed form."""
        return storage_bits(self.storage())

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, {self.stored_bits / max(self.original_bits, 1) * 32:.2f} bits/weight"


class Method(abc.ABC):
    """A compression method: its config type and how it builds generators for chosen layers.

    Attributes:
        skipped: Layers the last ``build`` left uncompressed, with the reason.
    """

    name: ClassVar[str]
    config_type: ClassVar[type[CompressConfig]]
    generator_type: ClassVar[type[WeightGenerator]]

    def __init__(self) -> None:
        self.skipped: dict[str, str] = {}

    @abc.abstractmethod
    def build(self, model: nn.Module, layers: list[str], config: CompressConfig) -> dict[str, WeightGenerator]:
        """Generators for ``layers`` (qualified names of Conv2d/Linear modules of ``model``),
        initialised from their current weights (projection)."""
