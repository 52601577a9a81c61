"""MLKD's loss (mixkd.mlkd_loss) against the released KD_ours.forward_train, restated term by term, on random
logits; its pieces by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixkd.mlkd_loss import batch_loss, class_loss, confidence_masks, instance_loss, mlkd_losses


def _released(sw, ss, tw, ts, y, T=4.0, ce_w=0.1, kd_w=0.9):
    """The released function's arithmetic, term by term (Jin-Ying/Multi-Level-Logit-Distillation,
    mdistiller/distillers/KD_ours.py): masks from NumPy's median, applied to already-reduced scalars."""
    def kd(s, t, temp):
        return (F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="none").sum(1).mean()
                * temp ** 2)

    def gram(p):
        return p @ p.T

    def cc(s, t, temp):
        ps, pt = F.softmax(s / temp, 1), F.softmax(t / temp, 1)
        return ((gram(pt.T) - gram(ps.T)) ** 2).sum() / s.shape[1]

    def bc(s, t, temp):
        ps, pt = F.softmax(s / temp, 1), F.softmax(t / temp, 1)
        return ((gram(pt) - gram(ps)) ** 2).sum() / s.shape[0]

    p = F.softmax(tw, 1)
    conf = p.max(1).values
    mask = conf <= float(np.percentile(conf.numpy(), 50))
    csum = p.sum(0)
    cmask = csum <= float(np.percentile(csum.numpy(), 50))
    temps = [T, 3.0, 5.0, 2.0, 6.0]
    ce = ce_w * (F.cross_entropy(sw, y) + F.cross_entropy(ss, y))
    kd_weak = sum(kd_w * (kd(sw, tw, t) * mask).mean() for t in temps)
    kd_strong = (kd_w * kd(ss, ts, T) + kd_w * kd(ss, ts, 3.0) + kd_w * kd(ss, ts, 5.0) + kd_w * kd(sw, tw, 2.0)
                 + kd_w * kd(sw, tw, 6.0))
    cc_weak = sum(kd_w * (cc(sw, tw, t) * cmask).mean() for t in temps)
    bc_weak = sum(kd_w * (bc(sw, tw, t) * mask).mean() for t in temps)
    return {"ce": ce, "kd": kd_weak + kd_strong, "cc": cc_weak, "bc": bc_weak}


@pytest.mark.parametrize("batch,classes,T", [(8, 5, 4.0), (7, 10, 2.5)])
def test_mlkd_matches_the_released_function(batch, classes, T):
    gen = torch.Generator().manual_seed(batch)
    sw, ss, tw, ts = (3 * torch.randn(batch, classes, generator=gen, dtype=torch.float64) for _ in range(4))
    y = torch.randint(0, classes, (batch,), generator=gen)
    ours = mlkd_losses(sw, ss, tw, ts, y, temperature=T)
    ref = _released(sw, ss, tw, ts, y, T)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert float(ours[k]) == pytest.approx(float(ref[k]), rel=1e-10), k


def test_pieces_by_hand():
    # two classes, one sample: teacher p = [3/4, 1/4] (logits ln 3, 0), student uniform: KL = 3/4 ln 3/2 + 1/4 ln 1/2
    t = torch.tensor([[math.log(3), 0.0]], dtype=torch.float64)
    s = torch.zeros(1, 2, dtype=torch.float64)
    assert float(instance_loss(s, t, 1.0)) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    # at T = 2 the logits halve: p_t = softmax([ln 3 / 2, 0]) = [sqrt3, 1] / (1 + sqrt3), times T² = 4
    q = math.sqrt(3) / (1 + math.sqrt(3))
    kl = q * math.log(2 * q) + (1 - q) * math.log(2 * (1 - q))
    assert float(instance_loss(s, t, 2.0)) == pytest.approx(4 * kl)
    # batch: P_t P_tᵀ = 9/16 + 1/16 = 5/8, P_s P_sᵀ = 1/2: (1/8)² / B (B = 1)
    assert float(batch_loss(s, t, 1.0)) == pytest.approx(1 / 64)
    # class: P_tᵀ P_t = [[9, 3], [3, 1]] / 16, P_sᵀ P_s = 1/4 everywhere: diffs 5/16, -1/16, -1/16, -3/16; / C = 2
    assert float(class_loss(s, t, 1.0)) == pytest.approx((25 + 1 + 1 + 9) / 256 / 2)


def test_confidence_masks_keep_the_lower_half():
    # confidences 0.9 (logit gap ln 9), 0.5, 0.75, 0.6: median 0.675: the samples at 0.5 and 0.6 count
    logits = torch.tensor([[math.log(9), 0.0], [0.0, 0.0], [math.log(3), 0.0], [math.log(1.5), 0.0]])
    mask, class_mask = confidence_masks(logits)
    assert mask.tolist() == [False, True, False, True]
    # per-class sums 0.9 + 0.5 + 0.75 + 0.6 = 2.75 and 1.25: the median 2.0; class 1 counts
    assert class_mask.tolist() == [False, True]
