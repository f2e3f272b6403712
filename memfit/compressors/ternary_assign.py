"""The ternary assignment rules: which latent gets which code in ``{-1, 0, +1}``.

* EC2T (Marban et al., arXiv 2004.01077) assigns each latent ``w`` the code ``c`` minimising
  ``(w - c)**2 + lambda * I_c``, with ``I_c = -log2`` of the code's frequency in the layer.
  Distances are measured on latents and centroids divided by the layer's largest ``|latent|`` (the
  paper's per-layer normalisation; the layer keeps its own magnitude).
* TTQ (Zhu et al., arXiv 1612.01064): codes are ``+`` above ``threshold * max|latent|``, ``-``
  below its negative, ``0`` in between.

EC2T's frequencies come from the assignment itself, found in-graph at every call: the zero band
minimising distortion plus ``lambda`` times the partition's total information (the
entropy-constrained objective; see :func:`ec2t_codes`), whose frequencies then give each weight's
``I_c``. The paper carries the previous training step's frequencies instead; doing it in-graph
keeps a generator's ``forward`` free of side effects, so the weight depends only on the parameters
(the same in eval, under FakeTensorMode, when the planner recomputes it, after loading) and never
on how many forwards ran before.
"""

from __future__ import annotations

import math

import torch

__all__ = ["RULES", "ec2t_codes", "ttq_codes", "unit_for"]

RULES = ("ec2t", "ttq")

# Keeps the normalisation finite for an all-zero latent tensor.
_TINY = 2.0**-100
# Steps of EC2T's search for the zero band's edges, over [0, max|latent|].
_GRID = 128


def unit_for(magnitude: torch.Tensor) -> torch.Tensor:
    """The power of two at (or, by log2 rounding, just around) ``magnitude``. Multiplying by a
    power of two is exact, so the weight ``unit * w_p`` and the float32 scale a file stores are
    the same number, whichever power of two a loaded generator picks."""
    return torch.exp2(torch.ceil(torch.log2(magnitude.detach().float().clamp_min(_TINY))))


def _information_bits(counts: torch.Tensor, n: int) -> torch.Tensor:
    """``n * H``: total bits of ``counts`` (last dim: the three codes) under their own frequencies."""
    counts = counts.to(torch.float32)
    return n * math.log2(max(n, 1)) - torch.special.xlogy(counts, counts).sum(-1) / math.log(2)


def ec2t_codes(
    x: torch.Tensor, w_p: torch.Tensor, w_n: torch.Tensor, lam: float, shape: tuple[int, ...]
) -> torch.Tensor:
    """EC2T's assignment of latents ``x`` (shaped ``shape``) to ``{-w_n, 0, +w_p}``, int8 codes.

    Each weight takes the code minimising ``(x - c)**2 + lam * I_c`` (all over ``max|x|``), with
    ``I_c`` from the frequencies of the entropy-constrained partition found in the same call: the
    zero band whose two edges minimise distortion plus ``lam`` times the partition's total bits,
    searched on a grid of ``_GRID`` steps over ``[0, max|x|]``.

    Two choices make sparsity grow with ``lam`` rather than jump. A candidate band's distortion
    takes each side at its own mean, as the trained scales move towards it: scored with the
    current scales a wider band only costs, and the optimum jumps from the nearest-centroid band
    straight to all zeros. And the searched band is never narrower than the nearest-centroid band:
    where zero starts as a rare code (uniformly spread weights), the binary ``{-w_n, +w_p}`` code,
    one bit a weight, would otherwise win at moderate ``lam``, and the penalty would remove every
    zero. (Iterating the per-weight rule from the nearest-centroid assignment, the paper's dynamics
    without training in between, goes binary as soon as zero is the rarest code, as it is in a
    Gaussian layer.)
    """
    n = math.prod(shape)
    norm = x.abs().amax().clamp_min(_TINY)
    v = (x / norm).reshape(-1)
    p = w_p / norm
    q = w_n / norm
    # Integer histograms of |v| on each side are exact and order-independent, so the search (and
    # the weight) is deterministic even where float scatter-adds are not; bin centres stand in for
    # the values inside a bin.
    negative = (v < 0).to(torch.int64)
    bins = torch.floor(v.abs() * _GRID).clamp(max=_GRID).to(torch.int64)
    hist = negative.new_zeros(2 * (_GRID + 2)).scatter_add(0, bins + negative * (_GRID + 2), torch.ones_like(bins))
    hist = hist.reshape(2, _GRID + 2)
    # Edge k gives a side's code to its weights in bins >= k; k = _GRID + 1 gives it to none.
    edges = v.new_ones(_GRID + 2).cumsum(0) - 1
    centres = (edges + 0.5).clamp(max=_GRID) / _GRID
    at_least = hist.flip(-1).cumsum(-1).flip(-1)
    sum_at_least = (hist * centres).flip(-1).cumsum(-1).flip(-1)
    # Distortion saved by giving a side's weights beyond an edge their mean instead of zero.
    gains = sum_at_least.square() / at_least.clamp_min(1)
    gain_pos = gains[0].reshape(1, -1)
    gain_neg = gains[1].reshape(-1, 1)
    n_pos = at_least[0].reshape(1, -1).expand(_GRID + 2, -1)
    n_neg = at_least[1].reshape(-1, 1).expand(-1, _GRID + 2)
    counts = torch.stack((n - n_pos - n_neg, n_pos, n_neg), dim=-1)
    cost = lam * _information_bits(counts, n) - gain_pos - gain_neg
    wide_pos = (edges >= torch.floor(p * _GRID / 2)).reshape(1, -1)
    wide_neg = (edges >= torch.floor(q * _GRID / 2)).reshape(-1, 1)
    wide_enough = wide_pos & wide_neg
    cost = torch.where(wide_enough, cost, torch.inf)
    # index_select rather than indexing with a tensor scalar, which would need .item() on fake tensors.
    best = counts.reshape(-1, 3).index_select(0, cost.reshape(-1).argmin().reshape(1)).reshape(3)
    info = -torch.log2(best.clamp_min(1).to(torch.float32) / n)
    cost_zero = v * v + lam * info[0]
    cost_pos = (v - p) ** 2 + lam * info[1]
    cost_neg = (v + q) ** 2 + lam * info[2]
    # Ties go to zero, then to +; elementwise comparisons are much faster than an argmin over a
    # stacked dimension on CPU.
    pos = (cost_pos < cost_zero) & (cost_pos <= cost_neg)
    neg = (cost_neg < cost_zero) & (cost_neg < cost_pos)
    return (pos.to(torch.int8) - neg.to(torch.int8)).reshape(shape)


def ttq_codes(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """TTQ's assignment of latents ``x``: int8 ``+1`` above ``threshold * max|x|``, ``-1`` below
    its negative, ``0`` between."""
    delta = threshold * x.abs().amax()
    return (x > delta).to(torch.int8) - (x < -delta).to(torch.int8)
