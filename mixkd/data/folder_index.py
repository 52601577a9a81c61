"""The file listing of an image folder split, made once and kept in an index file.

Listing ImageNet's ``train/`` (1.28M files in 1,000 class folders) takes seconds on a local disk and
minutes on a network filesystem. :func:`folder_index` lists a split once and writes the listing to an
index file in the cache folder (:func:`cache_dir`: ``$MIXKD_CACHE``, else ``$XDG_CACHE_HOME/mixkd``,
else ``~/.cache/mixkd``), keyed by the split folder's path. The index records the modification time
of every directory it lists (the split folder, each class folder and any folder below), which changes
whenever a file or folder is added, removed or renamed in it; a later load stats those directories
(about a thousand for ImageNet, no file listing) and uses the index only if every time is unchanged.
A stale, damaged or foreign index file is listed again and replaced, never trusted; a listing whose
directories changed in the last :data:`RACY_SECONDS` (so might change again within the
filesystem's time resolution) is not written; an unwritable cache folder only costs the listing.

The listing is what torchvision's ``ImageFolder`` finds (same files, same order: classes sorted,
``os.walk`` of each class folder sorted, torchvision's image extensions), except that hidden class
folders (``.name``) are not classes. Paths are held as one byte buffer and offsets (numpy), not a
list of 1.28M Python strings, so DataLoader workers share the parent's pages instead of copying
them as reference counts change.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from mixkd.errors import MixkdError
from mixkd.files import atomic_write

INDEX_VERSION = 1
RACY_SECONDS = 2.0
INDEX_SUBDIR = "imagefolder-index"


def cache_dir() -> Path:
    """Where mixkd keeps caches: ``$MIXKD_CACHE``, else ``$XDG_CACHE_HOME/mixkd``, else ``~/.cache/mixkd``."""
    if os.environ.get("MIXKD_CACHE"):
        return Path(os.environ["MIXKD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mixkd"


def index_path(root: str) -> Path:
    """The index file of the split folder ``root`` (its absolute path, hashed, plus its name)."""
    absolute = os.path.abspath(root)
    digest = hashlib.sha256(os.fsencode(absolute)).hexdigest()[:20]
    return cache_dir() / INDEX_SUBDIR / f"{digest}-{os.path.basename(absolute) or 'root'}.npz"


def class_dirs(path: str | Path) -> list[str]:
    """The class folders of a split: its subfolders, sorted, hidden ones (``.name``) left out."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


class FolderIndex(Sequence):
    """A split's ``(path, class index)`` samples, as torchvision's ``ImageFolder.samples`` holds them.

    ``classes``: the class folder names; ``targets``: int64 array of every sample's class;
    ``dirs`` / ``mtimes``: the directories listed (relative to ``root``) and their ``st_mtime_ns``."""

    def __init__(self, root: str, classes: list[str], names: np.ndarray, offsets: np.ndarray, targets: np.ndarray,
                 dirs: list[str], mtimes: np.ndarray) -> None:
        self.root, self.classes = root, classes
        self._names, self._offsets, self.targets = names, offsets, targets
        self.dirs, self.mtimes = dirs, mtimes

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i):  # type: ignore[override]
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        s, e = int(self._offsets[i]), int(self._offsets[i + 1])
        return os.path.join(self.root, os.fsdecode(self._names[s:e].tobytes())), int(self.targets[i])

    def empty_classes(self) -> list[str]:
        counts = np.bincount(self.targets, minlength=len(self.classes))
        return [c for c, k in zip(self.classes, counts.tolist()) if k == 0]

    def unchanged(self) -> bool:
        """Whether every directory listed still has the modification time it had then."""
        try:
            return all(os.stat(os.path.join(self.root, d)).st_mtime_ns == m
                       for d, m in zip(self.dirs, self.mtimes.tolist(), strict=True))
        except OSError:
            return False


def list_split(root: str) -> FolderIndex:
    """List ``root`` (``<data-dir>/train`` or ``val``) now, as torchvision's ``make_dataset`` does."""
    classes = class_dirs(root)
    paths: list[bytes] = []
    targets: list[int] = []
    dirs, mtimes = [os.curdir], [os.stat(root).st_mtime_ns]
    for ci, cls in enumerate(classes):
        for dirpath, _, fnames in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
            rel = os.path.relpath(dirpath, root)
            dirs.append(rel)
            mtimes.append(os.stat(dirpath).st_mtime_ns)
            for fname in sorted(fnames):
                if has_file_allowed_extension(fname, IMG_EXTENSIONS):
                    paths.append(os.fsencode(os.path.join(rel, fname)))
                    targets.append(ci)
    lengths = np.fromiter((len(p) for p in paths), dtype=np.int64, count=len(paths))
    offsets = np.zeros(len(paths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    names = np.frombuffer(b"".join(paths), dtype=np.uint8)
    return FolderIndex(root, classes, names, offsets, np.asarray(targets, dtype=np.int64), dirs,
                       np.asarray(mtimes, dtype=np.int64))


def _write(index: FolderIndex, path: Path) -> None:
    meta = json.dumps({"version": INDEX_VERSION, "root": os.path.abspath(index.root), "classes": index.classes,
                       "dirs": index.dirs})

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.frombuffer(meta.encode(), dtype=np.uint8), names=index._names,
                     offsets=index._offsets, targets=index.targets, mtimes=index.mtimes)

    atomic_write(path, write)


def _read(path: Path, root: str) -> FolderIndex | None:
    """The index at ``path`` if it is a well-formed index of ``root`` whose directories are unchanged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            names, offsets, targets, mtimes = z["names"], z["offsets"], z["targets"], z["mtimes"]
        if not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION or \
                meta.get("root") != os.path.abspath(root):
            return None
        classes, dirs = meta["classes"], meta["dirs"]
        n = targets.shape[0]
        well_formed = (
            names.dtype == np.uint8 and offsets.dtype == targets.dtype == mtimes.dtype == np.int64
            and offsets.shape == (n + 1,) and targets.shape == (n,) and mtimes.shape == (len(dirs),)
            and offsets[0] == 0 and offsets[-1] == names.shape[0] and bool(np.all(np.diff(offsets) > 0))
            and (n == 0 or 0 <= targets.min() and targets.max() < len(classes))
            and all(isinstance(c, str) for c in classes) and all(isinstance(d, str) for d in dirs)
        )
    except Exception:  # a damaged or foreign file: numpy, zipfile and json raise many types
        return None
    if not well_formed:
        return None
    index = FolderIndex(root, classes, names, offsets, targets, dirs, mtimes)
    return index if index.unchanged() else None


def folder_index(root: str | Path, *, cache: bool = True) -> FolderIndex:
    """The samples of the split folder ``root``: from its index file when that is still true, else
    listed now (and the index file written, when the folder has been still for :data:`RACY_SECONDS`)."""
    root = os.path.expanduser(str(root))
    path = index_path(root)
    if cache and path.is_file():
        index = _read(path, root)
        if index is not None:
            return index
    started = time.time_ns()
    index = list_split(root)
    settled = index.mtimes.size == 0 or int(index.mtimes.max()) < started - int(RACY_SECONDS * 1e9)
    if cache and settled:
        try:
            _write(index, path)
        except (MixkdError, OSError):  # no room or no permission in the cache folder: list again next time
            pass
    return index
