"""Models for the command-line tests: a ``package.module:factory`` target."""

from __future__ import annotations

import torch.nn as nn


def tiny_mlp(num_classes: int = 10) -> nn.Module:
    """A two-layer MLP over flattened 1x8x8 inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))
