"""Hinton KD (Hinton et al., 2015) as RepDistiller runs it on CIFAR-100."""

from __future__ import annotations

from typing import ClassVar

import torch

from mixkd.distiller import Distiller, KDSettings, LogitStandardization, standardized
from mixkd.losses import KDObjective, kd_loss, soft_cross_entropy
from mixkd.registry import KD_METHODS


class LogitObjectiveDistiller(Distiller):
    """A method on the logits only: ``KDObjective(objective_method)(student_logits, teacher_logits, target)``."""

    objective_method: ClassVar[str] = "kd"

    def __init__(self, student, teacher, settings: KDSettings):
        super().__init__(student, teacher, settings)
        self.objective = KDObjective(self.objective_method, settings.temperature, settings.ce_weight,
                                     settings.kd_weight)

    def forward_train(self, x, target):
        student_logits = self.student(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return self.objective(student_logits, teacher_logits, target)


class HintonKDSettings(LogitStandardization, KDSettings):
    """KD's settings: KDSettings' (RepDistiller's) and the switch of logit standardization."""


# KDSettings' defaults are this method's: RepDistiller scripts/run_cifar_distill.sh (-r 0.1 -a 0.9 --kd_T 4).
@KD_METHODS.register("kd", settings=HintonKDSettings, label="KD", title="KD")
class HintonKD(LogitObjectiveDistiller):
    """Hinton KD: ce_weight * CE + kd_weight * T^2 KL(teacher || student) at temperature T.

    With ``standardize``, the KL is on z-scored logits (LS-KD; CE on the raw ones): with ``-T 2
    --kd-weight 9``, the authors' KD + LS, which the method ``lskd`` also is."""

    objective_method = "kd"

    def __init__(self, student, teacher, settings: HintonKDSettings):
        super().__init__(student, teacher, settings)
        self.standardize = settings.standardize

    def forward_train(self, x, target):
        if not self.standardize:
            return super().forward_train(x, target)
        student_logits = self.student(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        s = self.settings
        ce = soft_cross_entropy(student_logits, target)
        kd = kd_loss(*standardized(True, student_logits, teacher_logits), s.temperature)
        return {"loss": s.ce_weight * ce + s.kd_weight * kd, "ce": ce, "kd": kd}
