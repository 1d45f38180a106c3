"""Backbones: plain classifiers ``[B, in_channels, H, W] -> [B, num_classes]`` (no torchvision).

Each constructor takes ``(in_channels, num_classes)`` only, which is what lets
:class:`pyens.nn.MIMO` build the same network with ``in_channels * M`` inputs and
``num_classes * M`` outputs. Inputs are expected already normalised (:class:`Normalize`
sits in front, see :func:`pyens.nn.build_model`). Every backbone ends in an adaptive
pooling layer, so the same network takes 28x28 (MNIST) and 32x32 (CIFAR) inputs, and any
other size from 8x8 up (LeNet from 12x12: its unpadded second 5x5 convolution and two poolings
need that much).

=============  ==========================================  ===========================
name           layers                                       parameters (1 -> 10 / 3 -> 10)
=============  ==========================================  ===========================
small_cnn      conv4x4/2(32)-conv4x4/2(64)-fc128-fc         ~436 k
lenet          LeNet-5: conv6-pool-conv16-pool-fc120-fc84   ~62 k
resnet18       CIFAR ResNet-18 (He et al. 2016), BasicBlock  ~11.2 M
resnet50       CIFAR ResNet-50, Bottleneck                   ~23.5 M
=============  ==========================================  ===========================
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pyens.checks import positive_int


class _PoolTo(nn.Module):
    """Adaptive average pooling to ``size``, skipped when the map already has that size.

    ``AdaptiveAvgPool2d`` is not free even as an identity: on the CPU its forward and
    backward cost 30-40% of a small-CNN PGD step on MNIST (bench/cost_table.py --profile).
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):
        if x.shape[-2:] == (self.size, self.size):
            return x
        return nn.functional.adaptive_avg_pool2d(x, self.size)


class SmallCNN(nn.Sequential):
    """A small, fast CNN for MNIST-sized inputs (also 3x32x32): PGD training on 2 CPU cores.

    conv4x4 stride 2 (32) - ReLU - conv4x4 stride 2 (64) - ReLU - fc(128) - ReLU - fc: the
    MNIST network of Wong et al. 2020 ("Fast is better than free"), doubled in width because
    a MIMO network fits M sub-models into it. Strided convolutions instead of max pooling:
    on the CPU, pooling and its backward cost as much as the convolutions (measured: a PGD
    step of the pooled variant is ~25% slower), and adversarial training runs K+1 of them.
    About 1.6 M multiply-adds per 28x28 image.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(
            nn.Conv2d(in_channels, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            # 7x7 (MNIST) stays; 8x8 (CIFAR) is pooled to 7x7: one fc size for both.
            _PoolTo(7), nn.Flatten(),
            nn.Linear(64 * 49, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes),
        )
        self.in_channels, self.num_classes = in_channels, num_classes


class LeNet(nn.Sequential):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, as the DML paper uses on MNIST.

    conv5x5(6, pad 2) - pool - conv5x5(16) - pool - fc(120) - fc(84) - fc. The padding makes
    28x28 inputs reach the classic 16x5x5 features; 32x32 inputs give 6x6, pooled to 5x5.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(5), nn.Flatten(),
            nn.Linear(16 * 25, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )
        self.in_channels, self.num_classes = in_channels, num_classes


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class _Residual(nn.Module):
    """``relu(body(x) + shortcut(x))``; the shortcut is a 1x1 projection where the shape changes."""

    expansion = 1

    def __init__(self, body: nn.Module, cin: int, planes: int, stride: int):
        super().__init__()
        self.body = body
        self.shortcut = _shortcut(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class BasicBlock(_Residual):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        body = nn.Sequential(*_conv_bn(cin, planes, 3, stride), nn.ReLU(inplace=True), *_conv_bn(planes, planes, 3))
        super().__init__(body, cin, planes, stride)


class Bottleneck(_Residual):
    """1x1 reduce - 3x3 (strided) - 1x1 expand (x4) (ResNet-50 and deeper)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        body = nn.Sequential(
            *_conv_bn(cin, planes, 1), nn.ReLU(inplace=True),
            *_conv_bn(planes, planes, 3, stride), nn.ReLU(inplace=True),
            *_conv_bn(planes, planes * self.expansion, 1),
        )
        super().__init__(body, cin, planes, stride)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(cin, cout, 1, stride))


class ResNet(nn.Module):
    """CIFAR-form ResNet: a 3x3 stem with no max-pool (small images keep their resolution),
    four stages of ``blocks`` at 64/128/256/512 planes (strides 1, 2, 2, 2), global average
    pooling and one linear layer.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        blocks: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        in_channels, num_classes: input channels and outputs.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], blocks: tuple[int, int, int, int],
                 in_channels: int, num_classes: int):
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.stem = nn.Sequential(*_conv_bn(in_channels, 64, 3), nn.ReLU(inplace=True))
        stages, cin = [], 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            layers = []
            for j in range(count):
                layers.append(block(cin, planes, stride=2 if i > 0 and j == 0 else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))


class ResNet18(ResNet):
    """CIFAR ResNet-18 (BasicBlock, 2-2-2-2): the MAT paper's MNIST model and the DML paper's CIFAR/RESISC model."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(BasicBlock, (2, 2, 2, 2), in_channels, num_classes)


class ResNet50(ResNet):
    """CIFAR ResNet-50 (Bottleneck, 3-4-6-3): the MAT paper's CIFAR-10 model."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(Bottleneck, (3, 4, 6, 3), in_channels, num_classes)


BackboneFactory = Callable[[int, int], nn.Module]
BACKBONES: dict[str, BackboneFactory] = {
    "small_cnn": SmallCNN, "lenet": LeNet, "resnet18": ResNet18, "resnet50": ResNet50,
}


def build_backbone(name: str | BackboneFactory, *, in_channels: int, num_classes: int) -> nn.Module:
    """The backbone ``name`` (a key of :data:`BACKBONES`, or a callable ``(in_channels,
    num_classes) -> nn.Module``) mapping ``[B, in_channels, H, W] -> [B, num_classes]``."""
    positive_int(in_channels, "in_channels")
    positive_int(num_classes, "num_classes")
    if callable(name):
        return name(in_channels, num_classes)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name](in_channels, num_classes)
