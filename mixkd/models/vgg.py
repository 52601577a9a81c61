"""CIFAR VGGs with batch norm (vgg8, vgg11, vgg13, vgg16, vgg19).

Matches RepDistiller's ``models/vgg.py`` (the ``*_bn`` variants, which its
``model_dict`` registers under the plain names): same module names, parameter
shapes, initialisation and forward computation, so its checkpoints load with
``strict=True``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from mixkd.models.registry import ModelOutput, register

# Channels of the convs in each of the five blocks.
CFG: dict[str, list[list[int]]] = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


def _make_block(channels: list[int], batch_norm: bool, in_channels: int) -> nn.Sequential:
    """conv(-bn)-relu repeated, without the final ReLU (the caller applies it)."""
    layers: list[nn.Module] = []
    for v in channels:
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG without the FC stack: five conv blocks, global average pool, one linear layer."""

    def __init__(self, cfg: list[list[int]], batch_norm: bool = False, num_classes: int = 1000) -> None:
        super().__init__()
        self.block0 = _make_block(cfg[0], batch_norm, 3)
        self.block1 = _make_block(cfg[1], batch_norm, cfg[0][-1])
        self.block2 = _make_block(cfg[2], batch_norm, cfg[1][-1])
        self.block3 = _make_block(cfg[3], batch_norm, cfg[2][-1])
        self.block4 = _make_block(cfg[4], batch_norm, cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> ModelOutput:
        h = x.shape[2]
        x = F.relu(self.block0(x))
        f0 = x
        x = self.pool0(x)
        x = self.block1(x)
        f1_pre = x
        x = F.relu(x)
        f1 = x
        x = self.pool1(x)
        x = self.block2(x)
        f2_pre = x
        x = F.relu(x)
        f2 = x
        x = self.pool2(x)
        x = self.block3(x)
        f3_pre = x
        x = F.relu(x)
        f3 = x
        if h == 64:  # RepDistiller pools a fourth time only for 64x64 inputs
            x = self.pool3(x)
        x = self.block4(x)
        f4_pre = x
        x = F.relu(x)
        f4 = x
        x = self.pool4(x).flatten(1)
        f5 = x
        x = self.classifier(x)
        if not is_feat:
            return x
        if preact:
            return [f0, f1_pre, f2_pre, f3_pre, f4_pre, f5], x
        return [f0, f1, f2, f3, f4, f5], x


def _define(name: str, cfg_key: str) -> None:
    register(name)(lambda num_classes: VGG(CFG[cfg_key], batch_norm=True, num_classes=num_classes))


_define("vgg8", "S")
_define("vgg11", "A")
_define("vgg13", "B")
_define("vgg16", "D")
_define("vgg19", "E")
