"""Datasets by name: load one (each split once per process), or check one without loading it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mixkd.data.cifar import CIFAR, check_cifar, load_cifar
from mixkd.data.digits import check_digits, load_digits
from mixkd.data.imagefolder import DEFAULT_IMAGE_SIZE, check_imagefolder, load_imagefolder, num_classes_of
from mixkd.data.spec import DATASETS, SPLITS, DataSpec
from mixkd.errors import MixkdError


def _check_args(name: str, image_size: int | None, splits: Sequence[str]) -> list[str]:
    if name not in DATASETS:
        return [f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}"]
    if isinstance(splits, str) or not splits or not set(splits) <= set(SPLITS):
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {splits!r}")
    if image_size is not None and name != "imagefolder" and image_size != 32:
        return [f"image_size={image_size} is not supported for dataset {name!r}: its images are 32x32 "
                "(image_size applies to imagefolder only)"]
    return []


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    *,
    splits: Sequence[str] = SPLITS,
) -> DataSpec:
    """Load dataset ``name`` (one of :data:`DATASETS`).

    ``data_dir``: for CIFAR the folder holding ``cifar-100-python/`` (or ``cifar-10-batches-py/``,
    or the archive), or that folder itself; defaults to ``./data``. For ``imagefolder`` the folder
    holding ``train/`` and ``val/``. Ignored for ``digits``.
    ``download``: fetch the official CIFAR archive (MD5-checked) when it is not there.
    ``image_size``: the crop size for ``imagefolder`` (default 224); the other datasets are 32x32.
    ``splits``: the splits to load, ``("train", "test")`` or e.g. ``("test",)`` (for CIFAR only the
    test pickle is then read); the others are None in the result.

    In-memory splits (CIFAR, digits) are read once per process and shared by every caller (see
    :mod:`mixkd.data.cache`): treat them as read-only.
    """
    problems = _check_args(name, image_size, splits)
    if problems:
        raise MixkdError(problems[0])
    if name in CIFAR:
        return load_cifar(name, data_dir, download, splits)
    if name == "digits":
        return load_digits(splits)
    return load_imagefolder(data_dir, DEFAULT_IMAGE_SIZE if image_size is None else image_size, splits)


def check_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    image_size: int | None = None,
    splits: Sequence[str] = SPLITS,
    batch_size: int | None = None,
) -> list[str]:
    """Problems that would stop :func:`load_dataset` (or a training batch of ``batch_size``), found
    cheaply: names, folder layout, file presence and sizes. Nothing is loaded, extracted, downloaded
    or written. An empty list does not promise that loading succeeds (a file may still be corrupt)."""
    problems = _check_args(name, image_size, splits)
    if problems:
        return problems
    if name in CIFAR:
        return check_cifar(name, data_dir, download, splits, batch_size)
    if name == "digits":
        return check_digits(splits, batch_size)
    return check_imagefolder(data_dir, image_size, splits)


def dataset_num_classes(name: str, data_dir: str | Path | None = None) -> int | None:
    """The class count of dataset ``name`` without loading it (None if it cannot be told cheaply)."""
    if name in CIFAR:
        return CIFAR[name].num_classes
    if name == "digits":
        return 10
    if name == "imagefolder" and data_dir is not None:
        return num_classes_of(data_dir)
    return None
