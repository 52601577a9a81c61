"""Tests for mixkd.data: dataset loading (fake CIFAR, digits, imagefolder) and the loaders."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF

from mixkd import data as D
from mixkd.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DATASETS,
    DIGITS_MEAN,
    DIGITS_STD,
    ArraySplit,
    DataSpec,
    DeviceLoader,
    FolderLoader,
    Loader,
    load_dataset,
    make_loaders,
)
from mixkd.data.digits import DIGITS_TRAIN_SIZE
from mixkd.errors import MixkdError

try:
    from cifar_fixture import make_fake_cifar_tar_gz, write_cifar_rows, write_fake_cifar
except ImportError:  # tests/ imported as a package
    from tests.cifar_fixture import make_fake_cifar_tar_gz, write_cifar_rows, write_fake_cifar

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster, and steady


def _read(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*list(loader), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _split(images: torch.Tensor, labels: torch.Tensor | None = None) -> ArraySplit:
    if labels is None:
        labels = torch.arange(images.shape[0], dtype=torch.int64)
    return ArraySplit(images=images, labels=labels)


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of mean=0, std=1 normalization: back to exact uint8 values."""
    return (x * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------


def test_fake_cifar100_loads(tmp_path):
    folder = write_fake_cifar(tmp_path, num_classes=100, n_train=200, n_test=100, seed=3)
    assert folder == tmp_path / "cifar-100-python"
    assert sorted(p.name for p in folder.iterdir()) == ["meta", "test", "train"]
    raw_train, raw_test = _read(folder / "train"), _read(folder / "test")
    assert "coarse_labels" in raw_train and "coarse_label_names" in _read(folder / "meta")

    spec = load_dataset("cifar100", tmp_path)
    assert isinstance(spec, DataSpec)
    assert (spec.name, spec.num_classes, spec.image_size) == ("cifar100", 100, 32)
    assert spec.mean == CIFAR100_MEAN and spec.std == CIFAR100_STD
    assert spec.class_names == [f"class_{i:03d}" for i in range(100)]
    for split, raw, n in ((spec.train, raw_train, 200), (spec.test, raw_test, 100)):
        assert isinstance(split, ArraySplit)
        assert split.images.shape == (n, 3, 32, 32) and split.images.dtype == torch.uint8
        assert split.labels.shape == (n,) and split.labels.dtype == torch.int64
        assert split.labels.tolist() == raw["fine_labels"]
        assert np.array_equal(split.images.reshape(n, -1).numpy(), raw["data"])
    assert set(spec.train.labels.tolist()) == set(range(100))
    # data_dir may also point at the cifar-100-python folder itself
    again = load_dataset("cifar100", folder)
    assert torch.equal(again.train.images, spec.train.images)


def test_fake_cifar10_loads_five_batches_in_order(tmp_path):
    folder = write_fake_cifar(tmp_path, num_classes=10, n_train=53, n_test=20)
    expected = ["batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    assert sorted(p.name for p in folder.iterdir()) == expected
    spec = load_dataset("cifar10", str(tmp_path))
    assert (spec.num_classes, spec.mean, spec.std) == (10, CIFAR10_MEAN, CIFAR10_STD)
    assert spec.train.images.shape == (53, 3, 32, 32) and spec.test.images.shape == (20, 3, 32, 32)
    batches = [_read(folder / f"data_batch_{i}") for i in range(1, 6)]
    assert spec.train.labels.tolist() == sum((b["labels"] for b in batches), [])
    assert np.array_equal(spec.train.images.reshape(53, -1).numpy(), np.concatenate([b["data"] for b in batches]))
    assert len(spec.class_names) == 10


def test_channel_planar_decoding(tmp_path):
    # Row k: R plane (1024 values, row-major 32x32), then G, then B -- built by hand.
    n = 4
    rows = np.zeros((n, 3072), dtype=np.uint8)
    for k in range(n):
        for c in range(3):
            for i in range(32):
                for j in range(32):
                    rows[k, c * 1024 + i * 32 + j] = (k * 11 + c * 80 + i * 3 + j * 5) % 256
    labels = np.array([3, 1, 4, 1])
    write_cifar_rows(tmp_path, 10, rows, labels, rows[:2], labels[:2])
    spec = load_dataset("cifar10", tmp_path)
    img = spec.train.images
    for k, c, i, j in [(0, 0, 0, 0), (1, 0, 0, 31), (2, 1, 5, 7), (3, 2, 31, 0), (3, 2, 31, 31), (0, 1, 17, 2)]:
        assert int(img[k, c, i, j]) == (k * 11 + c * 80 + i * 3 + j * 5) % 256, (k, c, i, j)
    assert spec.train.labels.tolist() == [3, 1, 4, 1]


def test_cifar_from_tar_gz(tmp_path):
    archive = make_fake_cifar_tar_gz(tmp_path, num_classes=100, n_train=120, n_test=30)
    assert archive.name == "cifar-100-python.tar.gz" and not (tmp_path / "cifar-100-python").exists()
    spec = load_dataset("cifar100", tmp_path)
    assert spec.train.images.shape == (120, 3, 32, 32) and spec.test.labels.shape == (30,)
    assert (tmp_path / "cifar-100-python" / "meta").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".extract-")]  # no leftovers
    archive.unlink()  # the extracted folder is used from now on
    assert torch.equal(load_dataset("cifar100", tmp_path).train.images, spec.train.images)


def test_cifar10_from_tar_gz(tmp_path):
    make_fake_cifar_tar_gz(tmp_path, num_classes=10, n_train=50, n_test=10)
    spec = load_dataset("cifar10", tmp_path)
    assert spec.train.images.shape == (50, 3, 32, 32)


def test_tar_with_path_traversal_is_refused(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tf:
        payload = b"evil"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    with pytest.raises(MixkdError, match="cifar-100-python.tar.gz"):
        load_dataset("cifar100", root)
    assert not (tmp_path / "escaped.txt").exists()


def test_damaged_tar_is_a_mixkd_error(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(MixkdError, match=r"cifar-10-python\.tar\.gz.*--download"):
        load_dataset("cifar10", tmp_path)
    assert not (tmp_path / "cifar-10-batches-py").exists()


@pytest.mark.parametrize("name, folder", [("cifar100", "cifar-100-python"), ("cifar10", "cifar-10-batches-py")])
def test_missing_cifar_is_one_line_error(tmp_path, name, folder):
    missing = tmp_path / "nowhere"
    with pytest.raises(MixkdError) as ei:
        load_dataset(name, missing)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(missing) in msg and folder in msg and "--download" in msg and "--data-dir" in msg


def test_incomplete_cifar_folder(tmp_path):
    folder = write_fake_cifar(tmp_path, num_classes=100, n_train=10, n_test=5)
    (folder / "meta").unlink()
    with pytest.raises(MixkdError, match=r"missing meta"):
        load_dataset("cifar100", tmp_path)


def _corrupt_truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _corrupt_no_labels(path: Path) -> None:
    d = _read(path)
    del d["fine_labels"]
    path.write_bytes(pickle.dumps(d))


def _corrupt_shape(path: Path) -> None:
    d = _read(path)
    d["data"] = d["data"][:, :1000]
    path.write_bytes(pickle.dumps(d))


def _corrupt_label_range(path: Path) -> None:
    d = _read(path)
    d["fine_labels"][0] = 100
    path.write_bytes(pickle.dumps(d))


def _corrupt_label_count(path: Path) -> None:
    d = _read(path)
    d["fine_labels"] = d["fine_labels"][:-1]
    path.write_bytes(pickle.dumps(d))


def _corrupt_not_a_dict(path: Path) -> None:
    path.write_bytes(pickle.dumps([1, 2, 3]))


def _corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"this is not a pickle at all")


@pytest.mark.parametrize(
    "corrupt",
    [
        _corrupt_truncate,
        _corrupt_no_labels,
        _corrupt_shape,
        _corrupt_label_range,
        _corrupt_label_count,
        _corrupt_not_a_dict,
        _corrupt_garbage,
    ],
)
@pytest.mark.parametrize("fname", ["train", "test"])
def test_malformed_pickle_names_the_file(tmp_path, corrupt, fname):
    folder = write_fake_cifar(tmp_path, num_classes=100, n_train=20, n_test=10)
    corrupt(folder / fname)
    with pytest.raises(MixkdError) as ei:
        load_dataset("cifar100", tmp_path)
    assert str(folder / fname) in str(ei.value) and "\n" not in str(ei.value)


def test_malformed_meta(tmp_path):
    folder = write_fake_cifar(tmp_path, num_classes=100, n_train=20, n_test=10)
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["a", "b"]}))
    with pytest.raises(MixkdError, match="meta"):
        load_dataset("cifar100", tmp_path)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_foreign_objects_is_refused(tmp_path):
    folder = write_fake_cifar(tmp_path, num_classes=100, n_train=20, n_test=10)
    marker = tmp_path / "code_ran"
    d = _read(folder / "train")
    d["batch_label"] = _Evil(marker)
    (folder / "train").write_bytes(pickle.dumps(d))
    with pytest.raises(MixkdError, match="train"):
        load_dataset("cifar100", tmp_path)
    assert not marker.exists()


def test_download_uses_official_url_and_md5(tmp_path, monkeypatch):
    calls = []

    def fake_download_url(url, root, filename=None, md5=None, **kwargs):
        calls.append((url, root, filename, md5))
        make_fake_cifar_tar_gz(Path(root), num_classes=10, n_train=20, n_test=10)

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", fake_download_url)
    root = tmp_path / "new"
    spec = load_dataset("cifar10", root, download=True)
    assert spec.train.images.shape == (20, 3, 32, 32)
    assert calls == [
        (torchvision.datasets.CIFAR10.url, str(root), "cifar-10-python.tar.gz", torchvision.datasets.CIFAR10.tgz_md5)
    ]
    load_dataset("cifar10", root, download=True)  # already there: no second download
    assert len(calls) == 1


def test_download_failure_is_a_mixkd_error(tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", failing)
    with pytest.raises(MixkdError, match=r"downloading dataset 'cifar100' from https://.*unreachable"):
        load_dataset("cifar100", tmp_path, download=True)


def test_unknown_dataset_and_bad_image_size(tmp_path):
    with pytest.raises(MixkdError, match="cifar100, cifar10, digits, imagefolder"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(MixkdError, match="image_size"):
        load_dataset("digits", image_size=64)
    assert DATASETS == ("cifar100", "cifar10", "digits", "imagefolder")


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


def test_digits():
    spec = load_dataset("digits", data_dir="/ignored/path")
    assert (spec.name, spec.num_classes, spec.image_size) == ("digits", 10, 32)
    assert spec.class_names == [str(i) for i in range(10)]
    assert (len(spec.train), len(spec.test)) == (DIGITS_TRAIN_SIZE, 360)  # the constant batch-size checks use
    for split in (spec.train, spec.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert split.labels.dtype == torch.int64
        assert torch.equal(split.images[:, 0], split.images[:, 1]) and torch.equal(
            split.images[:, 0], split.images[:, 2]
        )
    assert int(spec.train.images.max()) == 255 and int(spec.train.images.min()) == 0
    counts = torch.bincount(spec.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified
    # fixed split: identical across calls, whatever the global seed
    torch.manual_seed(123)
    np.random.seed(123)
    D.clear_cache()  # built again, not taken from the process cache
    again = load_dataset("digits")
    assert again.train is not spec.train
    assert torch.equal(again.train.images, spec.train.images) and torch.equal(again.test.labels, spec.test.labels)
    # hard-coded normalization == statistics of the train split
    x = spec.train.images.double() / 255
    mean = x.mean(dim=(0, 2, 3))
    std = x.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False)
    assert spec.mean == DIGITS_MEAN and spec.std == DIGITS_STD
    assert torch.allclose(mean, torch.tensor(DIGITS_MEAN, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(std, torch.tensor(DIGITS_STD, dtype=torch.float64), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# imagefolder
# ---------------------------------------------------------------------------------------------


def _write_image_folder(root: Path, classes_train=("cat", "dog"), classes_val=("cat", "dog"), n=3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes, count in (("train", classes_train, n), ("val", classes_val, 2)):
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                arr = np.clip(rng.normal(60 + 120 * ci, 20, size=(20, 26, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{k}.png")
    return root


def test_imagefolder_loads_and_iterates(tmp_path):
    root = _write_image_folder(tmp_path)
    spec = load_dataset("imagefolder", root, image_size=16)
    assert (spec.name, spec.num_classes, spec.image_size) == ("imagefolder", 2, 16)
    assert spec.class_names == ["cat", "dog"]
    assert spec.mean == D.IMAGENET_MEAN and spec.std == D.IMAGENET_STD
    assert isinstance(spec.train, torchvision.datasets.ImageFolder) and len(spec.train) == 6 and len(spec.test) == 4
    train, test = make_loaders(spec, batch_size=4, device="cpu", eval_batch_size=3, workers=0)
    assert isinstance(train, FolderLoader) and isinstance(train, Loader)
    assert (len(train), len(test), train.num_samples, test.num_samples) == (1, 2, 6, 4)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs, ys = _collect(test)
    assert xs.shape == (4, 3, 16, 16) and ys.tolist() == [0, 0, 1, 1]
    # un-augmented training uses the eval transform: deterministic
    plain, _ = make_loaders(spec, batch_size=6, device="cpu", augment=False, workers=0)
    a, _ = next(iter(plain))
    b, _ = next(iter(plain))
    assert torch.allclose(a.sum(0), b.sum(0), atol=1e-5)  # same images, possibly in another order
    assert load_dataset("imagefolder", root).image_size == 224


def test_imagefolder_epoch_is_a_function_of_the_seed(tmp_path):
    spec = load_dataset("imagefolder", _write_image_folder(tmp_path, n=4), image_size=12)
    global_state = torch.get_rng_state()
    runs = []
    for workers in (0, 1):
        loader, _ = make_loaders(spec, batch_size=3, device="cpu", workers=workers)
        epochs = []
        for seed in (5, 5, 6):
            loader.set_epoch_seed(seed)
            epochs.append(_collect(loader))
        runs.append(epochs)
    for (x5a, y5a), (x5b, y5b), (x6, _y6) in runs:
        assert torch.equal(x5a, x5b) and torch.equal(y5a, y5b)
        assert not torch.equal(x5a, x6)
    assert torch.equal(runs[0][0][0], runs[1][0][0])  # independent of the number of workers
    assert torch.equal(torch.get_rng_state(), global_state)  # global RNG untouched


@pytest.mark.parametrize(
    "case",
    ["no_val", "no_train", "no_classes", "different_classes", "empty_class", "none"],
)
def test_imagefolder_bad_layouts(tmp_path, case):
    root = tmp_path / "imgs"
    if case == "no_val":
        _write_image_folder(root)
        for p in sorted((root / "val").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (root / "val").rmdir()
        match = "val"
    elif case == "no_train":
        _write_image_folder(root)
        import shutil

        shutil.rmtree(root / "train")
        match = "train"
    elif case == "no_classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
        match = "no class folders"
    elif case == "different_classes":
        _write_image_folder(root, classes_val=("cat", "bird"))
        match = "only in train: dog; only in val: bird"
    elif case == "empty_class":
        _write_image_folder(root)
        (root / "train" / "dog" / "0.png").unlink()
        (root / "train" / "dog" / "1.png").unlink()
        (root / "train" / "dog" / "2.png").unlink()
        match = "dog"
    else:
        match = "--data-dir"
    with pytest.raises(MixkdError, match=match) as ei:
        load_dataset("imagefolder", None if case == "none" else root)
    assert "\n" not in str(ei.value)


# ---------------------------------------------------------------------------------------------
# DeviceLoader
# ---------------------------------------------------------------------------------------------


def _coded_images(n: int) -> torch.Tensor:
    """Images whose pixels say where they come from: R = column code, G = row code, B = 200."""
    codes = 10 + 7 * torch.arange(32)  # 10..227, never 0
    img = torch.empty(3, 32, 32, dtype=torch.uint8)
    img[0] = codes[None, :]
    img[1] = codes[:, None]
    img[2] = 200
    return img.expand(n, -1, -1, -1).contiguous()


def _decode(out: torch.Tensor) -> tuple[int, int, bool]:
    """(off_y, off_x, flipped) of one augmented coded image (uint8 (3, 32, 32))."""
    valid = out[2] == 200
    assert torch.equal(valid, (out[0] != 0) & (out[1] != 0)) and ((out[2] == 0) | valid).all()
    i0 = int(valid.any(1).nonzero()[0])
    js = valid[i0].nonzero().flatten()
    j0 = int(js[0])
    src_row, src_col = (int(out[1, i0, j0]) - 10) // 7, (int(out[0, i0, j0]) - 10) // 7
    flipped = int(out[0, i0, int(js[1])]) < int(out[0, i0, j0])
    off_y = src_row + 4 - i0
    off_x = src_col + 4 - (31 - j0 if flipped else j0)
    return off_y, off_x, flipped


@pytest.mark.parametrize("device", DEVICES)
def test_augmentation_matches_torchvision_random_crop_and_flip(device):
    n = 2000
    images = _coded_images(n)
    loader = DeviceLoader(
        _split(images), 250, device, (0, 0, 0), (1, 1, 1), shuffle=True, augment=True, drop_last=False
    )
    loader.set_epoch_seed(11)
    x, y = _collect(loader)
    assert x.device.type == torch.device(device).type and x.dtype == torch.float32 and x.shape == (n, 3, 32, 32)
    out = _unnormalize(x.cpu())
    params = [_decode(o) for o in out]
    ref_img = images[0]
    for o, (oy, ox, fl) in zip(out, params, strict=True):
        assert 0 <= oy <= 8 and 0 <= ox <= 8
        ref = TF.crop(TF.pad(ref_img, [4]), oy, ox, 32, 32)  # torchvision RandomCrop(32, padding=4)
        if fl:
            ref = TF.hflip(ref)
        assert torch.equal(o, ref)
    oys = torch.tensor([p[0] for p in params])
    oxs = torch.tensor([p[1] for p in params])
    flips = torch.tensor([p[2] for p in params], dtype=torch.float32)
    expected = n / 9
    for offsets in (oys, oxs):
        counts = torch.bincount(offsets, minlength=9)
        assert counts.numel() == 9 and (counts > 0.7 * expected).all() and (counts < 1.3 * expected).all(), counts
    assert 0.45 < flips.mean().item() < 0.55
    assert abs(torch.corrcoef(torch.stack([oys.float(), oxs.float()]))[0, 1].item()) < 0.1  # independent


def test_constant_image_crop_keeps_content_within_4px():
    n = 500
    images = torch.full((n, 3, 32, 32), 180, dtype=torch.uint8)
    loader = DeviceLoader(_split(images), 100, "cpu", (0, 0, 0), (1, 1, 1), shuffle=True, augment=True, drop_last=True)
    out = _unnormalize(_collect(loader)[0])
    assert set(out.unique().tolist()) <= {0, 180}
    pad = out == 0
    pad_rows = pad.all(dim=3).all(dim=1)  # (N, 32)
    pad_cols = pad.all(dim=2).all(dim=1)
    assert torch.equal(pad, (pad_rows[:, None, :, None] | pad_cols[:, None, None, :]).expand_as(pad))
    assert pad_rows.sum(1).max() <= 4 and pad_cols.sum(1).max() <= 4
    assert (pad_rows.sum(1) == 4).any() and (pad_rows.sum(1) == 0).any()
    for flags in (pad_rows, pad_cols):  # padding sits on one border only: a prefix or a suffix
        k = flags.sum(1)
        idx = torch.arange(32)
        prefix = flags == (idx[None, :] < k[:, None])
        suffix = flags == (idx[None, :] >= 32 - k[:, None])
        assert (prefix.all(1) | suffix.all(1)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_batches_and_normalization_bounds(tmp_path, device):
    write_fake_cifar(tmp_path, num_classes=100, n_train=203, n_test=70)
    spec = load_dataset("cifar100", tmp_path)
    train, test = make_loaders(spec, batch_size=20, device=device, eval_batch_size=32)
    assert isinstance(train, DeviceLoader) and isinstance(train, Loader) and isinstance(test, Loader)
    assert (len(train), len(test), train.num_samples, test.num_samples) == (10, 3, 203, 70)
    mean, std = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    batches = list(train)
    assert len(batches) == 10
    for x, y in batches:
        assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.device.type == y.device.type == torch.device(device).type
        x = x.cpu()
        assert (x >= lo - 1e-6).all() and (x <= hi + 1e-6).all()
    # eval: dataset order, every sample, last partial batch kept, exact ToTensor+Normalize values
    sizes = [xb.shape[0] for xb, _ in test]
    assert sizes == [32, 32, 6]
    x, y = _collect(test)
    assert torch.equal(y.cpu(), spec.test.labels)
    ref = TF.normalize(spec.test.images.float() / 255, CIFAR100_MEAN, CIFAR100_STD)
    assert torch.allclose(x.cpu(), ref, atol=1e-6)


def test_drop_last_batch_count():
    images = torch.zeros(103, 3, 32, 32, dtype=torch.uint8)
    for drop_last, expected in ((True, 10), (False, 11)):
        loader = DeviceLoader(
            _split(images), 10, "cpu", (0.5,) * 3, (0.5,) * 3, shuffle=True, augment=True, drop_last=drop_last
        )
        sizes = [x.shape[0] for x, _ in loader]
        assert len(loader) == len(sizes) == expected
        assert sizes[-1] == (10 if drop_last else 3)


def test_full_epoch_visits_every_sample_once():
    n = 103
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    loader = DeviceLoader(_split(images), 10, "cpu", (0, 0, 0), (1, 1, 1), shuffle=True, augment=False, drop_last=False)
    loader.set_epoch_seed(4)
    x, y = _collect(loader)
    assert sorted(y.tolist()) == list(range(n)) and y.tolist() != list(range(n))  # all, shuffled
    assert torch.equal(_unnormalize(x)[:, :, 0, 0], y.to(torch.uint8)[:, None].expand(n, 3))  # pairs aligned
    # with augmentation too (labels still identify samples exactly once)
    aug = DeviceLoader(_split(images), 10, "cpu", (0, 0, 0), (1, 1, 1), shuffle=True, augment=True, drop_last=False)
    assert sorted(_collect(aug)[1].tolist()) == list(range(n))


def test_same_seed_same_batches_different_seed_different():
    split = _split(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8))

    def epoch(loader, seed, n_batches=None):
        loader.set_epoch_seed(seed)
        out = []
        for k, b in enumerate(loader):
            if n_batches is not None and k == n_batches:
                break
            out.append(b)
        return out

    a = DeviceLoader(split, 16, "cpu", (0.5,) * 3, (0.25,) * 3, shuffle=True, augment=True, drop_last=True)
    b = DeviceLoader(split, 16, "cpu", (0.5,) * 3, (0.25,) * 3, shuffle=True, augment=True, drop_last=True)
    global_state = torch.get_rng_state()
    e1 = epoch(a, 7)
    epoch(b, 99, n_batches=1)  # a partly consumed epoch does not leak into the next one
    e2 = epoch(b, 7)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(e1, e2, strict=True))
    e3 = epoch(a, 8)
    assert not torch.equal(e1[0][1], e3[0][1])
    assert not torch.equal(torch.cat([x for x, _ in e1]), torch.cat([x for x, _ in e3]))
    # consecutive epochs without re-seeding differ too
    assert not torch.equal(_collect(a)[1], _collect(a)[1])
    assert torch.equal(torch.get_rng_state(), global_state)  # loaders never touch the global RNG


def test_make_loaders_rejects_batch_larger_than_dataset(tmp_path):
    write_fake_cifar(tmp_path, num_classes=10, n_train=50, n_test=10)
    spec = load_dataset("cifar10", tmp_path)
    with pytest.raises(MixkdError, match="batch size 64"):
        make_loaders(spec, batch_size=64, device="cpu")
    train, _ = make_loaders(spec, batch_size=64, device="cpu", drop_last=False)
    assert len(train) == 1
    with pytest.raises(MixkdError, match="batch size"):
        make_loaders(spec, batch_size=0, device="cpu")


def test_fake_cifar_is_learnable_through_the_loaders(tmp_path):
    torch.manual_seed(0)
    write_fake_cifar(tmp_path, num_classes=10, n_train=500, n_test=200, seed=1)
    spec = load_dataset("cifar10", tmp_path)
    train, test = make_loaders(spec, batch_size=50, device="cpu")
    model = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for ep in range(3):
        train.set_epoch_seed(ep)
        for x, y in train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test)
    accuracy = correct / test.num_samples
    assert accuracy > 0.5, accuracy  # chance: 0.1


# ---------------------------------------------------------------------------------------------
# Starting an epoch mid-way (step-exact resume)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle,augment,drop_last", [(True, True, False), (True, False, True), (False, False, False)])
def test_device_loader_iter_from_yields_the_same_batches_as_the_full_epoch(shuffle, augment, drop_last):
    split = _split(torch.randint(0, 256, (53, 3, 32, 32), dtype=torch.uint8))
    loader = DeviceLoader(split, 10, "cpu", (0.5,) * 3, (0.25,) * 3, shuffle=shuffle, augment=augment,
                          drop_last=drop_last)
    loader.set_epoch_seed(3)
    full = list(loader)
    assert len(full) == len(loader) == (5 if drop_last else 6)
    for start in (0, 1, 4, len(loader)):
        loader.set_epoch_seed(3)
        part = list(loader.iter_from(start))
        assert len(part) == len(full) - start
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(part, full[start:], strict=True))
    # the generator moves on as after a full epoch: the next epoch is the same either way
    loader.set_epoch_seed(3)
    list(loader.iter_from(2))
    after_part = next(iter(loader))
    loader.set_epoch_seed(3)
    list(loader)
    after_full = next(iter(loader))
    assert torch.equal(after_part[0], after_full[0])
    for bad in (-1, len(loader) + 1, 1.0):
        with pytest.raises(ValueError, match="start batch"):
            loader.iter_from(bad)


@pytest.mark.parametrize("workers", [0, 1])
def test_folder_loader_iter_from_yields_the_same_batches_as_the_full_epoch(tmp_path, workers):
    spec = load_dataset("imagefolder", _write_image_folder(tmp_path, n=4), image_size=12)  # 8 training images
    loader, _ = make_loaders(spec, batch_size=3, device="cpu", workers=workers, drop_last=False)
    loader.set_epoch_seed(5)
    full = list(loader)
    assert len(full) == len(loader) == 3
    for start in (1, 2, 3):
        loader.set_epoch_seed(5)
        part = list(loader.iter_from(start))
        assert len(part) == 3 - start
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(part, full[start:], strict=True))
    loader.set_epoch_seed(5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(loader, full, strict=True))  # iter() starts at 0 again


# ---------------------------------------------------------------------------------------------
# Datasets loaded once per process, one device copy per split
# ---------------------------------------------------------------------------------------------


def test_load_dataset_reads_each_split_once_and_rereads_a_changed_file(tmp_path):
    write_fake_cifar(tmp_path, num_classes=10, n_train=40, n_test=20, seed=1)
    a, b = load_dataset("cifar10", tmp_path), load_dataset("cifar10", tmp_path / "cifar-10-batches-py")
    assert a is not b and a.train is b.train and a.test is b.test  # same tensors, separate specs
    test_only = load_dataset("cifar10", tmp_path, splits=("test",))
    assert test_only.train is None and test_only.test is a.test
    write_fake_cifar(tmp_path, num_classes=10, n_train=40, n_test=30, seed=2)  # the files change
    c = load_dataset("cifar10", tmp_path)
    assert len(c.test) == 30 and c.test is not a.test and len(a.test) == 20


def test_test_split_alone_reads_only_the_test_pickle(tmp_path):
    folder = write_fake_cifar(tmp_path, num_classes=100, n_train=30, n_test=12)
    (folder / "train").unlink()
    spec = load_dataset("cifar100", tmp_path, splits=["test"])
    assert spec.train is None and len(spec.test) == 12 and spec.num_classes == 100
    test = D.make_test_loader(spec, "cpu", batch_size=5)
    assert [x.shape[0] for x, _ in test] == [5, 5, 2]
    with pytest.raises(MixkdError, match="missing train"):
        load_dataset("cifar100", tmp_path)
    with pytest.raises(ValueError, match="splits"):
        load_dataset("cifar100", tmp_path, splits=("val",))
    digits = load_dataset("digits", splits=("test",))
    assert digits.train is None and len(digits.test) == 360
    root = _write_image_folder(tmp_path / "imgs")
    import shutil

    shutil.rmtree(root / "train")  # evaluating an image folder needs only val/
    folder = load_dataset("imagefolder", root, image_size=8, splits=("test",))
    assert folder.train is None and len(folder.test) == 4 and folder.class_names == ["cat", "dog"]


@pytest.mark.parametrize("device", DEVICES)
def test_loaders_of_one_split_share_its_device_copy_and_stay_independent(device):
    first, second = load_dataset("digits"), load_dataset("digits")
    kwargs = {"mean": DIGITS_MEAN, "std": DIGITS_STD, "shuffle": True, "augment": True, "drop_last": True}
    a = DeviceLoader(first.train, 64, device, **kwargs)
    b = DeviceLoader(second.train, 64, device, **kwargs)
    assert a.images.device.type == torch.device(device).type
    assert a.images.data_ptr() == b.images.data_ptr() and a.labels.data_ptr() == b.labels.data_ptr()
    # a loader over a private copy of the same data gives the reference batches
    private = ArraySplit(first.train.images.clone(), first.train.labels.clone())
    ref = DeviceLoader(private, 64, device, **kwargs)
    assert ref.images.data_ptr() != a.images.data_ptr()
    a.set_epoch_seed(1)
    b.set_epoch_seed(2)
    ref.set_epoch_seed(1)
    ia, ib, iref = iter(a), iter(b), iter(ref)
    for _ in range(3):  # interleaved: one loader's epoch does not disturb the other's
        (xa, ya), (_, yb), (xr, yr) = next(ia), next(ib), next(iref)
        assert torch.equal(xa, xr) and torch.equal(ya, yr) and not torch.equal(ya, yb)
    assert torch.equal(a.images.cpu(), first.train.images)  # nothing was written into the shared copy


# ---------------------------------------------------------------------------------------------
# Workers: what the machine has; unreadable images
# ---------------------------------------------------------------------------------------------


def test_workers_default_to_the_cores_available_without_a_torch_warning(tmp_path, monkeypatch):
    import os
    import warnings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # a 2-core machine
    assert D.resolve_workers(None) == 2 and D.resolve_workers(0) == 0 and D.resolve_workers(7) == 7
    spec = load_dataset("imagefolder", _write_image_folder(tmp_path, n=2), image_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns (UserWarning) when workers exceed the cores
        train, test = make_loaders(spec, batch_size=2, device="cpu")
        assert train.workers == test.workers == 2
        assert len(list(train)) == 2
    from mixkd.config import RunConfig

    assert RunConfig().workers is None


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_one_line_naming_the_file(tmp_path, workers):
    root = _write_image_folder(tmp_path, n=2)
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not a png at all")
    spec = load_dataset("imagefolder", root, image_size=8)  # listing the folder opens no image
    train, _ = make_loaders(spec, batch_size=5, device="cpu", workers=workers, drop_last=False)
    with pytest.raises(D.UnreadableImageError) as ei:
        list(train)
    msg = str(ei.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert msg.startswith(f"cannot read image {bad}: not an image file PIL can identify; delete or replace")


# ---------------------------------------------------------------------------------------------
# check_dataset: what is missing, without loading or writing anything
# ---------------------------------------------------------------------------------------------


def _listing(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*"))


def test_check_dataset_finds_missing_truncated_and_too_small_data_without_touching_it(tmp_path):
    assert D.check_dataset("cifar100", tmp_path / "none") == [
        f"dataset 'cifar100' not found in {tmp_path / 'none'}: expected {tmp_path / 'none' / 'cifar-100-python'}"
        "/{train,test,meta} (CIFAR python-pickle layout) or cifar-100-python.tar.gz; pass --data-dir or --download"]
    assert D.check_dataset("cifar100", tmp_path / "none", download=True) == []
    assert D.check_dataset("cifar100", tmp_path / "none", download=True, batch_size=60_000)
    folder = write_fake_cifar(tmp_path, num_classes=10, n_train=50, n_test=10)
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(data[: len(data) // 2])
    before = _listing(tmp_path)
    assert D.check_dataset("cifar10", tmp_path, batch_size=50, splits=("train",)) == []
    [too_big] = D.check_dataset("cifar10", tmp_path, batch_size=128, splits=("train",))  # pixels alone: 80 at most
    assert too_big.startswith("batch size 128 is larger than the at most ")
    [cut] = D.check_dataset("cifar10", tmp_path)
    assert f"{folder / 'test_batch'} is truncated" in cut
    assert D.check_dataset("digits", batch_size=DIGITS_TRAIN_SIZE) == []
    assert "1437 training samples" in D.check_dataset("digits", batch_size=DIGITS_TRAIN_SIZE + 1)[0]
    assert D.check_dataset("mnist") == ["unknown dataset 'mnist': choose one of cifar100, cifar10, digits, imagefolder"]
    assert "image_size=64" in D.check_dataset("cifar10", tmp_path, image_size=64)[0]
    problems = D.check_dataset("imagefolder", tmp_path / "imgs")
    assert len(problems) == 2 and "train is not a directory" in problems[0] and "val is not a directory" in problems[1]
    assert _listing(tmp_path) == before  # nothing created
    (folder / "data_batch_3").unlink()
    assert "missing data_batch_3" in D.check_dataset("cifar10", tmp_path)[0]
    assert D.check_dataset("imagefolder", _write_image_folder(tmp_path / "imgs")) == []
    assert D.dataset_num_classes("imagefolder", tmp_path / "imgs") == 2 and D.dataset_num_classes("cifar100") == 100
    # the archive is enough (it is extracted when the run starts), and checking it extracts nothing
    archive_dir = tmp_path / "tgz"
    make_fake_cifar_tar_gz(archive_dir, num_classes=100, n_train=20, n_test=10)
    listed = _listing(archive_dir)
    assert D.check_dataset("cifar100", archive_dir) == [] and _listing(archive_dir) == listed


# ---------------------------------------------------------------------------------------------
# Data-parallel shards: each rank's part of each global batch
# ---------------------------------------------------------------------------------------------


def test_rank_part_splits_a_batch_into_the_ranks_parts():
    assert [D.rank_part(64, r, 2) for r in range(2)] == [(0, 32), (32, 64)]
    assert [D.rank_part(10, r, 4) for r in range(4)] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert [D.rank_part(1, r, 2) for r in range(2)] == [(0, 0), (0, 1)]


def _rank_batches(make, world: int, seed: int, start: int = 0) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per rank, the batches of one epoch (from ``start``) of the loader ``make(rank, world)``."""
    out = []
    for r in range(world):
        loader = make(r, world)
        loader.set_epoch_seed(seed)
        out.append(list(loader.iter_from(start)))
    return out


def _assert_parts_make_the_whole(make, world: int, start: int = 0) -> None:
    (whole,) = _rank_batches(make, 1, seed=7, start=start)
    parts = _rank_batches(make, world, seed=7, start=start)
    assert all(len(p) == len(whole) for p in parts) and len(whole) > 0
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[b][0] for p in parts]), x)  # order, crops and flips: the same
        assert torch.equal(torch.cat([p[b][1] for p in parts]), y)
        assert [p[b][1].shape[0] for p in parts] == [x.shape[0] // world] * world


def test_device_loader_ranks_together_yield_the_one_process_batches():
    images = torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8)
    split = _split(images, torch.arange(100) % 7)

    def make(rank, world):
        return DeviceLoader(split, 12, "cpu", (0.5,) * 3, (0.25,) * 3, shuffle=True, augment=True, drop_last=True,
                            rank=rank, world=world)

    _assert_parts_make_the_whole(make, 2)
    _assert_parts_make_the_whole(make, 4, start=3)  # a resumed epoch too
    with pytest.raises(MixkdError, match="global batch size 12 does not divide over 5 processes"):
        make(0, 5)


@pytest.mark.parametrize("workers", [0, 1])
def test_folder_loader_ranks_together_yield_the_one_process_batches(tmp_path, workers):
    spec = load_dataset("imagefolder", _write_image_folder(tmp_path, n=4), image_size=12)  # 8 training images

    def make(rank, world):
        return make_loaders(spec, batch_size=4, device="cpu", workers=workers, rank=rank, world=world)[0]

    _assert_parts_make_the_whole(make, 2)
    _assert_parts_make_the_whole(make, 2, start=1)


def test_sharded_test_loaders_cover_the_test_split_once():
    spec = load_dataset("digits", splits=("test",))  # 360 images: batches of 100, 100, 100, 60
    whole = torch.cat([y for _, y in D.make_test_loader(spec, "cpu", 100)])
    parts = [[y for _, y in D.make_test_loader(spec, "cpu", 100, rank=r, world=3)] for r in range(3)]
    assert torch.equal(torch.cat([torch.cat([p[b] for p in parts]) for b in range(4)]), whole)
    assert [sum(y.shape[0] for y in p) for p in parts] == [33 * 3 + 20, 33 * 3 + 20, 34 * 3 + 20]


@pytest.mark.parametrize("download", [False, True])
def test_processes_racing_to_prepare_one_archive_extract_it_once(tmp_path, monkeypatch, capsys, download):
    """Two loaders of one data folder holding only the archive (or nothing, with download=True), inside the
    extraction (the download) at the same time (each waits up to 1 s for the other one to be inside too):
    one prepares, the other waits for the lock and uses the folder made (no 'Directory not empty' failure
    with advice to --download; no second download into the same file). The lock is a flock on its own open
    file, so two threads contend as two processes do."""
    import threading

    inside, extractions = threading.Barrier(2), []

    def meet() -> None:
        extractions.append(threading.get_ident())
        try:
            inside.wait(timeout=1.0)  # without the lock both meet here, then both move their folder into place
        except threading.BrokenBarrierError:
            pass

    if download:
        def fake_download_url(url, root, filename=None, md5=None, **kwargs):
            meet()
            make_fake_cifar_tar_gz(Path(root), num_classes=10, n_train=20, n_test=10)

        monkeypatch.setattr(torchvision.datasets.utils, "download_url", fake_download_url)
    else:
        make_fake_cifar_tar_gz(tmp_path, num_classes=10, n_train=20, n_test=10)
        real = tarfile.TarFile.extractall

        def meeting(self, *args, **kwargs):
            meet()
            return real(self, *args, **kwargs)

        monkeypatch.setattr(tarfile.TarFile, "extractall", meeting)
    loaded: list = [None, None]

    def load(i: int) -> None:
        try:
            loaded[i] = load_dataset("cifar10", tmp_path, download=download)
        except MixkdError as e:
            loaded[i] = e

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [type(x).__name__ for x in loaded] == ["DataSpec", "DataSpec"], loaded
    assert len(extractions) == 1  # the second found the folder made
    assert "which prepares dataset 'cifar10' in" in capsys.readouterr().err  # the waiting one said so
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_ranks_data_fingerprints_name_what_differs(tmp_path, monkeypatch):
    """A data-parallel run compares every rank's fingerprint (class names; per split, the sample count and a
    hash of the pixels and labels, or of an image folder's listing) with rank 0's: equal data passes; a
    different count, the same count of other files or images, or other classes are one line naming the
    ranks and what differs."""
    from mixkd.data import fingerprint, fingerprint_mismatch

    monkeypatch.setenv("MIXKD_CACHE", str(tmp_path / "cache"))
    a = fingerprint(load_dataset("imagefolder", _write_image_folder(tmp_path / "a"), image_size=16))
    same = fingerprint(load_dataset("imagefolder", _write_image_folder(tmp_path / "same"), image_size=16))
    assert a["train"][0] == 6 and fingerprint_mismatch([a, same, same]) is None  # the listing, not the path
    more = fingerprint(load_dataset("imagefolder", _write_image_folder(tmp_path / "more", n=4), image_size=16))
    renamed_root = _write_image_folder(tmp_path / "renamed")
    (renamed_root / "train" / "dog" / "2.png").rename(renamed_root / "train" / "dog" / "9.png")
    renamed = fingerprint(load_dataset("imagefolder", renamed_root, image_size=16))
    classes = fingerprint(load_dataset("imagefolder", _write_image_folder(tmp_path / "cls", ("cat", "fox"), ("cat", "fox")),
                                       image_size=16))
    assert fingerprint_mismatch([a, more]) == (
        "the ranks see different data: rank 1 differs from rank 0 (rank 0 vs rank 1: training samples 6 vs 8); "
        "give every rank the same dataset (the same --data-dir contents on every node)")
    line = fingerprint_mismatch([a, a, renamed, renamed])
    assert line.startswith("the ranks see different data: rank 2, 3 differ from rank 0 (rank 0 vs rank 2: training "
                           f"samples differ with the same count (6; content hash {a['train'][1]} vs ")
    assert "class 1 is 'dog' vs 'fox'" in fingerprint_mismatch([a, classes])
    write_fake_cifar(tmp_path / "c0", num_classes=10, n_train=20, n_test=10, seed=0)
    write_fake_cifar(tmp_path / "c1", num_classes=10, n_train=20, n_test=10, seed=1)
    c0, c1 = (fingerprint(load_dataset("cifar10", tmp_path / d)) for d in ("c0", "c1"))
    assert fingerprint_mismatch([c0, c0]) is None
    assert "training samples differ with the same count (20;" in fingerprint_mismatch([c0, c1])
    assert "test samples differ with the same count (10;" in fingerprint_mismatch([c0, c1])
