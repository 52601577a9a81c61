"""Augmentation policies: the registry's built-in entries (one file each) and the pipeline.

A spec names policies joined by ``+``: per-sample policies first (``flip_crop+cutout``), then at most
one batch policy (``+mixup``, ``+cutmix``, ``+cutmix_pick``). :func:`parse_augment` checks a spec;
:func:`make_pipeline` builds it for a run. ``docs/augmentation.md`` is the user's page.

* :meth:`Pipeline.sample`: the per-sample stage of a uint8 batch (B, C, H, W) on the device, each sample
  its own draw, returning the normalized float batch. In-memory datasets run it in their loader
  (:class:`mixkd.data.loaders.DeviceLoader`, ``sample=``), which draws flip and flip + crop itself
  (today's numbers) and seeds the rest per batch, so an epoch stays a function of its seed.
* :meth:`Pipeline.folder_transform`: the same policies as a torchvision.transforms.v2 transform for
  image-folder loader workers, after the folder's own crop + flip.
* :attr:`Pipeline.batch`: the batch stage (None, or a :class:`BatchPolicy`); mixup and CutMix run as
  :func:`mixkd.mix.mix_batch` with the run's ``mix.*`` settings, CutMixPick in :mod:`mixkd.step`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mixkd.augment import (  # noqa: F401  (each file registers its entry)
    autoaugment,
    cutmix,
    cutmix_pick,
    cutout,
    flip,
    flip_crop,
    mixup,
    none,
    randaugment,
    random_erasing,
    trivialaugment,
)
from mixkd.augment.base import BatchPolicy, Context, SamplePolicy
from mixkd.data.layout import TEACHER_VIEWS
from mixkd.errors import MixkdError
from mixkd.mix import MixSpec, mix_batch
from mixkd.registry import AUGMENTATIONS, Entry

__all__ = ["AUGMENTATIONS", "TEACHER_VIEWS", "BatchPolicy", "Context", "Pipeline", "SamplePolicy", "augment_label", "batch_method", "effective_spec", "make_pipeline",
           "parse_augment"]



def parse_augment(spec: str, where: str = "augment") -> list[Entry]:
    """The entries of ``spec`` (``"flip_crop+cutout+mixup"``), per-sample ones first, at most one batch
    policy, last; a bad spec is one line naming what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise MixkdError(f"{where}: {spec!r} names no policy; write e.g. flip_crop or flip_crop+cutout+mixup")
    names = [n.strip() for n in spec.split("+")]
    if any(not n for n in names):
        raise MixkdError(f"{where}: {spec!r} has an empty name between '+'; write e.g. flip_crop+cutout")
    entries = []
    for n in names:
        try:
            entries.append(AUGMENTATIONS.get(n))
        except MixkdError as err:
            raise MixkdError(f"{where}: {err}".replace(f"{where}: augment: ", f"{where}: ")) from None
    if len(set(names)) < len(names):
        raise MixkdError(f"{where}: {spec!r} names a policy twice; name each once")
    batch = [e.name for e in entries if e.extra.get("stage") == "batch"]
    if len(batch) > 1:
        raise MixkdError(f"{where}: {spec!r} has {len(batch)} batch policies ({', '.join(batch)}); keep one")
    if batch and entries[-1].name != batch[0]:
        raise MixkdError(f"{where}: {spec!r}: the batch policy {batch[0]} must come last (per-sample policies "
                         f"first), e.g. {'+'.join([n for n in names if n != batch[0]] + batch)}")
    return entries


def batch_method(spec: str) -> str:
    """The spec's batch policy's name ('none' when it has none)."""
    batch = [e.name for e in parse_augment(spec) if e.extra.get("stage") == "batch"]
    return batch[0] if batch else "none"


def effective_spec(augment: str, mix_method: str = "none") -> str:
    """The run's whole spec: ``augment``, plus today's ``--mix`` method where ``augment`` has no batch
    policy (``flip_crop`` with ``--mix mixup``: ``flip_crop+mixup``)."""
    if mix_method != "none" and batch_method(augment) == "none":
        return f"{augment}+{mix_method}"
    return augment


def augment_label(spec: str) -> str:
    """The spec's label for tables: its entries' labels joined by '+' (a name not registered stays)."""
    parts = []
    for n in str(spec).split("+"):
        parts.append(AUGMENTATIONS.get(n).label if n in AUGMENTATIONS else n)
    return "+".join(parts)


class Pipeline:
    """A parsed spec built for a run (see the module docstring)."""

    def __init__(self, entries: list[Entry], settings: Mapping[str, Mapping[str, Any]], context: Context,
                 mix: MixSpec | None = None):
        self.entries, self.context = entries, context
        unknown = [k for k in settings if k not in [e.name for e in entries]]
        if unknown:
            raise MixkdError(f"augment_settings.{unknown[0]}: the spec does not use {unknown[0]}; remove it")
        self.policies: list[SamplePolicy] = []
        self.batch: BatchPolicy | None = None
        for e in entries:
            obj = e.obj(e.resolve(settings.get(e.name), {"dataset": context.dataset},
                                  where=f"augment_settings.{e.name}"), context)
            if e.extra.get("stage") == "batch":
                self.batch = obj
            else:
                self.policies.append(obj)
        method = self.batch.method if self.batch is not None and not self.batch.needs_models else "none"
        base = mix or MixSpec()
        # mixup / CutMix: the run's mix.alpha, mix.fraction, mix.sampling (today's --mix-* flags)
        self.mix_spec = MixSpec(method, base.alpha, base.fraction, base.sampling) if method != "none" else base
        names = [e.name for e in entries]
        self.crop = "flip_crop" in names
        self.flip = self.crop or "flip" in names
        self.extra = [p for p in self.policies if not p.loader_native]
        dev = context.device
        self.mean = torch.tensor(context.mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        self.std = torch.tensor(context.std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)

    @property
    def spec(self) -> str:
        return "+".join(e.name for e in self.entries)

    def sample_extra(self, x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """:meth:`sample` without flip and flip + crop, which the in-memory loader draws itself."""
        return self.sample(x, seed, native=False)

    def sample(self, x: torch.Tensor, seed: int | None = None, native: bool = True) -> torch.Tensor:
        """The per-sample stage of a uint8 batch (B, C, H, W): normalized float32, each sample its own
        draw. ``native``: flip and flip + crop too, by torchvision per sample. ``seed``: draws under that
        seed, leaving torch's global RNG as it was."""
        rng = torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []) if seed is not None \
            else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            for p in self.policies:
                if p.space == "pixels" and (native or not p.loader_native):
                    x = p(x)
            x = x.to(torch.float32).div(255.0).sub_(self.mean).div_(self.std)
            for p in self.policies:
                if p.space == "normalized":
                    x = p(x)
        return x

    def mix(self, x: torch.Tensor, y_onehot: torch.Tensor, teacher: torch.nn.Module | None = None,
            student: torch.nn.Module | None = None, generator: torch.Generator | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch stage on a normalized batch: ``(x, y)`` mixed by :attr:`mix_spec` (mixup, CutMix, or
        none: :func:`mixkd.mix.mix_batch`), or CutMixPick's picked candidates and their CutMix labels (scored by
        ``teacher``, and ``student`` for its student criteria), or the batch itself."""
        batch = self.batch
        if batch is None or not batch.needs_models:
            return mix_batch(x, y_onehot, self.mix_spec, generator)
        if teacher is None or (student is None and batch.settings.criterion != "teacher_entropy"):
            raise ValueError(f"cutmix_pick ({batch.settings.criterion}) needs the models that score its candidates")
        pool, pool_y = batch.candidates(x, y_onehot, generator)
        with torch.no_grad():
            t = teacher(pool).float()
            s = student(pool).float() if student is not None and batch.settings.criterion != "teacher_entropy" else None
        idx = batch.pick(pool, t, s, x.shape[0])
        return pool.index_select(0, idx), pool_y.index_select(0, idx)

    def folder_transform(self, base: Any) -> Any:
        """``base`` (the folder's train transform, ending in ToTensor + Normalize) with the per-sample
        policies inserted: pixel-space ones before ToTensor (on uint8 tensors), normalized ones after."""
        from torchvision.transforms import v2

        pixels = [p.folder_transform() for p in self.policies if p.space == "pixels"]
        after = [p.folder_transform() for p in self.policies if p.space == "normalized"]
        pixels, after = [t for t in pixels if t is not None], [t for t in after if t is not None]
        if not pixels and not after:
            return base
        steps = list(base.transforms)
        k = next(i for i, t in enumerate(steps) if type(t).__name__ == "ToTensor")
        head = v2.Compose([*steps[:k], v2.PILToTensor(), *pixels, v2.ToDtype(torch.float32, scale=True),
                           *[t for t in steps[k + 1:]], *after])
        return head


def make_pipeline(spec: str, settings: Mapping[str, Mapping[str, Any]] | None = None, *, image_size: int,
                  mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu",
                  generator: torch.Generator | None = None, dataset: str = "", temperature: float = 4.0,
                  mix: MixSpec | None = None) -> Pipeline:
    """The pipeline of ``spec`` for a run. ``generator``: unused (the per-sample stage is seeded per batch
    by the loader or by :meth:`Pipeline.sample`'s ``seed``; :meth:`Pipeline.mix` takes the generator of
    its draws); ``mix``: mixup's and CutMix's alpha, fraction and sampling (default Beta(1, 1), full)."""
    del generator
    context = Context(image_size=image_size, mean=tuple(mean), std=tuple(std), device=torch.device(device),
                      dataset=dataset, temperature=temperature)
    return Pipeline(parse_augment(spec), dict(settings or {}), context, mix)
