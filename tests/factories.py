"""Models for the tests: ``package.module:factory`` targets for the command line, and layers that
misbehave on purpose."""

from __future__ import annotations

import torch
from torch import nn


def tiny_mlp(num_classes: int = 10) -> nn.Module:
    """A two-layer MLP over flattened 1x8x8 inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))


class Fragile(nn.Module):
    """Runs in the model but, once ``broken``, not alone: a layer calibration cannot run."""

    broken = False

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self).broken:
            raise RuntimeError("needs the rest of the model")
        return self.linear(x)


def not_a_model() -> object:
    """A factory that builds something else: the command line must refuse what it returns."""
    return [nn.Linear(64, 10)]
