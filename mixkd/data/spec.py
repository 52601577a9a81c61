"""What a loaded dataset is: in-memory splits, the :class:`DataSpec`, normalization constants."""

from __future__ import annotations

import hashlib
import os
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


def split_labels(split: Split) -> torch.Tensor:
    """Every sample's label, int64 ``(N,)``, sample ``i``'s at ``i`` (the dataset index the loaders put in a batch)."""
    if isinstance(split, ArraySplit):
        return split.labels
    return torch.as_tensor(split.targets, dtype=torch.int64)


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
    # the fraction of an image's shorter side its test view keeps (an image folder's resize-then-centre-
    # crop: 224 / 256); 1: the whole image (in-memory datasets)
    crop_pct: float = 1.0


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


def few(items: Sequence[str], k: int = 5) -> str:
    """'a, b, c and 4 more' (or 'none')."""
    if not items:
        return "none"
    more = f" and {len(items) - k} more" if len(items) > k else ""
    return ", ".join(items[:k]) + more


# ---- the same data on every rank --------------------------------------------------------------------
def _split_print(split: Split | None) -> tuple[int, str] | None:
    """(sample count, hash of the split's content): an in-memory split's labels and pixels; an image
    folder's listing (each sample's path below its root, and its class)."""
    if split is None:
        return None
    h = hashlib.blake2b(digest_size=8)
    if isinstance(split, ArraySplit):
        for t in (split.labels, split.images):  # hashed in place (no copy of CIFAR's 150 MB)
            h.update(memoryview(t.contiguous().numpy()).cast("B"))
    else:
        samples = split.samples
        if hasattr(samples, "_names"):  # mixkd's FolderIndex: the listing as one byte buffer
            h.update(samples._names.tobytes())
            h.update(samples._offsets.tobytes())
            h.update(samples.targets.tobytes())
        else:
            root = str(split.root)
            for path, target in samples:
                h.update(f"{os.path.relpath(path, root)}\0{target}\n".encode())
    return len(split), h.hexdigest()


def fingerprint(spec: DataSpec) -> dict[str, object]:
    """What must be equal on every rank of a data-parallel run: the class names, and for each split its
    sample count and a hash of its content (in-memory data) or listing (image folders)."""
    return {"dataset": spec.name, "classes": list(spec.class_names),
            **{split: _split_print(getattr(spec, split)) for split in SPLITS}}


def fingerprint_mismatch(prints: Sequence[dict[str, object]]) -> str | None:
    """One line saying how the ranks' :func:`fingerprint` s differ from rank 0's (None where they do not)."""
    first = prints[0]
    differ = [r for r, p in enumerate(prints) if p != first]
    if not differ:
        return None
    r = differ[0]
    other = prints[r]
    what = []
    for split, label in (("train", "training"), ("test", "test")):
        a, b = first[split], other[split]
        if a != b:
            if a is None or b is None or a[0] != b[0]:
                what.append(f"{label} samples {a[0] if a else 0} vs {b[0] if b else 0}")
            else:
                what.append(f"{label} samples differ with the same count ({a[0]}; content hash {a[1]} vs {b[1]})")
    ca, cb = first["classes"], other["classes"]
    if ca != cb:
        if len(ca) != len(cb):
            what.append(f"{len(ca)} vs {len(cb)} classes")
        else:
            i = next(i for i, (x, y) in enumerate(zip(ca, cb)) if x != y)
            what.append(f"class {i} is {ca[i]!r} vs {cb[i]!r}")
    if first["dataset"] != other["dataset"]:
        what.insert(0, f"dataset {first['dataset']!r} vs {other['dataset']!r}")
    ranks = few([str(x) for x in differ])
    return (f"the ranks see different data: rank {ranks} differ{'s' if len(differ) == 1 else ''} from rank 0 "
            f"(rank 0 vs rank {r}: {'; '.join(what)}); give every rank the same dataset (the same --data-dir "
            "contents on every node)")
