"""The test images an analysis works on: uint8 pixels, a deterministic subset, the fixed t-SNE set.

Attacks and mixing work in pixel space [0, 1]; :class:`Normalized` puts the dataset's
normalization inside the model, so epsilon is in pixel units and clipping to [0, 1] is exact.

In-memory datasets (CIFAR-10/100, digits) are indexed directly. An ``imagefolder`` test split is
read once through a ``DataLoader`` with its evaluation transform (resize + center crop) and
un-normalized back to exact uint8 pixels; only the images analyzed are kept, so pass ``subset``
for a large folder (ImageNet's 50,000 validation images at 224 px need 7.5 GB of host memory).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mixkd.data import ArraySplit, DataSpec
from mixkd.errors import MixkdError

TSNE_CLASSES = 10
TSNE_PER_CLASS = 100


class Normalized(nn.Module):
    """``model((x - mean) / std)`` for pixel-space input ``x`` in [0, 1]; ``is_feat`` passes through."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor, is_feat: bool = False):
        x = (x - self.mean) / self.std
        return self.model(x, is_feat=True) if is_feat else self.model(x)


@dataclass
class PixelImages:
    """Images to analyze: uint8 (N, 3, H, W) (on the device for in-memory datasets) and labels."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor  # positions in the dataset's test split

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, device: torch.device) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """(slice, pixels in [0, 1] as float32 on ``device``, labels) per batch, in order."""
        for start in range(0, len(self), batch_size):
            sl = slice(start, min(start + batch_size, len(self)))
            x = self.images[sl].to(device, non_blocking=True).float().div_(255.0)
            yield sl, x, self.labels[sl].to(device, non_blocking=True)


def subset_indices(n: int, subset: int | None) -> torch.Tensor:
    """All ``n`` test images, or ``subset`` of them evenly spaced (every (n/subset)-th image), so a
    test split sorted by class (image folders) still contributes every class."""
    if subset is None or subset >= n:
        return torch.arange(n)
    if subset < 1:
        raise MixkdError(f"--subset must be at least 1, got {subset}")
    return torch.arange(subset) * n // subset


def tsne_indices(labels: torch.Tensor, classes: int = TSNE_CLASSES, per_class: int = TSNE_PER_CLASS) -> torch.Tensor:
    """The fixed t-SNE set: the first ``per_class`` test images (in test-set order) of each of the
    first ``classes`` classes (fewer where a class has fewer images), grouped by class."""
    picks = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(classes)]
    return torch.cat(picks)


def split_labels(spec: DataSpec) -> torch.Tensor:
    if isinstance(spec.test, ArraySplit):
        return spec.test.labels
    return torch.tensor(spec.test.targets, dtype=torch.int64)


def load_images(spec: DataSpec, indices: torch.Tensor, device: torch.device, workers: int | None = None) -> PixelImages:
    """The test images at ``indices`` as uint8 pixels."""
    if isinstance(spec.test, ArraySplit):
        images = spec.test.images[indices].to(device)
        labels = spec.test.labels[indices].to(device)
        return PixelImages(images, labels, indices)
    return _load_folder(spec, indices, device, workers)


def _load_folder(spec: DataSpec, indices: torch.Tensor, device: torch.device, workers: int | None) -> PixelImages:
    from torch.utils.data import DataLoader, Subset

    from mixkd.data import resolve_workers

    loader = DataLoader(Subset(spec.test, indices.tolist()), batch_size=256, shuffle=False,
                        num_workers=resolve_workers(workers))
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    images, labels = [], []
    try:
        for x, y in loader:
            # ToTensor gives k/255 exactly; undoing Normalize and rounding recovers the uint8 pixels.
            images.append((x * std + mean).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8))
            labels.append(y)
    except (OSError, ValueError) as e:
        raise MixkdError(f"cannot read the test images of {spec.name!r}: {type(e).__name__}: {e}") from e
    x = torch.cat(images)
    if device.type == "cuda":
        x = x.pin_memory()  # stays on the host; each batch is copied asynchronously
    return PixelImages(x, torch.cat(labels).to(device), indices)
