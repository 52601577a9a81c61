"""``cutout`` (DeVries & Taylor, "Improved Regularization of Convolutional Neural Networks with Cutout",
2017; code uoguelph-mlrg/Cutout ``util/cutout.py``): one square of side ``size`` set to zero after
normalization (the dataset's mean), its centre uniform over the pixels, clipped at the border (so near
a border less than size x size is cut). No library implements this box (torchvision's RandomErasing
keeps its box inside the image and draws its size), so it is the batched box of :func:`mixkd.mix.box_mask`.
"""

import torch
from pydantic import Field

from mixkd.augment.base import SamplePolicy
from mixkd.mix import box_mask
from mixkd.registry import AUGMENTATIONS, Settings


class CutoutSettings(Settings):
    size: int = Field(16, ge=1, le=4096, description="side of the square, pixels (DeVries & Taylor: 16 on "
                                                    "CIFAR-10, 8 on CIFAR-100; uoguelph-mlrg/Cutout README "
                                                    "--length 16 / 8; Wang et al. 2022 use --cut_size 16)")
    holes: int = Field(1, ge=1, le=64, description="squares per image (DeVries & Taylor: 1; --n_holes 1)")


@AUGMENTATIONS.register("cutout", settings=CutoutSettings, label="Cutout", title="Cutout (DeVries & Taylor 2017)",
                        stage="sample")
class Cutout(SamplePolicy):
    """Cutout: ``holes`` squares of side ``size`` zeroed (after normalization), clipped at the border."""

    space = "normalized"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        keep = torch.ones(b, h, w, dtype=torch.bool, device=x.device)
        for _ in range(self.settings.holes):
            cy = torch.randint(0, h, (b,), device=x.device)
            cx = torch.randint(0, w, (b,), device=x.device)
            half = torch.full((b,), self.settings.size // 2, dtype=torch.long, device=x.device)
            keep &= ~box_mask(cy, cx, half, half, h, w)
        return x * keep[:, None].to(x.dtype)

    def transform(self):
        return lambda s: self(s[None])[0]
