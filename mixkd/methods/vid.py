"""VID: variational information distillation (Ahn et al., CVPR 2019), as mdistiller trains it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from mixkd.methods._feature import FeatureDistiller, FeatureSettings, feature_weight_field, paired, stages
from mixkd.registry import KD_METHODS


class VIDSettings(FeatureSettings):
    feat_weight: float = feature_weight_field(1.0, "weight of the VID term "
                               "(mdistiller engine/cfg.py CFG.VID.LOSS.FEAT_WEIGHT)")
    init_pred_var: float = Field(5.0, gt=0, le=50, description="initial variance of the Gaussian over each "
                                 "teacher channel (mdistiller engine/cfg.py CFG.VID.INIT_PRED_VAR)")
    eps: float = Field(1e-5, gt=0, le=1, description="floor added to the variance "
                       "(mdistiller engine/cfg.py CFG.VID.EPS)")


def _regressor(s: int, t: int) -> torch.nn.Sequential:
    """1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv, without bias (VID.py ``init_vid_modules``)."""
    def conv(i, o):
        return torch.nn.Conv2d(i, o, kernel_size=1, bias=False)

    return torch.nn.Sequential(conv(s, t), torch.nn.ReLU(), conv(t, t), torch.nn.ReLU(), conv(t, t))


def vid_loss(regressor: torch.nn.Module, log_scale: torch.Tensor, f_s: torch.Tensor, f_t: torch.Tensor,
             eps: float) -> torch.Tensor:
    """mean of the Gaussian negative log-likelihood of the teacher's map under mean regressor(f_s) and a
    per-channel variance log(1 + exp(log_scale)) + eps (VID.py ``vid_loss``; constant dropped)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    pred_mean = regressor(f_s).float()
    pred_var = (torch.log(1.0 + torch.exp(log_scale)) + eps).view(1, -1, 1, 1)
    return torch.mean(0.5 * ((pred_mean - f_t.float()) ** 2 / pred_var + torch.log(pred_var)))


@KD_METHODS.register("vid", settings=VIDSettings, label="VID", title="variational information distillation")
class VID(FeatureDistiller):
    """Variational information distillation (Ahn et al. 2019; mdistiller distillers/VID.py), stage outputs.

    ``ce_weight * CE + feat_weight * sum over stages`` of the negative log-likelihood of each teacher stage output
    under a Gaussian whose mean a 3-layer 1x1-conv regressor predicts from the student's stage and whose
    per-channel variance is learned. The regressors and variances are the method's trainable modules."""

    def __init__(self, student, teacher, settings):
        super().__init__(student, teacher, settings)
        shape_s, shape_t = self.shapes()
        pairs = list(zip(*paired(stages(shape_s), stages(shape_t)), strict=True))
        init = math.log(math.exp(settings.init_pred_var - settings.eps) - 1.0)
        self.modules["regressors"] = torch.nn.ModuleList(_regressor(a[1], b[1]) for a, b in pairs)
        self.modules["log_scales"] = torch.nn.ParameterList(
            torch.nn.Parameter(torch.full((b[1],), init)) for _, b in pairs)

    def feature_term(self, feats_s, feats_t):
        total = 0
        regs, scales = self.modules["regressors"], self.modules["log_scales"]
        for reg, scale, f_s, f_t in zip(regs, scales, *paired(stages(feats_s), stages(feats_t)), strict=True):
            total = total + vid_loss(reg, scale, f_s, f_t, self.settings.eps)
        return total
