"""What an augmentation policy is: a per-sample policy (:class:`SamplePolicy`) or a batch policy
(:class:`BatchPolicy`), built from its typed settings and the run's :class:`Context`.

Per-sample policies run on the device, batched: every sample gets its own random draw. Where a
well-kept library implements the transform (torchvision.transforms.v2) the policy calls it once per
sample on the device tensor (``BENCHMARKS.md``, "Augmentation policies", says why per sample and why
torchvision rather than kornia: kornia's AutoAugment/RandAugment/TrivialAugment draw one sub-policy per
batch). The same transform serves image-folder loader workers (:meth:`SamplePolicy.folder_transform`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mixkd.registry import Settings


@dataclass(frozen=True)
class Context:
    """The run a policy is built for."""

    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device
    dataset: str = ""
    temperature: float = 4.0  # the run's KD temperature (CutMixPick scores at it)


class SamplePolicy:
    """A per-sample policy. ``space``: ``"pixels"`` (uint8 images, before normalization) or
    ``"normalized"`` (after it: erasing to 0 fills with the dataset's mean, as the papers' code does).
    ``loader_native``: the in-memory loader draws it itself (flip, flip + crop: today's numbers)."""

    space: ClassVar[str] = "pixels"
    loader_native: ClassVar[bool] = False

    def __init__(self, settings: Settings, context: Context):
        self.settings, self.context = settings, context

    def transform(self) -> Any:
        """The torchvision.transforms.v2 transform of one sample (a CHW tensor), or None."""
        return None

    def folder_transform(self) -> Any:
        """The transform for image-folder loader workers (after the folder's own crop + flip)."""
        return self.transform()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The policy on a batch (B, C, H, W): each sample its own draw (torch's global RNG, which
        the loader seeds per batch)."""
        t = self.transform()
        if t is None:
            return x
        return torch.stack([t(s) for s in x])


class BatchPolicy:
    """A batch policy (mixing): ``mix(x, y_onehot, generator)``; ``method`` is :class:`mixkd.mix.MixSpec`'s."""

    method: ClassVar[str] = "none"
    needs_models: ClassVar[bool] = False  # CutMixPick: scored by the teacher (and the student)

    def __init__(self, settings: Settings, context: Context):
        self.settings, self.context = settings, context
