"""``random_erasing`` (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020): torchvision's
``v2.RandomErasing`` after normalization (value 0: the mean), each sample its own box."""

from pydantic import Field
from torchvision.transforms import v2

from mixkd.augment.base import SamplePolicy
from mixkd.registry import AUGMENTATIONS, Settings


class RandomErasingSettings(Settings):
    p: float = Field(0.5, ge=0, le=1, description="probability of erasing (Zhong et al.: 0.5; torchvision default)")
    scale_min: float = Field(0.02, gt=0, le=1, description="smallest erased area share (Zhong et al. s_l = 0.02)")
    scale_max: float = Field(0.4, gt=0, le=1, description="largest erased area share (Zhong et al. s_h = 0.4; "
                                                          "torchvision's default 0.33)")
    ratio_min: float = Field(0.3, gt=0, le=10, description="smallest aspect ratio (Zhong et al. r_1 = 0.3)")


@AUGMENTATIONS.register("random_erasing", settings=RandomErasingSettings, label="RandomErasing",
                        title="Random Erasing (Zhong et al. 2020)", stage="sample")
class RandomErasing(SamplePolicy):
    """Random Erasing (torchvision v2) with zeros after normalization, per sample."""

    space = "normalized"

    def transform(self):
        s = self.settings
        return v2.RandomErasing(p=s.p, scale=(s.scale_min, s.scale_max), ratio=(s.ratio_min, 1 / s.ratio_min), value=0)
