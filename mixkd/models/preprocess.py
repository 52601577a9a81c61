"""A model's own input preprocessing, applied on the device to batches normalised for the dataset.

A pretrained timm or torchvision classifier expects its own input size, interpolation, mean and std
(timm's ``pretrained_cfg``, or the ``pretrained_cfg`` of a Hugging Face hub ``config.json``;
torchvision's weights' ``transforms()``). The loaders normalise every batch once, with the dataset's
mean and std, for the student; :class:`Preprocessed` turns such a batch into the model's own input
in two device ops: a per-channel affine map (``x * dataset_std / own_std + (dataset_mean - own_mean)
/ own_std``: the batch renormalised, never denormalised to pixels and normalised again) and, when the
sizes differ, a resize with the model's interpolation. The crop is the dataset's (the images arrive
cropped); the model's ``crop_pct`` is said in the log only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixkd.models import external
from mixkd.models.registry import ALIASES

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "InterpolationMode.BILINEAR": "bilinear",
          "InterpolationMode.BICUBIC": "bicubic", "InterpolationMode.NEAREST": "nearest"}


@dataclass(frozen=True)
class Preprocessing:
    """Input size (square), mean, std, interpolation and crop fraction of a model's input."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str | None = None  # None: the dataset's (its loaders'), no model's
    crop_pct: float | None = None

    def describe(self) -> str:
        crop = f", crop {self.crop_pct:g}" if self.crop_pct else ""
        mode = f" {self.interpolation}" if self.interpolation else ""
        return f"{self.size}x{self.size}{mode}, mean {_fmt(self.mean)}, std {_fmt(self.std)}{crop}"

    def same_input(self, other: Preprocessing) -> bool:
        """Whether batches prepared for ``other`` are this model's input (size, mean and std)."""
        close = all(abs(a - b) < 1e-6 for a, b in zip(self.mean + self.std, other.mean + other.std))
        return self.size == other.size and close


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def pretrained_preprocessing(name: str, hub_config: dict | None = None) -> Preprocessing | None:
    """The preprocessing that the pretrained weights of ``name`` expect: a hub ``config.json``'s
    ``pretrained_cfg`` when given, else timm's default pretrained config for the architecture, or
    torchvision's default weights' transforms; None for the registry's CIFAR models (and a library
    model that has no pretrained config)."""
    parts = external.split_name({registered: tv for tv, registered in ALIASES.items()}.get(name, name))
    if parts is None:
        return None
    source, arch = parts
    if source == "timm":
        cfg = (hub_config or {}).get("pretrained_cfg")
        if not cfg:
            found = external._timm().models.get_pretrained_cfg(arch)
            cfg = found.to_dict() if found is not None else None
        if not cfg or "input_size" not in cfg:
            return None
        return Preprocessing(int(cfg["input_size"][-1]), tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                             tuple(cfg.get("std", (0.229, 0.224, 0.225))),
                             _MODES.get(str(cfg.get("interpolation", "bilinear")), "bilinear"), cfg.get("crop_pct"))
    from torchvision.models import get_model_weights

    try:
        weights = get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None
    t = weights.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    return Preprocessing(crop, tuple(t.mean), tuple(t.std), _MODES.get(str(t.interpolation), "bilinear"),
                         round(crop / resize, 4))


class Preprocessed(nn.Module):
    """``model`` fed batches normalised for ``data`` (a :class:`Preprocessing`) in its ``own``
    preprocessing: renormalised by one per-channel affine map, resized when the sizes differ. Keeps the
    zoo's ``forward(x, is_feat=False, preact=False)`` and the model's feature names."""

    def __init__(self, model: nn.Module, data: Preprocessing, own: Preprocessing):
        super().__init__()
        self.model = model
        d_mean, d_std = torch.tensor(data.mean), torch.tensor(data.std)
        o_mean, o_std = torch.tensor(own.mean), torch.tensor(own.std)
        self.register_buffer("scale", (d_std / o_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((d_mean - o_mean) / o_std).view(1, 3, 1, 1), persistent=False)
        self.size = own.size if own.size != data.size else None
        self.mode = own.interpolation or "bilinear"
        self.mixkd_name = getattr(model, "mixkd_name", type(model).__name__)

    def prepare(self, x: Tensor) -> Tensor:
        x = torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))
        if self.size is not None:
            down = self.size < x.shape[-1]
            x = F.interpolate(x, size=(self.size, self.size), mode=self.mode,
                              align_corners=False if self.mode != "nearest" else None,
                              antialias=down and self.mode != "nearest")
        return x

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False):
        x = self.prepare(x)
        return self.model(x, is_feat=True, preact=preact) if is_feat else self.model(x)

    def feature_names(self) -> list[str] | None:
        return external.feature_names(self.model)
