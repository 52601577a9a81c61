"""``none``: the image as it is (no per-sample augmentation)."""

from mixkd.augment.base import SamplePolicy
from mixkd.registry import AUGMENTATIONS


@AUGMENTATIONS.register("none", label="none", title="no augmentation", stage="sample")
class Identity(SamplePolicy):
    """No augmentation: each image as stored."""

    loader_native = True
