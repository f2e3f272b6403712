"""Trained ternary weights: EC2T (entropy-constrained trained ternarization) and TTQ.

Every compressed layer keeps full-precision latent weights and two trained positive scales
``w_p`` and ``w_n``; its weight is ternary, each entry one of ``{-w_n, 0, +w_p}``.

The codes come from :mod:`~memfit.compressors.ternary_assign`: ``rule="ec2t"`` (entropy-constrained,
with ``lambda = strength * numel / numel of the largest compressed layer``, so big layers pay more
for information and become very sparse) or ``rule="ttq"`` (a threshold at ``ttq_threshold *
max|latent|``).

Gradients (as in TTQ): straight-through to the latents; ``dL/dw_p`` is the sum of ``dL/dW`` over
the ``+`` codes and ``dL/dw_n`` minus the sum over the ``-`` codes. Latents and scales are
measured in a per-layer power-of-two ``unit`` (the papers' per-layer normalisation), so an
optimizer step moves every layer by the same fraction of its range; the chain rule multiplies
those gradients by ``unit``.

Training has two phases. Phase 1 learns the assignment (the above). Phase 2,
:func:`freeze_assignment_`, stores the current codes in a buffer and sets a buffer flag; from then
on only the scales (and the rest of the network) train. ``forward`` selects with ``torch.where`` on
that flag, so a traced graph follows it (and still computes the live assignment, unused, at
every forward); :func:`unfreeze_assignment_` returns to phase 1.

Storage: the codes in the smallest of :mod:`~memfit.compressors.ternary_storage`'s formats and the two
scales as float32. Latents are training state and are not stored: a loaded generator starts in
phase 2 with the stored codes, so its weight is exactly the saved one, and its latents are
``code * scale``. Unfreezing it re-derives the assignment from those latents: TTQ gives the codes
back (unless the scales differ more than ``1 / ttq_threshold``-fold); EC2T gave them back in every
case tried, but its entropy term could move the codes of a much smaller scale to zero, which is
why loading freezes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .base import CompressConfig, Field, Method, WeightGenerator
from .ternary_assign import RULES, ec2t_codes, ttq_codes, unit_for
from .ternary_storage import FORMATS, code_formats, decode, encode, smallest_format

__all__ = [
    "FORMATS",
    "RULES",
    "TernaryConfig",
    "TernaryGenerator",
    "TernaryMethod",
    "code_formats",
    "freeze_assignment_",
    "ternary_generators",
    "ternary_sparsity",
    "unfreeze_assignment_",
]


@dataclass(frozen=True)
class TernaryConfig(CompressConfig):
    """Knobs of the ternary method.

    Attributes:
        rule: ``"ec2t"`` (entropy-constrained assignment) or ``"ttq"`` (fixed threshold).
        strength: EC2T's ``lambda`` for the largest compressed layer (others get it scaled by
            their size); 0 gives nearest-centroid ternarization. The default 0.02 leaves a
            ResNet-18's largest layers about 70% zeros (59% overall) for no measurable accuracy
            loss on a small task; 0.05 reaches 84% but empties whole layers of the last stage.
            Ignored by ``"ttq"``.
        ttq_threshold: TTQ's ``t``: codes are zero where ``|w| <= t * max|w|``. Ignored by
            ``"ec2t"``.
    """

    rule: str = "ec2t"
    strength: float = 0.02
    ttq_threshold: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise ValueError(f"strength must be a finite number >= 0, got {self.strength!r}")
        if not (math.isfinite(self.strength) and self.strength >= 0):
            raise ValueError(f"strength must be a finite number >= 0, got {self.strength!r}")
        if isinstance(self.ttq_threshold, bool) or not isinstance(self.ttq_threshold, (int, float)):
            raise ValueError(f"ttq_threshold must be a number in [0, 1), got {self.ttq_threshold!r}")
        if not 0 <= self.ttq_threshold < 1:
            raise ValueError(f"ttq_threshold must be a number in [0, 1), got {self.ttq_threshold!r}")


class TernaryGenerator(WeightGenerator):
    """A ternary weight ``{-w_n, 0, +w_p}`` assigned from trainable latents (see the module doc).

    Latents and scales are kept in units of ``unit``, a power of two at or above the layer's
    largest magnitude (the papers' per-layer normalisation), so an optimizer step is the same
    fraction of every layer's range; the weight is ``unit * code value``, and gradients follow the
    chain rule (``dL/dw_p = unit * sum of dL/dW over the + codes``).

    Attributes:
        rule: ``"ec2t"`` or ``"ttq"``.
        lam: EC2T's ``lambda`` for this layer (already scaled by its size).
        ttq_threshold: TTQ's ``t``.
        latent: Full-precision latent weights over ``unit`` (training state, not stored).
        w_p: Scale of the ``+`` code, over ``unit``.
        w_n: Scale of the ``-`` code (the weight is ``-unit * w_n``), over ``unit``.
        unit: Power-of-two buffer the parameters are measured in.
        frozen: Bool buffer; when set, ``forward`` uses ``frozen_codes`` (phase 2).
        frozen_codes: Int8 buffer of the codes frozen by :func:`freeze_assignment_`.
    """

    method: ClassVar[str] = "ternary"
    codebook_size: ClassVar[int | None] = 2
    # buffers (nn.Module's __getattr__ would type them Tensor | Module)
    unit: torch.Tensor
    frozen: torch.Tensor
    frozen_codes: torch.Tensor

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        rule: str = "ec2t",
        lam: float = 0.0,
        ttq_threshold: float = 0.05,
        device: torch.device | str | None = None,
    ) -> None:
        """Zero latents, unit scales and ``unit = 1``; :meth:`from_weight` projects a trained weight.

        Args:
            shape: Shape of the weight.
            rule: ``"ec2t"`` or ``"ttq"``.
            lam: EC2T's ``lambda`` for this layer, >= 0.
            ttq_threshold: TTQ's ``t``, in [0, 1).
            device: Where its parameters and buffers live.

        Raises:
            ValueError: On an invalid option.
        """
        super().__init__(shape)
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if not 0 <= ttq_threshold < 1:
            raise ValueError(f"ttq_threshold must be in [0, 1), got {ttq_threshold!r}")
        self.rule = rule
        self.lam = float(lam)
        self.ttq_threshold = float(ttq_threshold)
        self.latent = nn.Parameter(torch.zeros(self.shape, device=device))
        self.w_p = nn.Parameter(torch.ones((), device=device))
        self.w_n = nn.Parameter(torch.ones((), device=device))
        self.register_buffer("unit", torch.ones((), device=device))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("frozen_codes", torch.zeros(self.shape, dtype=torch.int8, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, **options: Any) -> TernaryGenerator:
        """Project a trained weight: latents are the weight, scales the mean magnitude of its
        positive and of its negative entries (EC2T's and efficientCNNs' initialisation).

        Args:
            weight: The layer's current weight.
            **options: ``rule``, ``lam``, ``ttq_threshold`` (see ``__init__``).
        """
        gen = cls(tuple(weight.shape), device=weight.device, **options)
        w = weight.detach().float()
        unit = unit_for(w.abs().amax())
        gen.unit.copy_(unit)
        gen.latent.data = w / unit
        # Masked sums rather than boolean indexing keep shapes static (the build may run on fake
        # tensors); a layer with no entry of one sign still gets a usable centroid.
        for scale, part in ((gen.w_p, w.clamp_min(0)), (gen.w_n, (-w).clamp_min(0))):
            count = (part > 0).sum()
            mean = part.sum() / count.clamp_min(1)
            scale.data = torch.where(count > 0, mean, w.abs().mean()) / unit
        return gen

    def _assign(self) -> torch.Tensor:
        """The codes the rule gives the current latents and scales (int8, no gradient)."""
        x = self.latent.detach()
        if self.rule == "ttq":
            return ttq_codes(x, self.ttq_threshold)
        return ec2t_codes(x, self.w_p.detach(), self.w_n.detach(), self.lam, self.shape)

    def forward(self) -> torch.Tensor:
        """The ternary weight; gradients reach the latents (straight through, phase 1 only) and
        the scales (sum of the weight's gradient over each scale's codes)."""
        codes = torch.where(self.frozen, self.frozen_codes, self._assign())
        values = torch.where(codes == 1, self.w_p, torch.where(codes == -1, -self.w_n, 0.0))
        # Exactly zero in value, so the weight is bit-exact; the identity gradient is the STE.
        straight_through = self.latent - self.latent.detach()
        return self.unit * (values + torch.where(self.frozen, 0.0, straight_through))

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The codes ``forward`` uses now, int8 in ``{-1, 0, 1}``."""
        return torch.where(self.frozen, self.frozen_codes, self._assign())

    @torch.no_grad()
    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The magnitudes of the ``+`` and ``-`` weights, exactly as ``forward`` produces them."""
        return self.unit * self.w_p, self.unit * self.w_n

    def sparsity(self) -> float:
        """Fraction of zero codes."""
        return 1.0 - self.density()

    def density(self) -> float:
        """Fraction of nonzero codes."""
        return int(torch.count_nonzero(self.codes())) / max(math.prod(self.shape), 1)

    @property
    def storage_format(self) -> str:
        """The format :meth:`pack` uses for the current codes: the smallest of :data:`FORMATS`."""
        return smallest_format(self.codes())[0]

    def storage(self) -> list[Field]:
        """The fields of the smallest format for the current codes, plus two float32 scales."""
        return smallest_format(self.codes())[1] + [Field("scales", 2, 32)]

    def pack(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The current codes in the smallest format and the scales as float32 ``[w_p, w_n]``
        (absolute, ``unit`` applied)."""
        codes = self.codes()
        fmt, _ = smallest_format(codes)
        meta = {
            "format": fmt,
            "shape": list(self.shape),
            "nnz": int(torch.count_nonzero(codes)),
            "rule": self.rule,
            "lam": self.lam,
            "ttq_threshold": self.ttq_threshold,
        }
        tensors = encode(codes, fmt)
        tensors["scales"] = torch.stack(self.scales()).to(torch.float32).cpu()
        return meta, tensors

    @classmethod
    def unpack(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module) -> TernaryGenerator:
        """A phase-2 (frozen) generator with the stored codes and scales; latents ``code * scale``.

        ``unit`` is rederived from the larger scale, as :meth:`from_weight` derives it from the
        latents' largest magnitude; being a power of two, the weight is the stored scales exactly.

        Raises:
            ValueError: On unknown formats or tensors that do not match ``meta``.
        """
        fmt = meta.get("format")
        if fmt not in FORMATS:
            raise ValueError(f"unknown ternary storage format {fmt!r}; expected one of {FORMATS}")
        shape = tuple(int(s) for s in meta["shape"])
        scales = tensors["scales"]
        if scales.shape != (2,) or scales.dtype != torch.float32:
            raise ValueError(f"ternary scales must be 2 float32 values, got {scales.dtype} {list(scales.shape)}")
        codes = decode(fmt, shape, int(meta["nnz"]), tensors)
        gen = cls(shape, rule=meta["rule"], lam=float(meta["lam"]), ttq_threshold=float(meta["ttq_threshold"]))
        with torch.no_grad():
            gen.unit.copy_(unit_for(scales.abs().amax()))
            gen.w_p.copy_(scales[0] / gen.unit)
            gen.w_n.copy_(scales[1] / gen.unit)
            gen.latent.copy_(torch.where(codes == 1, gen.w_p, torch.where(codes == -1, -gen.w_n, 0.0)))
            gen.frozen_codes.copy_(codes)
            gen.frozen.fill_(True)
        return gen

    def extra_repr(self) -> str:
        return f"rule={self.rule}, lam={self.lam:.4g}, " + super().extra_repr()


def ternary_generators(model: nn.Module) -> list[TernaryGenerator]:
    """Every :class:`TernaryGenerator` among ``model``'s submodules (a compressed model keeps its
    generators as submodules; a graph traced with the generators inlined holds only their tensors,
    and the functions below then find nothing)."""
    return [m for m in model.modules() if isinstance(m, TernaryGenerator)]


def _require_generators(model: nn.Module) -> list[TernaryGenerator]:
    gens = ternary_generators(model)
    if not gens:
        raise ValueError(f"{type(model).__name__} has no ternary-compressed layers")
    return gens


def freeze_assignment_(model: nn.Module) -> int:
    """Phase 2: store every ternary layer's current codes and use them from now on.

    Only the scales (and the rest of the network) keep training. The state lives in buffers that
    are updated in place, so a traced graph sharing them follows.

    Returns:
        The number of ternary layers frozen.

    Raises:
        ValueError: If ``model`` has no ternary layer.
    """
    gens = _require_generators(model)
    for gen in gens:
        with torch.no_grad():
            gen.frozen_codes.copy_(gen.codes())
            gen.frozen.fill_(True)
    return len(gens)


def unfreeze_assignment_(model: nn.Module) -> int:
    """Back to phase 1: every ternary layer reassigns its codes from its latents at each forward.

    Returns:
        The number of ternary layers unfrozen.

    Raises:
        ValueError: If ``model`` has no ternary layer.
    """
    gens = _require_generators(model)
    for gen in gens:
        gen.frozen.fill_(False)
    return len(gens)


def ternary_sparsity(model: nn.Module) -> float:
    """Fraction of zero codes over all ternary layers of ``model``, weighted by their size.

    Raises:
        ValueError: If ``model`` has no ternary layer.
    """
    gens = _require_generators(model)
    zeros = sum(g.sparsity() * math.prod(g.shape) for g in gens)
    return zeros / max(sum(math.prod(g.shape) for g in gens), 1)


class TernaryMethod(Method):
    """``ternary``: EC2T (or TTQ) trained ternary weights, see :class:`TernaryConfig`."""

    name: ClassVar[str] = "ternary"
    config_type: ClassVar[type[CompressConfig]] = TernaryConfig
    generator_type: ClassVar[type[WeightGenerator]] = TernaryGenerator

    def build(self, model: nn.Module, layers: list[str], config: CompressConfig) -> dict[str, WeightGenerator]:
        """Ternary generators projected from ``layers``' weights; EC2T's ``lambda`` of each is
        ``config.strength`` times its size relative to the largest of ``layers``.

        Raises:
            TypeError: If ``config`` is not a :class:`TernaryConfig` or a layer is not Conv2d/Linear.
        """
        if not isinstance(config, TernaryConfig):
            raise TypeError(f"the ternary method needs a TernaryConfig, got {type(config).__name__}")
        modules = dict(model.named_modules())
        weights: dict[str, torch.Tensor] = {}
        for name in layers:
            layer = modules.get(name)
            if not isinstance(layer, (nn.Conv2d, nn.Linear)):
                raise TypeError(f"layer {name!r} is {type(layer).__name__}; ternary compresses Conv2d and Linear")
            weights[name] = layer.weight
        largest = max((w.numel() for w in weights.values()), default=1)
        return {
            name: TernaryGenerator.from_weight(
                w,
                rule=config.rule,
                lam=config.strength * w.numel() / largest,
                ttq_threshold=config.ttq_threshold,
            )
            for name, w in weights.items()
        }
