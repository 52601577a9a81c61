"""``feature_loss`` for AT, NST, SP, KDSVD, PKT and RKD, pinned two ways.

1. Hand-computed values on tiny features (closed forms worked out in each test's comment, or plain-Python
   loops over the definitions, sharing no code with mixkd).
2. The authors' functions, re-typed below from mdistiller (megvii-research/mdistiller at a08d46f, MIT
   licence), on random features shaped like a CIFAR ResNet's stages. Each follows its source operation
   by operation, quirks included (KDSVD's (B, C H, W) view, the authors' ``torch.svd``, RKD's mean over
   positive distances by boolean indexing, PKT's in-place NaN zeroing).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mixkd.losses import feature_loss


def maps(*rows):
    """(B=1, C=1, H=1, W=len) maps from rows of numbers."""
    return [torch.tensor([[[r]]], dtype=torch.float32) for r in rows]


# ---- 1. hand-computed values -------------------------------------------------------------------------------
def test_at_is_one_minus_the_cosine_of_the_attention_maps_on_two_pixel_maps():
    # One channel, two pixels: at(f) = f^p / ||f^p||, and mean((a - b)^2) over 2 entries = 1 - cos(a, b).
    s, t = maps([3.0, 4.0]), maps([1.0, 0.0])
    assert feature_loss("at", s, t, p=1.0).item() == pytest.approx(1 - 3 / 5, rel=1e-6)
    assert feature_loss("at", s, t).item() == pytest.approx(1 - 9 / math.sqrt(337), rel=1e-6)  # p = 2: (9, 16)
    # stages add up; a 2x2 student map is average-pooled to the teacher's 1x1 one (then both are [1]: 0)
    two = feature_loss("at", s + [torch.ones(1, 1, 2, 2)], t + [torch.ones(1, 1, 1, 1)], p=1.0)
    assert two.item() == pytest.approx(0.4, rel=1e-6)


def test_nst_is_two_minus_twice_the_squared_cosine_for_one_channel():
    # One channel each: k(s, s) = k(t, t) = 1 and k(s, t) = cos^2(s, t) = 1/2 for (1, 0) and (1, 1).
    assert feature_loss("nst", maps([1.0, 0.0]), maps([1.0, 1.0])).item() == pytest.approx(1.0, rel=1e-6)
    assert feature_loss("nst", maps([2.0, 0.0]), maps([1.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)


def test_sp_on_two_one_dimensional_samples():
    # f_s = (1, 2): both rows of G_s normalize to (1, 2)/sqrt5; f_t = (1, -1): rows (1, -1)/sqrt2, (-1, 1)/sqrt2.
    # ||G_t - G_s||^2 = 2 + 2 - 2 * (-1/sqrt10 + 1/sqrt10) = 4, over B^2 = 4: 1.
    s = [torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1)]
    t = [torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1)]
    assert feature_loss("sp", s, t).item() == pytest.approx(1.0, rel=1e-6)


def test_pkt_on_orthogonal_student_and_collinear_teacher_rows():
    # q_s rows (2/3, 1/3), (1/3, 2/3); q_t all 1/2: mean over the 4 entries of q_t log(q_t / q_s) = ln(9/8) / 4.
    s, t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert feature_loss("pkt", [s], [t]).item() == pytest.approx(math.log(9 / 8) / 4, rel=1e-5)


def plain_rkd(s, t, distance_weight, angle_weight):
    """RKD from its definition with Python floats: distances over their mean over i != j, cosines of
    the angle at j of every triplet (i, j, k) (0 when a side has length 0), smooth-L1 (beta 1) means."""
    def huber(x):
        return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5

    def dist(e):
        n = len(e)
        d = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)
        return [d[i][j] / mean for i in range(n) for j in range(n)]

    def angles(e):
        out = []
        for i in range(len(e)):
            for j in range(len(e)):
                for k in range(len(e)):
                    a = [x - y for x, y in zip(e[i], e[j], strict=True)]  # e_i - e_j
                    b = [x - y for x, y in zip(e[k], e[j], strict=True)]
                    na, nb = math.hypot(*a), math.hypot(*b)
                    out.append(0.0 if na == 0 or nb == 0 else sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb))
        return out

    loss_d = sum(huber(x - y) for x, y in zip(dist(s), dist(t), strict=True)) / len(s) ** 2
    loss_a = sum(huber(x - y) for x, y in zip(angles(s), angles(t), strict=True)) / len(s) ** 3
    return distance_weight * loss_d + angle_weight * loss_a


def test_rkd_matches_its_definition_and_ignores_scale():
    t = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    s = [[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]]
    ours = feature_loss("rkd", [torch.tensor(s)], [torch.tensor(t)]).item()
    assert ours == pytest.approx(plain_rkd(s, t, 25.0, 50.0), rel=1e-5)
    assert ours > 0.1
    only_angles = feature_loss("rkd", [torch.tensor(s)], [torch.tensor(t)], distance_weight=0.0, angle_weight=1.0)
    assert only_angles.item() == pytest.approx(plain_rkd(s, t, 0.0, 1.0), rel=1e-5)
    doubled = feature_loss("rkd", [2 * torch.tensor(t)], [torch.tensor(t)]).item()
    assert doubled == pytest.approx(0.0, abs=1e-5)  # distances normalized by their mean, angles scale-free


def test_kdsvd_vanishes_for_a_student_that_is_the_teacher():
    g = torch.Generator().manual_seed(1)
    feats = [torch.relu(torch.randn(4, 8, 4, 4, generator=g)) for _ in range(3)]
    assert feature_loss("kdsvd", feats, [f.clone() for f in feats]).item() == pytest.approx(0.0, abs=1e-6)
    other = [torch.relu(torch.randn(4, 8, 4, 4, generator=g)) for _ in range(3)]
    assert feature_loss("kdsvd", other, feats).item() > 1e-3


# ---- 2. the authors' functions (mdistiller/distillers/*.py at a08d46f) ------------------------------------
def authors_pool(f_s, f_t):
    """The pooling that opens AT.py ``single_stage_at_loss`` and NST.py ``single_stage_nst_loss``."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def authors_at(g_s, g_t, p):
    """AT.py ``at_loss`` / ``single_stage_at_loss``."""
    total = 0
    for f_s, f_t in zip(g_s, g_t, strict=True):
        f_s, f_t = authors_pool(f_s, f_t)
        a_s = F.normalize(f_s.pow(p).mean(1).reshape(f_s.size(0), -1))
        a_t = F.normalize(f_t.pow(p).mean(1).reshape(f_t.size(0), -1))
        total = total + (a_s - a_t).pow(2).mean()
    return total


def authors_nst(g_s, g_t):
    """NST.py ``nst_loss`` / ``single_stage_nst_loss`` / ``poly_kernel``."""
    def poly_kernel(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    total = 0
    for f_s, f_t in zip(g_s, g_t, strict=True):
        f_s, f_t = authors_pool(f_s, f_t)
        f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
        f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)
        total = total + poly_kernel(f_t, f_t).mean().detach() + poly_kernel(f_s, f_s).mean() - 2 * poly_kernel(f_s, f_t).mean()
    return total


def authors_sp(g_s, g_t):
    """SP.py ``sp_loss`` / ``similarity_loss`` (its (1,)-shaped result)."""
    total = 0
    for f_s, f_t in zip(g_s, g_t, strict=True):
        bsz = f_s.shape[0]
        f_s, f_t = f_s.view(bsz, -1), f_t.view(bsz, -1)
        g_s_ = F.normalize(torch.mm(f_s, torch.t(f_s)))
        g_t_ = F.normalize(torch.mm(f_t, torch.t(f_t)))
        diff = g_t_ - g_s_
        total = total + (diff * diff).view(-1, 1).sum(0) / (bsz * bsz)
    return total


def authors_kdsvd(g_s, g_t, k):
    """KDSVD.py ``kdsvd_loss`` / ``svd`` / ``removenan`` / ``align_rsv``."""
    def removenan(x):
        return torch.where(torch.isfinite(x), x, torch.zeros_like(x))

    def svd(feat, n):
        size = feat.shape
        u, s, v = torch.svd(feat.view(size[0], size[1] * size[2], size[3]).float())
        u, s, v = removenan(u), removenan(s), removenan(v)
        return F.normalize(u[:, :, :n], dim=1), F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)

    def align_rsv(a, b):
        cosine = torch.matmul(a.transpose(-2, -1), b)
        max_abs_cosine, _ = torch.max(torch.abs(cosine), 1, keepdim=True)
        mask = torch.where(torch.eq(max_abs_cosine, torch.abs(cosine)), torch.sign(cosine), torch.zeros_like(cosine))
        return torch.matmul(a, mask), b

    v_sb = v_tb = None
    losses = []
    for i, (f_s, f_t) in enumerate(zip(g_s, g_t, strict=True)):
        _, s_t, v_t = svd(f_t, k)
        _, _, v_s = svd(f_s, k + 3)
        v_s, v_t = align_rsv(v_s, v_t)
        s_t = s_t.unsqueeze(1)
        v_t, v_s = v_t * s_t, v_s * s_t
        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
            l2 = (s_rbf - t_rbf.detach()).pow(2)
            losses.append(torch.where(torch.isfinite(l2), l2, torch.zeros_like(l2)).sum())
        v_tb, v_sb = v_t, v_s
    return sum(x / g_s[0].shape[0] for x in losses)


def authors_pkt(f_s, f_t, eps=1e-7):
    """PKT.py ``pkt_loss``."""
    f_s = f_s / (torch.sqrt(torch.sum(f_s**2, dim=1, keepdim=True)) + eps)
    f_s[f_s != f_s] = 0
    f_t = f_t / (torch.sqrt(torch.sum(f_t**2, dim=1, keepdim=True)) + eps)
    f_t[f_t != f_t] = 0
    model_sim = (torch.mm(f_s, f_s.transpose(0, 1)) + 1.0) / 2.0
    target_sim = (torch.mm(f_t, f_t.transpose(0, 1)) + 1.0) / 2.0
    model_sim = model_sim / torch.sum(model_sim, dim=1, keepdim=True)
    target_sim = target_sim / torch.sum(target_sim, dim=1, keepdim=True)
    return torch.mean(target_sim * torch.log((target_sim + eps) / (model_sim + eps)))


def authors_rkd(f_s, f_t, squared=False, eps=1e-12, distance_weight=25, angle_weight=50):
    """RKD.py ``rkd_loss`` / ``_pdist``."""
    def pdist(e):
        e_square = e.pow(2).sum(dim=1)
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
        if not squared:
            res = res.sqrt()
        res = res.clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    stu, tea = f_s.view(f_s.shape[0], -1), f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = pdist(tea)
        t_d = t_d / t_d[t_d > 0].mean()
    d = pdist(stu)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        norm_td = F.normalize(tea.unsqueeze(0) - tea.unsqueeze(1), p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    norm_sd = F.normalize(stu.unsqueeze(0) - stu.unsqueeze(1), p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    return distance_weight * loss_d + angle_weight * F.smooth_l1_loss(s_angle, t_angle)


@pytest.fixture(scope="module")
def features():
    """Stage outputs (post-ReLU) of a resnet8-like student and a wider teacher, batch 8; pooled (B, D) too.
    The teacher's first stage is twice the student's size, to exercise the pooling of AT and NST."""
    g = torch.Generator().manual_seed(27)
    s_maps = [torch.relu(torch.randn(8, c, h, h, generator=g)) for c, h in ((16, 8), (32, 4), (64, 2))]
    t_maps = [torch.relu(torch.randn(8, c, h, h, generator=g)) for c, h in ((32, 16), (64, 4), (128, 2))]
    s_pool, t_pool = torch.randn(8, 64, generator=g), torch.randn(8, 256, generator=g)
    return s_maps, t_maps, s_pool, t_pool


def test_at_nst_sp_equal_the_authors_functions(features):
    s_maps, t_maps, _, _ = features
    for p in (2.0, 1.0, 3.0):
        assert feature_loss("at", s_maps, t_maps, p=p).item() == pytest.approx(authors_at(s_maps, t_maps, p).item(), rel=1e-5)
    assert feature_loss("nst", s_maps, t_maps).item() == pytest.approx(authors_nst(s_maps, t_maps).item(), rel=1e-5)
    assert feature_loss("sp", s_maps, t_maps).item() == pytest.approx(authors_sp(s_maps, t_maps).item(), rel=1e-5)
    last = ([s_maps[-1]], [t_maps[-1]])  # what mdistiller's SP distils: the last stage only
    assert feature_loss("sp", *last).item() == pytest.approx(authors_sp(*last).item(), rel=1e-5)


def test_kdsvd_equals_the_authors_function(features):
    s_maps, _, _, _ = features
    g = torch.Generator().manual_seed(5)
    t_maps = [torch.relu(torch.randn(8, 2 * f.shape[1], f.shape[2], f.shape[3], generator=g)) for f in s_maps]
    for k in (1, 2):
        ours = feature_loss("kdsvd", s_maps, t_maps, k=k).item()
        assert ours == pytest.approx(authors_kdsvd(s_maps, t_maps, k).item(), rel=1e-4, abs=1e-6)
        assert ours > 0


def test_pkt_and_rkd_equal_the_authors_functions(features):
    _, _, s_pool, t_pool = features
    assert feature_loss("pkt", [s_pool], [t_pool]).item() == pytest.approx(authors_pkt(s_pool, t_pool).item(), rel=1e-5)
    for kw in ({}, {"squared": True}, {"distance_weight": 1.0, "angle_weight": 2.0}):
        ours = feature_loss("rkd", [s_pool], [t_pool], **kw).item()
        assert ours == pytest.approx(authors_rkd(s_pool, t_pool, **kw).item(), rel=1e-5), kw


@pytest.mark.parametrize("method", ["at", "nst", "sp", "kdsvd", "pkt", "rkd"])
def test_gradients_reach_only_the_student_and_bf16_gives_a_float32_scalar(features, method):
    s_maps, t_maps, s_pool, t_pool = features
    if method == "kdsvd":
        t_maps = [torch.cat([f, f], dim=1) for f in s_maps]
    s, t = ([s_pool], [t_pool]) if method in ("pkt", "rkd") else (s_maps, t_maps)
    s = [f.clone().requires_grad_(True) for f in s]
    t = [f.clone().requires_grad_(True) for f in t]
    out = feature_loss(method, s, t)
    out.backward()
    assert out.dim() == 0 and out.dtype == torch.float32
    assert all(f.grad is not None and torch.isfinite(f.grad).all() for f in s)
    assert sum(f.grad.abs().sum() for f in s) > 0
    assert all(f.grad is None for f in t)
    low = feature_loss(method, [f.detach().bfloat16() for f in s], [f.detach().bfloat16() for f in t])
    assert low.dtype == torch.float32 and low.dim() == 0


def test_bad_arguments_are_refused_with_one_clear_line(features):
    s_maps, t_maps, s_pool, t_pool = features
    with pytest.raises(ValueError, match="unknown feature KD method 'crd'; choose one of at, nst, sp, kdsvd, pkt, rkd"):
        feature_loss("crd", s_maps, t_maps)
    with pytest.raises(ValueError, match="'sp' does not take p; it takes no parameters"):
        feature_loss("sp", s_maps, t_maps, p=2.0)
    with pytest.raises(ValueError, match="one teacher feature per student feature"):
        feature_loss("at", s_maps, t_maps[:2])
    with pytest.raises(ValueError, match=r"takes \(B, C, H, W\) feature maps"):
        feature_loss("at", [s_pool], [t_pool])
    with pytest.raises(ValueError, match="one-element list"):
        feature_loss("rkd", [s_pool, s_pool], [t_pool, t_pool])
    with pytest.raises(ValueError, match="one batch size"):
        feature_loss("pkt", [s_pool], [t_pool[:4]])


def test_kdsvd_gradient_stays_finite_on_maps_with_repeated_singular_values():
    """ReLU maps with all-zero rows (digits' black background) have repeated zero singular values, where the
    SVD's gradient is infinite or NaN; its non-finite entries are zeroed, the loss is unchanged."""
    g = torch.Generator().manual_seed(2)
    s = [torch.relu(torch.randn(2, 4, 4, 4, generator=g)) for _ in range(2)]
    for f in s:
        f[:, :, :, 1:] = 0  # rank 1 at most: singular values 0 repeated
    t = [torch.relu(torch.randn(2, 8, 4, 4, generator=g)) for _ in range(2)]
    s = [f.requires_grad_(True) for f in s]
    loss = feature_loss("kdsvd", s, t)
    assert loss.item() == pytest.approx(authors_kdsvd([f.detach() for f in s], t, 1).item(), rel=1e-5)
    loss.backward()
    assert all(torch.isfinite(f.grad).all() for f in s)
