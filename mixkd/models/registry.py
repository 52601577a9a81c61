"""Name -> constructor registry for the model zoo, and the one entry point for every model name:
the registry's (RepDistiller's CIFAR models, ``tv_resnet18``...), ``timm:<name>`` and ``tv:<name>``
(:mod:`mixkd.models.external`). ``tv:resnet18/34/50`` and ``tv:mobilenet_v2`` are the registry's
``tv_*`` models (the same class, keys and features), so either name loads the other's checkpoints."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from mixkd.errors import MixkdError
from mixkd.models import external

# What every model's ``forward(x, is_feat=False, preact=False)`` returns:
# logits, or ``(features, logits)`` when ``is_feat`` is true.
ModelOutput = Tensor | tuple[list[Tensor], Tensor]

ModelFactory = Callable[[int], nn.Module]

DEFAULT_LR = 0.05


@dataclass(frozen=True)
class _Entry:
    factory: ModelFactory
    lr: float


_REGISTRY: dict[str, _Entry] = {}
# ``tv:`` names served by a registered model (the same torchvision class with the zoo's features).
ALIASES = {"tv:resnet18": "tv_resnet18", "tv:resnet34": "tv_resnet34", "tv:resnet50": "tv_resnet50",
           "tv:mobilenet_v2": "tv_mobilenet_v2"}


def register(name: str, lr: float = DEFAULT_LR) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory(num_classes) -> nn.Module`` under ``name``."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = _Entry(factory, lr)
        return factory

    return decorator


def available_models() -> list[str]:
    """All registered model names in natural order (resnet8, resnet14, ..., resnet110)."""
    return sorted(_REGISTRY, key=_natural_key)


def _natural_key(name: str) -> list[int | str]:
    """Case-insensitive, numbers by value: resnet8 < resnet8x4 < resnet14 < ResNet50."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name.lower())]


def closest_models(name: str, n: int = 1) -> list[str]:
    """Up to ``n`` registered names closest to ``name`` (case-insensitive, difflib), best first."""
    by_lower = {m.lower(): m for m in sorted(_REGISTRY, key=_natural_key)}
    return [by_lower[c] for c in difflib.get_close_matches(str(name).lower(), list(by_lower), n=n, cutoff=0.6)]


def unknown_model_message(name: str) -> str:
    """"unknown model 'resnt8x4'; did you mean 'resnet8x4'?; available: ..." (the hint when a name is close)."""
    close = closest_models(name)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown model {name!r}{hint}; available: {', '.join(sorted(_REGISTRY, key=_natural_key))}"


def model_problem(name: str) -> str | None:
    """Why ``name`` names no model, in one line (unknown, or ``timm:`` without timm); None if it does."""
    if name in _REGISTRY or name in ALIASES:
        return None
    if external.split_name(name):
        return external.external_problem(name)
    return unknown_model_message(name)


def model_slug(name: str) -> str:
    """``name`` as part of a file or folder name: ``timm:resnet18`` -> ``timm_resnet18``."""
    return str(name).replace(":", "_").replace("/", "_")


def _lookup(name: str) -> _Entry:
    entry = _REGISTRY.get(ALIASES.get(name, name))
    if entry is not None:
        return entry
    raise MixkdError(unknown_model_message(name))


def create_model(name: str, num_classes: int = 100, image_size: int | None = None) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way classifier (random init). ``image_size``: the input
    size a timm model of fixed input size (a ViT) is built for; the other models take any size."""
    external_name = name not in ALIASES and external.split_name(name) is not None
    entry = None if external_name else _lookup(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise MixkdError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    model = external.create_external(name, num_classes, image_size) if entry is None else entry.factory(num_classes)
    if image_size is not None:
        model.mixkd_input_size = image_size  # the size it is trained at (what a feature method probes it with)
    return model


def default_lr(name: str) -> float:
    """RepDistiller's default learning rate for ``name`` (a ``timm:``/``tv:`` model: 0.01 for the
    MobileNet/ShuffleNet/EfficientNet families, else 0.05)."""
    if name not in ALIASES and external.split_name(name):
        problem = external.external_problem(name)
        if problem:
            raise MixkdError(problem)
        return external.default_lr(name)
    return _lookup(name).lr
