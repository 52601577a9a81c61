"""The feature-based KD methods' distillation terms: pure functions of student and teacher features.

Each is the term as its authors compute it in mdistiller (``mdistiller/distillers/<NAME>.py``, commit
a08d46f), without the CE term and without the method's outer feature weight, in float32 whatever the
features' dtype, and without any read back to the host (no ``.item()``, no boolean indexing), so that
it runs inside a captured training step. The teacher's side carries no gradient where the authors
detach it or compute it under ``torch.no_grad()``.

- Map methods take lists of (B, C, H, W) feature maps, one student/teacher pair per list position
  (mdistiller feeds ``feats[1:]``, the stage outputs; SP only the last one): ``at``, ``nst``, ``sp``,
  ``kdsvd``.
- Embedding methods take the pooled (B, D) features: ``pkt``, ``rkd``.

:func:`feature_loss` is the public entry point (``from mixkd.losses import feature_loss``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _match_sizes(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """The larger map average-pooled to the smaller one's height (mdistiller AT/NST/VID: square maps)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


# ---- AT: attention transfer (Zagoruyko & Komodakis, ICLR 2017) ---------------------------------------------
def attention_map(feat: Tensor, p: float = 2.0) -> Tensor:
    """The L2-normalized spatial attention map: mean over channels of ``feat ** p``, flattened, (B, H W)."""
    return F.normalize(feat.float().pow(p).mean(1).reshape(feat.shape[0], -1))


def at_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """sum over stages of mean((at(f_s) - at(f_t))^2) (mdistiller AT.py ``at_loss``)."""
    total = 0
    for f_s, f_t in zip(student, teacher, strict=True):
        f_s, f_t = _match_sizes(f_s, f_t)
        total = total + (attention_map(f_s, p) - attention_map(f_t.detach(), p)).pow(2).mean()
    return total


# ---- NST: neuron selectivity transfer (Huang & Wang, 2017) --------------------------------------------------
def _poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """mean over (batch, channel of a, channel of b) of <a_i, b_j>^2 (NST.py ``poly_kernel(a, b).mean()``)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """sum over stages of the squared MMD with a degree-2 polynomial kernel between the channels'
    spatially L2-normalized activations: k(t, t) + k(s, s) - 2 k(s, t) (mdistiller NST.py ``nst_loss``)."""
    total = 0
    for f_s, f_t in zip(student, teacher, strict=True):
        f_s, f_t = _match_sizes(f_s.float(), f_t.float().detach())
        f_s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
        f_t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
        total = total + _poly_kernel_mean(f_t, f_t) + _poly_kernel_mean(f_s, f_s) - 2 * _poly_kernel_mean(f_s, f_t)
    return total


# ---- SP: similarity-preserving KD (Tung & Mori, ICCV 2019) -----------------------------------------------------
def sp_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """sum over stages of ||G_t - G_s||_F^2 / B^2, G the row-normalized (B, B) Gram matrix of the
    flattened features (mdistiller SP.py ``similarity_loss``)."""
    total = 0
    for f_s, f_t in zip(student, teacher, strict=True):
        bsz = f_s.shape[0]
        g_s = F.normalize(_gram(f_s.float().reshape(bsz, -1)))
        g_t = F.normalize(_gram(f_t.float().detach().reshape(bsz, -1)))
        total = total + (g_t - g_s).pow(2).sum() / (bsz * bsz)
    return total


def _gram(f: Tensor) -> Tensor:
    return f @ f.t()


# ---- KDSVD (Lee et al., ECCV 2018) ------------------------------------------------------------------------
def _finite(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class _FiniteGradient(torch.autograd.Function):
    """Identity forward; backward zeroes the non-finite entries of the gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _finite(grad)


def _svd(feat: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(singular values, right singular vectors), the first ``n`` of each L2-normalized, of the map
    viewed as a (B, C H, W) matrix, as KDSVD.py ``svd`` views it.

    The SVD's gradient divides by the differences of squared singular values: a map with repeated ones
    (ReLU maps with all-zero rows, digits' black background) gets an infinite or NaN gradient, which
    would make the student's weights NaN at once. Non-finite entries of the gradient reaching ``feat``
    are zeroed, the backward twin of the authors' ``removenan`` on the forward's outputs; finite
    gradients are untouched."""
    b, c, h, w = feat.shape
    x = feat.float().reshape(b, c * h, w)
    if x.requires_grad:
        x = _FiniteGradient.apply(x)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    s, v = _finite(s), _finite(vh.transpose(-2, -1))
    return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def _align(v_s: Tensor, v_t: Tensor) -> Tensor:
    """Each teacher vector's most similar student vector (in |cosine|), its sign matched (KDSVD.py ``align_rsv``)."""
    cosine = torch.matmul(v_s.transpose(-2, -1), v_t)
    best = torch.abs(cosine).amax(dim=1, keepdim=True)
    mask = torch.where(torch.eq(best, torch.abs(cosine)), torch.sign(cosine), torch.zeros_like(cosine))
    return torch.matmul(v_s, mask)


def kdsvd_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], k: int = 1) -> Tensor:
    """KDSVD (mdistiller KDSVD.py ``kdsvd_loss``): per stage, the teacher's first ``k`` right singular
    vectors and the student's first ``k + 3``, aligned; between consecutive stages, the RBF kernel
    exp(-(v_i - v'_j)^2 / 8) of the singular-value-scaled vectors; the sum of squared differences of
    the student's and the teacher's kernels (non-finite entries zeroed), divided by the batch size."""
    total = 0
    prev_s = prev_t = None
    bsz = student[0].shape[0]
    for f_s, f_t in zip(student, teacher, strict=True):
        with torch.no_grad():
            s_t, v_t = _svd(f_t.detach(), k)
        _, v_s = _svd(f_s, k + 3)
        v_s = _align(v_s, v_t)
        scale = s_t.unsqueeze(1)
        v_t, v_s = v_t * scale, v_s * scale
        if prev_s is not None:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - prev_s.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - prev_t.unsqueeze(1)).pow(2) / 8)
            total = total + _finite((s_rbf - t_rbf.detach()).pow(2)).sum() / bsz
        prev_s, prev_t = v_s, v_t
    return total


# ---- PKT: probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) -------------------------------------
def _cosine_probabilities(f: Tensor, eps: float) -> Tensor:
    """Rows of the (B, B) cosine-similarity matrix mapped to [0, 1] and normalized to sum to 1."""
    f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    f = torch.where(torch.isnan(f), torch.zeros_like(f), f)  # the authors' ``f[f != f] = 0``
    sim = (f @ f.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_loss(f_s: Tensor, f_t: Tensor, eps: float = 1e-7) -> Tensor:
    """mean over the (B, B) entries of q_t log((q_t + eps) / (q_s + eps)), q the cosine-similarity
    probabilities (mdistiller PKT.py ``pkt_loss``)."""
    q_s = _cosine_probabilities(f_s.float().reshape(f_s.shape[0], -1), eps)
    q_t = _cosine_probabilities(f_t.float().detach().reshape(f_t.shape[0], -1), eps)
    return torch.mean(q_t * torch.log((q_t + eps) / (q_s + eps)))


# ---- RKD: relational KD (Park et al., CVPR 2019) ----------------------------------------------------------
def _pdist(e: Tensor, squared: bool, eps: float) -> Tensor:
    """Pairwise (squared when ``squared``) Euclidean distances, clamped below at ``eps``, zero diagonal
    (RKD.py ``_pdist``)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (e @ e.t())).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def _by_positive_mean(d: Tensor) -> Tensor:
    """``d / d[d > 0].mean()`` without the boolean indexing (a host sync)."""
    positive = (d > 0).to(d.dtype)
    return d / ((d * positive).sum() / positive.sum())


def _angles(e: Tensor) -> Tensor:
    """cos of the angle at j between i and k for every triplet (i, j, k), flattened (RKD.py angle loss)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_loss(f_s: Tensor, f_t: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0,
             squared: bool = False, eps: float = 1e-12) -> Tensor:
    """distance_weight * smooth-L1 of the mean-normalized pairwise distances + angle_weight * smooth-L1
    of the triplet angles (mdistiller RKD.py ``rkd_loss``)."""
    stu = f_s.float().reshape(f_s.shape[0], -1)
    tea = f_t.float().detach().reshape(f_t.shape[0], -1)
    loss_d = F.smooth_l1_loss(_by_positive_mean(_pdist(stu, squared, eps)), _by_positive_mean(_pdist(tea, squared, eps)))
    loss_a = F.smooth_l1_loss(_angles(stu), _angles(tea))
    return distance_weight * loss_d + angle_weight * loss_a


# ---- the public entry point ---------------------------------------------------------------------------------
# Each method's parameters and their defaults (mdistiller engine/cfg.py: CFG.AT.P, CFG.KDSVD.K,
# CFG.RKD.DISTANCE_WEIGHT / ANGLE_WEIGHT / PDIST.SQUARED / PDIST.EPSILON; PKT's eps is pkt_loss's default).
FEATURE_LOSS_DEFAULTS: dict[str, dict[str, float | int | bool]] = {
    "at": {"p": 2.0},
    "nst": {},
    "sp": {},
    "kdsvd": {"k": 1},
    "pkt": {"eps": 1e-7},
    "rkd": {"distance_weight": 25.0, "angle_weight": 50.0, "squared": False, "eps": 1e-12},
}
_MAP_METHODS = ("at", "nst", "sp", "kdsvd")  # lists of (B, C, H, W) maps; the others one (B, D) pair


def term_params(kind: str, method: str, params: dict, defaults: dict[str, dict]) -> dict:
    """``method``'s parameters: its ``defaults`` updated with ``params``; an unknown method or parameter is
    a ValueError naming what exists (``kind``: "KD method", "feature KD method")."""
    if method not in defaults:
        raise ValueError(f"unknown {kind} {method!r}; choose one of {', '.join(defaults)}")
    allowed = defaults[method]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) or "no parameters"
        raise ValueError(f"{kind} {method!r} does not take {', '.join(unknown)}; it takes {takes}")
    return {**allowed, **params}


def feature_loss(method: str, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor],
                 **params: float | int | bool) -> Tensor:
    """A feature method's distillation term as its authors compute it (no CE term, no outer weight), a
    float32 scalar tensor.

    ``method``: "at" (``p``), "nst", "sp", "kdsvd" (``k``) on lists of (B, C, H, W) feature maps, one
    student/teacher pair per list position; "pkt" (``eps``), "rkd" (``distance_weight``,
    ``angle_weight``, ``squared``, ``eps``) on the pooled features given as a one-element list of
    (B, D) tensors. Parameters not given take mdistiller's defaults (:data:`FEATURE_LOSS_DEFAULTS`).
    """
    p = term_params("feature KD method", method, params, FEATURE_LOSS_DEFAULTS)
    student_feats, teacher_feats = list(student_feats), list(teacher_feats)
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"{method}: give one teacher feature per student feature (got {len(student_feats)} "
                         f"student and {len(teacher_feats)} teacher features)")
    batch = {f.shape[0] for f in student_feats + teacher_feats}
    if len(batch) != 1:
        raise ValueError(f"{method}: student and teacher features must share one batch size (got {sorted(batch)})")
    if method in _MAP_METHODS:
        bad = [tuple(f.shape) for f in student_feats + teacher_feats if f.dim() != 4]
        if bad:
            raise ValueError(f"{method}: takes (B, C, H, W) feature maps; got a feature of shape {bad[0]}")
        if method == "at":
            return at_loss(student_feats, teacher_feats, p["p"])
        if method == "nst":
            return nst_loss(student_feats, teacher_feats)
        if method == "sp":
            return sp_loss(student_feats, teacher_feats)
        return kdsvd_loss(student_feats, teacher_feats, int(p["k"]))
    if len(student_feats) != 1:
        raise ValueError(f"{method}: takes the pooled features as a one-element list of (B, D) tensors "
                         f"(got {len(student_feats)} pairs)")
    if method == "pkt":
        return pkt_loss(student_feats[0], teacher_feats[0], p["eps"])
    return rkd_loss(student_feats[0], teacher_feats[0], p["distance_weight"], p["angle_weight"],
                    bool(p["squared"]), p["eps"])
