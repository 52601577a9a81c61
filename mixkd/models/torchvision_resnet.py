"""torchvision's ImageNet ResNet-18/34/50 with the zoo's forward contract.

A subclass of ``torchvision.models.ResNet``, so the state_dict keys are
torchvision's own. Built with random weights; nothing is ever downloaded.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from mixkd.models.registry import ModelOutput, register


def _block_preact(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision's block forward, stopping before the final ReLU."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if isinstance(block, Bottleneck):
        out = block.bn3(block.conv3(block.relu(out)))
    return out + identity


def _run_stage(stage: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run a stage; return its output and the last block's pre-ReLU sum."""
    for block in list(stage)[:-1]:
        x = block(x)
    preact = _block_preact(stage[-1], x)
    return F.relu(preact), preact


class TorchvisionResNet(ResNet):
    """``torchvision.models.ResNet`` whose forward also takes ``is_feat`` / ``preact``.

    Features: the stem output (before max-pool), the four stage outputs and the
    pooled, flattened vector fed to ``fc``.
    """

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> ModelOutput:  # type: ignore[override]
        if not is_feat:
            return super().forward(x)
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = self.maxpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x, pre = _run_stage(stage, x)
            feats.append(pre if preact else x)
        x = self.avgpool(x).flatten(1)
        feats.append(x)
        return feats, self.fc(x)

    def feature_names(self) -> list[str]:
        """The names of the ``is_feat`` features (the stem's ReLU, the stages, the pooled vector)."""
        return ["relu", "layer1", "layer2", "layer3", "layer4", "pre_logits"]


@register("tv_resnet18")
def tv_resnet18(num_classes: int) -> TorchvisionResNet:
    """torchvision ResNet-18 (random init)."""
    return TorchvisionResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


@register("tv_resnet34")
def tv_resnet34(num_classes: int) -> TorchvisionResNet:
    """torchvision ResNet-34 (random init)."""
    return TorchvisionResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes)


@register("tv_resnet50")
def tv_resnet50(num_classes: int) -> TorchvisionResNet:
    """torchvision ResNet-50 (random init)."""
    return TorchvisionResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
