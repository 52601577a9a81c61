"""Image folders at ImageNet scale: the listing is made once and kept in an index file, used only while
every listed directory is unchanged; damaged, foreign or stale index files are listed again."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torchvision

import mixkd.data.folder_index as FI
from mixkd.data.imagefolder import IndexedImageFolder


def _touch_image(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 5, 3), 99, dtype=np.uint8)).save(path, format="PNG")


def _age(root: Path, seconds: float = 60.0) -> None:
    """Set every directory's modification time ``seconds`` into the past (a folder that has settled)."""
    t = time.time_ns() - int(seconds * 1e9)
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.utime(d, ns=(t, t))


@pytest.fixture
def split(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MIXKD_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data" / "train"
    for cls, names in {"b_cls": ["2.png", "10.JPEG", "1.jpg"], "a_cls": ["x.png"], "c_cls": ["y.webp"]}.items():
        for name in names:
            _touch_image(root / cls / name)
    _touch_image(root / "a_cls" / "nested" / "deep" / "z.png")  # a folder below a class folder counts too
    (root / "b_cls" / "notes.txt").write_text("not an image")  # not an image extension: not a sample
    (root / ".hidden").mkdir()  # hidden folders are not classes
    _age(root)
    return root


def _samples(index) -> list[tuple[str, int]]:
    return [index[i] for i in range(len(index))]


def test_the_listing_is_torchvisions(split):
    index = FI.folder_index(split)
    reference = torchvision.datasets.ImageFolder(str(split), allow_empty=True)
    assert index.classes == ["a_cls", "b_cls", "c_cls"]  # torchvision would add ".hidden"
    expected = [(p, reference.class_to_idx[c] - 1) for p, _ in reference.samples
                for c in [os.path.relpath(p, split).split(os.sep)[0]]]
    assert _samples(index) == expected
    assert [os.path.relpath(p, split) for p, _ in _samples(index)] == [
        "a_cls/x.png", "a_cls/nested/deep/z.png", "b_cls/1.jpg", "b_cls/10.JPEG", "b_cls/2.png", "c_cls/y.webp"]
    assert index.targets.tolist() == [0, 0, 1, 1, 1, 2] and index[-1] == index[5]
    with pytest.raises(IndexError):
        index[6]
    folder = IndexedImageFolder(split)
    assert isinstance(folder, torchvision.datasets.ImageFolder)
    assert len(folder) == 6 and folder.classes == index.classes and folder[3][1] == 1
    assert folder[3][0].size == (5, 4)


def test_a_settled_folder_is_listed_once_then_read_from_its_index(split, monkeypatch):
    first = _samples(FI.folder_index(split))
    path = FI.index_path(str(split))
    assert path.is_file() and path.parent.parent == Path(os.environ["MIXKD_CACHE"])

    def no_listing(root):
        raise AssertionError("listed again")

    with monkeypatch.context() as m:
        m.setattr(FI, "list_split", no_listing)
        assert _samples(FI.folder_index(split)) == first
        IndexedImageFolder(split)  # the dataset reads the index too
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no stray temporary files


@pytest.mark.parametrize("change", ["add_file", "remove_file", "rename_file", "add_class", "add_nested_file"])
def test_a_changed_folder_is_listed_again(split, change):
    before = _samples(FI.folder_index(split))
    assert FI.index_path(str(split)).is_file()
    if change == "add_file":
        _touch_image(split / "b_cls" / "3.png")
    elif change == "remove_file":
        (split / "b_cls" / "1.jpg").unlink()
    elif change == "rename_file":
        (split / "c_cls" / "y.webp").rename(split / "c_cls" / "w.webp")
    elif change == "add_class":
        _touch_image(split / "d_cls" / "q.png")
    else:
        _touch_image(split / "a_cls" / "nested" / "deep" / "zz.png")
    path = FI.index_path(str(split))
    assert FI._read(path, str(split)) is None  # the index on disk is stale now
    after = _samples(FI.folder_index(split))
    assert after == _samples(FI.list_split(str(split))) and after != before
    _age(split)
    assert _samples(FI.folder_index(split)) == after
    assert _samples(FI._read(path, str(split))) == after  # the new listing, indexed once settled


def test_a_folder_changed_just_now_is_not_indexed(split):
    _touch_image(split / "a_cls" / "new.png")  # a_cls's mtime is now: it may change again within the clock's step
    assert len(FI.folder_index(split)) == 7
    assert not FI.index_path(str(split)).exists()
    _age(split)
    assert len(FI.folder_index(split)) == 7
    assert FI.index_path(str(split)).is_file()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "foreign", "bad_offsets", "wrong_version"])
def test_a_damaged_or_foreign_index_is_listed_again_and_replaced(split, tmp_path, damage, monkeypatch):
    expected = _samples(FI.folder_index(split))
    path = FI.index_path(str(split))
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not an index" * 50)
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":  # another folder's index under this folder's name
        other = tmp_path / "other" / "train"
        _touch_image(other / "k" / "1.png")
        _age(other)
        FI.folder_index(other)
        path.write_bytes(FI.index_path(str(other)).read_bytes())
    else:
        index, version = FI._read(path, str(split)), FI.INDEX_VERSION
        if damage == "bad_offsets":
            index._offsets = index._offsets[::-1].copy()
        else:
            monkeypatch.setattr(FI, "INDEX_VERSION", version + 1)
        FI._write(index, path)
        monkeypatch.setattr(FI, "INDEX_VERSION", version)
    assert FI._read(path, str(split)) is None
    assert _samples(FI.folder_index(split)) == expected
    assert path.read_bytes() != b"" and _samples(FI._read(path, str(split))) == expected  # rewritten


def test_an_unwritable_cache_folder_only_costs_the_listing(split, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("MIXKD_CACHE", str(blocker / "cache"))  # below a regular file: cannot be created
    assert len(FI.folder_index(split)) == 6
    assert not (blocker / "cache").exists()


def test_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXKD_CACHE", str(tmp_path / "c"))
    assert FI.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MIXKD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert FI.cache_dir() == tmp_path / "x" / "mixkd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert FI.cache_dir() == tmp_path / "h" / ".cache" / "mixkd"
    a, b = FI.index_path("/data/imagenet/train"), FI.index_path("/data/imagenet/val")
    assert a != b and a.name.endswith("-train.npz") and b.name.endswith("-val.npz")
