"""MobileNetV2 (Sandler et al., 2018).

Channel counts are rounded to multiples of 8 as in the paper's reference
implementation; at ``width_mult=1.0`` with 1000 classes the model has
3,504,872 parameters (same as torchvision).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._options import Stem, check_positive_int, check_probability, check_stem
from .registry import register_model

__all__ = ["ConvBNReLU6", "InvertedResidual", "MobileNetV2", "make_divisible", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, first stride s) per stage.
_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without losing >10%.

    Args:
        value: The unrounded channel count.
        divisor: The multiple to round to.
        min_value: Lower bound for the result (defaults to ``divisor``).

    Returns:
        The rounded channel count.
    """
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU6."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        """Build the unit.

        Args:
            in_ch: Input channels.
            out_ch: Output channels.
            kernel_size: Square kernel size (padding keeps the size at stride 1).
            stride: Convolution stride.
            groups: Convolution groups (``in_ch`` for depthwise).
        """
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual if shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        """Build the block.

        Args:
            in_ch: Input channels.
            out_ch: Output channels.
            stride: Depthwise convolution stride (1 or 2).
            expand_ratio: Hidden width multiplier ``t`` (no expansion conv if 1).
        """
        super().__init__()
        hidden = round(in_ch * expand_ratio)
        self.use_residual: bool = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_ch, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape [B, C, H, W]."""
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 backbone + global-average-pool + dropout + linear."""

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        stem: Stem = "imagenet",
        dropout: float = 0.2,
    ) -> None:
        """Build the model.

        Args:
            num_classes: Classifier outputs.
            width_mult: Channel multiplier (channels rounded to multiples of 8;
                the last conv keeps 1280 channels for ``width_mult <= 1``).
            stem: ``"imagenet"`` (first conv stride 2) or ``"cifar"`` (first
                conv and the second stage use stride 1; total stride 8).
            dropout: Dropout probability before the classifier.

        Raises:
            ValueError: On an invalid option.
        """
        super().__init__()
        num_classes = check_positive_int("num_classes", num_classes)
        stem = check_stem(stem)
        dropout = check_probability("dropout", dropout)
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or width_mult <= 0:
            raise ValueError(f"width_mult must be a positive float, got {width_mult!r}")

        in_ch = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNReLU6(3, in_ch, stride=2 if stem == "imagenet" else 1)]
        for stage, (t, c, n, s) in enumerate(_SETTINGS):
            if stem == "cifar" and stage == 1:
                s = 1
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(ConvBNReLU6(in_ch, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map images [B, 3, H, W] to logits [B, num_classes]."""
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


@register_model
def mobilenet_v2(
    *,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    stem: Stem = "imagenet",
    dropout: float = 0.2,
) -> MobileNetV2:
    """MobileNetV2; 3,504,872 params at ``width_mult=1.0`` with 1000 classes.

    Args:
        num_classes: Classifier outputs.
        width_mult: Channel multiplier (rounded to multiples of 8).
        stem: ``"imagenet"`` or ``"cifar"`` (stride-1 first conv and second stage).
        dropout: Dropout probability before the classifier.

    Returns:
        The model.
    """
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, stem=stem, dropout=dropout)
