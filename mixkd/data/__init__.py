"""Datasets and loaders.

``load_dataset`` returns a :class:`DataSpec`; ``make_loaders`` turns it into a pair of loaders
(``make_test_loader`` into the test loader alone); ``check_dataset`` says what is missing without
loading anything.

* Small datasets (CIFAR-10/100 in :mod:`~mixkd.data.cifar`, scikit-learn's digits in
  :mod:`~mixkd.data.digits`) are held whole in memory as uint8 :class:`ArraySplit` tensors, read
  once per process (:mod:`~mixkd.data.cache`). :class:`DeviceLoader` moves a split once to the
  training device (one copy per device, shared by every loader of that split) and does shuffling,
  ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` and normalization as batched tensor ops
  there, with no per-sample Python work and no host synchronization.
* ``imagefolder`` (ImageNet layout, :mod:`~mixkd.data.imagefolder`) is read lazily through
  torchvision's ``ImageFolder``, listed once and then read from an index file while the folder is
  unchanged (:mod:`~mixkd.data.folder_index`), and :class:`FolderLoader`, a thin wrapper around
  ``torch.utils.data.DataLoader`` that decodes and augments in worker processes
  (``workers=None``: what the machine has), each sample under its own seed.

Both loaders follow the :class:`Loader` protocol (:mod:`~mixkd.data.loaders`):
``set_epoch_seed(seed)`` makes the order and the augmentation of the next epoch a pure function of
``seed`` (resumed runs replay the same batches), and ``iter_from(s)`` starts that epoch at batch ``s``.
"""

from mixkd.data.cache import clear_cache
from mixkd.data.catalog import check_dataset, dataset_num_classes, load_dataset
from mixkd.data.imagefolder import UnreadableImageError
from mixkd.data.loaders import (
    DeviceLoader,
    FolderLoader,
    Loader,
    make_loaders,
    make_test_loader,
    rank_part,
    resolve_workers,
)
from mixkd.data.spec import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DATASETS,
    DIGITS_MEAN,
    DIGITS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    ArraySplit,
    DataSpec,
    fingerprint,
    fingerprint_mismatch,
    split_labels,
)

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
    "SPLITS",
    "ArraySplit",
    "DataSpec",
    "DeviceLoader",
    "FolderLoader",
    "Loader",
    "UnreadableImageError",
    "check_dataset",
    "clear_cache",
    "dataset_num_classes",
    "fingerprint",
    "fingerprint_mismatch",
    "load_dataset",
    "make_loaders",
    "make_test_loader",
    "rank_part",
    "resolve_workers",
    "split_labels",
]
