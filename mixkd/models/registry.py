"""Name -> constructor registry for the model zoo."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from mixkd.errors import MixkdError

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


def _lookup(name: str) -> _Entry:
    entry = _REGISTRY.get(name)
    if entry is not None:
        return entry
    raise MixkdError(unknown_model_message(name))


def create_model(name: str, num_classes: int = 100) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way classifier (random init)."""
    entry = _lookup(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise MixkdError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return entry.factory(num_classes)


def default_lr(name: str) -> float:
    """RepDistiller's default learning rate for ``name``."""
    return _lookup(name).lr
