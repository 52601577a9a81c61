"""Metrics of a classifier's outputs: accuracy and likelihood, calibration, smoothness, fidelity to a
teacher, and behaviour between samples (vicinal). All batched on the model's device; values cross
to the host once per metric group.

Conventions: accuracies and agreement are percentages; ECE, confidence and linearity gap are
fractions; entropy and KL are in nats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mixkd.analysis.inputs import PixelImages

ECE_BINS = 15
LAMBDAS = (0.5, 0.7, 0.9)
HIST_BINS = 40


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on ``device`` when ``amp``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


# ---- model passes ------------------------------------------------------------------------------

@torch.inference_mode()
def predict(model: nn.Module, data: PixelImages, batch_size: int, device: torch.device, amp: bool = False) -> torch.Tensor:
    """Float32 logits (N, C) of ``model`` (a pixel-space model, see ``Normalized``) on ``data``."""
    out = []
    for _, x, _ in data.batches(batch_size, device):
        with autocast(device, amp):
            out.append(model(x).float())
    return torch.cat(out)


@torch.inference_mode()
def penultimate_features(model: nn.Module, data: PixelImages, batch_size: int, device: torch.device,
                         amp: bool = False) -> torch.Tensor:
    """The pooled features fed to the classifier (``model(x, is_feat=True)[0][-1]``), float32 (N, D)."""
    out = []
    for _, x, _ in data.batches(batch_size, device):
        with autocast(device, amp):
            feats, _ = model(x, is_feat=True)
        out.append(feats[-1].flatten(1).float())
    return torch.cat(out)


# ---- accuracy, likelihood, calibration ----------------------------------------------------------

def _host(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    keys = list(values)
    return dict(zip(keys, torch.stack([values[k].double() for k in keys]).cpu().tolist()))


def accuracy_and_nll(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) and mean negative log-likelihood (nats)."""
    k = min(5, logits.shape[1])
    hits = logits.topk(k, dim=1).indices == labels[:, None]
    return _host({"top1": hits[:, 0].double().mean() * 100, "top5": hits.any(1).double().mean() * 100,
                  "nll": F.cross_entropy(logits, labels)})


def calibration(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """Expected calibration error with ``bins`` equal-width confidence bins (lo, hi] over [0, 1],
    ECE = sum_b (n_b / N) |acc_b - conf_b|, and the per-bin counts, accuracies and mean
    confidences of a reliability diagram (None for an empty bin)."""
    conf = confidence.double()
    idx = (conf * bins).ceil().long().sub_(1).clamp_(0, bins - 1)
    count = torch.bincount(idx, minlength=bins).double()
    acc_sum = torch.bincount(idx, weights=correct.double(), minlength=bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=bins)
    ece = (acc_sum - conf_sum).abs().sum() / max(conf.numel(), 1)
    count_h, acc_h, conf_h = count.cpu().tolist(), acc_sum.cpu().tolist(), conf_sum.cpu().tolist()
    return {
        "ece": float(ece),
        "bins": bins,
        "bin_edges": [b / bins for b in range(bins + 1)],
        "bin_count": [int(c) for c in count_h],
        "bin_accuracy": [a / c if c else None for a, c in zip(acc_h, count_h)],
        "bin_confidence": [s / c if c else None for s, c in zip(conf_h, count_h)],
    }


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    return calibration(confidence, correct, bins)["ece"]


# ---- smoothness ---------------------------------------------------------------------------------

def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample predictive entropy (nats)."""
    logp = logits.float().log_softmax(dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def logit_std(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample standard deviation of the logits over classes (unbiased, as standardized KD uses)."""
    return logits.float().std(dim=1)


def distribution(values: torch.Tensor, bins: int = HIST_BINS) -> dict:
    """Summary statistics and a histogram of a 1-D tensor."""
    v = values.float()
    q = torch.quantile(v, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], device=v.device))
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1e-6
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    stats = _host({"mean": v.mean(), "std": v.std() if v.numel() > 1 else v.new_zeros(()), "min": v.min(),
                   "max": v.max(), "p05": q[0], "p25": q[1], "median": q[2], "p75": q[3], "p95": q[4]})
    stats["hist_edges"] = [lo + (hi - lo) * b / bins for b in range(bins + 1)]
    stats["hist_counts"] = [int(c) for c in counts.cpu().tolist()]
    return stats


def output_metrics(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """Accuracy, NLL, calibration (ECE + reliability bins) and smoothness of test-set logits."""
    probs = logits.float().softmax(dim=1)
    confidence, pred = probs.max(dim=1)
    out = accuracy_and_nll(logits, labels)
    cal = calibration(confidence, pred == labels, bins)
    out["ece"] = cal.pop("ece")
    out["calibration"] = cal
    out.update(_host({"confidence": confidence.mean(), "entropy": entropy(logits).mean()}))
    out["logit_std"] = distribution(logit_std(logits))
    return out


# ---- fidelity -----------------------------------------------------------------------------------

def kl_teacher_student(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p_teacher || p_student) at T = 1 (nats)."""
    log_t = teacher_logits.float().log_softmax(dim=1)
    log_s = student_logits.float().log_softmax(dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1)


def fidelity(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement (%) with the teacher and mean KL(teacher || student) at T = 1
    (Stanton et al., "Does Knowledge Distillation Really Work?", 2021)."""
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).double().mean() * 100
    return _host({"agreement": agree, "kl": kl_teacher_student(teacher_logits, student_logits).mean()})


# ---- between samples (vicinal) ------------------------------------------------------------------

def vicinal_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random pairs (i, j), i != j when n > 1: consecutive entries of a seeded permutation
    (cyclically), so every image is the first of one pair and the second of another."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm, perm.roll(-1)


@torch.inference_mode()
def vicinal(models: Mapping[str, nn.Module], probs: Mapping[str, torch.Tensor], data: PixelImages,
            batch_size: int, device: torch.device, lambdas: Sequence[float] = LAMBDAS, seed: int = 0,
            amp: bool = False) -> dict:
    """Behaviour on x = lam x_i + (1 - lam) x_j for random test pairs, per model and lambda:

    * ``accuracy`` (%) against the mixed label's majority class (y_i for lam > 0.5; at lam = 0.5
      either class counts);
    * mean ``entropy`` and ``confidence`` of p(x);
    * ``linearity_gap``: mean |p(x) - (lam p(x_i) + (1 - lam) p(x_j))|_1.

    ``probs`` holds each model's test-set probabilities (same order as ``data``). With a
    ``student`` and a ``teacher``, also their ``agreement`` (%) and KL(teacher || student) on x.
    Returns {"pairs", "seed", "lambdas", <model>: {str(lam): {...}}, "fidelity": {...} or None}.
    """
    first, second = vicinal_pairs(len(data), seed)
    first, second = first.to(device), second.to(device)
    both = "student" in models and "teacher" in models
    sums: dict[tuple[str, float, str], torch.Tensor] = {}

    def add(key, value):
        sums[key] = sums[key] + value.sum() if key in sums else value.sum().double()

    for start in range(0, len(data), batch_size):
        i, j = first[start:start + batch_size], second[start:start + batch_size]
        xi = data.images[i.to(data.images.device)].to(device, non_blocking=True).float().div_(255.0)
        xj = data.images[j.to(data.images.device)].to(device, non_blocking=True).float().div_(255.0)
        yi, yj = data.labels[i], data.labels[j]
        for lam in lambdas:
            x = xi * lam + xj * (1.0 - lam)
            logits = {}
            for name, model in models.items():
                with autocast(device, amp):
                    logits[name] = model(x).float()
                p = logits[name].softmax(dim=1)
                pred = p.argmax(dim=1)
                major = yi if lam > 0.5 else yj
                hit = pred == major
                if lam == 0.5:
                    hit |= pred == yi
                add((name, lam, "accuracy"), hit.double() * 100)
                add((name, lam, "entropy"), entropy(logits[name]))
                add((name, lam, "confidence"), p.max(dim=1).values)
                target = probs[name][i] * lam + probs[name][j] * (1.0 - lam)
                add((name, lam, "linearity_gap"), (p - target).abs().sum(dim=1))
            if both:
                agree = logits["student"].argmax(1) == logits["teacher"].argmax(1)
                add(("fidelity", lam, "agreement"), agree.double() * 100)
                add(("fidelity", lam, "kl"), kl_teacher_student(logits["teacher"], logits["student"]))
    keys = list(sums)
    values = (torch.stack([sums[k] for k in keys]) / max(len(data), 1)).cpu().tolist()
    out: dict = {"pairs": len(data), "seed": seed, "lambdas": list(lambdas)}
    for (name, lam, metric), value in zip(keys, values):
        out.setdefault(name, {}).setdefault(str(lam), {})[metric] = value
    out.setdefault("fidelity", None)
    return out
