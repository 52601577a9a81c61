"""``mixup`` (Zhang et al., "mixup", ICLR 2018): :func:`mixkd.mix.mixup`; its weight, share and sampling
are the run's ``mix.alpha``, ``mix.fraction`` (1: full mixup, FMU; 0.1: the study's partial mixup,
PMU), ``mix.sampling``."""

from mixkd.augment.base import BatchPolicy
from mixkd.registry import AUGMENTATIONS


@AUGMENTATIONS.register("mixup", label="mixup", title="mixup (Zhang et al. 2018)", stage="batch")
class Mixup(BatchPolicy):
    """mixup of the batch (settings: the run's mix.alpha, mix.fraction, mix.sampling)."""

    method = "mixup"
