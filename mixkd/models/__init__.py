"""Model zoo: RepDistiller's CIFAR architectures, torchvision's ResNet-18/34/50 and MobileNet-V2, and
any timm or torchvision classifier by name (``timm:convnext_atto``, ``tv:mobilenet_v3_small``; see
:mod:`mixkd.models.external`).

Every model's ``forward(x, is_feat=False, preact=False)`` returns logits, or
``(features, logits)`` when ``is_feat`` is true; ``features[-1]`` is the pooled,
flattened vector fed to the classifier. The RepDistiller models keep its exact
state_dict keys, so its published ``{"model": state_dict}`` checkpoints load
with ``strict=True``; the ``tv_*`` models keep torchvision's keys, so a state_dict
saved from torchvision (``torch.save(model.state_dict(), path)``) loads the same way.
"""

# Importing the family modules fills the registry.
from mixkd.models import (  # noqa: F401
    mobilenetv2,
    resnet,
    resnetv2,
    shufflenetv1,
    shufflenetv2,
    torchvision_mobilenet,
    torchvision_resnet,
    vgg,
    wrn,
)
from mixkd.models.external import feature_index, feature_names, list_external
from mixkd.models.registry import (
    ModelOutput,
    available_models,
    create_model,
    default_lr,
    model_problem,
    model_slug,
)

__all__ = ["ModelOutput", "available_models", "create_model", "default_lr", "feature_index", "feature_names",
           "list_external", "model_problem", "model_slug"]
