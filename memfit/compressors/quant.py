"""The symmetric low-bit quantizer shared by the compressors, with a straight-through gradient.

Values are ``levels * (scale / L)`` with integer ``levels`` in ``[-L, L]``, ``L = 2**(bits-1) - 1``.
Training and a file loaded back compute that same expression from the same integers and scale, so
a saved model's outputs are reproduced bit for bit.
"""

from __future__ import annotations

import torch

__all__ = ["dequantize", "latent_for_levels", "max_level", "round_ste", "tanh_levels"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer; the gradient passes straight through.

    ``round(x) + (x - x.detach())`` is exactly ``round(x)`` in value (the second term is exactly
    zero), unlike ``x + (round(x) - x).detach()``, which can land one ulp off an integer.
    """
    return x.detach().round() + (x - x.detach())


def max_level(bits: int) -> int:
    """The largest level ``L`` of a symmetric ``bits``-bit code (levels are ``-L..L``)."""
    if bits < 2:
        raise ValueError(f"a symmetric quantizer needs at least 2 bits, got {bits}")
    return 2 ** (bits - 1) - 1


def tanh_levels(x: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa-style levels of a latent tensor: ``tanh`` normalised by its largest magnitude,
    scaled to ``[-L, L]`` and rounded (straight-through). Integer-valued floats."""
    t = torch.tanh(x)
    return round_ste(t / t.abs().max().clamp_min(1e-12) * max_level(bits))


def dequantize(levels: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Values of a code: ``levels * (scale / L)``; the one expression training and loading share."""
    return levels * (scale / max_level(bits))


def latent_for_levels(levels: torch.Tensor, bits: int, span: float = 0.5) -> torch.Tensor:
    """A latent tensor whose :func:`tanh_levels` are exactly ``levels`` (for loading a saved code
    back into a trainable generator). The largest level must be ``±L``, as it always is after
    normalisation; staying in tanh's near-linear range keeps rounding errors far below 0.5.

    ``span`` (in ``(0, 1)``) is ``tanh`` of the largest latent. :func:`tanh_levels` does not see it
    (it normalises by the largest magnitude), but Adam, whose steps are about ``lr`` in latent units
    whatever the gradient, crosses a level in about ``span / (L * lr)`` steps: the span sets how
    fast codes can change."""
    if not 0 < span < 1:
        raise ValueError(f"span must be in (0, 1), got {span!r}")
    return torch.atanh(levels.to(torch.float32) / max_level(bits) * span)
