"""The study's losses: soft-target cross-entropy, Hinton KD, standardized KD and their objectives.

All reductions are means over the batch; KL divergences sum over classes first ("batchmean"),
as RepDistiller's ``DistillKL`` does. Losses are computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

KDMethod = Literal["kd", "std"]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-mean_i sum_c target_ic log softmax(logits)_ic; ``target`` rows are (mixed) label distributions."""
    return -(target.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Each sample's logits divided by their own (unbiased) standard deviation over classes."""
    logits = logits.float()
    return logits / logits.std(dim=-1, keepdim=True)


def _kl_batchmean(student_log_p: torch.Tensor, teacher_p: torch.Tensor) -> torch.Tensor:
    return F.kl_div(student_log_p, teacher_p, reduction="sum") / student_log_p.shape[0]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: T^2 * mean_i KL(softmax(t_i / T) || softmax(s_i / T))."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    p_t = F.softmax(teacher_logits.float() / t, dim=-1)
    return _kl_batchmean(log_p_s, p_t) * (t * t)


def std_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Standardized KD: mean_i KL(softmax(t_i / std(t_i)) || softmax(s_i / std(s_i))), no T^2."""
    log_p_s = F.log_softmax(standardize(student_logits), dim=-1)
    p_t = F.softmax(standardize(teacher_logits), dim=-1)
    return _kl_batchmean(log_p_s, p_t)


@dataclass(frozen=True)
class KDObjective:
    """gamma * CE + alpha * KD, the student's loss.

    ``method='kd'``: CE on the raw student logits, Hinton KD at ``temperature``.
    ``method='std'``: CE on the *standardized* student logits, standardized KD (``temperature`` unused).
    Defaults are RepDistiller's: gamma (``ce_weight``) 0.1, alpha (``kd_weight``) 0.9, T = 4.
    """

    method: KDMethod = "kd"
    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9

    def __call__(self, student_logits, teacher_logits, target) -> dict[str, torch.Tensor]:
        if self.method == "std":
            ce = soft_cross_entropy(standardize(student_logits), target)
            kd = std_kd_loss(student_logits, teacher_logits)
        else:
            ce = soft_cross_entropy(student_logits, target)
            kd = kd_loss(student_logits, teacher_logits, self.temperature)
        return {"loss": self.ce_weight * ce + self.kd_weight * kd, "ce": ce, "kd": kd}


def supervised_objective(student_logits, target) -> dict[str, torch.Tensor]:
    """Plain (soft-target) cross-entropy, for teachers and students trained alone."""
    ce = soft_cross_entropy(student_logits, target)
    return {"loss": ce, "ce": ce}
