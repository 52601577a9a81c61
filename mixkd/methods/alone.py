"""The student trained alone: no teacher (teachers, and the baseline of every study)."""

from __future__ import annotations

from mixkd.distiller import Distiller
from mixkd.losses import supervised_objective
from mixkd.registry import KD_METHODS, NoSettings


@KD_METHODS.register("alone", settings=NoSettings, label="alone", title="student alone")
class Supervised(Distiller):
    """The student trained alone (teachers, baselines): soft-target cross-entropy on the mixed labels."""

    needs_teacher = False
    loss_names = ("loss", "ce")

    def forward_train(self, x, target):
        return supervised_objective(self.student(x), target)
