"""ReviewKD: knowledge review (Chen et al., CVPR 2021), as mdistiller trains it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from mixkd.methods._feature import FeatureDistiller, FeatureSettings, feature_weight_field, stages
from mixkd.registry import KD_METHODS


class ReviewKDSettings(FeatureSettings):
    feat_weight: float = feature_weight_field(1.0, "weight of the review term (mdistiller engine/cfg.py "
                               "CFG.REVIEWKD.REVIEWKD_WEIGHT; 5 for resnet32x4->resnet8x4, configs/cifar100/reviewkd.yaml)")
    warmup_epochs: int = Field(20, ge=0, le=10000, description="epochs over which the review weight rises linearly "
                               "from 0 (mdistiller engine/cfg.py CFG.REVIEWKD.WARMUP_EPOCHS; 0: no warm-up)")
    max_mid_channel: int = Field(512, ge=1, le=4096, description="cap of the fusion modules' width "
                                 "(mdistiller engine/cfg.py CFG.REVIEWKD.MAX_MID_CHANNEL)")


class ABF(torch.nn.Module):
    """Attention-based fusion (ReviewKD.py ``ABF``): a 1x1 conv of the student's feature, fused with the
    (upsampled) residual of the deeper level by two sigmoid attention maps, resized to the teacher's
    size, then a 3x3 conv to the teacher's channels. Returns (output, residual for the next level)."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = torch.nn.Sequential(torch.nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                         torch.nn.BatchNorm2d(mid_channel))
        self.conv2 = torch.nn.Sequential(
            torch.nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
            torch.nn.BatchNorm2d(out_channel))
        self.att_conv = (torch.nn.Sequential(torch.nn.Conv2d(mid_channel * 2, 2, kernel_size=1), torch.nn.Sigmoid())
                         if fuse else None)
        torch.nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        torch.nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, y=None, out_shape: int = 0):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (h, w), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


def hcl_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss (ReviewKD.py ``hcl_loss``): per level, the MSE of the maps plus the MSEs
    of their 4x4, 2x2 and 1x1 average pools (those smaller than the map) weighted 1/2, 1/4, 1/8,
    normalized by the sum of the weights; summed over levels."""
    total = 0
    for fs, ft in zip(student, teacher, strict=True):
        fs, ft = fs.float(), ft.float()
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        cnt, tot = 1.0, 1.0
        for size in (4, 2, 1):
            if size >= h:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, (size, size)), F.adaptive_avg_pool2d(ft, (size, size))) * cnt
            tot += cnt
        total = total + loss / tot
    return total


def _levels(feats: list, n: int) -> list:
    """The last ``n`` of the stage maps and the pooled vector (as a 1x1 map), shallow to deep; of
    tensors or of their shapes."""
    pooled = feats[-1]
    pooled = (*pooled, 1, 1) if isinstance(pooled, torch.Size) else pooled.reshape(*pooled.shape, 1, 1)
    return (list(feats[:-1]) + [pooled])[-n:]


@KD_METHODS.register("reviewkd", settings=ReviewKDSettings, label="ReviewKD", title="knowledge review",
                     context_defaults={"pair=resnet32x4->resnet8x4": {"feat_weight": 5.0}})  # configs/cifar100/reviewkd.yaml
class ReviewKD(FeatureDistiller):
    """Knowledge review (Chen et al. 2021; mdistiller distillers/ReviewKD.py): fused student stages.

    ``ce_weight * CE +
    min(epoch / warmup_epochs, 1) * feat_weight * HCL``: the student's stage outputs and pooled vector,
    deepest first, are fused level by level (ABF) into maps compared with the teacher's pre-ReLU stage
    outputs and pooled vector by the hierarchical context loss. Channels and sizes come from the models
    (mdistiller lists them per pair in REVIEWKD.IN_CHANNELS / OUT_CHANNELS / SHAPES)."""

    teacher_preact = True

    def __init__(self, student, teacher, settings):
        super().__init__(student, teacher, settings)
        shape_s, _ = self.shapes()
        _, shape_t = self.shapes(preact=True)
        self.n = len(stages(shape_t)) + 1  # the teacher's stages (stem excluded) and its pooled vector
        in_channels = [s[1] for s in _levels(shape_s, self.n)]
        out_channels = [t[1] for t in _levels(shape_t, self.n)]
        if len(in_channels) < self.n:
            raise self.refuse(f"the student has {len(in_channels)} feature levels, the teacher {self.n}; ReviewKD "
                              "pairs them one to one")
        mid = min(settings.max_mid_channel, in_channels[-1])
        abfs = [ABF(c, mid, out_channels[i], i < self.n - 1) for i, c in enumerate(in_channels)]
        self.modules["abfs"] = torch.nn.ModuleList(abfs[::-1])  # deepest first

    def feat_factor(self):
        s = self.settings
        if not s.warmup_epochs:
            return s.feat_weight
        return s.feat_weight * torch.clamp(self.epoch / s.warmup_epochs, max=1.0)  # a device op: no host sync

    def feature_term(self, feats_s, feats_t):
        x = _levels(feats_s, self.n)[::-1]
        t_levels = _levels(feats_t, self.n)
        out_shapes = [f.shape[-1] for f in t_levels[::-1]]
        abfs = self.modules["abfs"]
        out, res = abfs[0](x[0], out_shape=out_shapes[0])
        results = [out]
        for features, abf, out_shape in zip(x[1:], abfs[1:], out_shapes[1:], strict=True):
            out, res = abf(features, res, out_shape)
            results.insert(0, out)
        return hcl_loss(results, [f.detach() for f in t_levels])

