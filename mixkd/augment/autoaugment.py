"""``autoaugment`` (Cubuk et al., "AutoAugment", CVPR 2019): the learned CIFAR-10 policy, torchvision's
``v2.AutoAugment(AutoAugmentPolicy.CIFAR10)`` (as Wang et al. 2022 use for CIFAR-100), each sample its
own sub-policy."""

from typing import Literal

from pydantic import Field
from torchvision.transforms import v2

from mixkd.augment.base import SamplePolicy
from mixkd.registry import AUGMENTATIONS, Settings


class AutoAugmentSettings(Settings):
    policy: Literal["cifar10", "imagenet", "svhn"] = Field(
        "cifar10", description="the learned policy (Cubuk et al.: CIFAR-10's for CIFAR; Good-DA-in-KD "
                               "helper/loops.py uses AutoAugmentPolicy.CIFAR10 for cifar100)")


@AUGMENTATIONS.register("autoaugment", settings=AutoAugmentSettings, label="AutoAugment",
                        title="AutoAugment (Cubuk et al. 2019), CIFAR-10 policy", stage="sample")
class AutoAugment(SamplePolicy):
    """AutoAugment with a learned policy (torchvision v2), per sample."""

    def transform(self):
        policy = {"cifar10": v2.AutoAugmentPolicy.CIFAR10, "imagenet": v2.AutoAugmentPolicy.IMAGENET,
                  "svhn": v2.AutoAugmentPolicy.SVHN}[self.settings.policy]
        return v2.AutoAugment(policy)
