"""Conv2d and Linear whose weight comes from a WeightGenerator at every forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import WeightGenerator

__all__ = ["COMPRESSIBLE", "GeneratedConv2d", "GeneratedLinear", "generated_layer"]

COMPRESSIBLE = (nn.Conv2d, nn.Linear)


class GeneratedConv2d(nn.Module):
    """A Conv2d whose weight is ``generator()``; bias and hyper-parameters are the original's."""

    def __init__(self, conv: nn.Conv2d, generator: WeightGenerator) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported by compressed convs; use 'zeros'")
        self.generator = generator
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.generator(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class GeneratedLinear(nn.Module):
    """A Linear whose weight is ``generator()``."""

    def __init__(self, linear: nn.Linear, generator: WeightGenerator) -> None:
        super().__init__()
        self.generator = generator
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.generator(), self.bias)


def generated_layer(layer: nn.Module, generator: WeightGenerator) -> nn.Module:
    """The generated counterpart of a Conv2d or Linear."""
    if isinstance(layer, nn.Conv2d):
        return GeneratedConv2d(layer, generator)
    if isinstance(layer, nn.Linear):
        return GeneratedLinear(layer, generator)
    raise TypeError(f"cannot compress {type(layer).__name__}; compressible layers are Conv2d and Linear")
