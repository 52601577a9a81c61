"""scikit-learn's 8x8 handwritten digits, upsampled to 32x32 RGB, with a fixed stratified 80/20 split.

It ships inside scikit-learn: no files, no download. Built once per process.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mixkd.data.cache import cached
from mixkd.data.spec import DIGITS_MEAN, DIGITS_STD, ArraySplit, DataSpec

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN_SIZE = 1437  # of 1797 images; tests/test_data.py checks it
DIGITS_TEST_SIZE = 360


def _build() -> dict[str, ArraySplit]:
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
    labels = torch.from_numpy(y)

    def split(idx: np.ndarray) -> ArraySplit:
        t = torch.from_numpy(np.sort(idx))
        return ArraySplit(images=images[t].contiguous(), labels=labels[t].contiguous())

    return {"train": split(train_idx), "test": split(test_idx)}


def load_digits(splits: Sequence[str] = ("train", "test")) -> DataSpec:
    both = cached(("digits",), _build)
    return DataSpec(
        name="digits",
        num_classes=10,
        image_size=32,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        class_names=[str(i) for i in range(10)],
        train=both["train"] if "train" in splits else None,
        test=both["test"] if "test" in splits else None,
    )


def check_digits(splits: Sequence[str] = ("train", "test"), batch_size: int | None = None) -> list[str]:
    """What stops :func:`load_digits` from working (nothing is loaded)."""
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        return ["dataset 'digits' needs scikit-learn: pip install scikit-learn"]
    if batch_size is not None and "train" in splits and batch_size > DIGITS_TRAIN_SIZE:
        return [f"batch size {batch_size} is larger than the {DIGITS_TRAIN_SIZE} training samples of 'digits' "
                "(the last partial batch is dropped): use a smaller batch size"]
    return []
