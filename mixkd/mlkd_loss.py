"""Multi-level logit distillation (MLKD: Jin, Wang, Lin, "Multi-Level Logit Distillation", CVPR 2023), its loss
as pure functions on logits, as the authors' released code computes it (Jin-Ying/Multi-Level-Logit-Distillation,
``mdistiller/distillers/KD_ours.py``, class ``KD_ours``, and ``mdistiller/engine/cfg.py`` for its defaults).

Both models see a weak and a strong (RandAugment) view of each sample. Three alignments, each at several
temperatures (the configured one, 4 by default, then 3, 5, 2 and 6):

* instance: Hinton KD per sample, ``T² · KL(softmax(t/T) || softmax(s/T))`` summed over classes, batch mean;
* batch: the B x B Gram matrix of the batch's probabilities, ``P Pᵀ``, student against teacher: the squared
  difference summed, divided by B;
* class: the C x C class-correlation matrix ``Pᵀ P``: the squared difference summed, divided by C;

with confidence masks from the teacher's weak view at T = 1: a sample counts when its top probability is at
most the batch's median (``np.percentile(confidence, 50)``), a class when its summed probability over the
batch is at most the median over classes.

What the released function does, transcribed here exactly (and pinned by tests/test_mlkd_loss.py against a
transcription of it), quirks included:

* each alignment reduces to a scalar before its mask is applied (``reduce=False`` is commented out), so a mask
  scales the term by the share of samples (or classes) it keeps, about 1/2, rather than selecting them;
* the strong view's instance term takes T = 4, 3, 5 on the strong logits, but T = 2 and 6 on the *weak* ones
  (unmasked);
* the strong view's batch and class terms are computed and dropped: the loss is CE on both views, the
  instance terms of both views, and the weak view's class and batch terms;
* every term is multiplied by the KD weight (``cfg.KD.LOSS.KD_WEIGHT``, 0.9) and CE by ``cfg.KD.LOSS.CE_WEIGHT``
  (0.1): the class has no section of its own in ``cfg.py``, so it takes Hinton KD's.

The median is :func:`torch.quantile` (linear interpolation, as NumPy's percentile): no host synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

TEMPERATURES = (3.0, 5.0, 2.0, 6.0)  # KD_ours.py: the temperatures after the configured one, in its order
CE_WEIGHT = 0.1  # cfg.py CFG.KD.LOSS.CE_WEIGHT (KD_ours reads cfg.KD)
KD_WEIGHT = 0.9  # cfg.py CFG.KD.LOSS.KD_WEIGHT
TEMPERATURE = 4.0  # cfg.py CFG.KD.TEMPERATURE


def instance_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton KD: batch mean of ``T² · KL(p_t || p_s)`` at ``temperature`` (``kd_loss`` of KD_ours.py)."""
    log_s = F.log_softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_s, p_t, reduction="none").sum(1).mean() * temperature ** 2


def batch_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Batch alignment: ``sum((P_t P_tᵀ - P_s P_sᵀ)²) / B`` (``bc_loss``)."""
    p_s, p_t = F.softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1)
    return ((p_t @ p_t.T - p_s @ p_s.T) ** 2).sum() / student.shape[0]


def class_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Class alignment: ``sum((P_tᵀ P_t - P_sᵀ P_s)²) / C`` (``cc_loss``)."""
    p_s, p_t = F.softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1)
    return ((p_t.T @ p_t - p_s.T @ p_s) ** 2).sum() / student.shape[1]


def confidence_masks(teacher_weak: Tensor) -> tuple[Tensor, Tensor]:
    """(sample mask (B,), class mask (C,)): the samples whose teacher confidence (top probability at T = 1) is at
    most the batch median, the classes whose summed probability is at most the median over classes."""
    p = F.softmax(teacher_weak.detach().float(), dim=1)
    confidence = p.max(dim=1).values
    per_class = p.sum(0)
    return confidence <= torch.quantile(confidence, 0.5), per_class <= torch.quantile(per_class, 0.5)


def mlkd_losses(student_weak: Tensor, student_strong: Tensor, teacher_weak: Tensor, teacher_strong: Tensor,
                target: Tensor, temperature: float = TEMPERATURE, ce_weight: float = CE_WEIGHT,
                kd_weight: float = KD_WEIGHT, temperatures: tuple[float, ...] = TEMPERATURES) -> dict[str, Tensor]:
    """The released ``KD_ours.forward_train`` losses on given logits: ``{"ce", "kd", "cc", "bc"}`` (their sum is
    the loss trained on), with ``temperature`` first and then ``temperatures``. The teacher's logits are taken as
    given (detach them: the teacher runs without gradient)."""
    temps = (temperature, *temperatures)
    mask, class_mask = confidence_masks(teacher_weak)
    dtype = student_weak.dtype
    share, class_share = mask.to(dtype).mean(), class_mask.to(dtype).mean()  # (scalar x mask).mean(), as released
    ce = ce_weight * (F.cross_entropy(student_weak, target) + F.cross_entropy(student_strong, target))
    kd_weak = sum(kd_weight * instance_loss(student_weak, teacher_weak, t) * share for t in temps)
    # the strong view's terms: its first three temperatures on the strong logits, the last two on the weak ones
    views = [(student_strong, teacher_strong) if i < 3 else (student_weak, teacher_weak) for i in range(len(temps))]
    kd_strong = sum(kd_weight * instance_loss(s, t, temp) for (s, t), temp in zip(views, temps))
    cc = sum(kd_weight * class_loss(student_weak, teacher_weak, t) * class_share for t in temps)
    bc = sum(kd_weight * batch_loss(student_weak, teacher_weak, t) * share for t in temps)
    return {"ce": ce, "kd": kd_weak + kd_strong, "cc": cc, "bc": bc}
