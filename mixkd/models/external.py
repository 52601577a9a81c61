"""Any timm or torchvision classifier by name: ``timm:<name>`` and ``tv:<name>``.

The model is the library's own (built with random weights by ``timm.create_model`` or
``torchvision.models.get_model``; nothing is ever downloaded), with ``num_classes`` outputs and the
library's own state_dict keys, so a weights file saved from the library loads with ``strict=True``.
Its class is swapped for a subclass that adds the zoo's ``forward(x, is_feat=False, preact=False)``
contract (:data:`mixkd.models.registry.ModelOutput`): plain calls run the library's forward untouched;
``is_feat=True`` returns the intermediate feature maps through the library's own mechanism (timm's
``forward_intermediates``, torchvision's ``create_feature_extractor``) and, last, the pooled
penultimate vector fed to the classifier. ``preact`` has no meaning for these models (their stage
outputs are returned either way).

Feature stages: timm's ``feature_info`` (e.g. ``act1, layer1..layer4`` for a ResNet, ``stages.0..3``
for a ConvNeXt, ``blocks.0..11`` for a ViT, whose tokens come back as NCHW maps); for torchvision,
the last module at each spatial resolution of a 224 x 224 probe (e.g. ``relu, layer1..layer4``).
:func:`feature_names` lists them; a feature method picks one by name or index.

timm is optional (``pip install 'mixkd[timm]'``): a ``timm:`` name without it is one line saying so.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from typing import Any

import torch
from torch import Tensor, nn

from mixkd.errors import MixkdError

SOURCES = ("timm", "tv")
TIMM_INSTALL = "pip install 'mixkd[timm]'"
PENULTIMATE = "pre_logits"
_PLAIN = {"is_feat": False, "preact": False}  # the library forward, as the FX graphs trace it  # the name of the last is_feat feature of these models
# Learning rates by family, as RepDistiller sets its CIFAR models' (the small-channel nets: 0.01).
SMALL_LR_FAMILIES = ("mobilenet", "shufflenet", "mnasnet", "efficientnet", "ghostnet", "mobilevit")


def split_name(name: str) -> tuple[str, str] | None:
    """``('timm', 'resnet18')`` for ``'timm:resnet18'``, ``('tv', ...)`` for ``'tv:...'``; None for
    any other name (a registry name)."""
    source, sep, arch = str(name).partition(":")
    if sep and source in SOURCES:
        return source, arch
    return None


def _timm():
    try:
        import timm
    except ImportError:
        raise MixkdError(f"timm models need timm, which is not installed: {TIMM_INSTALL}") from None
    return timm


def _tv_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def list_external(source: str, pattern: str | None = None) -> list[str]:
    """The library's own listing of its architectures (``timm.list_models``,
    ``torchvision.models.list_models`` of the classification models), as ``source:name``, filtered by
    the wildcard ``pattern`` (``resnet*``; a plain word matches anywhere)."""
    if source not in SOURCES:
        raise MixkdError(f"unknown model source {source!r}: choose one of {', '.join(SOURCES)}")
    if pattern and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    if source == "timm":
        names = _timm().list_models(pattern or "")
    else:
        names = [n for n in _tv_names() if not pattern or fnmatch.fnmatch(n, pattern)]
    return [f"{source}:{n}" for n in names]


def external_problem(name: str) -> str | None:
    """Why ``name`` (``timm:...``/``tv:...``) cannot be built here, in one line; None if it can."""
    source, arch = split_name(name) or ("", "")
    if source == "timm":
        try:
            timm = _timm()
        except MixkdError as e:
            return f"model {name!r}: {e}"
        if timm.is_model(arch):
            return None
        names = timm.list_models()
    elif source == "tv":
        names = _tv_names()
        if arch in names:
            return None
    else:
        return None
    close = difflib.get_close_matches(arch, names, n=3, cutoff=0.6)
    hint = f"; similar: {', '.join(f'{source}:{c}' for c in close)}" if close else ""
    return (f"unknown model {name!r}: {source} has no classifier {arch!r}{hint}; list them with "
            f"'mixkd models --source {source} PATTERN'")


def default_lr(name: str) -> float:
    """0.01 for the small-channel families (MobileNet, ShuffleNet, EfficientNet, ...), as RepDistiller
    sets its MobileNet/ShuffleNet; else 0.05."""
    return 0.01 if any(f in name.lower() for f in SMALL_LR_FAMILIES) else 0.05


def create_external(name: str, num_classes: int, image_size: int | None = None) -> nn.Module:
    """Build ``timm:<arch>`` or ``tv:<arch>`` with ``num_classes`` outputs (random init).

    ``image_size``: the input size a timm model that takes ``img_size`` (a ViT) is built for;
    convolutional models take any size and ignore it."""
    problem = external_problem(name)
    if problem:
        raise MixkdError(problem)
    source, arch = split_name(name)  # type: ignore[misc]
    if source == "timm":
        timm = _timm()
        kwargs: dict[str, Any] = {}
        if image_size is not None and _takes_img_size(timm, arch):
            kwargs["img_size"] = image_size
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
        model.__class__ = _with_features(type(model), TimmFeatures)
    else:
        import torchvision

        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        model.__class__ = _with_features(type(model), TorchvisionFeatures)
    model.mixkd_name = name
    return model


def _takes_img_size(timm, arch: str) -> bool:
    """Whether timm's ``arch`` is built for a fixed input size (``img_size``: ViTs and their kin)."""
    cfg = timm.models.get_pretrained_cfg(arch)
    return bool(cfg is not None and getattr(cfg, "fixed_input_size", False))


@functools.cache
def _with_features(cls: type, mixin: type) -> type:
    """``cls`` with the zoo's forward (one subclass per library class, so that compiled code is shared)."""
    return type(cls.__name__, (mixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _stage_index(names: list[str], stage: int | str, model_name: str) -> int:
    if isinstance(stage, str):
        if stage.lstrip("-").isdigit():
            stage = int(stage)
        elif stage in names:
            return names.index(stage)
        else:
            raise MixkdError(f"{model_name} has no feature stage {stage!r}; its stages: {', '.join(names)}")
    if not -len(names) <= stage < len(names):
        raise MixkdError(f"{model_name} has no feature stage {stage}: it has {len(names)} "
                         f"({', '.join(f'{i}: {n}' for i, n in enumerate(names))})")
    return stage % len(names)


class TimmFeatures:
    """The zoo's forward for a timm model: ``is_feat`` features from ``forward_intermediates``
    (the stages of ``feature_info``, NCHW), then the pooled pre-logits vector (``forward_head(...,
    pre_logits=True)``)."""

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False):
        if not is_feat:
            return super().forward(x)
        if not hasattr(self, "forward_intermediates"):
            raise MixkdError(f"{self.mixkd_name} has no forward_intermediates in this timm version: its features "
                             "cannot be read; update timm or choose another model")
        final, inter = self.forward_intermediates(x)
        return [*inter, self.forward_head(final, pre_logits=True)], self.forward_head(final)

    def feature_names(self) -> list[str]:
        return [f["module"] for f in self.feature_info] + [PENULTIMATE]


class TorchvisionFeatures:
    """The zoo's forward for a torchvision model: ``is_feat`` features from a
    ``create_feature_extractor`` graph over the same modules (built on the first such call), returning
    the stage outputs, the classifier's input and the logits in one pass."""

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False):
        if not is_feat:
            return super().forward(x)
        extractor = self._feature_extractor()
        if extractor.training != self.training:
            extractor.train(self.training)  # the DualGraphModule's train/eval graph (dropout, batch norm)
        out = extractor(x)
        return [out[k] for k in self._mixkd_stages] + [out[PENULTIMATE].flatten(1)], out["logits"]

    def feature_names(self) -> list[str]:
        self._feature_extractor()
        return [*self._mixkd_stages, PENULTIMATE]

    def _feature_extractor(self):
        extractor = self.__dict__.get("_mixkd_extractor")
        if extractor is None:
            extractor = _build_tv_extractor(self)
            object.__setattr__(self, "_mixkd_extractor", extractor)  # not a submodule: no second copy of the keys
        return extractor


def _build_tv_extractor(model: nn.Module) -> nn.Module:
    """Stages: the last module (of those the forward calls, containers opened) at each spatial size of a
    224 x 224 probe; the penultimate: the graph node that feeds the last ``nn.Linear``."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    name = getattr(model, "mixkd_name", type(model).__name__)
    calls: list[tuple[str, nn.Module, tuple]] = []
    hooks = []
    for mod_name, module in _leaves_and_blocks(model):
        hooks.append(module.register_forward_hook(
            lambda m, i, o, n=mod_name: calls.append((n, m, tuple(o.shape) if isinstance(o, Tensor) else ()))))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, 3, 224, 224, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    by_size: dict[tuple[int, int], str] = {}
    for mod_name, module, shape in calls:
        if len(shape) == 4 and not isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            by_size.pop(shape[2:], None)
            by_size[shape[2:]] = mod_name  # the last at this size, in call order
    stages = list(by_size.values())
    linears = [n for n, m, _ in calls if isinstance(m, nn.Linear)]
    nodes = get_graph_node_names(model, concrete_args=_PLAIN)[0]
    if not linears or linears[-1] not in nodes or nodes.index(linears[-1]) == 0:
        raise MixkdError(f"{name}: no final nn.Linear classifier found, so its penultimate features cannot be read")
    penultimate = nodes[nodes.index(linears[-1]) - 1]
    return_nodes = {s: s for s in stages} | {penultimate: PENULTIMATE, nodes[-1]: "logits"}
    extractor = create_feature_extractor(model, return_nodes=return_nodes, concrete_args=_PLAIN)
    object.__setattr__(model, "_mixkd_stages", stages)
    return extractor


def _leaves_and_blocks(model: nn.Module):
    """(name, module) of the modules below ``model``, ``nn.Sequential``/``ModuleList`` opened up."""
    for name, child in model.named_children():
        if type(child) in (nn.Sequential, nn.ModuleList):  # not torchvision's subclasses: its tracer keeps those whole
            yield from ((f"{name}.{n}", m) for n, m in _leaves_and_blocks(child))
        else:
            yield name, child


def feature_names(model: nn.Module) -> list[str] | None:
    """The names of ``model``'s ``is_feat`` features (a timm/torchvision model's stages, then
    ``pre_logits``); None for the registry's models (whose features are indexed only)."""
    names = getattr(model, "feature_names", None)
    return names() if callable(names) else None


def feature_index(model: nn.Module, stage: int | str, model_name: str | None = None) -> int | None:
    """The index in ``model``'s ``is_feat`` features of ``stage`` (a stage name, or an index, negative from
    the end); None for a registry model given a name (those have indices only)."""
    names = feature_names(model)
    label = model_name or getattr(model, "mixkd_name", type(model).__name__)
    if names is None:
        if isinstance(stage, str) and not stage.lstrip("-").isdigit():
            raise MixkdError(f"{label} names no feature stages: give an index (0, 1, ...) instead of {stage!r}")
        return int(stage)
    return _stage_index(names, stage, label)
