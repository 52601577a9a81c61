"""``flip_crop``: today's CIFAR default, ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``
(He et al. 2016, as RepDistiller and mdistiller train CIFAR); image folders: their
``RandomResizedCrop`` + flip."""

from torchvision.transforms import v2

from mixkd.augment.base import SamplePolicy
from mixkd.data.loaders import CROP_PADDING
from mixkd.registry import AUGMENTATIONS


@AUGMENTATIONS.register("flip_crop", label="flip+crop", title="random crop (padding 4) + horizontal flip",
                        stage="sample")
class FlipCrop(SamplePolicy):
    """Zero-padded random crop (padding 4) + horizontal flip: in-memory datasets draw it in the loader
    (mixkd.data.loaders.DeviceLoader, exactly today's numbers); here for other callers."""

    loader_native = True

    def transform(self):
        size = self.context.image_size
        return v2.Compose([v2.RandomCrop(size, padding=CROP_PADDING), v2.RandomHorizontalFlip(p=0.5)])

    def folder_transform(self):
        return None  # the folder's own train transform: RandomResizedCrop + flip
