"""Multi-level logit distillation (MLKD: Jin, Wang, Lin, CVPR 2023) as its authors release it
(Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/distillers/KD_ours.py``): both models see a weak and a
strong view of each sample; the loss is :func:`mixkd.mlkd_loss.mlkd_losses` (its docstring lists the released
code's quirks, kept)."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from mixkd.augment import parse_augment
from mixkd.distiller import Distiller, KDSettings, temperature_field, weight_field
from mixkd.errors import MixkdError
from mixkd.mlkd_loss import CE_WEIGHT, KD_WEIGHT, TEMPERATURE, TEMPERATURES, mlkd_losses
from mixkd.registry import KD_METHODS

_CFG = "MLKD mdistiller/engine/cfg.py"
_TEMPS = ", ".join(f"{t:g}" for t in TEMPERATURES)


class MLKDSettings(KDSettings):
    temperature: float = temperature_field(TEMPERATURE, f"the first softmax temperature of every alignment, then "
                                           f"{_TEMPS} ({_CFG} CFG.KD.TEMPERATURE: KD_ours reads Hinton KD's section)")
    ce_weight: float = weight_field(CE_WEIGHT, f"weight of the cross-entropy, on each view ({_CFG} "
                                    "CFG.KD.LOSS.CE_WEIGHT)")
    kd_weight: float = weight_field(KD_WEIGHT, f"weight of every alignment term ({_CFG} CFG.KD.LOSS.KD_WEIGHT)")
    strong_augment: str = Field(
        "flip_crop+randaugment", min_length=1, max_length=500,
        description="the strong view's per-sample policies, its own draw for every sample (the weak view is the "
        "run's augment; both are mixed alike by the run's mix). The authors' (mdistiller/dataset/cifar100.py "
        "get_cifar100_train_transform_strong): RandomCrop(32, padding 4) + flip + their RandAugment(2, 10), "
        "FixMatch's: 2 of 14 operations, each at a magnitude drawn uniformly in its range (the 10 is unused), then "
        "a Cutout of up to half the side. Here torchvision's RandAugment at its defaults (2 operations, magnitude "
        "9 of 31: mixkd/augment/randaugment.py), the nearest registered policy; the policies take their defaults")

    @field_validator("strong_augment")
    @classmethod
    def _per_sample(cls, value: str) -> str:
        try:
            entries = parse_augment(value, where="strong_augment")
        except MixkdError as err:
            raise ValueError(str(err).removeprefix("strong_augment: ")) from None
        batch = [e.name for e in entries if e.extra.get("stage") == "batch"]
        if batch:
            raise ValueError(f"{batch[0]} is a batch policy: the strong view takes per-sample policies (the run's "
                             "mix mixes both views alike); e.g. flip_crop+randaugment")
        return value


@KD_METHODS.register("mlkd", settings=MLKDSettings, label="MLKD", title="MLKD (Jin et al. 2023)")
class MLKD(Distiller):
    """MLKD: CE on a weak and a strong view + instance, batch and class alignment at T, 3, 5, 2, 6 with confidence masks.

    The weak view is the (mixed) batch, the strong one its ``strong_augment`` view mixed alike (same partners,
    weights and boxes). Each model sees the two views in two forward passes, as the released code runs them
    (the student's BatchNorm normalizes each view by its own statistics). ``train_ce`` is the weighted CE of
    both views, ``train_kd`` the instance terms of both, ``train_cc`` and ``train_bc`` the weak view's class and
    batch terms (weighted): their sum is ``train_loss``."""

    inputs = ("strong",)
    loss_names = ("loss", "ce", "kd", "cc", "bc")

    def forward_train(self, x, target, strong):
        student_weak, student_strong = self.student(x).float(), self.student(strong).float()
        with torch.no_grad():
            teacher_weak, teacher_strong = self.teacher(x).float(), self.teacher(strong).float()
        s = self.settings
        losses = mlkd_losses(student_weak, student_strong, teacher_weak, teacher_strong, target,
                             temperature=s.temperature, ce_weight=s.ce_weight, kd_weight=s.kd_weight)
        return {"loss": losses["ce"] + losses["kd"] + losses["cc"] + losses["bc"], **losses}
