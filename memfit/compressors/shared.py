"""MESS-style inter-layer kernel sharing (Lee & Bae, IEEE Access 2021): later layers' kernels are
affine copies of one uncompressed reference layer's kernels.

Every 3x3 kernel ``x = W[o, i]`` of a compressed conv is stored as the index ``k`` of the reference
kernel ``R_k`` it correlates with best (largest ``|Pearson correlation|``) and two numbers fitted by
least squares, ``x ~ alpha * R_k + beta``. 1x1 convs and Linear layers are cut into row sub-vectors
of ``bind_size`` values, matched the same way against reference sub-vectors: the first
``bind_size`` values of each flattened 3x3 reference kernel (a row whose length is not a multiple
of ``bind_size`` ends in a shorter sub-vector, matched against the reference sub-vectors' first
values). Other kernel sizes are left uncompressed.

``alpha`` and ``beta`` are quantized per layer with the shared symmetric quantizer
(:func:`~memfit.compressors.quant.tanh_levels` on trainable latents, one trainable scale each,
straight-through rounding), so they train with the rest of the network; the indices are a fixed
buffer. The reference kernels are read from the reference layer's weight at every forward: they
are that layer's parameter (tied, and trained by both uses) and are stored once, with the
uncompressed layer, never in a generator's packed form.

Per kernel or sub-vector the packed form takes ``index_bits(#reference kernels) + alpha_bits +
beta_bits`` bits (22 instead of 288 for a 3x3 kernel with a 48-kernel reference and 8-bit alpha and
beta, 13x), plus two float32 scales per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import CompressConfig, Field, Method, WeightGenerator
from .bits import index_bits, pack_bits, unpack_bits
from .quant import dequantize, latent_for_levels, max_level, tanh_levels

__all__ = ["SharedConfig", "SharedGenerator", "SharedMethod", "find_reference", "match_affine"]

REFERENCE_KERNEL = (3, 3)
"""Kernel size of the reference layer and of the convs predicted kernel by kernel."""

_KERNEL_AREA = REFERENCE_KERNEL[0] * REFERENCE_KERNEL[1]
_MAX_BITS = 16  # alpha/beta levels are rebuilt from float32 latents: wider codes lose exactness
_MATCH_CHUNK = 1 << 22  # correlation entries per matching block (16 MiB of float32)


@dataclass(frozen=True)
class SharedConfig(CompressConfig):
    """Settings of the ``shared`` method.

    Attributes:
        reference: Qualified name of the 3x3 Conv2d whose kernels the other layers copy; None
            picks the model's first 3x3 Conv2d (the stem with a CIFAR stem, the first block's
            first conv behind a 7x7 ImageNet stem). It always stays uncompressed.
        alpha_bits: Bits of each kernel's quantized scale factor ``alpha`` (2 to 16).
        beta_bits: Bits of each kernel's quantized offset ``beta`` (2 to 16).
        bind_size: Length of the sub-vectors 1x1 convs and Linear rows are cut into (2 to 9: a
            reference sub-vector is the first ``bind_size`` values of a flattened 3x3 kernel).
    """

    reference: str | None = None
    alpha_bits: int = 8
    beta_bits: int = 8
    bind_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reference is not None and (not isinstance(self.reference, str) or not self.reference):
            raise ValueError(f"reference must be a layer name (non-empty str) or None, got {self.reference!r}")
        for name in ("alpha_bits", "beta_bits"):
            _check_int(name, getattr(self, name), 2, _MAX_BITS)
        _check_int("bind_size", self.bind_size, 2, _KERNEL_AREA)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")


def find_reference(model: nn.Module, reference: str | None = None) -> str:
    """Qualified name of the reference layer.

    Args:
        model: The model.
        reference: A layer name to check, or None for the first 3x3 Conv2d in module order.

    Returns:
        The reference layer's qualified name.

    Raises:
        ValueError: If the named layer is missing or not a 3x3 Conv2d, or the model has none.
    """
    if reference is None:
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == REFERENCE_KERNEL:
                return name
        raise ValueError("the model has no 3x3 Conv2d to serve as the shared method's reference")
    try:
        module = model.get_submodule(reference)
    except AttributeError:
        raise ValueError(f"reference {reference!r} is not a submodule of the model") from None
    if not isinstance(module, nn.Conv2d) or tuple(module.kernel_size) != REFERENCE_KERNEL:
        raise ValueError(f"reference {reference!r} must be a 3x3 Conv2d, got {module}")
    return reference


def match_affine(targets: torch.Tensor, refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best reference for each target row and the least-squares fit ``target ~ alpha * ref + beta``.

    The reference with the largest ``|Pearson correlation|`` is the one with the smallest
    least-squares residual (the residual is ``||t - mean(t)||^2 * (1 - corr^2)``). A constant
    target gets ``alpha = 0``; a constant reference is never better than any other.

    Args:
        targets: ``[N, d]`` rows to approximate.
        refs: ``[K, d]`` candidate rows.

    Returns:
        ``(indices [N] int64, alpha [N], beta [N])``.
    """
    refs = refs.detach()
    targets = targets.detach()
    ref_mean = refs.mean(1)
    ref_centered = refs - ref_mean[:, None]
    ref_sq = (ref_centered * ref_centered).sum(1)
    usable = ref_sq > 0
    # A unit-norm centred reference makes |t_c . r_hat| proportional to |corr| within a row.
    ref_unit = torch.where(usable[:, None], ref_centered / ref_sq.clamp_min(1e-30).sqrt()[:, None], 0.0)
    chunk = max(1, _MATCH_CHUNK // max(refs.shape[0], 1))
    indices, alphas = [], []
    for start in range(0, max(targets.shape[0], 1), chunk):
        t = targets[start : start + chunk]
        t_centered = t - t.mean(1, keepdim=True)
        idx = (t_centered @ ref_unit.T).abs().argmax(1)
        dot = (t_centered * ref_centered[idx]).sum(1)
        alphas.append(torch.where(usable[idx], dot / ref_sq[idx].clamp_min(1e-30), 0.0))
        indices.append(idx)
    index, alpha = torch.cat(indices), torch.cat(alphas)
    beta = targets.mean(1) - alpha * ref_mean[index]
    return index, alpha, beta


def _quantize_init(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric levels of ``values`` with the max-magnitude scale: ``(levels, scale)``."""
    scale = values.abs().max()
    levels = torch.round(values / scale.clamp_min(1e-30) * max_level(bits)).clamp(-max_level(bits), max_level(bits))
    return levels, scale


class SharedGenerator(WeightGenerator):
    """A layer's weight as quantized affine copies of a reference layer's kernels.

    A 3x3 conv weight ``[Co, Ci, 3, 3]`` is ``Co * Ci`` kernels; a 1x1 conv ``[Co, Ci, 1, 1]`` or a
    Linear ``[Co, Ci]`` is ``Co * ceil(Ci / bind_size)`` sub-vectors. Each one is
    ``alpha * R[index] + beta`` with ``R`` read from the reference layer's weight at every forward.

    The generator refers to the reference Conv2d without registering it as a submodule: its
    parameters, state dict and packed form hold only its own compact fields, and torch.fx finds
    the reference weight under the reference layer's own name (``get_attr``) when the whole model
    is traced.

    Attributes:
        reference_name: Qualified name of the reference layer in the model.
        kind: ``"kernel"`` (3x3 conv) or ``"vector"`` (1x1 conv or Linear).
        alpha_bits: Bits of each ``alpha`` level.
        beta_bits: Bits of each ``beta`` level.
        bind_size: Sub-vector length of the ``"vector"`` kind.
        num_refs: Number of reference kernels (what an index can name).
        alpha_latent: Trainable latents whose :func:`tanh_levels` are the ``alpha`` levels.
        beta_latent: Same for ``beta``.
        alpha_scale: Trainable per-layer scale of ``alpha``.
        beta_scale: Trainable per-layer scale of ``beta``.
        indices: Buffer of reference-kernel indices, fixed while training.
    """

    method = "shared"
    indices: torch.Tensor  # a buffer (nn.Module's __getattr__ would type it Tensor | Module)

    def __init__(
        self,
        shape: tuple[int, ...],
        reference: nn.Module,
        reference_name: str,
        *,
        alpha_bits: int = 8,
        beta_bits: int = 8,
        bind_size: int = 8,
    ) -> None:
        """Make a generator with zero codes; :meth:`project_` or :meth:`unpack` fill it.

        Args:
            shape: The generated weight's shape: ``[Co, Ci, 3, 3]``, ``[Co, Ci, 1, 1]`` or ``[Co, Ci]``.
            reference: The reference 3x3 Conv2d (its weight is read at every forward).
            reference_name: Its qualified name in the model, stored in the packed form.
            alpha_bits: Bits of ``alpha`` (2 to 16).
            beta_bits: Bits of ``beta`` (2 to 16).
            bind_size: Sub-vector length for 1x1 convs and Linear layers (2 to 9).

        Raises:
            ValueError: On a shape that is neither 3x3, 1x1 nor 2-D, a reference that is not a
                3x3 Conv2d, or bit widths out of range.
        """
        super().__init__(shape)
        _check_int("alpha_bits", alpha_bits, 2, _MAX_BITS)
        _check_int("beta_bits", beta_bits, 2, _MAX_BITS)
        _check_int("bind_size", bind_size, 2, _KERNEL_AREA)
        if not isinstance(reference, nn.Conv2d) or tuple(reference.kernel_size) != REFERENCE_KERNEL:
            raise ValueError(f"the reference must be a 3x3 Conv2d, got {reference}")
        if len(self.shape) == 4 and self.shape[2:] == REFERENCE_KERNEL:
            self.kind = "kernel"
            count = self.shape[0] * self.shape[1]
        elif len(self.shape) == 2 or (len(self.shape) == 4 and self.shape[2:] == (1, 1)):
            self.kind = "vector"
            count = self.shape[0] * math.ceil(self.shape[1] / bind_size)
        else:
            raise ValueError(f"the shared method predicts 3x3 and 1x1 convs and Linear weights, not shape {self.shape}")
        self.reference_name = reference_name
        self.alpha_bits, self.beta_bits, self.bind_size = alpha_bits, beta_bits, bind_size
        self.num_refs = reference.weight.shape[0] * reference.weight.shape[1]
        # A tuple keeps nn.Module from registering the reference as a submodule of this generator.
        self._reference: tuple[nn.Conv2d] = (reference,)
        device, dtype = reference.weight.device, reference.weight.dtype
        self.alpha_latent = nn.Parameter(torch.zeros(count, device=device, dtype=dtype))
        self.beta_latent = nn.Parameter(torch.zeros(count, device=device, dtype=dtype))
        self.alpha_scale = nn.Parameter(torch.zeros((), device=device, dtype=dtype))
        self.beta_scale = nn.Parameter(torch.zeros((), device=device, dtype=dtype))
        self.register_buffer("indices", torch.zeros(count, dtype=torch.long, device=reference.weight.device))

    @property
    def reference(self) -> nn.Conv2d:
        """The reference layer (not a submodule: it belongs to the model)."""
        return self._reference[0]

    @property
    def count(self) -> int:
        """Number of stored kernels or sub-vectors."""
        return int(self.indices.numel())

    def _reference_rows(self, weight: torch.Tensor) -> torch.Tensor:
        rows = weight.reshape(-1, _KERNEL_AREA)
        return rows if self.kind == "kernel" else rows[:, : self.bind_size]

    def _alpha_levels(self) -> torch.Tensor:
        return tanh_levels(self.alpha_latent, self.alpha_bits)

    def _beta_levels(self) -> torch.Tensor:
        return tanh_levels(self.beta_latent, self.beta_bits)

    def forward(self) -> torch.Tensor:
        """The weight: ``alpha * R[indices] + beta`` per kernel or sub-vector, shaped ``self.shape``."""
        refs = self._reference_rows(self.reference.weight)
        alpha = dequantize(self._alpha_levels(), self.alpha_scale, self.alpha_bits)
        beta = dequantize(self._beta_levels(), self.beta_scale, self.beta_bits)
        return self._assemble(alpha[:, None] * torch.index_select(refs, 0, self.indices) + beta[:, None])

    @torch.no_grad()
    def project_(self, weight: torch.Tensor | None = None) -> SharedGenerator:
        """Fit indices, ``alpha``, ``beta`` and their scales to a dense weight (in place).

        ``alpha`` is fitted and quantized first; ``beta`` is then refitted against the quantized
        ``alpha`` before being quantized itself, so the offset absorbs part of alpha's rounding.

        Args:
            weight: The weight to approximate, shaped ``self.shape``; None re-projects the current
                generated weight onto the current reference (the seed's between-epoch re-matching).

        Returns:
            ``self``.

        Raises:
            ValueError: If ``weight`` does not have the generator's shape.
        """
        target = (self() if weight is None else weight).detach().to(self.alpha_latent)
        if tuple(target.shape) != self.shape:
            raise ValueError(f"weight shape {tuple(target.shape)} does not match the generator's {self.shape}")
        refs = self._reference_rows(self.reference.weight.detach())
        fits = [match_affine(rows, candidates) for rows, candidates in self._split(target, refs)]
        index = self._merge([f[0] for f in fits])
        alpha_levels, alpha_scale = _quantize_init(self._merge([f[1] for f in fits]), self.alpha_bits)
        alpha_q = dequantize(alpha_levels, alpha_scale, self.alpha_bits)
        beta_levels, beta_scale = _quantize_init(self._mean_residual(target, alpha_q, index, refs), self.beta_bits)
        self.indices.copy_(index)
        self.alpha_latent.copy_(latent_for_levels(alpha_levels, self.alpha_bits))
        self.beta_latent.copy_(latent_for_levels(beta_levels, self.beta_bits))
        self.alpha_scale.copy_(alpha_scale)
        self.beta_scale.copy_(beta_scale)
        return self

    def _split(self, target: torch.Tensor, refs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Rows to match, each part with its candidate references. A row of a 1x1/Linear weight
        whose length is not a multiple of ``bind_size`` ends in a short sub-vector, matched against
        the references' first values only: the rest of what it generates is cut off."""
        if self.kind == "kernel":
            return [(target.reshape(-1, _KERNEL_AREA), refs)]
        matrix = target.reshape(self.shape[0], self.shape[1])
        full, tail = divmod(self.shape[1], self.bind_size)
        parts = []
        if full:
            parts.append((matrix[:, : full * self.bind_size].reshape(-1, self.bind_size), refs))
        if tail:
            parts.append((matrix[:, full * self.bind_size :], refs[:, :tail]))
        return parts

    def _merge(self, values: list[torch.Tensor]) -> torch.Tensor:
        """Per-part values (from :meth:`_split`) in storage order: row-major over ``[Co, groups]``."""
        if self.kind == "kernel":
            return values[0]
        return torch.cat([v.reshape(self.shape[0], -1) for v in values], 1).reshape(-1)

    def _mean_residual(
        self, target: torch.Tensor, alpha: torch.Tensor, index: torch.Tensor, refs: torch.Tensor
    ) -> torch.Tensor:
        """Least-squares ``beta`` given ``alpha``: the mean of ``target - alpha * R[index]`` over the
        values each kernel or sub-vector actually generates."""
        residual = target - self._assemble(alpha[:, None] * refs[index])
        if self.kind == "kernel":
            return residual.reshape(-1, _KERNEL_AREA).mean(1)
        co, ci = self.shape[0], self.shape[1]
        groups = self.count // co
        padded = torch.zeros(co, groups * self.bind_size, dtype=residual.dtype, device=residual.device)
        padded[:, :ci] = residual.reshape(co, ci)
        sizes = torch.full((groups,), float(self.bind_size), dtype=residual.dtype, device=residual.device)
        sizes[-1] = ci - (groups - 1) * self.bind_size
        return (padded.reshape(co, groups, self.bind_size).sum(2) / sizes).reshape(-1)

    def _assemble(self, rows: torch.Tensor) -> torch.Tensor:
        """Generated rows (one per kernel or sub-vector) laid out as the weight."""
        if self.kind == "vector":
            rows = rows.reshape(self.shape[0], -1)[:, : self.shape[1]]
        return rows.reshape(self.shape)

    def storage(self) -> list[Field]:
        """Indices, ``alpha`` and ``beta`` levels per kernel or sub-vector, two float32 scales."""
        return [
            Field("indices", self.count, index_bits(self.num_refs)),
            Field("alpha", self.count, self.alpha_bits),
            Field("beta", self.count, self.beta_bits),
            Field("alpha_scale", 1, 32),
            Field("beta_scale", 1, 32),
        ]

    def pack(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Indices and offset levels packed with :func:`pack_bits`, scales as float32; the
        reference kernels are not included (they are stored with the reference layer)."""
        meta = {
            "reference": self.reference_name,
            "shape": list(self.shape),
            "num_refs": self.num_refs,
            "alpha_bits": self.alpha_bits,
            "beta_bits": self.beta_bits,
            "bind_size": self.bind_size,
        }
        with torch.no_grad():
            alpha = self._alpha_levels().to(torch.long) + max_level(self.alpha_bits)
            beta = self._beta_levels().to(torch.long) + max_level(self.beta_bits)
            tensors = {
                "indices": pack_bits(self.indices, index_bits(self.num_refs)),
                "alpha": pack_bits(alpha, self.alpha_bits),
                "beta": pack_bits(beta, self.beta_bits),
                "alpha_scale": self.alpha_scale.detach().to(torch.float32).reshape(1).cpu(),
                "beta_scale": self.beta_scale.detach().to(torch.float32).reshape(1).cpu(),
            }
        return meta, tensors

    @classmethod
    def unpack(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module) -> SharedGenerator:
        """Rebuild a trainable generator tied to the reference layer ``meta["reference"]`` of ``model``.

        Raises:
            ValueError: If the model's reference layer is missing, not a 3x3 Conv2d, or holds a
                different number of kernels than the packed indices were made for.
        """
        name = find_reference(model, meta["reference"])
        reference = model.get_submodule(name)
        gen = cls(
            tuple(meta["shape"]),
            reference,
            name,
            alpha_bits=int(meta["alpha_bits"]),
            beta_bits=int(meta["beta_bits"]),
            bind_size=int(meta["bind_size"]),
        )
        if gen.num_refs != int(meta["num_refs"]):
            raise ValueError(
                f"reference {name!r} has {gen.num_refs} kernels but the packed indices name {meta['num_refs']}"
            )
        n = gen.count
        index = unpack_bits(tensors["indices"], index_bits(gen.num_refs), n)
        alpha = unpack_bits(tensors["alpha"], gen.alpha_bits, n) - max_level(gen.alpha_bits)
        beta = unpack_bits(tensors["beta"], gen.beta_bits, n) - max_level(gen.beta_bits)
        with torch.no_grad():
            gen.indices.copy_(index)
            gen.alpha_latent.copy_(latent_for_levels(alpha, gen.alpha_bits))
            gen.beta_latent.copy_(latent_for_levels(beta, gen.beta_bits))
            gen.alpha_scale.copy_(tensors["alpha_scale"].reshape(()))
            gen.beta_scale.copy_(tensors["beta_scale"].reshape(()))
        return gen

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reference={self.reference_name!r}, kind={self.kind}"


class SharedMethod(Method):
    """The ``shared`` method: 3x3 and 1x1 convs and Linear layers predicted from a reference layer.

    ``skipped`` lists the reference itself and layers with kernel sizes other than 3x3 and 1x1.
    """

    name = "shared"
    config_type = SharedConfig
    generator_type = SharedGenerator

    def build(self, model: nn.Module, layers: list[str], config: CompressConfig) -> dict[str, WeightGenerator]:
        """Generators for the 3x3/1x1 convs and Linear layers among ``layers``, projected from their
        current weights onto the reference layer's kernels.

        Raises:
            TypeError: If ``config`` is not a :class:`SharedConfig`.
            ValueError: If the reference layer cannot be found (see :func:`find_reference`).
        """
        if not isinstance(config, SharedConfig):
            raise TypeError(f"the shared method needs a SharedConfig, got {type(config).__name__}")
        ref_name = find_reference(model, config.reference)
        reference = model.get_submodule(ref_name)
        self.skipped = {}
        generators: dict[str, WeightGenerator] = {}
        for name in layers:
            layer = model.get_submodule(name)
            reason = _skip_reason(name, layer, ref_name)
            if reason is not None:
                self.skipped[name] = reason
                continue
            assert isinstance(layer, (nn.Conv2d, nn.Linear))  # what _skip_reason passes
            generator = SharedGenerator(
                tuple(layer.weight.shape),
                reference,
                ref_name,
                alpha_bits=config.alpha_bits,
                beta_bits=config.beta_bits,
                bind_size=config.bind_size,
            )
            generators[name] = generator.project_(layer.weight)
        return generators


def _skip_reason(name: str, layer: nn.Module, ref_name: str) -> str | None:
    if name == ref_name:
        return "it is the shared method's reference layer: its kernels predict the others, so it stays uncompressed"
    if isinstance(layer, nn.Linear):
        return None
    if not isinstance(layer, nn.Conv2d):
        return f"{type(layer).__name__} is not a Conv2d or Linear"
    kernel = tuple(layer.kernel_size)
    if kernel in (REFERENCE_KERNEL, (1, 1)):
        return None
    return f"its {kernel[0]}x{kernel[1]} kernels are neither 3x3 (matched to reference kernels) nor 1x1"
