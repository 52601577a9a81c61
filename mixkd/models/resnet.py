"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4).

Matches RepDistiller's ``models/resnet.py``: same module names, parameter
shapes, initialisation and forward computation, so its checkpoints load with
``strict=True``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mixkd.models.registry import ModelOutput, register


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation basic block; the last block of a stage also returns its pre-ReLU sum."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        is_last: bool = False,
    ) -> None:
        super().__init__()
        self.is_last = is_last
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        preact = out + residual
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class CifarResNet(nn.Module):
    """ResNet with three stages of ``(depth - 2) // 6`` basic blocks, for 32x32 inputs."""

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        out_planes = planes * BasicBlock.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, is_last=blocks == 1)]
        self.inplanes = out_planes
        layers += [BasicBlock(out_planes, planes, is_last=i == blocks - 1) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> ModelOutput:
        x = self.relu(self.bn1(self.conv1(x)))  # 32x32
        f0 = x
        x, f1_pre = self.layer1(x)  # 32x32
        f1 = x
        x, f2_pre = self.layer2(x)  # 16x16
        f2 = x
        x, f3_pre = self.layer3(x)  # 8x8
        f3 = x
        x = self.avgpool(x).flatten(1)
        f4 = x
        x = self.fc(x)
        if not is_feat:
            return x
        if preact:
            return [f0, f1_pre, f2_pre, f3_pre, f4], x
        return [f0, f1, f2, f3, f4], x


_SMALL = [16, 16, 32, 64]
_WIDE = [32, 64, 128, 256]


def _define(name: str, depth: int, filters: list[int]) -> None:
    register(name)(lambda num_classes: CifarResNet(depth, filters, num_classes=num_classes))


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _define(f"resnet{_depth}", _depth, _SMALL)
_define("resnet8x4", 8, _WIDE)
_define("resnet32x4", 32, _WIDE)
