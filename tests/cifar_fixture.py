"""Tiny fake CIFAR datasets in the official python-pickle layout, for tests.

    from cifar_fixture import write_fake_cifar          # tests/ is on sys.path under pytest
    folder = write_fake_cifar(tmp_path, num_classes=10)  # tmp_path/cifar-10-batches-py
    spec = load_dataset("cifar10", tmp_path)             # or load_dataset("cifar10", folder)

Images are learnable: each class has its own colour and a coarse 4x4 block pattern, plus noise,
so a small model trained for a few steps beats chance by far.
"""

from __future__ import annotations

import pickle
import tarfile
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["fake_cifar_arrays", "make_fake_cifar_tar_gz", "write_cifar_rows", "write_fake_cifar"]

_LAYOUT = {
    100: ("cifar-100-python", "cifar-100-python.tar.gz"),
    10: ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
}


def fake_cifar_arrays(
    num_classes: int, n: int, rng: np.random.Generator, class_rng_seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` learnable uint8 images (n, 3, 32, 32) and int64 labels, every class present when
    ``n >= num_classes``. Class colours and patterns depend only on ``class_rng_seed``."""
    crng = np.random.default_rng(class_rng_seed)
    palette = crng.uniform(50, 205, size=(num_classes, 3, 1, 1))
    blocks = crng.uniform(-40, 40, size=(num_classes, 1, 4, 4))
    patterns = blocks.repeat(8, axis=2).repeat(8, axis=3)  # (C, 1, 32, 32)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    noise = rng.normal(0, 12, size=(n, 3, 32, 32))
    images = np.clip(np.rint(palette[labels] + patterns[labels] + noise), 0, 255).astype(np.uint8)
    return images, labels


def write_cifar_rows(
    root: Path,
    num_classes: int,
    train_rows: np.ndarray,
    train_labels: np.ndarray,
    test_rows: np.ndarray,
    test_labels: np.ndarray,
    class_names: list[str] | None = None,
) -> Path:
    """Write raw CIFAR rows (uint8 (N, 3072), channel-planar) in the official layout under
    ``root``; returns the dataset folder (``root/cifar-100-python`` or ``root/cifar-10-batches-py``)."""
    folder_name, _ = _LAYOUT[num_classes]
    folder = Path(root) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    names = class_names or [f"class_{i:03d}" for i in range(num_classes)]

    def dump(obj: object, name: str) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    def batch(rows: np.ndarray, labels: np.ndarray, label: str) -> dict:
        rows = np.ascontiguousarray(rows, dtype=np.uint8)
        labels_list = [int(v) for v in labels]
        d = {
            "batch_label": label,
            "filenames": [f"img_{i:05d}.png" for i in range(len(rows))],
            "data": rows,
        }
        if num_classes == 100:
            d["fine_labels"] = labels_list
            d["coarse_labels"] = [v // 5 for v in labels_list]
        else:
            d["labels"] = labels_list
        return d

    if num_classes == 100:
        dump(batch(train_rows, train_labels, "training batch 1 of 1"), "train")
        dump(batch(test_rows, test_labels, "testing batch 1 of 1"), "test")
        dump(
            {"fine_label_names": names, "coarse_label_names": [f"superclass_{i:02d}" for i in range(20)]},
            "meta",
        )
    else:
        parts = np.array_split(np.arange(len(train_rows)), 5)
        for k, idx in enumerate(parts, start=1):
            dump(batch(train_rows[idx], train_labels[idx], f"training batch {k} of 5"), f"data_batch_{k}")
        dump(batch(test_rows, test_labels, "testing batch 1 of 1"), "test_batch")
        dump({"label_names": names, "num_cases_per_batch": len(parts[0]), "num_vis": 3072}, "batches.meta")
    return folder


def write_fake_cifar(root: Path, num_classes: int = 100, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """Write a tiny learnable CIFAR-100 (``num_classes=100``) or CIFAR-10 (``10``) under ``root``
    in the official pickle layout; returns the dataset folder. ``load_dataset`` accepts either
    ``root`` or the returned folder as ``data_dir``."""
    if num_classes not in _LAYOUT:
        raise ValueError(f"num_classes must be 100 or 10, got {num_classes}")
    rng = np.random.default_rng(seed)
    x_train, y_train = fake_cifar_arrays(num_classes, n_train, rng, class_rng_seed=seed)
    x_test, y_test = fake_cifar_arrays(num_classes, n_test, rng, class_rng_seed=seed)
    return write_cifar_rows(
        root, num_classes, x_train.reshape(n_train, -1), y_train, x_test.reshape(n_test, -1), y_test
    )


def make_fake_cifar_tar_gz(root: Path, num_classes: int = 100, **kwargs: int) -> Path:
    """Write ``root/cifar-100-python.tar.gz`` (or ``cifar-10-python.tar.gz``) holding a fake
    dataset, like the official archive, without leaving the extracted folder; returns its path."""
    folder_name, archive_name = _LAYOUT[num_classes]
    archive = Path(root) / archive_name
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_fake_cifar(Path(tmp), num_classes, **kwargs)
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(folder, arcname=folder_name)
    return archive
