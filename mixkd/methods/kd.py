"""Hinton KD (Hinton et al., 2015) as RepDistiller runs it on CIFAR-100."""

from __future__ import annotations

from typing import ClassVar

import torch

from mixkd.distiller import Distiller, KDSettings
from mixkd.losses import KDObjective
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


# KDSettings' defaults are this method's: RepDistiller scripts/run_cifar_distill.sh (-r 0.1 -a 0.9 --kd_T 4).
@KD_METHODS.register("kd", settings=KDSettings, label="KD", title="KD")
class HintonKD(LogitObjectiveDistiller):
    """Hinton KD: ce_weight * CE + kd_weight * T^2 KL(teacher || student) at temperature T."""

    objective_method = "kd"
