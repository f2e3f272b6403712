"""MemoryReport: what a training step holds in memory, predicted or measured, as a printable table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..units import MiB, mib

__all__ = ["Comparison", "LayerRow", "MemoryReport", "MiB", "mib"]


@dataclass(frozen=True)
class LayerRow:
    """One row of the per-layer table (torchinfo's columns plus saved activations)."""

    name: str
    kind: str
    output_shape: str
    params: int
    saved_bytes: int
    flops: int


@dataclass
class MemoryReport:
    """The memory of one training step.

    All ``*_bytes`` fields are integers; the ``*_mb`` properties give MiB (2**20 bytes).

    Attributes:
        source: ``"predicted"`` (cost model, nothing allocated) or ``"measured"`` (a real step).
        model: Name of the model.
        description: Optimizer and precision of the step.
        batch_size: Leading dimension of the inputs.
        parameters_bytes: Parameters.
        buffers_bytes: Buffers (BatchNorm statistics ...).
        inputs_bytes: The example inputs.
        gradients_bytes: Parameter gradients after backward.
        optimizer_bytes: Optimizer state (momentum, Adam moments).
        activations_bytes: Storage saved for backward that is not a parameter.
        peak_bytes: Peak of the step at the allocator (tensors and kernel workspaces).
        tensor_peak_bytes: Peak of live tensor storage, as the dispatcher sees it.
        peak_phase: Phase of the step where the peak falls.
        peak_breakdown: Bytes per category alive at the peak (``workspace`` included).
        phase_peaks: Peak per phase.
        layers: Per-layer rows (predicted reports).
        notes: Extra lines printed under the totals.
        stored_weights_bytes: For a compressed model, the parameters as stored (packed codes
            and factors, the rest at their dtype): computed exactly, not predicted or measured.
        original_weights_bytes: The same parameters at fp32, uncompressed.
    """

    source: Literal["predicted", "measured"]
    model: str
    description: str
    batch_size: int
    parameters_bytes: int
    buffers_bytes: int
    inputs_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    peak_bytes: int
    tensor_peak_bytes: int
    peak_phase: str
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    phase_peaks: dict[str, int] = field(default_factory=dict)
    layers: list[LayerRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stored_weights_bytes: int | None = None
    original_weights_bytes: int | None = None

    @property
    def parameters_mb(self) -> float:
        """Parameters, MiB."""
        return mib(self.parameters_bytes)

    @property
    def buffers_mb(self) -> float:
        """Buffers, MiB."""
        return mib(self.buffers_bytes)

    @property
    def gradients_mb(self) -> float:
        """Parameter gradients, MiB."""
        return mib(self.gradients_bytes)

    @property
    def optimizer_mb(self) -> float:
        """Optimizer state, MiB."""
        return mib(self.optimizer_bytes)

    @property
    def activations_mb(self) -> float:
        """Activations saved for backward, MiB."""
        return mib(self.activations_bytes)

    @property
    def peak_mb(self) -> float:
        """Peak of the step at the allocator, MiB."""
        return mib(self.peak_bytes)

    def __str__(self) -> str:
        return render(self)


def _fmt_int(n: int) -> str:
    return f"{n:,}" if n else "--"


def _fmt_flops(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n) if n else "--"


def render(r: MemoryReport) -> str:
    """The report as text: a per-layer table in torchinfo's manner, then the totals."""
    lines: list[str] = []
    title = f"memfit memory report ({r.source}): {r.model}, batch {r.batch_size}, {r.description}"
    if r.layers:
        headers = ("Layer (type)", "Output Shape", "Param #", "Saved MiB", "FLOPs")
        rows = [
            (
                f"{x.name} ({x.kind})",
                x.output_shape,
                _fmt_int(x.params),
                f"{mib(x.saved_bytes):.2f}",
                _fmt_flops(x.flops),
            )
            for x in r.layers
        ]
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
        width = sum(widths) + 2 * (len(widths) - 1)
        lines += [title, "=" * width]
        lines.append(
            "  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))
        )
        lines.append("-" * width)
        for row in rows:
            lines.append(
                "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            )
        lines.append("=" * width)
        total_flops = sum(x.flops for x in r.layers)
        lines.append(f"Forward FLOPs: {_fmt_flops(total_flops)}")
    else:
        lines += [title, "=" * len(title)]
    label = r.source
    totals = [
        ("Parameters", r.parameters_bytes),
        ("Buffers", r.buffers_bytes),
        ("Inputs", r.inputs_bytes),
        ("Gradients", r.gradients_bytes),
        ("Optimizer state", r.optimizer_bytes),
        ("Activations (saved for backward)", r.activations_bytes),
        ("Peak of the step, tensors only", r.tensor_peak_bytes),
        (f"Peak of the step (in {r.peak_phase})", r.peak_bytes),
    ]
    for name, value in totals:
        lines.append(f"{name + ' (MiB, ' + label + '):':<58}{mib(value):>12.2f}")
    if r.phase_peaks:
        parts = ", ".join(f"{k} {mib(v):.2f}" for k, v in r.phase_peaks.items())
        lines.append(f"Peak per phase (MiB, {label}): {parts}")
    if r.peak_breakdown:
        parts = ", ".join(f"{k} {mib(v):.2f}" for k, v in r.peak_breakdown.items() if v)
        where = "At the peak" if "workspace" in r.peak_breakdown else "At the tensor peak"
        lines.append(f"{where} (MiB, {label}): {parts}")
    if r.stored_weights_bytes is not None and r.original_weights_bytes:
        lines.append(
            f"{'Weights stored, packed (MiB, computed):':<58}{mib(r.stored_weights_bytes):>12.2f}"
            f"  ({r.original_weights_bytes / max(r.stored_weights_bytes, 1):.1f}x smaller than fp32)"
        )
    lines.extend(r.notes)
    return "\n".join(lines)


@dataclass
class Comparison:
    """Two reports of the same step side by side: before and after a plan (or compression)."""

    before: MemoryReport
    after: MemoryReport

    def __str__(self) -> str:
        b, a = self.before, self.after
        rows = [
            ("Parameters", b.parameters_bytes, a.parameters_bytes),
            ("Gradients", b.gradients_bytes, a.gradients_bytes),
            ("Optimizer state", b.optimizer_bytes, a.optimizer_bytes),
            ("Peak of the step", b.peak_bytes, a.peak_bytes),
        ]
        head = f"{'MiB (' + b.source + ' / ' + a.source + ')':<34}{'before':>12}{'after':>12}"
        lines = [f"memfit: {b.model}, batch {b.batch_size}, {b.description}", head]
        lines += [f"{name:<34}{mib(x):>12.2f}{mib(y):>12.2f}" for name, x, y in rows]
        return "\n".join(lines)
