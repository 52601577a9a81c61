"""FitNet (Romero et al., ICLR 2015) as RepDistiller trains it (``train_student.py --distill hint``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from mixkd.distiller import Distiller, KDSettings, temperature_field, weight_field
from mixkd.errors import MixkdError
from mixkd.losses import kd_loss, soft_cross_entropy
from mixkd.models import feature_index, feature_names
from mixkd.registry import KD_METHODS

_SH = "RepDistiller scripts/run_cifar_distill.sh --distill hint"


class FitNetSettings(KDSettings):
    temperature: float = temperature_field(4.0, f"temperature of its KD term ({_SH} --kd_T 4)")
    ce_weight: float = weight_field(1.0, f"weight of the cross-entropy term ({_SH} -r 1)")
    kd_weight: float = weight_field(0.0, f"weight of Hinton KD beside the hint ({_SH} -a 0)")
    hint_weight: float = weight_field(100.0, "weight of the hint, the MSE between the regressed "
                                      f"student feature map and the teacher's ({_SH} -b 100)")
    hint_layer: int | str = Field(2, description="which feature map is hinted: an index into the models' is_feat "
                                  "features (RepDistiller train_student.py --hint_layer 2: the middle one), a stage name "
                                  "of a timm/tv model (layer3; docs/models.md), or 'student_stage,teacher_stage'")

    @field_validator("hint_layer")
    @classmethod
    def _hint_layer(cls, value: int | str) -> int | str:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)  # "2" is the index 2
        parts = str(value).split(",")
        if len(parts) > 2 or not all(p.strip() for p in parts):
            raise ValueError(f"expected an index, a stage name or 'student_stage,teacher_stage', got {value!r}")
        if isinstance(value, int) and not 0 <= value <= 100:
            raise ValueError(f"an index must lie in 0..100, got {value}")
        return value


class ConvRegressor(torch.nn.Module):
    """FitNet's regressor from a student feature map to the teacher's (RepDistiller ``models/util.py``
    ``ConvReg``): a 1x1 convolution when the maps have one size (a 3x3 stride-2 one when the student's is
    twice the teacher's, a 4x4 stride-2 transposed one when half, a (1 + dH) x (1 + dW) one when larger
    otherwise), then batch norm and ReLU."""

    def __init__(self, s_shape: torch.Size, t_shape: torch.Size):
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape[1:], t_shape[1:]
        if s_h == 2 * t_h:
            self.conv = torch.nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = torch.nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = torch.nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise MixkdError(f"fitnet: no regressor from a {s_h}x{s_w} student feature map to a {t_h}x{t_w} "
                             "teacher one; choose another kd.hint_layer")
        self.bn = torch.nn.BatchNorm2d(t_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


@KD_METHODS.register("fitnet", settings=FitNetSettings, label="FitNet", title="FitNet")
class FitNet(Distiller):
    """FitNet (Romero et al., ICLR 2015): ce_weight * CE + kd_weight * KD + hint_weight * MSE(regressor(student map), teacher map).

    As RepDistiller trains it (``--distill hint``): ``ce_weight * CE + kd_weight * Hinton KD + hint_weight * MSE(regressor(student feature), teacher feature)`` on the
    ``hint_layer``-th feature map (``is_feat`` features; 2: the middle stage), both from the same mixed
    batch. The regressor (:class:`ConvRegressor`) is the method's trainable module: in the optimizer,
    the checkpoints and the captured step. Its shape is found by one forward of both models at the
    student's training size (32 x 32, the CIFAR size, for a model built without one). ``hint_layer`` may
    name a timm/torchvision model's stage, or one stage per model (``2,layer1``; :mod:`mixkd.models`)."""

    loss_names = ("loss", "ce", "kd", "hint")
    PROBE_SIZE = 32

    def __init__(self, student, teacher, settings: FitNetSettings):
        super().__init__(student, teacher, settings)
        stages = str(settings.hint_layer).split(",")  # one stage for both, or "student_stage,teacher_stage"
        self.layers = (feature_index(student, stages[0].strip()), feature_index(teacher, stages[-1].strip()))
        s_shape, t_shape = self._feature_shapes()
        self.modules["regressor"] = ConvRegressor(s_shape, t_shape).to(self.device)

    def _feature_shapes(self) -> tuple[torch.Size, torch.Size]:
        size = getattr(self.student, "mixkd_input_size", None) or self.PROBE_SIZE  # the size it trains at
        probe = torch.zeros(2, 3, size, size, device=self.device)
        shapes = []
        for model, layer in zip((self.student, self.teacher), self.layers):
            was_training = model.training
            model.eval()
            with torch.no_grad():
                feats, _ = model(probe, is_feat=True)
            model.train(was_training)
            if not -len(feats) <= layer < len(feats) or feats[layer].dim() != 4:
                maps = [i for i, f in enumerate(feats) if f.dim() == 4]
                names = feature_names(model)
                maps = [f"{i} ({names[i]})" for i in maps] if names else maps
                raise MixkdError(f"fitnet: kd.hint_layer {layer} is not a feature map of "
                                 f"{getattr(model, 'mixkd_name', type(model).__name__)}; choose one of {maps}")
            shapes.append(feats[layer].shape)
        return shapes[0], shapes[1]

    def forward_train(self, x, target):
        feats_s, student_logits = self.student(x, is_feat=True)
        with torch.no_grad():
            feats_t, teacher_logits = self.teacher(x, is_feat=True)
        s_layer, t_layer = self.layers
        hint = F.mse_loss(self.modules["regressor"](feats_s[s_layer]).float(), feats_t[t_layer].float())
        ce = soft_cross_entropy(student_logits, target)
        s = self.settings
        kd = kd_loss(student_logits, teacher_logits, s.temperature)
        loss = s.ce_weight * ce + s.kd_weight * kd + s.hint_weight * hint
        return {"loss": loss, "ce": ce, "kd": kd, "hint": hint}
