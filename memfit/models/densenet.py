"""DenseNet-BC family (Huang et al., 2017).

Each dense layer concatenates all previous feature maps with ``torch.cat``
inside its own ``forward`` (no ``torch.utils.checkpoint``, no data-dependent
control flow), so ``torch.fx.symbolic_trace`` records every op. The ImageNet
models follow torchvision's layout and parameter counts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._options import Stem, check_positive_int, check_probability, check_stem
from .registry import register_model

__all__ = [
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "Transition",
    "densenet121",
    "densenet169",
    "densenet201",
    "densenet264",
    "densenet_bc_100",
]


class DenseLayer(nn.Module):
    """cat(features) -> BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv [-> dropout]."""

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        """Build the layer.

        Args:
            in_ch: Channels of the concatenated input.
            growth_rate: Output channels (``k``).
            bn_size: Bottleneck width multiplier (1x1 conv outputs ``bn_size * k``).
            drop_rate: Dropout probability on the output; 0 adds no dropout op.
        """
        super().__init__()
        inner = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, inner, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(inner)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(inner, growth_rate, kernel_size=3, padding=1, bias=False)
        self.dropout: nn.Module | None = nn.Dropout(drop_rate) if drop_rate > 0 else None

    def forward(self, features: list[Tensor]) -> Tensor:
        """Return the ``k`` new channels computed from all previous ``features``."""
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        x = self.conv2(self.relu2(self.norm2(x)))
        if self.dropout is not None:
            x = self.dropout(x)
        return x


class DenseBlock(nn.ModuleDict):
    """A stack of :class:`DenseLayer` whose outputs are all concatenated."""

    def __init__(self, num_layers: int, in_ch: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        """Build the block.

        Args:
            num_layers: Number of dense layers.
            in_ch: Input channels; the output has ``in_ch + num_layers * growth_rate``.
            growth_rate: Channels added per layer.
            bn_size: Bottleneck width multiplier.
            drop_rate: Dropout probability inside each layer.
        """
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(in_ch + i * growth_rate, growth_rate, bn_size, drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        """Apply every layer and return the concatenation of input and all new features."""
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN -> ReLU -> 1x1 conv (compression) -> 2x2 average pool."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        """Build the transition.

        Args:
            in_ch: Input channels.
            out_ch: Output channels.
        """
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC: stem, dense blocks joined by transitions, BN-ReLU, GAP, linear."""

    def __init__(
        self,
        block_config: tuple[int, ...],
        *,
        growth_rate: int = 32,
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        stem: Stem | None = "imagenet",
    ) -> None:
        """Build a DenseNet.

        Args:
            block_config: Number of dense layers in each block.
            growth_rate: Channels added per dense layer (``k``).
            num_init_features: Output channels of the stem convolution.
            bn_size: Bottleneck width multiplier.
            compression: Channel reduction factor of each transition.
            drop_rate: Dropout probability after each dense layer.
            num_classes: Classifier outputs.
            stem: ``"imagenet"`` (7x7/2 conv + BN + ReLU + 3x3/2 max-pool),
                ``"cifar"`` (3x3/1 conv + BN + ReLU) or ``None`` (a bare 3x3/1
                conv, as in the original CIFAR DenseNet-BC).

        Raises:
            ValueError: On an invalid option.
        """
        super().__init__()
        num_classes = check_positive_int("num_classes", num_classes)
        drop_rate = check_probability("drop_rate", drop_rate)
        if stem is not None:
            stem = check_stem(stem)
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression!r}")

        self.features = nn.Sequential()
        if stem == "imagenet":
            self.features.add_module("conv0", nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False))
        else:
            self.features.add_module("conv0", nn.Conv2d(3, num_init_features, 3, stride=1, padding=1, bias=False))
        if stem is not None:
            self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
            self.features.add_module("relu0", nn.ReLU())
        if stem == "imagenet":
            self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))

        ch = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(num_layers, ch, growth_rate, bn_size, drop_rate))
            ch += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_ch = int(ch * compression)
                self.features.add_module(f"transition{i + 1}", Transition(ch, out_ch))
                ch = out_ch
        self.features.add_module("norm5", nn.BatchNorm2d(ch))
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(ch, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map images [B, 3, H, W] to logits [B, num_classes]."""
        x = self.relu(self.features(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


def _imagenet_densenet(
    block_config: tuple[int, int, int, int], num_classes: int, stem: Stem, drop_rate: float
) -> DenseNet:
    return DenseNet(
        block_config,
        growth_rate=32,
        num_init_features=64,
        bn_size=4,
        compression=0.5,
        drop_rate=drop_rate,
        num_classes=num_classes,
        stem=check_stem(stem),
    )


@register_model
def densenet121(*, num_classes: int = 1000, stem: Stem = "imagenet", drop_rate: float = 0.0) -> DenseNet:
    """DenseNet-121 (k=32, blocks [6, 12, 24, 16]); 7,978,856 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        drop_rate: Dropout probability after each dense layer.

    Returns:
        The model.
    """
    return _imagenet_densenet((6, 12, 24, 16), num_classes, stem, drop_rate)


@register_model
def densenet169(*, num_classes: int = 1000, stem: Stem = "imagenet", drop_rate: float = 0.0) -> DenseNet:
    """DenseNet-169 (k=32, blocks [6, 12, 32, 32]); 14,149,480 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        drop_rate: Dropout probability after each dense layer.

    Returns:
        The model.
    """
    return _imagenet_densenet((6, 12, 32, 32), num_classes, stem, drop_rate)


@register_model
def densenet201(*, num_classes: int = 1000, stem: Stem = "imagenet", drop_rate: float = 0.0) -> DenseNet:
    """DenseNet-201 (k=32, blocks [6, 12, 48, 32]); 20,013,928 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        drop_rate: Dropout probability after each dense layer.

    Returns:
        The model.
    """
    return _imagenet_densenet((6, 12, 48, 32), num_classes, stem, drop_rate)


@register_model
def densenet264(*, num_classes: int = 1000, stem: Stem = "imagenet", drop_rate: float = 0.0) -> DenseNet:
    """DenseNet-264 (k=32, blocks [6, 12, 64, 48]); 33,337,704 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        drop_rate: Dropout probability after each dense layer.

    Returns:
        The model.
    """
    return _imagenet_densenet((6, 12, 64, 48), num_classes, stem, drop_rate)


@register_model
def densenet_bc_100(*, num_classes: int = 10, drop_rate: float = 0.0) -> DenseNet:
    """CIFAR DenseNet-BC, depth 100, k=12 (3 blocks of 16 bottleneck layers).

    The first layer is a bare 3x3/1 convolution with ``2k = 24`` channels (no
    BN/ReLU/pool), transitions halve the channels, and the head is
    BN -> ReLU -> global average pool -> linear. About 0.77M parameters with
    10 classes.

    Args:
        num_classes: Classifier outputs.
        drop_rate: Dropout probability after each dense layer.

    Returns:
        The model.
    """
    return DenseNet(
        (16, 16, 16),
        growth_rate=12,
        num_init_features=24,
        bn_size=4,
        compression=0.5,
        drop_rate=drop_rate,
        num_classes=num_classes,
        stem=None,
    )
