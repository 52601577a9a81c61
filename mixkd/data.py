"""Datasets and loaders.

``load_dataset`` returns a :class:`DataSpec`; ``make_loaders`` turns it into a pair of loaders.

* Small datasets (CIFAR-10/100, scikit-learn's digits) are held whole in memory as uint8
  :class:`ArraySplit` tensors. :class:`DeviceLoader` moves a split once to the training device and
  does shuffling, ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` and normalization as
  batched tensor ops there, with no per-sample Python work and no host synchronization.
* ``imagefolder`` (ImageNet layout) is read lazily through torchvision's ``ImageFolder`` and
  :class:`FolderLoader`, a thin wrapper around ``torch.utils.data.DataLoader``.

Both loaders follow the :class:`Loader` protocol: ``set_epoch_seed(seed)`` makes the order and the
augmentation of the next epoch a pure function of ``seed`` (resumed runs replay the same batches).
"""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, Sampler

from mixkd.errors import MixkdError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArraySplit",
    "DataSpec",
    "DeviceLoader",
    "FolderLoader",
    "Loader",
    "load_dataset",
    "make_loaders",
]

# The study's normalization constants.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Per-channel statistics of the digits train split built below (all channels are equal);
# tests/test_data.py recomputes them.
DIGITS_MEAN = (0.3054, 0.3054, 0.3054)
DIGITS_STD = (0.3236, 0.3236, 0.3236)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS = ("cifar100", "cifar10", "digits", "imagefolder")

CROP_PADDING = 4  # RandomCrop(32, padding=4)
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DEFAULT_DATA_DIR = Path("data")


# --------------------------------------------------------------------------------------------
# Data containers
# --------------------------------------------------------------------------------------------


@dataclass(repr=False)
class ArraySplit:
    """A small dataset held whole in memory: uint8 images (N, 3, H, W) and int64 labels (N,)."""

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


@dataclass
class DataSpec:
    """A loaded dataset: its splits plus everything a model and the loaders need to know."""

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: list[str]
    train: ArraySplit | torchvision.datasets.ImageFolder
    test: ArraySplit | torchvision.datasets.ImageFolder


# --------------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> DataSpec:
    """Load dataset ``name`` (one of :data:`DATASETS`).

    ``data_dir``: for CIFAR the folder holding ``cifar-100-python/`` (or ``cifar-10-batches-py/``,
    or the archive), or that folder itself; defaults to ``./data``. For ``imagefolder`` the folder
    holding ``train/`` and ``val/``. Ignored for ``digits``.
    ``download``: fetch the official CIFAR archive (MD5-checked) when it is not there.
    ``image_size``: the crop size for ``imagefolder`` (default 224); the other datasets are 32x32.
    """
    if name not in DATASETS:
        raise MixkdError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if image_size is not None and name != "imagefolder" and image_size != 32:
        raise MixkdError(
            f"image_size={image_size} is not supported for dataset {name!r}: its images are 32x32 "
            "(image_size applies to imagefolder only)"
        )
    if name in _CIFAR:
        return _load_cifar(name, data_dir, download)
    if name == "digits":
        return _load_digits()
    return _load_imagefolder(data_dir, 224 if image_size is None else image_size)


# ---- CIFAR ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarInfo:
    folder: str
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str  # for messages


_CIFAR = {
    "cifar100": _CifarInfo(
        folder=torchvision.datasets.CIFAR100.base_folder,
        archive=torchvision.datasets.CIFAR100.filename,
        url=torchvision.datasets.CIFAR100.url,
        md5=torchvision.datasets.CIFAR100.tgz_md5,
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        layout="{train,test,meta}",
    ),
    "cifar10": _CifarInfo(
        folder=torchvision.datasets.CIFAR10.base_folder,
        archive=torchvision.datasets.CIFAR10.filename,
        url=torchvision.datasets.CIFAR10.url,
        md5=torchvision.datasets.CIFAR10.tgz_md5,
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        layout="{data_batch_1..5,test_batch,batches.meta}",
    ),
}


def _cifar_files(info: _CifarInfo) -> tuple[str, ...]:
    return (*info.train_files, *info.test_files, info.meta_file)


def _find_cifar_folder(name: str, info: _CifarInfo, root: Path, download: bool) -> Path:
    """The folder holding the pickles: extracting or downloading the archive if needed."""
    expected = (
        f"expected {root / info.folder}/{info.layout} (CIFAR python-pickle layout) "
        f"or {info.archive}; pass --data-dir or --download"
    )
    # data_dir may be the pickle folder itself.
    if root.is_dir() and (root.name == info.folder or (root / info.meta_file).is_file()):
        return root
    folder = root / info.folder
    if folder.is_dir():
        return folder
    if root.exists() and not root.is_dir():
        raise MixkdError(f"dataset {name!r}: {root} is not a directory; {expected}")
    archive = root / info.archive
    if archive.is_file():
        _safe_extract(archive, root, info.folder)
        return folder
    if download:
        try:
            root.mkdir(parents=True, exist_ok=True)
            torchvision.datasets.utils.download_url(info.url, str(root), info.archive, info.md5)
        except Exception as e:  # network errors, MD5 mismatch, permissions
            raise MixkdError(
                f"downloading dataset {name!r} from {info.url} to {root} failed: {type(e).__name__}: {_one_line(e)}"
            ) from e
        _safe_extract(archive, root, info.folder)
        return folder
    raise MixkdError(f"dataset {name!r} not found in {root}: {expected}")


def _safe_extract(archive: Path, root: Path, folder: str) -> None:
    """Extract ``archive`` (a .tar.gz holding ``folder/``) into ``root`` without trusting it.

    Extracts into a temporary sibling first, so an interrupted or failed extraction never leaves
    a half-written ``root/folder`` behind.
    """
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    except OSError as e:
        raise MixkdError(f"cannot extract {archive}: {root} is not writable ({e.strerror})") from e
    try:
        with tarfile.open(archive, "r:*") as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:  # Python without extraction filters: check every member ourselves
                for m in tf.getmembers():
                    target = (tmp / m.name).resolve()
                    if not (m.isfile() or m.isdir()) or not target.is_relative_to(tmp.resolve()):
                        raise MixkdError(f"refusing to extract {archive}: unsafe member {m.name!r}")
                tf.extractall(tmp)  # members checked above
        extracted = tmp / folder
        if not extracted.is_dir():
            raise MixkdError(f"archive {archive} does not contain the folder {folder}/")
        os.replace(extracted, root / folder)
    except MixkdError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise MixkdError(
            f"cannot extract {archive}: {type(e).__name__}: {_one_line(e)} "
            "(damaged archive? delete it and pass --download)"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Pickled CIFAR files contain only dicts, lists, strings, ints and numpy arrays; refuse anything
# else, so that a crafted file cannot run code when it is loaded.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes, as written by pickle protocol 2
    ("builtins", "bytes"),
    ("__builtin__", "bytes"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the pickle")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="latin1").load()
    except FileNotFoundError as e:
        raise MixkdError(f"CIFAR file {path} is missing") from e
    except Exception as e:  # truncated or corrupt files raise many different exceptions
        raise MixkdError(
            f"cannot read CIFAR file {path}: {type(e).__name__}: {_one_line(e)} "
            "(truncated or not a CIFAR python pickle?)"
        ) from e


def _read_cifar_batches(folder: Path, files: Sequence[str], info: _CifarInfo) -> ArraySplit:
    images, labels = [], []
    for fname in files:
        path = folder / fname
        d = _read_pickle(path)
        if not isinstance(d, dict) or "data" not in d or info.label_key not in d:
            keys = sorted(map(str, d)) if isinstance(d, dict) else type(d).__name__
            raise MixkdError(
                f"malformed CIFAR file {path}: expected a dict with 'data' and {info.label_key!r}, found {keys}"
            )
        data = d["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise MixkdError(f"malformed CIFAR file {path}: 'data' must be uint8 (N, 3072), got {desc}")
        try:
            lab = np.asarray(d[info.label_key], dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise MixkdError(f"malformed CIFAR file {path}: {info.label_key!r} is not a list of ints") from e
        if lab.shape != (data.shape[0],):
            raise MixkdError(
                f"malformed CIFAR file {path}: {data.shape[0]} images but {info.label_key!r} has shape {lab.shape}"
            )
        if lab.size and (lab.min() < 0 or lab.max() >= info.num_classes):
            raise MixkdError(
                f"malformed CIFAR file {path}: labels must lie in 0..{info.num_classes - 1}, "
                f"found {lab.min()}..{lab.max()}"
            )
        # Rows are channel-planar: R (1024, row-major 32x32), then G, then B.
        images.append(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
        labels.append(lab)
    x = torch.from_numpy(np.concatenate(images) if len(images) > 1 else images[0].copy())
    y = torch.from_numpy(np.concatenate(labels))
    return ArraySplit(images=x, labels=y)


def _load_cifar(name: str, data_dir: str | Path | None, download: bool) -> DataSpec:
    info = _CIFAR[name]
    root = Path(data_dir).expanduser() if data_dir is not None else DEFAULT_DATA_DIR
    folder = _find_cifar_folder(name, info, root, download)
    missing = [f for f in _cifar_files(info) if not (folder / f).is_file()]
    if missing:
        raise MixkdError(
            f"dataset {name!r} in {folder} is incomplete: missing {', '.join(missing)}; expected "
            f"{folder}/{info.layout} (CIFAR python-pickle layout); pass --data-dir or --download"
        )
    meta_path = folder / info.meta_file
    meta = _read_pickle(meta_path)
    names = meta.get(info.names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != info.num_classes or not all(isinstance(n, str) for n in names):
        raise MixkdError(
            f"malformed CIFAR file {meta_path}: expected {info.names_key!r} with {info.num_classes} class names"
        )
    return DataSpec(
        name=name,
        num_classes=info.num_classes,
        image_size=32,
        mean=info.mean,
        std=info.std,
        class_names=list(names),
        train=_read_cifar_batches(folder, info.train_files, info),
        test=_read_cifar_batches(folder, info.test_files, info),
    )


# ---- digits --------------------------------------------------------------------------------


def _load_digits() -> DataSpec:
    """scikit-learn's 8x8 digits, upsampled to 32x32 RGB, with a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pix = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32))  # (N, 8, 8), 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    u8 = torch.round(pix * (255.0 / 16.0)).clamp_(0, 255)
    big = F.interpolate(u8[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    images = big.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    train_idx, test_idx = train_test_split(
        np.arange(len(y)),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=y,
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    labels = torch.from_numpy(y)

    def split(idx: np.ndarray) -> ArraySplit:
        t = torch.from_numpy(idx)
        return ArraySplit(images=images[t].contiguous(), labels=labels[t].contiguous())

    return DataSpec(
        name="digits",
        num_classes=10,
        image_size=32,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        class_names=[str(i) for i in range(10)],
        train=split(train_idx),
        test=split(test_idx),
    )


# ---- imagefolder ---------------------------------------------------------------------------


def _class_dirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _load_imagefolder(data_dir: str | Path | None, image_size: int) -> DataSpec:
    from torchvision import transforms as T

    layout = "expected <data-dir>/train/<class>/<image> and <data-dir>/val/<class>/<image>"
    if data_dir is None:
        raise MixkdError(f"dataset 'imagefolder' needs --data-dir: {layout}")
    if image_size < 8:
        raise MixkdError(f"image_size must be at least 8 for imagefolder, got {image_size}")
    root = Path(data_dir).expanduser()
    train_dir, val_dir = root / "train", root / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise MixkdError(f"dataset 'imagefolder': {d} is not a directory; {layout}")
    train_classes, val_classes = _class_dirs(train_dir), _class_dirs(val_dir)
    if not train_classes:
        raise MixkdError(f"dataset 'imagefolder': no class folders in {train_dir}; {layout}")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise MixkdError(
            f"dataset 'imagefolder' in {root}: train/ and val/ have different class folders "
            f"(only in train: {_few(only_train)}; only in val: {_few(only_val)})"
        )
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    eval_tf = T.Compose(
        [
            T.Resize(int(image_size * 256 / 224)),
            T.CenterCrop(image_size),
            T.ToTensor(),
            normalize,
        ]
    )
    splits = []
    for d, tf in ((train_dir, train_tf), (val_dir, eval_tf)):
        try:
            splits.append(torchvision.datasets.ImageFolder(str(d), transform=tf))
        except (FileNotFoundError, OSError) as e:  # e.g. a class folder without any image
            raise MixkdError(f"dataset 'imagefolder' in {d}: {_one_line(e)}") from e
    return DataSpec(
        name="imagefolder",
        num_classes=len(train_classes),
        image_size=image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        class_names=list(splits[0].classes),
        train=splits[0],
        test=splits[1],
    )


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Loader(Protocol):
    """What the engine needs from a loader."""

    num_samples: int

    def __len__(self) -> int:
        """Number of batches per epoch."""
        ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields (x float32 normalized (N, 3, H, W), y int64 (N,)), both on the loader's device."""
        ...

    def set_epoch_seed(self, seed: int) -> None:
        """Make the next epoch's order and augmentation a pure function of ``seed``."""
        ...


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


class DeviceLoader:
    """Batches of an in-memory :class:`ArraySplit`, with everything done on ``device``.

    The uint8 split is moved to ``device`` once. At the start of each epoch (each ``iter()``),
    the permutation, the crop offsets and the flips of every sample are drawn from the loader's own
    generator, which lives on ``device``; the same code runs on CPU and CUDA.

    Augmentation matches torchvision's ``RandomCrop(H, padding=4)`` (zero padding, offsets
    uniform in 0..8) followed by ``RandomHorizontalFlip(p=0.5)``, sample by sample, and is done as
    one gather per batch. Normalization is ``(x / 255 - mean) / std`` like ``ToTensor`` +
    ``Normalize``.
    """

    def __init__(
        self,
        split: ArraySplit,
        batch_size: int,
        device: torch.device | str,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        shuffle: bool,
        augment: bool,
        drop_last: bool,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise MixkdError(f"batch size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.num_samples = int(self.images.shape[0])
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(seed)
        h, w = self.images.shape[-2:]
        self._rows = torch.arange(h, device=self.device)
        self._cols = torch.arange(w, device=self.device)

    def __len__(self) -> int:
        return _num_batches(self.num_samples, self.batch_size, self.drop_last)

    def set_epoch_seed(self, seed: int) -> None:
        self._gen.manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, dev, g = self.num_samples, self.device, self._gen
        order = torch.randperm(n, generator=g, device=dev) if self.shuffle else None
        if self.augment:
            span = 2 * CROP_PADDING + 1
            off_y = torch.randint(0, span, (n,), generator=g, device=dev)
            off_x = torch.randint(0, span, (n,), generator=g, device=dev)
            flip = torch.rand(n, generator=g, device=dev) < 0.5  # like RandomHorizontalFlip(p=0.5)
            if order is None:
                order = torch.arange(n, device=dev)
        for b in range(len(self)):
            s, e = b * self.batch_size, min((b + 1) * self.batch_size, n)
            if order is None:
                xb, yb = self.images[s:e], self.labels[s:e]
            else:
                idx = order[s:e]
                yb = self.labels.index_select(0, idx)
                if self.augment:
                    xb = self._crop_flip(idx, off_y[s:e], off_x[s:e], flip[s:e])
                else:
                    xb = self.images.index_select(0, idx)
            yield self._normalize(xb), yb

    def _crop_flip(
        self, idx: torch.Tensor, off_y: torch.Tensor, off_x: torch.Tensor, flip: torch.Tensor
    ) -> torch.Tensor:
        """Zero-pad by CROP_PADDING, crop at the given offsets, then flip; no per-sample loop.

        Output pixel (i, j) of sample k is padded[k, :, off_y + i, off_x + j'] with j' = j, or
        W - 1 - j when the sample is flipped: two ``gather`` calls (rows, then columns).
        """
        x = F.pad(self.images.index_select(0, idx), (CROP_PADDING,) * 4)  # zeros: value 0
        b, c, hp, wp = x.shape
        h, w = hp - 2 * CROP_PADDING, wp - 2 * CROP_PADDING
        rows = off_y[:, None] + self._rows[None, :]  # (B, H)
        cols = off_x[:, None] + torch.where(flip[:, None], (w - 1) - self._cols[None, :], self._cols[None, :])  # (B, W)
        x = x.gather(2, rows[:, None, :, None].expand(b, c, h, wp))
        return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)


class _SeededSampler(Sampler):
    """Yields (index, sample_seed) pairs: the order and each sample's augmentation seed are drawn
    in the main process from one generator, so they do not depend on worker count or state."""

    def __init__(self, n: int, shuffle: bool, generator: torch.Generator) -> None:
        self.n, self.shuffle, self.generator = n, shuffle, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = self.generator
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        return iter(zip(order.tolist(), seeds.tolist(), strict=True))


class _SeededFolder(Dataset):
    """An ImageFolder whose transform runs under a per-sample seed, leaving global RNGs intact."""

    def __init__(self, folder: torchvision.datasets.ImageFolder, transform: Any) -> None:
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        path, target = self.folder.samples[index]
        img = self.folder.loader(path)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                img = self.transform(img)
        if self.folder.target_transform is not None:
            target = self.folder.target_transform(target)
        return img, target


class FolderLoader:
    """A ``DataLoader`` over an ``ImageFolder`` that moves batches to ``device``.

    Shuffling and each sample's augmentation are seeded from ``set_epoch_seed``, so an epoch is
    reproducible whatever the number of workers (persistent when ``workers > 0``).
    ``transform`` overrides the folder's own transform (used for un-augmented training).
    """

    def __init__(
        self,
        folder: torchvision.datasets.ImageFolder,
        batch_size: int,
        device: torch.device | str,
        *,
        shuffle: bool,
        drop_last: bool,
        workers: int,
        transform: Any = None,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise MixkdError(f"batch size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.num_samples = len(folder)
        self._gen = torch.Generator()
        self._gen.manual_seed(seed)
        dataset = _SeededFolder(folder, folder.transform if transform is None else transform)
        self._loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=_SeededSampler(self.num_samples, shuffle, self._gen),
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            # The DataLoader draws worker base seeds from this one (not from the global RNG, and
            # not from self._gen: with persistent workers it draws only on the first epoch).
            # Worker seeds do not matter: each sample's transform runs under its own seed.
            generator=torch.Generator().manual_seed(0),
        )

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch_seed(self, seed: int) -> None:
        self._gen.manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self._loader:
            yield (
                x.to(self.device, non_blocking=True),
                y.to(self.device, dtype=torch.int64, non_blocking=True),
            )


def make_loaders(
    spec: DataSpec,
    batch_size: int,
    device: torch.device | str,
    *,
    eval_batch_size: int = 1024,
    augment: bool = True,
    drop_last: bool = True,
    workers: int = 4,
) -> tuple[DeviceLoader | FolderLoader, DeviceLoader | FolderLoader]:
    """(train_loader, test_loader) for ``spec``.

    The train loader shuffles, augments when ``augment`` and drops the last partial batch when
    ``drop_last``; the test loader keeps the dataset order, never augments and keeps every sample.
    ``workers`` only matters for ``imagefolder``.
    """
    train: DeviceLoader | FolderLoader
    test: DeviceLoader | FolderLoader
    if isinstance(spec.train, ArraySplit) and isinstance(spec.test, ArraySplit):
        common = {"device": device, "mean": spec.mean, "std": spec.std}
        train = DeviceLoader(spec.train, batch_size, shuffle=True, augment=augment, drop_last=drop_last, **common)
        test = DeviceLoader(spec.test, eval_batch_size, shuffle=False, augment=False, drop_last=False, **common)
    else:
        train = FolderLoader(
            spec.train,
            batch_size,
            device,
            shuffle=True,
            drop_last=drop_last,
            workers=workers,
            transform=None if augment else spec.test.transform,
        )
        test = FolderLoader(spec.test, eval_batch_size, device, shuffle=False, drop_last=False, workers=workers)
    if len(train) == 0:
        raise MixkdError(
            f"batch size {batch_size} is larger than the {train.num_samples} training samples of "
            f"{spec.name!r} (the last partial batch is dropped): use a smaller batch size"
        )
    return train, test


# --------------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _few(items: Sequence[str], k: int = 5) -> str:
    if not items:
        return "none"
    more = f" and {len(items) - k} more" if len(items) > k else ""
    return ", ".join(items[:k]) + more
