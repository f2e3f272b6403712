"""ResNet family (He et al., 2015), torchvision-v1.5 layout.

Bottleneck blocks put the stride on the 3x3 convolution. With the ImageNet
stem and 1000 classes the parameter counts equal torchvision's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._options import Stem, check_positive_int, check_stem
from .registry import register_model

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(_conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion: int = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        """Build the block.

        Args:
            in_ch: Input channels.
            planes: Output channels (``planes * expansion``).
            stride: Stride of the first 3x3 convolution.
        """
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = _shortcut(in_ch, out_ch, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape [B, C, H, W]."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        # Python locals go as the traced graph's values do (after their last use), so that this
        # eager forward peaks where memfit predicts: nothing saves BatchNorm's output or the
        # shortcut for backward, and held through the last ReLU they were a block's output high
        out = self.bn2(self.conv2(out)) + identity
        del identity
        return self.relu2(out)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand, with a shortcut."""

    expansion: int = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        """Build the block.

        Args:
            in_ch: Input channels.
            planes: Bottleneck width; output channels are ``planes * 4``.
            stride: Stride of the 3x3 convolution (torchvision v1.5).
        """
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv1x1(planes, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = _shortcut(in_ch, out_ch, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape [B, C, H, W]."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + identity  # locals go after their last use, as above
        del identity
        return self.relu3(out)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """ResNet backbone + global-average-pool + linear classifier."""

    def __init__(
        self,
        block: Block,
        layers: tuple[int, int, int, int],
        *,
        num_classes: int = 1000,
        stem: Stem = "imagenet",
        width: int = 64,
    ) -> None:
        """Build a ResNet.

        Args:
            block: ``BasicBlock`` or ``Bottleneck``.
            layers: Number of blocks in each of the four stages.
            num_classes: Size of the classifier output.
            stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool) or ``"cifar"``
                (3x3/1 conv, no max-pool).
            width: Channels of the stem and the first stage; later stages double it (64 is the
                published network; smaller widths make quick experiments).

        Raises:
            ValueError: On an invalid option.
        """
        super().__init__()
        num_classes = check_positive_int("num_classes", num_classes)
        stem = check_stem(stem)
        width = check_positive_int("width", width)
        self.stem_kind: Stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = _conv3x3(3, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool: nn.Module | None = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else None
        )
        in_ch = width
        stages: list[nn.Sequential] = []
        for i, (planes, blocks) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), layers, strict=True)):
            stride = 1 if i == 0 else 2
            mods: list[nn.Module] = []
            for j in range(blocks):
                mods.append(block(in_ch, planes, stride if j == 0 else 1))
                in_ch = planes * block.expansion
            stages.append(nn.Sequential(*mods))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map images [B, 3, H, W] to logits [B, num_classes]."""
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register_model
def resnet18(*, num_classes: int = 1000, stem: Stem = "imagenet", width: int = 64) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); 11,689,512 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        width: Channels of the first stage (64 published).

    Returns:
        The model.
    """
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, stem=stem, width=width)


@register_model
def resnet34(*, num_classes: int = 1000, stem: Stem = "imagenet", width: int = 64) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]); 21,797,672 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        width: Channels of the first stage (64 published).

    Returns:
        The model.
    """
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, stem=stem, width=width)


@register_model
def resnet50(*, num_classes: int = 1000, stem: Stem = "imagenet", width: int = 64) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); 25,557,032 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        width: Channels of the first stage (64 published).

    Returns:
        The model.
    """
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, stem=stem, width=width)


@register_model
def resnet101(*, num_classes: int = 1000, stem: Stem = "imagenet", width: int = 64) -> ResNet:
    """ResNet-101 (Bottleneck, [3, 4, 23, 3]); 44,549,160 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        width: Channels of the first stage (64 published).

    Returns:
        The model.
    """
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes=num_classes, stem=stem, width=width)


@register_model
def resnet152(*, num_classes: int = 1000, stem: Stem = "imagenet", width: int = 64) -> ResNet:
    """ResNet-152 (Bottleneck, [3, 8, 36, 3]); 60,192,808 params at ImageNet defaults.

    Args:
        num_classes: Classifier outputs.
        stem: ``"imagenet"`` or ``"cifar"``.
        width: Channels of the first stage (64 published).

    Returns:
        The model.
    """
    return ResNet(Bottleneck, (3, 8, 36, 3), num_classes=num_classes, stem=stem, width=width)
