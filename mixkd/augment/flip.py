"""``flip``: a horizontal flip with probability 1/2 (torchvision ``RandomHorizontalFlip(p=0.5)``)."""

from torchvision.transforms import v2

from mixkd.augment.base import SamplePolicy
from mixkd.registry import AUGMENTATIONS


@AUGMENTATIONS.register("flip", label="flip", title="horizontal flip", stage="sample")
class Flip(SamplePolicy):
    """Horizontal flip, p = 1/2 (in-memory datasets: drawn by the loader, one gather per batch)."""

    loader_native = True

    def transform(self):
        return v2.RandomHorizontalFlip(p=0.5)
