"""CTKD: curriculum temperature for KD (Li et al., AAAI 2023), its global learnable temperature."""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from mixkd.distiller import Distiller, temperature_field, weight_field
from mixkd.losses import kd_loss, soft_cross_entropy
from mixkd.registry import KD_METHODS, Settings


class CTKDSettings(Settings):
    ce_weight: float = weight_field(0.1, "weight of the cross-entropy (CTKD scripts/run_cifar_distill.sh: -r 0.1)")
    kd_weight: float = weight_field(0.9, "weight of the KD term (CTKD scripts/run_cifar_distill.sh: -a 0.9)")
    t_start: float = temperature_field(1.0, "lowest temperature: T = t_start + t_end * sigmoid(g), g learned "
                                       "(CTKD train_student.py --t_start)")
    t_end: float = Field(20.0, ge=0, le=1000, description="range of the temperature above t_start "
                         "(CTKD train_student.py --t_end)")
    decay_max: float = Field(0.0, ge=-10, le=10, description="gradient-reversal factor at epoch 0 of the cosine "
                             "curriculum (CTKD scripts/run_cifar_distill.sh --decay_max 0)")
    decay_min: float = Field(-1.0, ge=-10, le=10, description="gradient-reversal factor from epoch decay_loops on "
                             "(CTKD scripts/run_cifar_distill.sh --decay_min -1)")
    decay_loops: int = Field(10, ge=1, le=10000, description="epochs of the cosine curriculum of the reversal "
                             "factor (CTKD scripts/run_cifar_distill.sh --decay_loops 10)")

    @model_validator(mode="after")
    def _order(self):
        if self.decay_min > self.decay_max:
            raise ValueError(f"decay_min {self.decay_min} must be at most decay_max {self.decay_max}")
        return self


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (CTKD models/temp_global.py
    ``GradientReversalFunction``: the factor is the curriculum's lambda, negative, so the temperature
    ascends the KD loss the student descends). ``factor`` is a device tensor: no host sync."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.save_for_backward(factor)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (factor,) = ctx.saved_tensors
        return grad * factor.to(grad.dtype), None


class GlobalTemperature(torch.nn.Module):
    """The learnable global temperature logit, initialized to 1 (CTKD ``Global_T``)."""

    def __init__(self):
        super().__init__()
        self.global_t = torch.nn.Parameter(torch.ones(1))

    def forward(self, factor: torch.Tensor) -> torch.Tensor:
        return _ScaledGradient.apply(self.global_t, factor)


def reversal_factor(epoch: torch.Tensor, settings: CTKDSettings) -> torch.Tensor:
    """lambda(epoch) = decay_min + (decay_max - decay_min) (1 + cos(pi min(epoch, loops) / loops)) / 2
    (CTKD train_student.py ``CosineDecay.get_value``), on the device."""
    e = torch.clamp(epoch, min=0.0, max=float(settings.decay_loops))
    value = (torch.cos(e * math.pi / settings.decay_loops) + 1.0) * 0.5
    return value * (settings.decay_max - settings.decay_min) + settings.decay_min


@KD_METHODS.register("ctkd", settings=CTKDSettings, label="CTKD", title="curriculum temperature KD")
class CTKD(Distiller):
    """Curriculum temperature KD (Li et al. 2023; zhengli97/CTKD): Hinton KD at a learned temperature.

    ``ce_weight * CE + kd_weight * T^2 KL(softmax(t / T) || softmax(s / T))``, at a learned temperature T = t_start +
    t_end * sigmoid(g), g trained with the student through a gradient reversal whose strength follows a
    cosine curriculum over epochs (from -decay_max to -decay_min): the temperature makes distillation
    harder while the student learns. ``train_temperature`` logs the epoch's mean temperature."""

    loss_names = ("loss", "ce", "kd", "temperature")

    def __init__(self, student, teacher, settings):
        super().__init__(student, teacher, settings)
        self.modules["temperature"] = GlobalTemperature().to(self.device)

    def temperature(self) -> torch.Tensor:
        s = self.settings
        g = self.modules["temperature"](reversal_factor(self.epoch, s))
        return (s.t_start + s.t_end * torch.sigmoid(g)).squeeze(0)

    def forward_train(self, x, target):
        logits_s = self.student(x)
        with torch.no_grad():
            logits_t = self.teacher(x)
        temp = self.temperature()
        ce = soft_cross_entropy(logits_s, target)
        kd = kd_loss(logits_s, logits_t, temp)
        s = self.settings
        return {"loss": s.ce_weight * ce + s.kd_weight * kd, "ce": ce, "kd": kd, "temperature": temp.detach()}
