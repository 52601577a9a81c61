"""Image folders in the ImageNet layout: ``<data-dir>/train/<class>/<image>`` and ``val/``.

Images are read lazily (torchvision's ``ImageFolder``); an image that cannot be read raises
:class:`UnreadableImageError`, one line naming the file, also from a ``DataLoader`` worker.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torchvision

from mixkd.data.spec import IMAGENET_MEAN, IMAGENET_STD, DataSpec, few, one_line
from mixkd.errors import MixkdError

DEFAULT_IMAGE_SIZE = 224
LAYOUT = "expected <data-dir>/train/<class>/<image> and <data-dir>/val/<class>/<image>"
_FOLDERS = {"train": "train", "test": "val"}


class UnreadableImageError(MixkdError):
    """An image file that cannot be decoded (corrupt, truncated, not an image).

    A ``DataLoader`` re-raises a worker's exception as ``type(e)(text with the worker's traceback)``;
    the message is cut back to its one line here, so the error reads the same with and without
    workers."""

    _MARK = "UnreadableImageError: "

    def __init__(self, message: str) -> None:
        if "Traceback" in message and self._MARK in message:
            message = message.rsplit(self._MARK, 1)[1].strip().splitlines()[0]
        super().__init__(message)


def read_image(path: str):
    """The image at ``path`` as RGB (torchvision's ``pil_loader``), or :class:`UnreadableImageError`."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        from PIL import UnidentifiedImageError

        why = "not an image file PIL can identify" if isinstance(e, UnidentifiedImageError) else \
            f"{type(e).__name__}: {one_line(e)}"
        raise UnreadableImageError(
            f"cannot read image {path}: {why}; delete or replace the file "
            "(mixkd does not skip unreadable images, so that every epoch sees the same samples)"
        ) from None


def class_dirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def check_imagefolder(data_dir: str | Path | None, image_size: int | None = None,
                      splits: Sequence[str] = ("train", "test")) -> list[str]:
    """What stops :func:`load_imagefolder` from working, from the folder layout only (one directory
    listing per split; no image is opened)."""
    if data_dir is None:
        return [f"dataset 'imagefolder' needs --data-dir: {LAYOUT}"]
    problems = []
    if image_size is not None and image_size < 8:
        problems.append(f"image_size must be at least 8 for imagefolder, got {image_size}")
    root = Path(data_dir).expanduser()
    found = {}
    for split in splits:
        d = root / _FOLDERS[split]
        if not d.is_dir():
            problems.append(f"dataset 'imagefolder': {d} is not a directory; {LAYOUT}")
            continue
        found[split] = class_dirs(d)
        if not found[split]:
            problems.append(f"dataset 'imagefolder': no class folders in {d}; {LAYOUT}")
    if len(found) == 2 and found["train"] and found["test"] and found["train"] != found["test"]:
        only_train = sorted(set(found["train"]) - set(found["test"]))
        only_val = sorted(set(found["test"]) - set(found["train"]))
        problems.append(f"dataset 'imagefolder' in {root}: train/ and val/ have different class folders "
                        f"(only in train: {few(only_train)}; only in val: {few(only_val)})")
    return problems


def num_classes_of(data_dir: str | Path) -> int | None:
    """The class count of an image folder (its ``train/`` or else ``val/`` subfolders), if it has one."""
    root = Path(data_dir).expanduser()
    for name in ("train", "val"):
        if (root / name).is_dir():
            return len(class_dirs(root / name)) or None
    return None


def load_imagefolder(data_dir: str | Path | None, image_size: int = DEFAULT_IMAGE_SIZE,
                     splits: Sequence[str] = ("train", "test")) -> DataSpec:
    from torchvision import transforms as T

    problems = check_imagefolder(data_dir, image_size, splits)
    if problems:
        raise MixkdError(problems[0])
    root = Path(data_dir).expanduser()  # type: ignore[arg-type]
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    transforms = {
        "train": T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize]),
        "test": T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(), normalize]),
    }
    loaded = {}
    for split in splits:
        d = root / _FOLDERS[split]
        try:
            loaded[split] = torchvision.datasets.ImageFolder(str(d), transform=transforms[split], loader=read_image)
        except (FileNotFoundError, OSError) as e:  # e.g. a class folder without any image
            raise MixkdError(f"dataset 'imagefolder' in {d}: {one_line(e)}") from e
    first = next(iter(loaded.values()))
    return DataSpec(
        name="imagefolder",
        num_classes=len(first.classes),
        image_size=image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        class_names=list(first.classes),
        train=loaded.get("train"),
        test=loaded.get("test"),
    )
