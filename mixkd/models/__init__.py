"""Model zoo: RepDistiller's CIFAR architectures plus torchvision ResNets.

Every model's ``forward(x, is_feat=False, preact=False)`` returns logits, or
``(features, logits)`` when ``is_feat`` is true; ``features[-1]`` is the pooled,
flattened vector fed to the classifier. The RepDistiller models keep its exact
state_dict keys, so its published ``{"model": state_dict}`` checkpoints load
with ``strict=True``.
"""

# Importing the family modules fills the registry.
from mixkd.models import (  # noqa: F401
    mobilenetv2,
    resnet,
    resnetv2,
    shufflenetv1,
    shufflenetv2,
    torchvision_resnet,
    vgg,
    wrn,
)
from mixkd.models.registry import ModelOutput, available_models, create_model, default_lr

__all__ = ["ModelOutput", "available_models", "create_model", "default_lr"]
