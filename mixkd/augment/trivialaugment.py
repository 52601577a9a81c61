"""``trivialaugment`` (Müller & Hutter, "TrivialAugment", ICCV 2021): one random operation of random
magnitude, the "wide" ranges; torchvision's ``v2.TrivialAugmentWide``, each sample its own draw."""

from torchvision.transforms import v2

from mixkd.augment.base import SamplePolicy
from mixkd.registry import AUGMENTATIONS


@AUGMENTATIONS.register("trivialaugment", label="TrivialAugment", title="TrivialAugmentWide (Müller & Hutter 2021)",
                        stage="sample")
class TrivialAugment(SamplePolicy):
    """TrivialAugmentWide (torchvision v2, 31 magnitude bins as the paper's), per sample."""

    def transform(self):
        return v2.TrivialAugmentWide()
