"""torchvision's ImageNet MobileNet-V2 with the zoo's forward contract.

A subclass of ``torchvision.models.MobileNetV2``, so the state_dict keys are torchvision's own and a
file saved with ``torch.save(torchvision.models.mobilenet_v2().state_dict(), path)`` loads with
``strict=True``. Built with random weights; nothing is ever downloaded.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchvision.models.mobilenetv2 import MobileNetV2

from mixkd.models.registry import ModelOutput, register

# ``features`` indices where each resolution ends (stem; strides 4, 8, 16, 32; then the 1x1 head conv),
# as RepDistiller's CIFAR MobileNetV2 groups its blocks: f1 after the 24-channel blocks, f2 after the
# 32-channel ones, f3 after the 96-channel ones, f4 after the 320-channel one.
_STAGE_ENDS = (1, 4, 7, 14, 18)


class TorchvisionMobileNetV2(MobileNetV2):
    """``torchvision.models.MobileNetV2`` whose forward also takes ``is_feat`` / ``preact``.

    Features: the stem output (stride 2), the outputs of the stride-4, 8, 16 and 32 stages, and the
    pooled, flattened vector fed to ``classifier``, so that index ``i`` has the spatial size of the
    torchvision ResNets' feature ``i`` (a FitNet hint between them needs no resizing). The stages end
    in linear bottlenecks (no ReLU), so ``preact`` features are the same tensors, as in RepDistiller.
    """

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> ModelOutput:  # type: ignore[override]
        if not is_feat:
            return super().forward(x)
        feats = []
        start = 0
        for end in _STAGE_ENDS:
            x = self.features[start:end](x)
            feats.append(x)
            start = end
        x = self.features[start:](x)  # the 1x1 conv to 1280 channels
        x = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
        feats.append(x)
        return feats, self.classifier(x)

    def feature_names(self) -> list[str]:
        """The names of the ``is_feat`` features: the last ``features`` block of each stage, the pooled vector."""
        return [f"features.{end - 1}" for end in _STAGE_ENDS] + ["pre_logits"]


@register("tv_mobilenet_v2", lr=0.01)
def tv_mobilenet_v2(num_classes: int) -> TorchvisionMobileNetV2:
    """torchvision MobileNet-V2, width 1.0 (random init)."""
    return TorchvisionMobileNetV2(num_classes=num_classes)
