"""``cutmix`` (Yun et al., "CutMix", ICCV 2019): :func:`mixkd.mix.cutmix`, a box of side sqrt(1 - lambda)
of the partner pasted, the label weighted by the pasted area; settings as mixup's (``mix.*``)."""

from mixkd.augment.base import BatchPolicy
from mixkd.registry import AUGMENTATIONS


@AUGMENTATIONS.register("cutmix", label="CutMix", title="CutMix (Yun et al. 2019)", stage="batch")
class CutMix(BatchPolicy):
    """CutMix of the batch (settings: the run's mix.alpha, mix.fraction, mix.sampling)."""

    method = "cutmix"
