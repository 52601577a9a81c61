"""A model's own input preprocessing, applied on the device to batches normalised for the dataset.

A pretrained timm or torchvision classifier expects its own input size, interpolation, mean, std and
crop (timm's ``pretrained_cfg`` resolved by ``timm.data.resolve_data_config``, or the ``pretrained_cfg``
of a Hugging Face hub ``config.json``; torchvision's weights' ``transforms()``). The loaders normalise
every batch once, with the dataset's mean and std, for the student; :class:`Preprocessed` turns such a
batch into the model's own input in device ops: a per-channel affine map (``x * dataset_std / own_std
+ (dataset_mean - own_mean) / own_std``: the batch renormalised, never denormalised to pixels and
normalised again), optionally a centre crop, and, when the sizes differ, a resize with the model's
interpolation.

The model's crop (``crop_pct``: the fraction of the image's shorter side its evaluation view keeps,
resized to ``int(size / crop_pct)`` then centre-cropped to ``size``) is an evaluation setting:

* evaluating on an image folder, the model's own eval transform replaces the dataset's test transform
  (:meth:`Preprocessing.eval_transform`: timm's ``create_transform(**resolve_data_config(...))``,
  torchvision's ``weights.transforms()``; every ``crop_mode``) when the two differ;
* on the device, a batch already cropped to the dataset's ``crop_pct`` (an image folder's test view:
  ``224 / 256``; an in-memory dataset's: the whole image, 1) can only be cropped tighter: a centre crop
  of ``own crop_pct / dataset crop_pct`` of its side, then the resize to the model's size
  (:func:`crop_ratio`). A wider crop cannot be recovered (the pixels are gone): the dataset's is kept.
  On square batches timm's ``center``, ``squash`` and ``border`` modes are the same centre crop.

Which views get the on-device crop is :mod:`mixkd.loading`'s choice (evaluation views; the training
views under ``kd.teacher_input: model_crop`` only).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2.functional import center_crop

from mixkd.models import external
from mixkd.models.registry import ALIASES

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "InterpolationMode.BILINEAR": "bilinear",
          "InterpolationMode.BICUBIC": "bicubic", "InterpolationMode.NEAREST": "nearest"}


@dataclass(frozen=True)
class Preprocessing:
    """Input size (square), mean, std, interpolation and evaluation crop of a model's input (or of a
    dataset's batches: ``crop_pct`` then the fraction of the image its test view keeps).

    ``resize``: the shorter side the evaluation view is resized to before the centre crop of ``size``
    (torchvision's ``resize_size``; timm's ``floor(size / crop_pct)``). ``transforms``: the library's
    own eval transform factory (a callable returning it), for :meth:`eval_transform`."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str | None = None  # None: the dataset's (its loaders'), no model's
    crop_pct: float | None = None
    crop_mode: str = "center"
    resize: int | None = None
    transforms: Callable[[], Any] | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        crop = f", crop {self.crop_pct:g}" if self.crop_pct else ""
        if self.crop_pct and self.eval_resize != self.size:
            crop += f" (resize {self.eval_resize}, centre crop {self.size}" + \
                    (f", {self.crop_mode}" if self.crop_mode != "center" else "") + ")"
        mode = f" {self.interpolation}" if self.interpolation else ""
        return f"{self.size}x{self.size}{mode}, mean {_fmt(self.mean)}, std {_fmt(self.std)}{crop}"

    @property
    def eval_resize(self) -> int:
        """The shorter side the evaluation view is resized to before its centre crop."""
        if self.resize is not None:
            return self.resize
        return math.floor(self.size / self.crop_pct) if self.crop_pct else self.size

    def same_input(self, other: Preprocessing) -> bool:
        """Whether batches prepared for ``other`` are this model's input (size, mean and std)."""
        close = all(abs(a - b) < 1e-6 for a, b in zip(self.mean + self.std, other.mean + other.std))
        return self.size == other.size and close

    def same_eval(self, other: Preprocessing) -> bool:
        """Whether this evaluation view is ``other``'s: the same input, resize, crop and interpolation."""
        return (self.same_input(other) and self.eval_resize == other.eval_resize
                and (self.interpolation or "bilinear") == (other.interpolation or "bilinear")
                and self.crop_mode == other.crop_mode)

    def eval_transform(self):
        """The library's own evaluation transform of a PIL image (resize, centre crop, to tensor,
        normalise); None where there is none (a dataset's, or a model without a pretrained config)."""
        return self.transforms() if self.transforms is not None else None


def crop_ratio(own: Preprocessing, data: Preprocessing) -> float | None:
    """The side fraction of ``data``'s batches to centre-crop so that they show ``own``'s crop:
    ``own.crop_pct / data.crop_pct``; None where either crop is unknown. Above 1 (a wider crop than the
    batches') it cannot be applied: the pixels outside the dataset's crop are gone."""
    if not own.crop_pct or not data.crop_pct:
        return None
    return own.crop_pct / data.crop_pct


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def pretrained_preprocessing(name: str, hub_config: dict | None = None) -> Preprocessing | None:
    """The preprocessing that the pretrained weights of ``name`` expect: a hub ``config.json``'s
    ``pretrained_cfg`` when given, else timm's default pretrained config for the architecture (both
    resolved by ``timm.data.resolve_data_config``, the train-time ``input_size`` and ``crop_pct``), or
    torchvision's default weights' transforms; None for the registry's CIFAR models (and a library
    model that has no pretrained config)."""
    parts = external.split_name({registered: tv for tv, registered in ALIASES.items()}.get(name, name))
    if parts is None:
        return None
    source, arch = parts
    if source == "timm":
        timm = external._timm()
        cfg = (hub_config or {}).get("pretrained_cfg")
        if not cfg:
            found = timm.models.get_pretrained_cfg(arch)
            cfg = found.to_dict() if found is not None else None
        if not cfg or "input_size" not in cfg:
            return None
        from timm.data import create_transform, resolve_data_config

        resolved = resolve_data_config(pretrained_cfg=cfg)
        return Preprocessing(int(resolved["input_size"][-1]), tuple(resolved["mean"]), tuple(resolved["std"]),
                             _MODES.get(str(resolved["interpolation"]), "bilinear"), float(resolved["crop_pct"]),
                             str(resolved["crop_mode"]),
                             transforms=functools.partial(create_transform, **resolved, is_training=False))
    from torchvision.models import get_model_weights

    try:
        weights = get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None
    t = weights.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    return Preprocessing(crop, tuple(t.mean), tuple(t.std), _MODES.get(str(t.interpolation), "bilinear"),
                         round(crop / resize, 4), resize=resize, transforms=weights.transforms)


class Preprocessed(nn.Module):
    """``model`` fed batches normalised for ``data`` (a :class:`Preprocessing`) in its ``own``
    preprocessing: renormalised by one per-channel affine map, centre-cropped to the side fraction
    ``crop`` when given (a :func:`crop_ratio` below 1), resized to its size when the sizes differ. Keeps
    the zoo's ``forward(x, is_feat=False, preact=False)`` and the model's feature names."""

    def __init__(self, model: nn.Module, data: Preprocessing, own: Preprocessing, crop: float | None = None):
        super().__init__()
        if crop is not None and not 0 < crop < 1:
            raise ValueError(f"crop is the side fraction of a centre crop, in (0, 1): got {crop}")
        self.model = model
        d_mean, d_std = torch.tensor(data.mean), torch.tensor(data.std)
        o_mean, o_std = torch.tensor(own.mean), torch.tensor(own.std)
        self.register_buffer("scale", (d_std / o_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((d_mean - o_mean) / o_std).view(1, 3, 1, 1), persistent=False)
        self.size, self.crop, self.own = own.size, crop, own
        self.mode = own.interpolation or "bilinear"
        self.mixkd_name = getattr(model, "mixkd_name", type(model).__name__)

    def prepare(self, x: Tensor) -> Tensor:
        x = torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))
        if self.crop is not None:  # torchvision's centre crop (its rounding of the offsets)
            h, w = x.shape[-2:]
            x = center_crop(x, [max(1, round(h * self.crop)), max(1, round(w * self.crop))])
        if tuple(x.shape[-2:]) != (self.size, self.size):
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
