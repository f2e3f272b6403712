"""VGG family (Simonyan & Zisserman, 2014), with and without batch norm.

``stem="imagenet"`` gives torchvision's layout (features, 7x7 adaptive average
pool, 3-layer classifier) and its parameter counts; ``stem="cifar"`` gives the
common CIFAR VGG (features, flatten, one linear layer), which expects 32x32
inputs (the five max-pools reduce them to 1x1x512).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._options import Stem, check_positive_int, check_probability, check_stem
from .registry import register_model

__all__ = [
    "VGG",
    "make_vgg_features",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
]

_M = "M"
_CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, _M, 128, _M, 256, 256, _M, 512, 512, _M, 512, 512, _M),
    13: (64, 64, _M, 128, 128, _M, 256, 256, _M, 512, 512, _M, 512, 512, _M),
    16: (64, 64, _M, 128, 128, _M, 256, 256, 256, _M, 512, 512, 512, _M, 512, 512, 512, _M),
    19: (
        64, 64, _M, 128, 128, _M, 256, 256, 256, 256, _M,
        512, 512, 512, 512, _M, 512, 512, 512, 512, _M,
    ),
}  # fmt: skip


def make_vgg_features(config: tuple[int | str, ...], batch_norm: bool) -> nn.Sequential:
    """Build the convolutional trunk of a VGG.

    Args:
        config: Output channels of each 3x3 conv, with ``"M"`` for a 2x2 max-pool.
        batch_norm: Insert BatchNorm2d after every convolution.

    Returns:
        The feature extractor.
    """
    layers: list[nn.Module] = []
    in_ch = 3
    for item in config:
        if item == _M:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_ch = int(item)
        layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU())
        in_ch = out_ch
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG feature trunk plus an ImageNet or CIFAR classifier head."""

    def __init__(
        self,
        features: nn.Sequential,
        *,
        num_classes: int = 1000,
        stem: Stem = "imagenet",
        dropout: float = 0.5,
    ) -> None:
        """Build the model.

        Args:
            features: Trunk from :func:`make_vgg_features` (ends with 512 channels).
            num_classes: Classifier outputs.
            stem: ``"imagenet"`` (adaptive 7x7 pool + 4096-4096 MLP head with
                dropout) or ``"cifar"`` (flatten + ``Linear(512, num_classes)``;
                needs 32x32 inputs).
            dropout: Dropout probability in the ImageNet head (unused for cifar).

        Raises:
            ValueError: On an invalid option.
        """
        super().__init__()
        num_classes = check_positive_int("num_classes", num_classes)
        stem = check_stem(stem)
        dropout = check_probability("dropout", dropout)
        self.features = features
        self.avgpool: nn.Module | None
        if stem == "imagenet":
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                nn.Linear(512 * 7 * 7, 4096),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(4096, 4096),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(4096, num_classes),
            )
        else:
            self.avgpool = None
            self.classifier = nn.Sequential(nn.Linear(512, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map images [B, 3, H, W] to logits [B, num_classes]."""
        x = self.features(x)
        if self.avgpool is not None:
            x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


def _vgg(depth: int, batch_norm: bool, num_classes: int, stem: Stem, dropout: float) -> VGG:
    return VGG(
        make_vgg_features(_CONFIGS[depth], batch_norm),
        num_classes=num_classes,
        stem=stem,
        dropout=dropout,
    )


@register_model
def vgg11(*, num_classes: int = 1000, stem: Stem = "imagenet", dropout: float = 0.5) -> VGG:
    """VGG-11 (config A); 132,863,336 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        dropout: Dropout probability in the ImageNet head.

    Returns:
        The model.
    """
    return _vgg(11, False, num_classes, stem, dropout)


@register_model
def vgg13(*, num_classes: int = 1000, stem: Stem = "imagenet", dropout: float = 0.5) -> VGG:
    """VGG-13 (config B); 133,047,848 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        dropout: Dropout probability in the ImageNet head.

    Returns:
        The model.
    """
    return _vgg(13, False, num_classes, stem, dropout)


@register_model
def vgg16(*, num_classes: int = 1000, stem: Stem = "imagenet", dropout: float = 0.5) -> VGG:
    """VGG-16 (config D); 138,357,544 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        dropout: Dropout probability in the ImageNet head.

    Returns:
        The model.
    """
    return _vgg(16, False, num_classes, stem, dropout)


@register_model
def vgg19(*, num_classes: int = 1000, stem: Stem = "imagenet", dropout: float = 0.5) -> VGG:
    """VGG-19 (config E); 143,667,240 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        dropout: Dropout probability in the ImageNet head.

    Returns:
        The model.
    """
    return _vgg(19, False, num_classes, stem, dropout)


@register_model
def vgg11_bn(*, num_classes: int = 1000, stem: Stem = "imagenet", dropout: float = 0.5) -> VGG:
    """VGG-11 with batch norm; 132,868,840 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        dropout: Dropout probability in the ImageNet head.

    Returns:
        The model.
    """
    return _vgg(11, True, num_classes, stem, dropout)


@register_model
def vgg13_bn(*, num_classes: int = 1000, stem: Stem = "imagenet", dropout: float = 0.5) -> VGG:
    """VGG-13 with batch norm; 133,053,736 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        dropout: Dropout probability in the ImageNet head.

    Returns:
        The model.
    """
    return _vgg(13, True, num_classes, stem, dropout)


@register_model
def vgg16_bn(*, num_classes: int = 1000, stem: Stem = "imagenet", dropout: float = 0.5) -> VGG:
    """VGG-16 with batch norm; 138,365,992 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        dropout: Dropout probability in the ImageNet head.

    Returns:
        The model.
    """
    return _vgg(16, True, num_classes, stem, dropout)


@register_model
def vgg19_bn(*, num_classes: int = 1000, stem: Stem = "imagenet", dropout: float = 0.5) -> VGG:
    """VGG-19 with batch norm; 143,678,248 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        dropout: Dropout probability in the ImageNet head.

    Returns:
        The model.
    """
    return _vgg(19, True, num_classes, stem, dropout)
