"""``randaugment`` (Cubuk et al., "RandAugment", NeurIPS workshops 2020): ``num_ops`` random operations of
magnitude ``magnitude`` (of 31 levels), torchvision's ``v2.RandAugment``, each sample its own draw."""

from pydantic import Field
from torchvision.transforms import v2

from mixkd.augment.base import SamplePolicy
from mixkd.registry import AUGMENTATIONS, Settings


class RandAugmentSettings(Settings):
    num_ops: int = Field(2, ge=1, le=14, description="operations per image, N (Cubuk et al.: N = 2 for "
                                                     "CIFAR; torchvision default 2)")
    magnitude: int = Field(9, ge=0, le=30, description="magnitude M of each operation (torchvision default 9; "
                                                       "Cubuk et al. report M = 14 for Wide-ResNet-28-2 on CIFAR-10: "
                                                       "set 14 for that setting)")


@AUGMENTATIONS.register("randaugment", settings=RandAugmentSettings, label="RandAugment",
                        title="RandAugment (Cubuk et al. 2020)", stage="sample")
class RandAugment(SamplePolicy):
    """RandAugment (torchvision v2), per sample."""

    def transform(self):
        return v2.RandAugment(num_ops=self.settings.num_ops, magnitude=self.settings.magnitude)
