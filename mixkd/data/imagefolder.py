"""Image folders in the ImageNet layout: ``<data-dir>/train/<class>/<image>`` and ``val/``.

A split is an :class:`IndexedImageFolder`: torchvision's ``ImageFolder`` whose file listing comes
from :func:`~mixkd.data.folder_index.folder_index` (listed once, then read from an index file while
the folder is unchanged). The test view is torchvision's ImageNet one: the shorter side resized to
:func:`test_resize` (``int(size * 256 / 224)``, bilinear), centre-cropped to ``size`` (the spec's
``crop_pct``: ``size / test_resize``); :func:`with_test_transform` reads the same files through a
model's own eval transform instead. Images are read lazily, in the loader's worker processes; an image that
cannot be read raises :class:`UnreadableImageError`, one line naming the file, also from a
``DataLoader`` worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torchvision
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.vision import VisionDataset

from mixkd.data.folder_index import class_dirs, folder_index
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


class IndexedImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ``ImageFolder`` (same samples, same ``__getitem__``) listed through
    :func:`~mixkd.data.folder_index.folder_index`: ``samples`` is a :class:`FolderIndex`, ``targets``
    an int64 array. ``cache=False`` lists the folder now and writes no index file."""

    def __init__(self, root: str | Path, transform: Any = None, loader: Any = read_image, cache: bool = True) -> None:
        VisionDataset.__init__(self, str(root), transform=transform)  # ImageFolder.__init__ would list the folder
        index = folder_index(self.root, cache=cache)
        if not index.classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {self.root}.")
        empty = index.empty_classes()
        if empty:
            raise FileNotFoundError(f"no image file in the class folder(s) {few(empty)}; image files end in "
                                    f"{', '.join(IMG_EXTENSIONS)}")
        self.loader, self.extensions = loader, IMG_EXTENSIONS
        self.classes = list(index.classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = self.imgs = index  # type: ignore[assignment]
        self.targets = index.targets  # type: ignore[assignment]


def test_resize(image_size: int) -> int:
    """The shorter side the test view resizes an image to before its centre crop of ``image_size``."""
    return int(image_size * 256 / 224)


def with_test_transform(spec: DataSpec, transform: Any) -> DataSpec:
    """``spec`` (an image folder's) whose test split reads the same files, in the same order, through
    ``transform`` (a model's own eval transform); the training split is left out."""
    test = spec.test
    if not isinstance(test, IndexedImageFolder):
        raise ValueError("with_test_transform takes an image folder's spec with its test split")
    return dataclasses.replace(spec, train=None, test=IndexedImageFolder(test.root, transform=transform))


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
        "test": T.Compose([T.Resize(test_resize(image_size)), T.CenterCrop(image_size), T.ToTensor(), normalize]),
    }
    loaded = {}
    for split in splits:
        d = root / _FOLDERS[split]
        try:
            loaded[split] = IndexedImageFolder(d, transform=transforms[split])
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
        crop_pct=image_size / test_resize(image_size),
    )
