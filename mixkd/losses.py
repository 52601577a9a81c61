"""The study's losses: soft-target cross-entropy, Hinton KD, standardized KD and their objectives.

The logit methods' terms are :func:`distillation_loss`; the feature methods' terms are
:func:`feature_loss` (defined in :mod:`mixkd.feature_losses`, re-exported here).

All reductions are means over the batch; KL divergences sum over classes first ("batchmean"),
as RepDistiller's ``DistillKL`` does. Losses are computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from mixkd.feature_losses import FEATURE_LOSS_DEFAULTS, feature_loss, term_params  # noqa: F401  (feature terms public)

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


# ---- other KD methods' distillation terms --------------------------------------------------------------
# Each is the term its paper defines, without the CE term and without any outer KD weight; inputs
# are (B, C) logits and a (B, C) label distribution; computed in float32; a batch-mean scalar.
# Defaults are the authors' CIFAR-100 settings (see DISTILLATION_DEFAULTS).


def logit_standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """LS-KD's z-score: (z - mean(z)) / (eps + std(z)) per sample, torch's (unbiased) std.

    As ``normalize`` in sunshangquan/logit-standardization-KD, ``mdistiller/distillers/KD.py``.
    Unlike :func:`standardize` (the study's), the mean is subtracted and ``eps`` is added.
    """
    logits = logits.float()
    return (logits - logits.mean(dim=-1, keepdim=True)) / (eps + logits.std(dim=-1, keepdim=True))


def lskd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Logit-standardized KD (Sun et al., CVPR 2024): Hinton KD on z-scored logits at a base temperature,
    times T^2: T^2 * mean_i KL(softmax(zs(t_i) / T) || softmax(zs(s_i) / T))."""
    return kd_loss(logit_standardize(student_logits), logit_standardize(teacher_logits), temperature)


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - mean over rows of the Pearson correlation of a's and b's rows (cosine of the centred rows,
    eps added to the product of norms, as in DIST's ``lib/models/losses/dist_kd.py``)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    corr = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return 1 - corr.mean()


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 4.0) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): T^2 * (beta * inter-class + gamma * intra-class relation loss).

    With y = softmax(z / T): inter = 1 - mean_i pearson(y_s[i, :], y_t[i, :]) (across classes, per
    sample), intra = 1 - mean_c pearson(y_s[:, c], y_t[:, c]) (across the batch, per class).
    """
    t = temperature
    y_s = F.softmax(student_logits.float() / t, dim=-1)
    y_t = F.softmax(teacher_logits.float() / t, dim=-1)
    inter = _pearson_distance(y_s, y_t)
    intra = _pearson_distance(y_s.t(), y_t.t())
    return (t * t) * (beta * inter + gamma * intra)


def _log_one_minus(log_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log(1 - p_c) for every class c, the argmax mask) from log-probabilities, without cancellation.

    For c other than a row's most probable class, p_c <= 1/2 and log1p(-p_c) is accurate; for the
    most probable class it is the log-sum-exp of the other classes' log-probabilities.
    """
    top = F.one_hot(log_p.argmax(dim=-1), log_p.shape[-1]).bool()
    rest = torch.logsumexp(log_p.masked_fill(top, float("-inf")), dim=-1, keepdim=True)
    p = log_p.exp().masked_fill(top, 0.0)  # no log1p(-1) (or its infinite gradient) at the top class
    return torch.where(top, rest, torch.log1p(-p)), top


def dkd_class_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's (TCKD, NCKD) for every sample i and every class c taken as the target class: two (B, C)
    tensors, without the T^2 factor. Entry (i, c) is what mdistiller's ``dkd_loss`` computes for
    sample i with label c (``mdistiller/distillers/DKD.py``), in O(B C) rather than one pass per class:

    TCKD_ic = KL([p_t,c, 1 - p_t,c] || [p_s,c, 1 - p_s,c]) on the binary (target, rest) probabilities;
    NCKD_ic = KL(q_t || q_s), q = softmax(z / T) over the classes j != c (renormalized), which equals
    E_{q_t}[log p_t,j - log p_s,j] - log(1 - p_t,c) + log(1 - p_s,c).
    """
    t = temperature
    lp_s = F.log_softmax(student_logits.float() / t, dim=-1)
    lp_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    p_t = lp_t.exp()
    l1m_s, _ = _log_one_minus(lp_s)
    l1m_t, top_t = _log_one_minus(lp_t)
    d = lp_t - lp_s
    tckd = p_t * d + l1m_t.exp() * (l1m_t - l1m_s)
    # E over the non-target teacher distribution of d. For c not the teacher's top class,
    # (sum_j p_t,j d_j - p_t,c d_c) / (1 - p_t,c) with 1 - p_t,c >= 1/2; at the top class, the
    # renormalized teacher distribution over the other classes directly.
    total = (p_t * d).sum(dim=-1, keepdim=True)
    safe = torch.where(top_t, torch.zeros_like(l1m_t), l1m_t)  # finite everywhere, gradients too
    closed = (total - p_t * d) / safe.exp()
    q_rest = F.softmax(lp_t.masked_fill(top_t, float("-inf")), dim=-1)
    at_top = (q_rest * d.masked_fill(top_t, 0.0)).sum(dim=-1, keepdim=True)
    nckd = torch.where(top_t, at_top, closed) - l1m_t + l1m_s
    return tckd, nckd


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """DKD (Zhao et al., CVPR 2022): T^2 * mean_i sum_c y_ic (alpha * TCKD_ic + beta * NCKD_ic).

    DKD needs the sample's target class. For a mixed sample (mixup, CutMix) whose label distribution
    y_i puts weight on several classes, the term is the label-weighted sum of DKD taken with each of
    those classes as the target; for an unmixed (one-hot) sample it is exactly the authors' DKD.
    (Mixing the loss, not the label: as mixup mixes CE, lam * CE(y_a) + (1 - lam) * CE(y_b).)
    """
    tckd, nckd = dkd_class_terms(student_logits, teacher_logits, temperature)
    per_class = alpha * tckd + beta * nckd
    return (temperature * temperature) * (target.float() * per_class).sum(dim=-1).mean()


# The parameters of each method's term, with their defaults: the authors' CIFAR-100 settings (each cited
# in its method's settings, mixkd/methods/<method>.py, with the method's CE and KD weights).
DISTILLATION_DEFAULTS: dict[str, dict[str, float]] = {
    "kd": {"temperature": 4.0}, "std": {}, "dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0},
    "lskd": {"temperature": 2.0}, "dist": {"beta": 1.0, "gamma": 1.0, "temperature": 4.0}}


def distillation_loss(method: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      target: torch.Tensor, **params: float) -> torch.Tensor:
    """A KD method's distillation term as its paper defines it (no CE term, no outer weight), a scalar.

    ``method``: "kd" (``temperature``), "std" (none), "dkd" (``alpha``, ``beta``, ``temperature``),
    "lskd" (``temperature``), "dist" (``beta``, ``gamma``, ``temperature``); parameters not given take
    the authors' CIFAR-100 values (:data:`DISTILLATION_DEFAULTS`). ``target``: (B, C) label
    distributions (one-hot rows for unmixed samples); only DKD reads it.
    """
    p = term_params("KD method", method, params, DISTILLATION_DEFAULTS)
    if student_logits.shape != teacher_logits.shape or target.shape != student_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)}, teacher logits "
                         f"{tuple(teacher_logits.shape)} and target {tuple(target.shape)} must have one (B, C) shape")
    if method == "kd":
        return kd_loss(student_logits, teacher_logits, p["temperature"])
    if method == "std":
        return std_kd_loss(student_logits, teacher_logits)
    if method == "lskd":
        return lskd_loss(student_logits, teacher_logits, p["temperature"])
    if method == "dist":
        return dist_loss(student_logits, teacher_logits, p["beta"], p["gamma"], p["temperature"])
    return dkd_loss(student_logits, teacher_logits, target, p["alpha"], p["beta"], p["temperature"])
