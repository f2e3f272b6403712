"""Exact storage of a compressed model, layer by layer, and MicroNet-style parameter/operation counts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..capture.trace import as_input_tuple
from ..units import mib
from .apply import generators, plain_state
from .layer import GeneratedConv2d, GeneratedLinear

__all__ = ["LayerStorage", "StorageReport", "storage_table"]


@dataclass(frozen=True)
class LayerStorage:
    """One compressed layer's storage and operations.

    Attributes:
        name: Layer name.
        method: Compression method.
        shape: Weight shape.
        original_bits: Bits of the fp32 weight.
        stored_bits: Bits of its packed form (codes, indices, scales, bases, coefficients).
        fields: ``{field: bits}`` of the packed form.
        density: Fraction of nonzero weights.
        mults: Multiplications per sample (sparsity- and codebook-aware), 0 without example inputs.
        adds: Additions per sample.
        dense_macs: Multiply-accumulates per sample of the uncompressed layer.
    """

    name: str
    method: str
    shape: tuple[int, ...]
    original_bits: int
    stored_bits: int
    fields: dict[str, int]
    density: float
    mults: int = 0
    adds: int = 0
    dense_macs: int = 0

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight."""
        return self.stored_bits / max(math.prod(self.shape), 1)

    @property
    def ratio(self) -> float:
        """Original over stored size."""
        return self.original_bits / max(self.stored_bits, 1)


@dataclass
class StorageReport:
    """What a compressed model stores, exactly (bytes are what ``memfit.save`` writes, before the
    file header).

    Attributes:
        layers: The compressed layers.
        other_parameter_bytes: Parameters kept uncompressed, at their dtype.
        buffer_bytes: Buffers (BatchNorm statistics), at their dtype.
        original_parameter_bytes: All parameters of the uncompressed model, fp32 weights.
        dense_macs: Multiply-accumulates per sample of the layers that are not compressed.
    """

    layers: list[LayerStorage]
    other_parameter_bytes: int
    buffer_bytes: int
    original_parameter_bytes: int
    dense_macs: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def compressed_layer_bytes(self) -> int:
        """Bytes of the compressed layers' packed fields (each field rounded up to whole bytes)."""
        return sum(sum(math.ceil(b / 8) for b in layer.fields.values()) for layer in self.layers)

    @property
    def parameter_bytes(self) -> int:
        """Stored bytes of every parameter: packed layers plus the uncompressed ones."""
        return self.compressed_layer_bytes + self.other_parameter_bytes

    @property
    def parameter_ratio(self) -> float:
        """How many times smaller the model's weights are stored than at fp32."""
        return self.original_parameter_bytes / max(self.parameter_bytes, 1)

    @property
    def covered_ratio(self) -> float:
        """Storage ratio over the compressed layers alone."""
        return sum(x.original_bits for x in self.layers) / max(sum(x.stored_bits for x in self.layers), 1)

    @property
    def file_bytes(self) -> int:
        """Bytes of tensor data ``memfit.save`` writes (parameters and buffers)."""
        return self.parameter_bytes + self.buffer_bytes

    @property
    def scoring_params(self) -> float:
        """MicroNet's parameter score: stored bits over 32 (a 2-bit weight counts 1/16)."""
        return (8 * self.other_parameter_bytes + sum(x.stored_bits for x in self.layers)) / 32

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over the compressed layers."""
        n = sum(math.prod(x.shape) for x in self.layers)
        return 1 - sum(x.density * math.prod(x.shape) for x in self.layers) / max(n, 1)

    def __str__(self) -> str:
        head = (
            f"{'Layer':<28} {'Method':<10} {'Shape':<18} {'Bits/w':>7} "
            f"{'Original':>11} {'Stored':>11} {'Ratio':>7} {'Nonzero':>8}"
        )
        lines = [head, "-" * len(head)]
        for x in self.layers:
            lines.append(
                f"{x.name:<28} {x.method:<10} {'x'.join(map(str, x.shape)):<18} {x.bits_per_weight:>7.2f} "
                f"{x.original_bits / 8 / 1024:>8.1f} KiB {x.stored_bits / 8 / 1024:>7.1f} KiB {x.ratio:>6.1f}x "
                f"{x.density:>8.1%}"
            )
        lines += [
            "-" * len(head),
            (
                f"Compressed layers: {len(self.layers)}, {self.covered_ratio:.1f}x smaller, "
                f"{self.sparsity:.1%} zero weights"
            ),
            (
                f"Weights stored: {mib(self.parameter_bytes):.3f} MiB vs {mib(self.original_parameter_bytes):.3f} MiB "
                f"at fp32 ({self.parameter_ratio:.1f}x smaller); buffers {mib(self.buffer_bytes):.3f} MiB"
            ),
            f"MicroNet scoring params: {self.scoring_params / 1e6:.4f} M",
        ]
        if any(x.dense_macs for x in self.layers):
            mults = sum(x.mults for x in self.layers) + self.dense_macs
            adds = sum(x.adds for x in self.layers) + self.dense_macs
            dense = sum(x.dense_macs for x in self.layers) + self.dense_macs
            lines.append(
                f"Operations per sample: {mults / 1e6:.2f} M mults, {adds / 1e6:.2f} M adds "
                f"(uncompressed: {dense / 1e6:.2f} M multiply-accumulates)"
            )
        lines += self.notes
        lines.append("All figures are exact counts of the stored form (computed, not measured).")
        return "\n".join(lines)


def _macs_per_sample(model: nn.Module, example_inputs: Any) -> dict[str, tuple[int, int]]:
    """{layer: (dense multiply-accumulates, outputs)} per sample, from one forward with hooks."""
    inputs = as_input_tuple(example_inputs)
    batch = max(int(inputs[0].shape[0]), 1) if inputs[0].dim() else 1
    found: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, GeneratedConv2d, nn.Linear, GeneratedLinear)):

            def hook(mod: nn.Module, args: Any, out: torch.Tensor, name: str = name) -> None:
                if isinstance(mod, (GeneratedConv2d, GeneratedLinear)):
                    w_shape = mod.generator.shape
                else:
                    assert isinstance(mod, (nn.Conv2d, nn.Linear))  # the layers hooked here
                    w_shape = tuple(mod.weight.shape)
                per_output = math.prod(w_shape[1:])
                outputs = out.numel() // batch
                macs, n = found.get(name, (0, 0))
                found[name] = (macs + outputs * per_output, n + outputs)

            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            training = model.training
            model.eval()
            model(*inputs)
            model.train(training)
    finally:
        for h in hooks:
            h.remove()
    return found


def _own_tensors(model: nn.Module) -> tuple[int, int]:
    """Bytes of the parameters and of the buffers outside the generators."""
    params = {id(p) for p in model.parameters()}
    sizes = [(id(t) in params, t.numel() * t.element_size()) for t in plain_state(model).values()]
    return sum(n for is_param, n in sizes if is_param), sum(n for is_param, n in sizes if not is_param)


def storage_table(model: nn.Module, example_inputs: Any = None) -> StorageReport:
    """The exact storage of a model's compressed layers, and its totals.

    Args:
        model: A model from :func:`memfit.compress` (or a planned one built on it).
        example_inputs: If given, operations per sample are counted too (one forward, eval mode).

    Returns:
        A StorageReport; ``print`` it for the table.
    """
    gens = generators(model)
    ops = _macs_per_sample(model, example_inputs) if example_inputs is not None else {}
    rows = []
    for name, gen in gens.items():
        layer = name.removesuffix(".generator")
        macs, outputs = ops.get(layer, (0, 0))
        density = gen.density()
        mults = outputs * gen.codebook_size if gen.codebook_size else round(macs * density)
        rows.append(
            LayerStorage(
                name=layer,
                method=gen.method,
                shape=gen.shape,
                original_bits=gen.original_bits,
                stored_bits=gen.stored_bits,
                fields={f.name: f.total_bits for f in gen.storage()},
                density=density,
                mults=mults,
                adds=round(macs * density),
                dense_macs=macs,
            )
        )
    other_params, buffers = _own_tensors(model)
    compressed_layers = {r.name for r in rows}
    dense = sum(m for name, (m, _) in ops.items() if name not in compressed_layers)
    return StorageReport(
        layers=rows,
        other_parameter_bytes=other_params,
        buffer_bytes=buffers,
        original_parameter_bytes=other_params + sum(r.original_bits for r in rows) // 8,
        dense_macs=dense,
    )
