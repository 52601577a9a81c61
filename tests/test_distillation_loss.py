"""``distillation_loss`` for DKD, LS-KD and DIST, pinned three ways.

1. Plain-Python references below (``decimal`` arithmetic and explicit loops, written from the papers' definitions,
   sharing no code with mixkd) on small fixtures, including mixed (mixup/CutMix) label distributions.
2. The numbers those references print, written down as literals (so a change to both sides shows).
3. Transcriptions of the authors' code for one-hot targets (mdistiller ``dkd_loss``,
   logit-standardization-KD ``kd_loss(..., logit_stand=True)``, DIST's ``DIST.forward``).
"""

from decimal import Decimal, getcontext

import pytest
import torch
import torch.nn.functional as F

from mixkd.losses import DISTILLATION_DEFAULTS, distillation_loss

# Three samples, four classes; sample 0 is mixed 0.7/0.3 (mixup), sample 2 0.25/0.75 (CutMix area).
S = [[1.0, 2.0, 3.0, -1.0], [0.5, -1.0, 2.0, 0.0], [-2.0, 0.3, 1.1, 2.5]]
T = [[3.0, 2.0, 1.0, 0.5], [1.0, 0.0, 4.0, -2.0], [0.2, -0.7, 1.9, 3.3]]
Y_MIXED = [[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.25, 0.0, 0.75]]
Y_ONEHOT = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


def tensor(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---- plain-Python references (decimal arithmetic, 50 digits: exact enough for any logit gap) -------
getcontext().prec = 50


def dec(rows):
    return [[Decimal(repr(v)) for v in r] for r in rows]


def softmax(z, temp):
    e = [(v / temp).exp() for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * (a / b).ln() for a, b in zip(p, q, strict=True) if a > 0)


def ref_dkd(s, t, y, alpha, beta, temp):
    """Per sample, per class c with y_c > 0: TCKD on (p_c, 1 - p_c) and NCKD on the other classes
    renormalized, weighted by y_c; times T^2, mean over samples."""
    s, t, y, alpha, beta, temp = dec(s), dec(t), dec(y), Decimal(alpha), Decimal(beta), Decimal(temp)
    total = Decimal(0)
    for si, ti, yi in zip(s, t, y, strict=True):
        ps, pt = softmax(si, temp), softmax(ti, temp)
        for c, w in enumerate(yi):
            if w == 0:
                continue
            tckd = kl([pt[c], 1 - pt[c]], [ps[c], 1 - ps[c]])
            qs = [ps[j] / (1 - ps[c]) for j in range(len(si)) if j != c]
            qt = [pt[j] / (1 - pt[c]) for j in range(len(ti)) if j != c]
            total += w * (alpha * tckd + beta * kl(qt, qs))
    return float(temp * temp * total / len(s))


def zscore(z):
    mean = sum(z) / len(z)
    std = (sum((v - mean) ** 2 for v in z) / (len(z) - 1)).sqrt()  # unbiased
    return [(v - mean) / (Decimal("1e-7") + std) for v in z]


def ref_lskd(s, t, temp):
    s, t, temp = dec(s), dec(t), Decimal(temp)
    total = sum(kl(softmax(zscore(ti), temp), softmax(zscore(si), temp)) for si, ti in zip(s, t, strict=True))
    return float(temp * temp * total / len(s))


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    den = sum((x - ma) ** 2 for x in a).sqrt() * sum((y - mb) ** 2 for y in b).sqrt()
    return num / (den + Decimal("1e-8"))


def ref_dist(s, t, beta, gamma, temp):
    temp = Decimal(temp)
    ys = [softmax(r, temp) for r in dec(s)]
    yt = [softmax(r, temp) for r in dec(t)]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ys, yt, strict=True)) / len(ys)
    cols = range(len(ys[0]))
    intra = 1 - sum(pearson([r[c] for r in ys], [r[c] for r in yt]) for c in cols) / len(cols)
    return float(temp * temp * (Decimal(beta) * inter + Decimal(gamma) * intra))


# The references' values (printed by the functions above):
DKD_MIXED = 6.802807860012991  # ref_dkd(S, T, Y_MIXED, 1, 8, 4)
DKD_ONEHOT = 6.611335308962263  # ref_dkd(S, T, Y_ONEHOT, 1, 8, 4)
DKD_MIXED_A2_B05_T1 = 0.764341255233429  # ref_dkd(S, T, Y_MIXED, 2, 0.5, 1)
LSKD_T2 = 0.2818508499556735  # ref_lskd(S, T, 2)
LSKD_T1 = 0.24389406729767002  # ref_lskd(S, T, 1)
DIST_T4 = 12.755682375983662  # ref_dist(S, T, 1, 1, 4)
DIST_B2_G05_T1 = 1.1002129237974743  # ref_dist(S, T, 2, 0.5, 1)


def test_references_print_the_literals():
    assert ref_dkd(S, T, Y_MIXED, 1.0, 8.0, 4.0) == pytest.approx(DKD_MIXED, rel=1e-12)
    assert ref_dkd(S, T, Y_ONEHOT, 1.0, 8.0, 4.0) == pytest.approx(DKD_ONEHOT, rel=1e-12)
    assert ref_dkd(S, T, Y_MIXED, 2.0, 0.5, 1.0) == pytest.approx(DKD_MIXED_A2_B05_T1, rel=1e-12)
    assert ref_lskd(S, T, 2.0) == pytest.approx(LSKD_T2, rel=1e-12)
    assert ref_lskd(S, T, 1.0) == pytest.approx(LSKD_T1, rel=1e-12)
    assert ref_dist(S, T, 1.0, 1.0, 4.0) == pytest.approx(DIST_T4, rel=1e-12)
    assert ref_dist(S, T, 2.0, 0.5, 1.0) == pytest.approx(DIST_B2_G05_T1, rel=1e-12)


def value(method, y=Y_MIXED, **params):
    return distillation_loss(method, tensor(S), tensor(T), tensor(y), **params).item()


def test_dkd_matches_hand_computed_values_on_mixed_and_one_hot_targets():
    assert value("dkd") == pytest.approx(DKD_MIXED, rel=1e-5)  # defaults: alpha 1, beta 8, T 4
    assert value("dkd", Y_ONEHOT) == pytest.approx(DKD_ONEHOT, rel=1e-5)
    assert value("dkd", alpha=2.0, beta=0.5, temperature=1.0) == pytest.approx(DKD_MIXED_A2_B05_T1, rel=1e-5)


def test_dkd_on_a_mixed_sample_is_the_label_weighted_sum_of_its_classes_terms():
    s, t = tensor(S[:1]), tensor(T[:1])
    as_0 = distillation_loss("dkd", s, t, tensor([[1.0, 0, 0, 0]])).item()
    as_1 = distillation_loss("dkd", s, t, tensor([[0, 1.0, 0, 0]])).item()
    mixed = distillation_loss("dkd", s, t, tensor([[0.7, 0.3, 0, 0]])).item()
    assert mixed == pytest.approx(0.7 * as_0 + 0.3 * as_1, rel=1e-6)
    assert as_0 != pytest.approx(as_1, rel=1e-2)


def test_lskd_matches_hand_computed_values_and_ignores_the_target():
    assert value("lskd") == pytest.approx(LSKD_T2, rel=1e-5)  # default base temperature 2
    assert value("lskd", Y_ONEHOT, temperature=1.0) == pytest.approx(LSKD_T1, rel=1e-5)


def test_lskd_is_invariant_to_shifting_and_scaling_each_samples_logits():
    s, t, y = tensor(S), tensor(T), tensor(Y_MIXED)
    moved = distillation_loss("lskd", 3.0 * s - 5.0, 0.5 * t + 2.0, y).item()
    assert moved == pytest.approx(LSKD_T2, rel=1e-4)


def test_dist_matches_hand_computed_values():
    assert value("dist") == pytest.approx(DIST_T4, rel=1e-5)  # defaults: beta 1, gamma 1, tau 4
    assert value("dist", Y_ONEHOT, beta=2.0, gamma=0.5, temperature=1.0) == pytest.approx(DIST_B2_G05_T1, rel=1e-5)


def test_kd_and_std_are_the_studys_terms():
    from mixkd.losses import kd_loss, std_kd_loss

    s, t, y = tensor(S), tensor(T), tensor(Y_MIXED)
    assert distillation_loss("kd", s, t, y).item() == pytest.approx(kd_loss(s, t, 4.0).item(), rel=1e-7)
    assert distillation_loss("kd", s, t, y, temperature=2.0).item() == pytest.approx(kd_loss(s, t, 2.0).item(), rel=1e-7)
    assert distillation_loss("std", s, t, y).item() == pytest.approx(std_kd_loss(s, t).item(), rel=1e-7)


def test_terms_vanish_when_the_student_is_the_teacher():
    t, y = tensor(T), tensor(Y_MIXED)
    for method in ("dkd", "lskd", "dist"):
        assert distillation_loss(method, t, t, y).item() == pytest.approx(0.0, abs=1e-4), method  # T^2 = 16 x float32 rounding


# ---- the authors' code, transcribed (one-hot targets given as class indices) ---------------------
def authors_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller/distillers/DKD.py ``dkd_loss`` (``size_average=False`` written as reduction='sum')."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        return torch.cat([(t * mask1).sum(dim=1, keepdims=True), (t * mask2).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def authors_lskd(logits_student, logits_teacher, temperature):
    """logit-standardization-KD mdistiller/distillers/KD.py ``kd_loss`` with ``logit_stand=True``."""
    def normalize(logit):
        return (logit - logit.mean(dim=-1, keepdims=True)) / (1e-7 + logit.std(dim=-1, keepdims=True))

    log_pred_student = F.log_softmax(normalize(logits_student) / temperature, dim=1)
    pred_teacher = F.softmax(normalize(logits_teacher) / temperature, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * temperature**2


def authors_dist(z_s, z_t, beta, gamma, tau):
    """image_classification_sota lib/models/losses/dist_kd.py ``DIST.forward``."""
    def cosine_similarity(a, b, eps=1e-8):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def pearson_correlation(a, b, eps=1e-8):
        return cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)

    def inter_class_relation(y_s, y_t):
        return 1 - pearson_correlation(y_s, y_t).mean()

    y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    inter = tau**2 * inter_class_relation(y_s, y_t)
    intra = tau**2 * inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))
    return beta * inter + gamma * intra


@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_agrees_with_the_authors_code_on_one_hot_targets(scale):
    g = torch.Generator().manual_seed(3)
    s = scale * torch.randn(16, 100, generator=g)
    t = scale * torch.randn(16, 100, generator=g)
    labels = torch.randint(0, 100, (16,), generator=g)
    y = F.one_hot(labels, 100).float()
    for alpha, beta, temp in ((1.0, 8.0, 4.0), (1.0, 2.0, 4.0), (9.0, 72.0, 2.0), (1.0, 0.5, 1.0)):
        ours = distillation_loss("dkd", s, t, y, alpha=alpha, beta=beta, temperature=temp)
        assert ours.item() == pytest.approx(authors_dkd(s, t, labels, alpha, beta, temp).item(), rel=2e-5)
    for temp in (2.0, 1.0):
        ours = distillation_loss("lskd", s, t, y, temperature=temp)
        assert ours.item() == pytest.approx(authors_lskd(s, t, temp).item(), rel=2e-5)
    for beta, gamma, tau in ((1.0, 1.0, 4.0), (2.0, 0.5, 1.0)):
        ours = distillation_loss("dist", s, t, y, beta=beta, gamma=gamma, temperature=tau)
        assert ours.item() == pytest.approx(authors_dist(s, t, beta, gamma, tau).item(), rel=2e-5)


def test_dkd_stays_exact_and_finite_for_a_confident_teacher_and_student():
    """Logit gaps of 60 at T = 1: 1 - p underflows in float32, where a closed form would cancel."""
    s = torch.tensor([[60.0, 0.0, 1.0, -1.0], [0.0, 2.0, 1.0, 0.5]], requires_grad=True)
    t = torch.tensor([[0.0, 61.0, 0.5, 1.0], [55.0, 0.0, 0.0, 0.3]])
    y = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.0, 0.5, 0.0, 0.5]])
    loss = distillation_loss("dkd", s, t, y, alpha=1.0, beta=8.0, temperature=1.0)
    expected = ref_dkd(s.detach().tolist(), t.tolist(), y.tolist(), 1.0, 8.0, 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_gradients_reach_only_the_student_and_are_finite():
    for method in DISTILLATION_DEFAULTS:
        s = tensor(S).requires_grad_(True)
        t = tensor(T).requires_grad_(True)
        distillation_loss(method, s, t.detach(), tensor(Y_MIXED)).backward()
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0, method
        assert t.grad is None


def test_bf16_logits_give_float32_terms():
    for method in DISTILLATION_DEFAULTS:
        out = distillation_loss(method, tensor(S).bfloat16(), tensor(T).bfloat16(), tensor(Y_MIXED))
        assert out.dtype == torch.float32 and out.dim() == 0, method


def test_bad_arguments_are_refused_with_one_clear_line():
    s, t, y = tensor(S), tensor(T), tensor(Y_MIXED)
    with pytest.raises(ValueError, match="unknown KD method 'crd'; choose one of kd, std, dkd, lskd, dist"):
        distillation_loss("crd", s, t, y)
    with pytest.raises(ValueError, match="'lskd' does not take gamma; it takes temperature"):
        distillation_loss("lskd", s, t, y, gamma=1.0)
    with pytest.raises(ValueError, match="must have one"):
        distillation_loss("dkd", s, t, y[:, :3])
