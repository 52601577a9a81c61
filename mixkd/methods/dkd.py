"""Decoupled KD (Zhao et al., CVPR 2022) as mdistiller ships it (``mdistiller/distillers/DKD.py``)."""

from __future__ import annotations

import torch
from pydantic import Field

from mixkd.distiller import KDSettings, LogitStandardization, LogitTermDistiller, temperature_field, weight_field
from mixkd.registry import KD_METHODS

_CFG = "mdistiller engine/cfg.py"


class DKDSettings(LogitStandardization, KDSettings):
    temperature: float = temperature_field(4.0, f"softmax temperature ({_CFG} CFG.DKD.T)")
    ce_weight: float = weight_field(1.0, f"weight of the cross-entropy term ({_CFG} "
                                    "CFG.DKD.CE_WEIGHT)")
    kd_weight: float = weight_field(1.0, "weight of the DKD term, before its warm-up (DKD has "
                                    "none of its own: 1)")
    alpha: float = weight_field(1.0, f"weight of TCKD, the target-class term ({_CFG} "
                                "CFG.DKD.ALPHA)")
    beta: float = weight_field(8.0, f"weight of NCKD, the non-target-class term ({_CFG} "
                               "CFG.DKD.BETA; its configs/cifar100/dkd/*.yaml set 2 or 6 for some pairs)")
    warmup_epochs: int = Field(20, ge=0, le=100_000, description="epochs over which the DKD term's weight rises "
                               f"linearly, epoch e (from 1) weighted min(e / warmup_epochs, 1); 0: none ({_CFG} "
                               "CFG.DKD.WARMUP)")


# mdistiller configs/cifar100/dkd/<pair>.yaml, DKD.BETA (the pairs whose file sets none keep cfg.py's 8).
_BETA = {"resnet56->resnet20": 2.0,  # res56_res20.yaml
         "resnet110->resnet32": 2.0,  # res110_res32.yaml
         "vgg13->vgg8": 6.0,  # vgg13_vgg8.yaml
         "vgg13->MobileNetV2": 6.0,  # vgg13_mv2.yaml
         "wrn_40_2->wrn_16_2": 6.0,  # wrn40_2_wrn_16_2.yaml
         "wrn_40_2->wrn_40_1": 6.0}  # wrn40_2_wrn_40_1.yaml


# ImageNet (image-folder runs): mdistiller configs/imagenet/r34_r18/dkd.yaml (DKD: CE_WEIGHT 1, BETA 0.5, T 1,
# WARMUP 1; ALPHA is cfg.py's default, 1, as on CIFAR-100). Listed first: a pair's own beta wins over it.
_IMAGENET = {"temperature": 1.0, "ce_weight": 1.0, "beta": 0.5, "warmup_epochs": 1}


@KD_METHODS.register("dkd", settings=DKDSettings, label="DKD", title="DKD",
                     context_defaults={"dataset=imagefolder": _IMAGENET,
                                       **{f"pair={pair}": {"beta": beta} for pair, beta in _BETA.items()}})
class DKD(LogitTermDistiller):
    """Decoupled KD (Zhao et al., CVPR 2022): ce_weight * CE + min(epoch / warmup_epochs, 1) * kd_weight * T^2 (alpha TCKD + beta NCKD).

    The epoch is counted from 1. On a mixed sample, the label-weighted sum of DKD over the sample's
    classes (:func:`mixkd.losses.dkd_loss`)."""

    term = "dkd"
    term_settings = ("alpha", "beta", "temperature")

    def kd_factor(self):
        warmup = self.settings.warmup_epochs
        if not warmup:
            return self.settings.kd_weight
        return self.settings.kd_weight * torch.clamp(self.epoch / warmup, max=1.0)  # a device op: no host sync
