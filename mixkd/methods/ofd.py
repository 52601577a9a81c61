"""OFD: overhaul of feature distillation (Heo et al., ICCV 2019), as mdistiller trains it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from mixkd.methods._feature import FeatureDistiller, FeatureSettings, feature_weight_field, stages
from mixkd.registry import KD_METHODS


class OFDSettings(FeatureSettings):
    feat_weight: float = feature_weight_field(0.001, "weight of the OFD term "
                               "(mdistiller engine/cfg.py CFG.OFD.LOSS.FEAT_WEIGHT)")
    kernel_size: int = Field(1, ge=1, le=7, description="kernel size of the student-to-teacher connector "
                             "convolution, odd (mdistiller engine/cfg.py CFG.OFD.CONNECTOR.KERNEL_SIZE)")


def margins(bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """Per channel, the expectation of a pre-ReLU response below zero, the response taken as Gaussian
    with the batch norm's affine bias m and |weight| s: E[x | x < 0] = m - s phi(m/s) / Phi(-m/s), or
    -3 s where Phi(-m/s) <= 0.001 (OFD.py ``init_ofd_modules``). Shape (1, C, 1, 1)."""
    s, m = bn.weight.detach().abs().double(), bn.bias.detach().double()
    cdf = torch.special.ndtr(-m / s)
    expected = -s * torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m
    return torch.where(cdf > 0.001, expected, -3 * s).float().view(1, -1, 1, 1)


def ofd_distill_loss(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 (OFD.py ``feat_loss``): where the teacher's response is positive, (s - t)^2; where
    it is negative, the teacher taken as its margin m: (s - m)^2 where s > m and t <= m, (s - t)^2 where
    s > t > m; nothing where the student is already below. Summed over C, H, W, mean over the batch."""
    loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
            + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
            + (source - target) ** 2 * (target > 0).float())
    return torch.abs(loss).mean(dim=0).sum()


def bn_before_relu(model: torch.nn.Module) -> list[torch.nn.BatchNorm2d] | None:
    """The batch norm feeding each stage's last ReLU, as mdistiller's ``get_bn_before_relu`` lists them
    (models/cifar/resnet.py, resnetv2.py, wrn.py, vgg.py), found by the module names mixkd's models share
    with RepDistiller's; None for a model it does not know."""
    names = type(model).__name__
    if hasattr(model, "layer4") and hasattr(model.layer1[-1], "bn3"):  # RepDistiller ResNet50 (bottleneck)
        return [getattr(model, f"layer{i}")[-1].bn3 for i in range(1, 5)]
    if hasattr(model, "layer1") and hasattr(model.layer1[-1], "bn2") and hasattr(model, "layer3"):
        layers = [f"layer{i}" for i in range(1, 5) if hasattr(model, f"layer{i}")]
        return [getattr(model, name)[-1].bn2 for name in layers]
    if hasattr(model, "block3") and hasattr(model.block3, "layer") and hasattr(model, "bn1"):  # WRN
        return [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]
    if names == "VGG":
        return [model.block1[-1], model.block2[-1], model.block3[-1], model.block4[-1]]
    return None


def _connector(s: int, t: int, kernel_size: int) -> torch.nn.Sequential:
    """Conv (no bias) + batch norm from the student's channels to the teacher's, initialized as OFD.py
    ``ConnectorConvBN._build_feature_connector``."""
    conv = torch.nn.Conv2d(s, t, kernel_size=kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False)
    bn = torch.nn.BatchNorm2d(t)
    conv.weight.data.normal_(0, math.sqrt(2.0 / (kernel_size * kernel_size * t)))
    bn.weight.data.fill_(1)
    bn.bias.data.zero_()
    return torch.nn.Sequential(conv, bn)


class _Margins(torch.nn.Module):
    """The teacher's margins, one (1, C, 1, 1) buffer a stage: moved with the method's modules, derived
    from the teacher at every start (not saved)."""

    def __init__(self, values: list[torch.Tensor]):
        super().__init__()
        self.count = len(values)
        for i, v in enumerate(values):
            self.register_buffer(f"m{i}", v, persistent=False)

    def __getitem__(self, i: int) -> torch.Tensor:
        return getattr(self, f"m{i}")


@KD_METHODS.register("ofd", settings=OFDSettings, label="OFD", title="overhaul of feature distillation")
class OFD(FeatureDistiller):
    """Overhaul of feature distillation (Heo et al. 2019; mdistiller distillers/OFD.py), pre-ReLU stages.

    ``ce_weight * CE +
    feat_weight * sum_i partial-L2(connector_i(student pre-ReLU stage i), teacher pre-ReLU stage i,
    margin_i) / 2^(n - 1 - i)``, the teacher's stage pooled to the student's size, the margins computed
    from the teacher's batch norms before each stage's ReLU. Unlike mdistiller's ``OFD.train``, which
    also puts the teacher in train mode (batch statistics), the teacher stays in eval mode as in every
    method here. Teachers: the CIFAR ResNets, ResNet50, WRNs and VGGs."""

    student_preact = True
    teacher_preact = True

    def __init__(self, student, teacher, settings):
        super().__init__(student, teacher, settings)
        if settings.kernel_size % 2 == 0:
            raise self.refuse(f"kd.kernel_size {settings.kernel_size} must be odd (the connector keeps the size)")
        bns = bn_before_relu(teacher)
        if bns is None:
            raise self.refuse(f"no batch norm before each stage's ReLU known for the teacher {type(teacher).__name__} "
                              "(OFD's margins need it); use a ResNet, ResNet50, WRN or VGG teacher")
        shape_s, shape_t = self.shapes(preact=True)
        n = min(len(stages(shape_s)), len(stages(shape_t)), len(bns))
        s_ch = [s[1] for s in stages(shape_s)[-n:]]
        t_ch = [t[1] for t in stages(shape_t)[-n:]]
        bns = bns[-n:]
        if [bn.num_features for bn in bns] != t_ch:
            raise self.refuse(f"the teacher's batch norms before ReLU have {[bn.num_features for bn in bns]} "
                              f"channels but its stages {t_ch}")
        self.n = n
        self.modules["connectors"] = torch.nn.ModuleList(
            _connector(s, t, settings.kernel_size) for s, t in zip(s_ch, t_ch, strict=True))
        self.modules["margins"] = _Margins([margins(bn).to(self.device) for bn in bns])

    def feature_term(self, feats_s, feats_t):
        feats_s, feats_t = stages(feats_s)[-self.n:], stages(feats_t)[-self.n:]
        total = 0
        for i, (connector, f_s, f_t) in enumerate(zip(self.modules["connectors"], feats_s, feats_t, strict=True)):
            source = connector(f_s).float()
            target = F.adaptive_avg_pool2d(f_t.float(), source.shape[-2:]).detach()
            total = total + ofd_distill_loss(source, target, self.modules["margins"][i]) / 2 ** (self.n - i - 1)
        return total
