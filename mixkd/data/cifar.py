"""CIFAR-10 / CIFAR-100 in the official python-pickle layout (or its archive, or downloaded).

Pickles are read with a restricted unpickler (only arrays, lists, strings and numbers), each split
once per process (see :mod:`mixkd.data.cache`). :func:`check_cifar` finds what is missing without
reading or writing anything.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from mixkd.data.cache import cached
from mixkd.data.spec import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, ArraySplit, DataSpec, one_line
from mixkd.errors import MixkdError
from mixkd.files import wait_lock

DEFAULT_DATA_DIR = Path("data")
ROW_BYTES = 3 * 32 * 32  # one image in a CIFAR pickle: 3072 uint8


@dataclass(frozen=True)
class CifarInfo:
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
    train_size: int  # the official dataset's
    test_size: int

    def files(self, splits: Sequence[str]) -> tuple[str, ...]:
        picked = (*(self.train_files if "train" in splits else ()), *(self.test_files if "test" in splits else ()))
        return (*picked, self.meta_file)


CIFAR = {
    "cifar100": CifarInfo(
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
        train_size=50_000,
        test_size=10_000,
    ),
    "cifar10": CifarInfo(
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
        train_size=50_000,
        test_size=10_000,
    ),
}


def _root(data_dir: str | Path | None) -> Path:
    return Path(data_dir).expanduser() if data_dir is not None else DEFAULT_DATA_DIR


def _expected(info: CifarInfo, root: Path) -> str:
    return (f"expected {root / info.folder}/{info.layout} (CIFAR python-pickle layout) "
            f"or {info.archive}; pass --data-dir or --download")


def _existing_folder(info: CifarInfo, root: Path) -> Path | None:
    """The folder holding the pickles, if it exists: ``root`` itself or ``root/<folder>``."""
    if root.is_dir() and (root.name == info.folder or (root / info.meta_file).is_file()):
        return root
    folder = root / info.folder
    return folder if folder.is_dir() else None


def check_cifar(name: str, data_dir: str | Path | None, download: bool = False,
                splits: Sequence[str] = ("train", "test"), batch_size: int | None = None) -> list[str]:
    """What stops :func:`load_cifar` from working, found from names and sizes only (nothing is read
    beyond each pickle's last byte, nothing is written): a missing folder or file, a truncated
    pickle, a batch size larger than the training split can hold."""
    info = CIFAR[name]
    root = _root(data_dir)
    folder = _existing_folder(info, root)
    if folder is None:
        if root.exists() and not root.is_dir():
            return [f"dataset {name!r}: {root} is not a directory; {_expected(info, root)}"]
        if not (root / info.archive).is_file() and not download:
            return [f"dataset {name!r} not found in {root}: {_expected(info, root)}"]
        # the archive is extracted (or downloaded) when the run starts: the official sizes
        if batch_size is not None and "train" in splits and batch_size > info.train_size:
            return [_too_large(batch_size, info.train_size, name, "")]
        return []
    missing = [f for f in info.files(splits) if not (folder / f).is_file()]
    if missing:
        return [f"dataset {name!r} in {folder} is incomplete: missing {', '.join(missing)}; expected "
                f"{folder}/{info.layout} (CIFAR python-pickle layout); pass --data-dir or --download"]
    problems = [f"CIFAR file {folder / f} is truncated (it does not end as a pickle does); "
                "replace it, or delete the folder and pass --download"
                for f in info.files(splits) if not _ends_like_a_pickle(folder / f)]
    if not problems and batch_size is not None and "train" in splits:
        # a pickle of N images holds N x 3072 bytes of pixels and more: an upper bound on N
        at_most = sum((folder / f).stat().st_size for f in info.train_files) // ROW_BYTES
        if batch_size > at_most:
            problems.append(_too_large(batch_size, at_most, name, "at most "))
    return problems


def _too_large(batch_size: int, n: int, name: str, bound: str) -> str:
    return (f"batch size {batch_size} is larger than the {bound}{n} training samples of {name!r} "
            "(the last partial batch is dropped): use a smaller batch size")


def _ends_like_a_pickle(path: Path) -> bool:
    """Every pickle ends with the STOP opcode '.'; a file cut short almost never does."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"."
    except OSError:
        return False


def _find_cifar_folder(name: str, info: CifarInfo, root: Path, download: bool) -> Path:
    """The folder holding the pickles: extracting or downloading the archive if needed."""
    folder = _existing_folder(info, root)
    if folder is not None:
        return folder
    expected = _expected(info, root)
    if root.exists() and not root.is_dir():
        raise MixkdError(f"dataset {name!r}: {root} is not a directory; {expected}")
    folder, archive = root / info.folder, root / info.archive
    if not archive.is_file() and not download:
        raise MixkdError(f"dataset {name!r} not found in {root}: {expected}")
    with _preparing(root, info, name):  # one process extracts (or downloads), the others wait for it
        if _existing_folder(info, root) is not None:  # done by another process meanwhile
            return _existing_folder(info, root)
        if not archive.is_file():
            _download(name, info, root)
        _safe_extract(archive, root, info.folder)
    return folder


@contextlib.contextmanager
def _preparing(root: Path, info: CifarInfo, name: str):
    """Hold ``root/.<archive>.lock`` while preparing the dataset there: the ranks of a data-parallel run,
    a study's workers and two studies sharing a data folder extract (or download) it once, the others
    waiting for the one that does (then finding the folder made)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = root / f".{info.archive}.lock"
        held = wait_lock(lock, lambda holder: print(
            f"mixkd: waiting for process {holder}, which prepares dataset {name!r} in {root}", file=sys.stderr, flush=True))
    except OSError as e:
        raise MixkdError(f"cannot prepare dataset {name!r} in {root}: {e.strerror or e}; make the folder writable "
                         "or extract the archive there yourself") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        held.close()


def _download(name: str, info: CifarInfo, root: Path) -> None:
    """The official archive, MD5-checked, into ``root`` (under the preparation lock: one download)."""
    try:
        torchvision.datasets.utils.download_url(info.url, str(root), info.archive, info.md5)
    except Exception as e:  # network errors, MD5 mismatch, permissions
        raise MixkdError(
            f"downloading dataset {name!r} from {info.url} to {root} failed: {type(e).__name__}: {one_line(e)}"
        ) from e


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
    except MixkdError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MixkdError(
            f"cannot extract {archive}: {type(e).__name__}: {one_line(e)} "
            "(damaged archive? delete it and pass --download)"
        ) from e
    except OSError as e:  # the file system's: no room, no permission (the archive may be fine)
        shutil.rmtree(tmp, ignore_errors=True)
        raise MixkdError(f"cannot extract {archive} into {root}: {e.strerror or one_line(e)}; check the folder's "
                         "free space and permissions") from e
    try:
        os.replace(extracted, root / folder)
    except OSError as e:
        if not (root / folder).is_dir():
            raise MixkdError(f"cannot move the extracted {folder}/ into {root}: {e.strerror or one_line(e)}; check "
                             "the folder's permissions") from e
        # made meanwhile by a process that did not wait for the lock (an older mixkd): use it
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
            f"cannot read CIFAR file {path}: {type(e).__name__}: {one_line(e)} "
            "(truncated or not a CIFAR python pickle?)"
        ) from e


def _read_cifar_batches(folder: Path, files: Sequence[str], info: CifarInfo) -> ArraySplit:
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
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
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


def _file_key(folder: Path, files: Sequence[str]) -> tuple:
    """What a split read from ``files`` depends on: their real paths, sizes and modification times."""
    key = []
    for f in files:
        st = (folder / f).stat()
        key.append((str((folder / f).resolve()), st.st_size, st.st_mtime_ns))
    return tuple(key)


def _split(name: str, folder: Path, files: Sequence[str], info: CifarInfo) -> ArraySplit:
    return cached(("cifar", name, _file_key(folder, files)), lambda: _read_cifar_batches(folder, files, info))


def load_cifar(name: str, data_dir: str | Path | None, download: bool = False,
               splits: Sequence[str] = ("train", "test")) -> DataSpec:
    """CIFAR ``name`` from ``data_dir`` (the folder holding ``cifar-100-python/`` or the archive, or
    the pickle folder itself; default ``./data``). Only the files of ``splits`` (and the class
    names) are read."""
    info = CIFAR[name]
    folder = _find_cifar_folder(name, info, _root(data_dir), download)
    missing = [f for f in info.files(splits) if not (folder / f).is_file()]
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
        train=_split(name, folder, info.train_files, info) if "train" in splits else None,
        test=_split(name, folder, info.test_files, info) if "test" in splits else None,
    )
