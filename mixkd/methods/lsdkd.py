"""DKD with logit standardization (Sun et al., CVPR 2024; github.com/sunshangquan/logit-standardization-KD)."""

from __future__ import annotations

from pydantic import Field

from mixkd.distiller import temperature_field, weight_field
from mixkd.methods.dkd import DKD, DKDSettings
from mixkd.registry import KD_METHODS

_README = "logit-standardization-KD README"


class LSDKDSettings(DKDSettings):
    standardize: bool = Field(True, description="logit standardization: DKD's term on z-scored logits "
                              f"({_README}: --logit-stand); false gives DKD at these weights")
    temperature: float = temperature_field(2.0, f"the base temperature ({_README}: --base-temp 2)")
    kd_weight: float = weight_field(9.0, f"weight of the DKD term before its warm-up ({_README}: --kd-weight 9, "
                                    "which its tools/train.py applies to DKD as ALPHA and BETA times 9)")


# The authors' DKD+LS logs, logs/DKD/dkd,<teacher>,<student>,<base temp>,<kd weight>[,<beta>].txt (README: "The
# possible third value for DKD is the value of BETA"), for the pairs whose settings differ from --base-temp 2
# --kd-weight 9 and mdistiller's beta (dkd.py's per-pair beta, else 8).
_PAIRS = {"resnet56->resnet20": {"temperature": 3.0, "kd_weight": 18.0, "beta": 2.0},  # dkd,resnet56,resnet20,3,18,2.0
          "resnet110->resnet32": {"kd_weight": 15.0, "beta": 2.0},  # dkd,resnet110,resnet32,2,15,2.0
          "resnet110->resnet20": {"kd_weight": 15.0, "beta": 2.0},  # dkd,resnet110,resnet20,2,15,2.0
          "vgg13->vgg8": {"kd_weight": 15.0, "beta": 2.0},  # dkd,vgg13,vgg8,2,15,2.0
          "wrn_40_2->wrn_40_1": {"kd_weight": 12.0, "beta": 2.0},  # dkd,wrn_40_2,wrn_40_1,2,12,2.0
          "wrn_40_2->wrn_16_2": {"kd_weight": 12.0, "beta": 2.0},  # dkd,wrn_40_2,wrn_16_2,2,12,2.0
          "resnet32x4->wrn_16_2": {"beta": 2.0},  # dkd,resnet32x4,wrn_16_2,2,9,2.0
          "wrn_40_2->resnet8x4": {"kd_weight": 18.0, "beta": 2.0},  # dkd,wrn_40_2,resnet8x4,2,18,2.0
          "wrn_40_2->MobileNetV2": {"kd_weight": 15.0, "beta": 2.0},  # dkd,wrn_40_2,MobileNetV2,2,15,2.0
          "vgg13->MobileNetV2": {"temperature": 3.0, "beta": 2.0},  # dkd,vgg13,MobileNetV2,3,9,2.0
          "ResNet50->MobileNetV2": {"kd_weight": 15.0, "beta": 2.0}}  # dkd,ResNet50,MobileNetV2,2,15,2.0


@KD_METHODS.register("lsdkd", settings=LSDKDSettings, label="DKD+LS", title="DKD + LS",
                     context_defaults={f"pair={pair}": values for pair, values in _PAIRS.items()})
class LogitStandardizedDKD(DKD):
    """DKD with logit standardization (Sun et al., CVPR 2024): DKD on z-scored logits at a base temperature.

    ``dkd`` with ``standardize: true`` and the LS-KD authors' CIFAR-100 settings as its defaults (base
    temperature 2, KD weight 9; per pair, their logs' settings), so that a study names it (``lsdkd``,
    ``lsdkd_fmu``, ``lsdkd_pmu``) and reports it apart from DKD. CE on the raw student logits."""
