"""KD with logit standardization (Sun et al., CVPR 2024; github.com/sunshangquan/logit-standardization-KD)."""

from __future__ import annotations

from mixkd.distiller import KDSettings, LogitTermDistiller, temperature_field, weight_field
from mixkd.registry import KD_METHODS

_README = "logit-standardization-KD README"


class LSKDSettings(KDSettings):
    temperature: float = temperature_field(2.0, f"the base temperature ({_README}: --base-temp 2)")
    ce_weight: float = weight_field(0.1, "weight of the cross-entropy term (mdistiller "
                                    "engine/cfg.py CFG.KD.LOSS.CE_WEIGHT, which its tools/train.py keeps)")
    kd_weight: float = weight_field(9.0, f"weight of the KD term ({_README}: --kd-weight 9)")


# The pairs whose KD+LS log in the authors' README (logs/KD/kd,<teacher>,<student>,<base temp>,<kd weight>.txt)
# names other settings than --base-temp 2 --kd-weight 9.
_PAIRS = {"vgg13->vgg8": {"temperature": 3.0},  # kd,vgg13,vgg8,3,9.txt
          "resnet32x4->wrn_16_2": {"temperature": 3.0},  # kd,resnet32x4,wrn_16_2,3,9.txt
          "resnet32x4->wrn_40_2": {"temperature": 3.0},  # kd,resnet32x4,wrn_40_2,3,9.txt
          "wrn_40_2->MobileNetV2": {"temperature": 3.0},  # kd,wrn_40_2,MobileNetV2,3,9.txt
          "vgg13->MobileNetV2": {"temperature": 3.0},  # kd,vgg13,MobileNetV2,3,9.txt
          "ResNet50->MobileNetV2": {"temperature": 3.0, "kd_weight": 1.0}}  # kd,ResNet50,MobileNetV2,3,1.txt


@KD_METHODS.register("lskd", settings=LSKDSettings, label="LS-KD", title="LS-KD",
                     context_defaults={f"pair={pair}": values for pair, values in _PAIRS.items()})
class LogitStandardizedKD(LogitTermDistiller):
    """KD with logit standardization (Sun et al., CVPR 2024): Hinton KD on z-scored logits at a base temperature, times T^2.

    CE on the raw student logits (unlike the study's ``std``)."""

    term = "lskd"
    term_settings = ("temperature",)
