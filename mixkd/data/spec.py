"""What a loaded dataset is: in-memory splits, the :class:`DataSpec`, normalization constants."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision

# The study's normalization constants.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Per-channel statistics of the digits train split (all channels are equal); tests/test_data.py
# recomputes them.
DIGITS_MEAN = (0.3054, 0.3054, 0.3054)
DIGITS_STD = (0.3236, 0.3236, 0.3236)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS = ("cifar100", "cifar10", "digits", "imagefolder")
SPLITS = ("train", "test")


@dataclass(repr=False)
class ArraySplit:
    """A small dataset held whole in memory: uint8 images (N, 3, H, W) and int64 labels (N,).

    Splits returned by :func:`mixkd.data.load_dataset` are shared by every caller in the process
    (and their device copies by every loader on a device): treat them as read-only.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"ArraySplit.images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"ArraySplit.labels must be int64 ({self.images.shape[0]},), got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"ArraySplit(images=uint8{tuple(self.images.shape)}, labels=int64({len(self)},))"


Split = ArraySplit | torchvision.datasets.ImageFolder


@dataclass
class DataSpec:
    """A loaded dataset: its splits plus everything a model and the loaders need to know.

    A split that was not asked for is None (``load_dataset(..., splits=("test",))`` leaves ``train``
    None).
    """

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: list[str]
    train: Split | None
    test: Split | None


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


def few(items: Sequence[str], k: int = 5) -> str:
    """'a, b, c and 4 more' (or 'none')."""
    if not items:
        return "none"
    more = f" and {len(items) - k} more" if len(items) > k else ""
    return ", ".join(items[:k]) + more
