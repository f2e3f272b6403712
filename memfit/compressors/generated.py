"""MLG: multi-level generation of conv/linear weights from a quantized basis (arXiv 2108.11430).

A weight ``W[Co, Ci, kh, kw]`` (``Ci`` = input channels per group; a Linear weight is ``[Co, Ci]``
with a 1x1 kernel) is generated in two levels from three low-bit factors:

- level 1, within each kernel: ``W1[o] = q(U[o]) @ q(B[o])`` turns a basis ``B[Bo, Bi, kh*kw]`` of
  ``Bi`` kernels per output basis into ``Bo`` sets of ``Ci`` kernels, ``W1[Bo, Ci, kh*kw]``;
- level 2, across kernels: ``W = q(V) @ W1`` mixes the ``Bo`` kernel sets into ``Co`` filters.

``q`` is the shared symmetric quantizer (:func:`~memfit.compressors.quant.tanh_levels` then
:func:`~memfit.compressors.quant.dequantize`): one float scale per factor, trained through a log
gain (see :class:`MLGGenerator`), a bit width per factor, straight-through gradients to the latent
tensors. Only the three codes and their scales are
stored and trained; no dense weight is kept. Generators start from a projection of the trained
weight (truncated SVDs, then least squares alternated with quantization), and
:func:`orthonormality_loss` and :func:`distillation_loss` are the two extra losses the method's
fine-tuning uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CompressConfig, Field, Method, WeightGenerator
from .bits import pack_bits, unpack_bits
from .layer import GeneratedConv2d, GeneratedLinear
from .quant import dequantize, latent_for_levels, max_level, tanh_levels

__all__ = [
    "GeneratedConfig",
    "GeneratedMethod",
    "MLGGenerator",
    "distillation_loss",
    "orthonormality_loss",
    "project_",
]

# Bits a code may take: at least 2 (a symmetric code needs -L..L with L >= 1); at most 16 so a
# float32 latent still reproduces every level exactly (latent_for_levels' rounding error grows with L).
_MIN_BITS, _MAX_BITS = 2, 16
# Rounds of alternating least squares in the projection: the real-valued fit (it converges
# slowly, but most of the gain comes in the first 20) and the re-quantization rounds.
_FIT_ROUNDS = 20
_POLISH_ROUNDS = 3
# Clipping ratios (of the largest magnitude) tried when fitting a code to a real factor.
_CLIP_RATIOS = torch.linspace(0.25, 1.0, 16, dtype=torch.float64)
# tanh of a factor's largest latent (see latent_for_levels). At 0.5, a 3-bit code sat 0.17 latent
# units from its next level, 170 Adam steps at 1e-3: a plain loop after compression (8 epochs of
# digits, 184 steps) barely moved the codes and ended 1.1-2.2 points below the uncompressed model
# trained as long on seeds 0, 3, 4 (measured); at 0.15 the same loop was within 0.3 points of it.
_LATENT_SPAN = 0.15
_SCALE_NAMES = ("basis_scale", "coeff_in_scale", "coeff_out_scale")
_GAIN_NAMES = ("basis_log_gain", "coeff_in_log_gain", "coeff_out_log_gain")


@dataclass(frozen=True)
class GeneratedConfig(CompressConfig):
    """Knobs of the ``generated`` (MLG) method; the defaults are the seed's best point.

    Attributes:
        base_in: ``Bi``, basis kernels per output basis (level 1). Clamped per layer to
            ``min(base_in, kh*kw, Ci)``.
        base_out: ``Bo``, output bases (level 2). Clamped per layer to ``min(base_out, Co, Ci*kh*kw)``.
        basis_bits: Bits of each basis value ``B``.
        coeff_in_bits: Bits of each input-side coefficient ``U``.
        coeff_out_bits: Bits of each output-side coefficient ``V``.
    """

    base_in: int = 2
    base_out: int = 44
    basis_bits: int = 3
    coeff_in_bits: int = 6
    coeff_out_bits: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("base_in", "base_out"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("basis_bits", "coeff_in_bits", "coeff_out_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not _MIN_BITS <= value <= _MAX_BITS:
                raise ValueError(f"{name} must be an int in {_MIN_BITS}..{_MAX_BITS}, got {value!r}")


def _fit_code(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric ``bits``-bit code closest to ``x`` (float64): integer levels and a scale.

    Tries clipping at fractions of the largest magnitude and keeps the least-squares scale of the
    best. The largest magnitude always lands on ``±L``, as :func:`tanh_levels` produces, so
    :func:`latent_for_levels` gives a latent reproducing the levels exactly.
    """
    top = max_level(bits)
    peak = x.abs().max()
    if peak == 0:
        return torch.zeros_like(x), torch.zeros((), dtype=x.dtype, device=x.device)
    flat = x.reshape(1, -1)
    ratios = _CLIP_RATIOS.to(x.device)[:, None]
    levels = (flat / (ratios * peak) * top).round().clamp(-top, top)
    scales = (flat * levels).sum(1, keepdim=True) / levels.square().sum(1, keepdim=True) * top
    best = (flat - levels * (scales / top)).square().sum(1).argmin()
    return levels[best].reshape(x.shape), scales[best, 0]


def _quantized(x: torch.Tensor, bits: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``x``'s best code, ``(levels, scale)``, and the values it stands for."""
    levels, scale = _fit_code(x, bits)
    return (levels, scale), levels * (scale / max_level(bits))


# The projection's least-squares steps. ``target`` is the weight as [Co, Ci, K] (K = kh*kw),
# ``v`` [Co, Bo], ``u`` [Bo, Ci, Bi], ``b`` [Bo, Bi, K], all float64; each step solves the normal
# equations of ``target ~ _product(v, u, b)`` in one factor, never forming the full design matrix.


def _product(v: torch.Tensor, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (v @ torch.bmm(u, b).flatten(1)).reshape(v.shape[0], u.shape[1], -1)


def _error(target: torch.Tensor, v: torch.Tensor, u: torch.Tensor, b: torch.Tensor) -> float:
    return (target - _product(v, u, b)).square().sum().item()


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``gram^-1 @ rhs`` with a tiny ridge, which keeps the system solvable when a quantized
    factor is rank-deficient (a code column rounded to zero)."""
    ridge = 1e-10 * gram.diagonal().mean().clamp_min(1e-300)
    return torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), rhs)


def _solve_v(target: torch.Tensor, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    kernels = torch.bmm(u, b).flatten(1)
    return _solve(kernels @ kernels.t(), kernels @ target.flatten(1).t()).t()


def _solve_u(target: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    bo, bi, _ = b.shape
    gram = torch.einsum("op,ojt,pkt->ojpk", v.t() @ v, b, b).reshape(bo * bi, bo * bi)
    mixed = (v.t() @ target.flatten(1)).reshape(bo, target.shape[1], -1)
    rhs = torch.einsum("ojt,oit->oji", b, mixed).reshape(bo * bi, -1)
    return _solve(gram, rhs).reshape(bo, bi, -1).transpose(1, 2)


def _solve_b(target: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    bo, _, bi = u.shape
    gram = torch.einsum("op,oij,pik->ojpk", v.t() @ v, u, u).reshape(bo * bi, bo * bi)
    mixed = (v.t() @ target.flatten(1)).reshape(bo, target.shape[1], -1)
    rhs = torch.einsum("oij,oit->ojt", u, mixed).reshape(bo * bi, -1)
    return _solve(gram, rhs).reshape(bo, bi, -1)


def _unit_columns(v: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same product, ``v``'s columns of unit norm (``u`` takes the norms)."""
    norms = v.norm(dim=0).clamp_min(1e-30)
    return v / norms, u * norms[:, None, None]


def _orthonormal_rows(u: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same product, each ``b[o]``'s rows orthonormal (``u[o]`` takes the triangular factor)."""
    q, r = torch.linalg.qr(b.transpose(1, 2))
    return u @ r.transpose(1, 2), q.transpose(1, 2)


class MLGGenerator(WeightGenerator):
    """Generates one weight as ``q(V) @ (q(U) @ q(B))`` (see the module docstring).

    ``Bo`` and ``Bi`` are clamped to the ranks of the matrices they factorise: ``Bo <= min(Co,
    Ci*kh*kw)`` and ``Bi <= min(kh*kw, Ci)``. Beyond those ranks more bases store more bits without
    representing anything new (a Linear or 1x1 conv has ``Bi = 1``, a depthwise conv ``Bi = 1`` and
    ``Bo <= kh*kw``).

    Parameters: the latents ``basis`` ``[Bo, Bi, kh, kw]``, ``coeff_in`` ``[Bo, Ci, Bi]`` and
    ``coeff_out`` ``[Co, Bo]`` (their :func:`tanh_levels` are the stored codes) and one log gain
    each (``basis_log_gain``, ...). A factor's scale is its buffer ``*_scale`` (set by the
    projection or a loaded file) times ``exp(*_log_gain)``. The weight's magnitude is the product
    of the three scales alone (the levels are normalised), and a BatchNorm after the layer makes
    the loss blind to it, so a plain scale parameter gets almost no gradient and Adam, whose steps
    are a fixed size whatever the gradient, walks it by ``lr`` per step: at 3e-3 a deep layer's
    0.17 reached 0.0005 in 90 steps, the layer's output collapsed faster than BatchNorm's running
    statistics could follow, and the model fell to chance in eval mode. In log space a step moves
    the scale by a fraction ``lr`` of itself and never through zero.

    Args:
        shape: The weight's shape, ``[Co, Ci, kh, kw]`` or ``[Co, Ci]``.
        base_in: Requested ``Bi``.
        base_out: Requested ``Bo``.
        basis_bits: Bits of ``B``.
        coeff_in_bits: Bits of ``U``.
        coeff_out_bits: Bits of ``V``.
    """

    method = "generated"

    def __init__(
        self,
        shape: tuple[int, ...],
        base_in: int,
        base_out: int,
        basis_bits: int,
        coeff_in_bits: int,
        coeff_out_bits: int,
    ) -> None:
        super().__init__(shape)
        if len(self.shape) not in (2, 4):
            raise ValueError(f"MLG generates conv [Co, Ci, kh, kw] or linear [Co, Ci] weights, got shape {self.shape}")
        self.out_channels, self.in_channels = self.shape[:2]
        self.kernel = self.shape[2:] if len(self.shape) == 4 else (1, 1)
        kk = self.kernel[0] * self.kernel[1]
        self.base_in = min(base_in, kk, self.in_channels)
        self.base_out = min(base_out, self.out_channels, self.in_channels * kk)
        self.bits = {"basis": basis_bits, "coeff_in": coeff_in_bits, "coeff_out": coeff_out_bits}
        bo, bi = self.base_out, self.base_in
        self.basis = nn.Parameter(torch.zeros(bo, bi, *self.kernel))
        self.coeff_in = nn.Parameter(torch.zeros(bo, self.in_channels, bi))
        self.coeff_out = nn.Parameter(torch.zeros(self.out_channels, bo))
        for scale, gain in zip(_SCALE_NAMES, _GAIN_NAMES, strict=True):
            self.register_buffer(scale, torch.ones(()))
            setattr(self, gain, nn.Parameter(torch.zeros(())))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The quantized factors ``q(B)`` ``[Bo, Bi, kh*kw]``, ``q(U)`` ``[Bo, Ci, Bi]`` and
        ``q(V)`` ``[Co, Bo]``, differentiable (straight-through) in latents and scales."""
        b = self._dequantized("basis").reshape(self.base_out, self.base_in, -1)
        return b, self._dequantized("coeff_in"), self._dequantized("coeff_out")

    def forward(self) -> torch.Tensor:
        """The weight, shaped ``self.shape``."""
        b, u, v = self.factors()
        kernels = torch.bmm(u, b).reshape(self.base_out, -1)
        return (v @ kernels).reshape(self.shape)

    def _scale(self, name: str) -> torch.Tensor:
        """A factor's current scale; exactly the buffer while the gain is 0 (``exp(0) == 1``), so a
        packed scale loaded back reproduces the weight bit for bit."""
        return getattr(self, f"{name}_scale") * torch.exp(getattr(self, f"{name}_log_gain"))

    def _dequantized(self, name: str) -> torch.Tensor:
        bits = self.bits[name]
        return dequantize(tanh_levels(getattr(self, name), bits), self._scale(name), bits)

    def _levels(self, name: str) -> torch.Tensor:
        """The stored integer levels of a factor, ``-L..L``."""
        with torch.no_grad():
            return tanh_levels(getattr(self, name), self.bits[name]).to(torch.int64)

    def _set_code(self, name: str, levels: torch.Tensor, scale: torch.Tensor) -> None:
        """Load a code into a factor's latent and scale (gain reset to 0), in place (optimisers
        keep their tensors)."""
        latent = getattr(self, name)
        with torch.no_grad():
            latent.copy_(latent_for_levels(levels, self.bits[name], _LATENT_SPAN).reshape(latent.shape))
            getattr(self, f"{name}_scale").copy_(scale.reshape(()))
            getattr(self, f"{name}_log_gain").zero_()

    def project_(self, weight: torch.Tensor) -> MLGGenerator:
        """Re-initialise from a dense weight: codes whose product approximates it closely.

        First a real-valued fit: ``V`` from the top ``Bo`` left singular vectors of ``W`` (as
        ``[Co, Ci*kh*kw]``), ``B[o]`` from the top ``Bi`` right singular vectors of each kernel
        set, then alternating least squares on ``V``, ``U``, ``B`` (the mixing ``V`` must be found
        jointly: the SVD's kernel sets are not of rank ``Bi``). ``V``'s columns and ``B[o]``'s rows
        are kept orthonormal, so their coarse codes spend their levels evenly, and the magnitudes
        go to ``U``, the factor with the most bits. Then ``V`` and ``B`` are quantized as fitted
        and ``U`` is re-solved against their codes before its own quantization, so it absorbs their
        rounding; a few more rounds re-solve and re-quantize each factor against the other two
        codes, and the best product is kept, its overall scale fitted by least squares.

        Args:
            weight: Dense weight of ``self.shape``.

        Returns:
            ``self``.
        """
        if tuple(weight.shape) != self.shape:
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} cannot initialise a generator of shape {self.shape}"
            )
        bo, bi = self.base_out, self.base_in
        target = weight.detach().to(torch.float64).reshape(self.out_channels, self.in_channels, -1)
        if not target.any():  # the least squares are singular; zero codes are exact
            for name in self.bits:
                self._set_code(name, torch.zeros(getattr(self, name).shape, dtype=torch.float64), torch.zeros(()))
            return self
        v = torch.linalg.svd(target.flatten(1), full_matrices=False)[0][:, :bo]
        kernels = (v.t() @ target.flatten(1)).reshape(bo, self.in_channels, -1)
        p, s, b = torch.linalg.svd(kernels, full_matrices=False)
        u, b = p[..., :bi] * s[:, None, :bi], b[:, :bi]
        for _ in range(_FIT_ROUNDS):
            v, u = _unit_columns(_solve_v(target, u, b), u)
            u = _solve_u(target, v, b)
            u, b = _orthonormal_rows(u, _solve_b(target, v, u))
        bits = self.bits
        v_code, v = _quantized(v, bits["coeff_out"])
        b_code, b = _quantized(b, bits["basis"])
        u_code, u = _quantized(_solve_u(target, v, b), bits["coeff_in"])
        best_err, best = _error(target, v, u, b), (v_code, b_code, u_code, v, u, b)
        for _ in range(_POLISH_ROUNDS):
            v_code, v = _quantized(_solve_v(target, u, b), bits["coeff_out"])
            b_code, b = _quantized(_solve_b(target, v, u), bits["basis"])
            u_code, u = _quantized(_solve_u(target, v, b), bits["coeff_in"])
            err = _error(target, v, u, b)
            if err < best_err:
                best_err, best = err, (v_code, b_code, u_code, v, u, b)
        v_code, b_code, (u_levels, u_scale), v, u, b = best
        approx = _product(v, u, b)
        norm = approx.square().sum()
        if norm > 0:
            u_scale = u_scale * (target * approx).sum() / norm
        self._set_code("coeff_out", *v_code)
        self._set_code("basis", *b_code)
        self._set_code("coeff_in", u_levels, u_scale)
        return self

    def storage(self) -> list[Field]:
        """The three packed codes and their float32 scales."""
        fields = [Field(name, getattr(self, name).numel(), bits) for name, bits in self.bits.items()]
        return fields + [Field(name, 1, 32) for name in _SCALE_NAMES]

    def pack(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Codes packed as unsigned ``level + L`` at their bit widths, scales as float32 scalars."""
        meta = {
            "shape": list(self.shape),
            "base_in": self.base_in,
            "base_out": self.base_out,
            "basis_bits": self.bits["basis"],
            "coeff_in_bits": self.bits["coeff_in"],
            "coeff_out_bits": self.bits["coeff_out"],
        }
        tensors = {name: pack_bits(self._levels(name) + max_level(bits), bits) for name, bits in self.bits.items()}
        for name in self.bits:
            tensors[f"{name}_scale"] = self._scale(name).detach().to(torch.float32).cpu().clone()
        return meta, tensors

    @classmethod
    def unpack(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module) -> MLGGenerator:
        """Rebuild a trainable generator producing exactly the packed one's weight (``model`` is
        not needed: everything is in the packed form)."""
        gen = cls(
            tuple(meta["shape"]),
            meta["base_in"],
            meta["base_out"],
            meta["basis_bits"],
            meta["coeff_in_bits"],
            meta["coeff_out_bits"],
        )
        if (gen.base_in, gen.base_out) != (meta["base_in"], meta["base_out"]):
            raise ValueError(
                f"packed bases (Bi, Bo) = ({meta['base_in']}, {meta['base_out']}) do not fit shape {gen.shape}"
            )
        for name, bits in gen.bits.items():
            count = getattr(gen, name).numel()
            levels = unpack_bits(tensors[name], bits, count) - max_level(bits)
            gen._set_code(name, levels, tensors[f"{name}_scale"].to(torch.float32))
        return gen


class GeneratedMethod(Method):
    """The ``generated`` method: every chosen layer's weight becomes an :class:`MLGGenerator`,
    projected from the layer's current weight."""

    name = "generated"
    config_type = GeneratedConfig
    generator_type = MLGGenerator

    def build(self, model: nn.Module, layers: list[str], config: CompressConfig) -> dict[str, WeightGenerator]:
        """One projected generator per layer, on the layer's device."""
        if not isinstance(config, GeneratedConfig):
            raise TypeError(f"the generated method needs a GeneratedConfig, got {type(config).__name__}")
        built: dict[str, WeightGenerator] = {}
        for name in layers:
            weight = _weight(model, name)
            gen = MLGGenerator(
                tuple(weight.shape),
                config.base_in,
                config.base_out,
                config.basis_bits,
                config.coeff_in_bits,
                config.coeff_out_bits,
            ).to(weight.device)
            built[name] = gen.project_(weight)
        return built


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of the layer ``name`` of ``model``."""
    weight = model.get_submodule(name).weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}.weight is a {type(weight).__name__}, not a tensor")
    return weight


def _generated_layers(model: nn.Module) -> dict[str, MLGGenerator]:
    """MLG generators of a model, by the name of the layer they generate the weight of."""
    return {
        name: m.generator
        for name, m in model.named_modules()
        if isinstance(m, (GeneratedConv2d, GeneratedLinear)) and isinstance(m.generator, MLGGenerator)
    }


def _gram_penalty(rows: torch.Tensor) -> torch.Tensor:
    """``sum ||R R^T - I||^2`` over a batch of matrices ``R[n, r, c]`` (``r <= c``), each first
    scaled to mean squared row norm 1: per-tensor scales and each basis's magnitude are free
    (trained scales and ``U`` carry them), what is penalised is correlated or unequal rows."""
    r = rows.shape[1]
    norm = rows.square().sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    unit = rows * torch.sqrt(r / norm)
    eye = torch.eye(r, dtype=rows.dtype, device=rows.device)
    return (unit @ unit.transpose(1, 2) - eye).square().sum()


def orthonormality_loss(model: nn.Module) -> torch.Tensor:
    """The seed's orthonormality regulariser, summed over the model's MLG generators.

    Each quantized factor, reshaped so its rows are the vectors meant to be orthonormal, adds
    ``||F F^T - I||^2``: the ``Bi`` basis kernels of each output basis (``B[o]``, ``[Bi, kh*kw]``),
    the ``Bi`` coefficient vectors of each output basis (``U[o]^T``, ``[Bi, Ci]``) and the ``Bo``
    output-side coefficient vectors (``V^T``, ``[Bo, Co]``). Each matrix is first normalised to mean
    squared row norm 1, so the loss does not fight the trained scales. Add it to the task loss with
    a small weight (``1e-4`` to ``1e-3``).

    Args:
        model: A model compressed with the ``generated`` method.

    Returns:
        A scalar tensor (zero if the model has no MLG generator), differentiable in the latents.
    """
    terms = []
    for gen in _generated_layers(model).values():
        b, u, v = gen.factors()
        terms += [_gram_penalty(b), _gram_penalty(u.transpose(1, 2)), _gram_penalty(v.t().unsqueeze(0))]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Hinton knowledge distillation: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``.

    Args:
        student_logits: ``[N, classes]`` logits of the model being trained.
        teacher_logits: ``[N, classes]`` logits of the dense model (no gradient flows to it).
        labels: ``[N]`` class indices.
        temperature: Softening temperature ``T`` (> 0); ``T^2`` keeps the soft term's gradient scale.
        alpha: Weight of the soft term, in ``[0, 1]``.

    Returns:
        The scalar loss (batch mean).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits.detach() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def project_(model: nn.Module, dense: nn.Module) -> None:
    """Re-project every MLG generator of ``model`` from the weight of the same-named layer of
    ``dense`` (e.g. the uncompressed model after more training), in place.

    Args:
        model: A model compressed with the ``generated`` method.
        dense: A model holding Conv2d/Linear layers under the generated layers' names.
    """
    with torch.no_grad():
        for name, gen in _generated_layers(model).items():
            gen.project_(_weight(dense, name))
