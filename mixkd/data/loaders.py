"""Loaders: batches of a split on the training device, each epoch a pure function of its seed.

* :class:`DeviceLoader`: an in-memory :class:`ArraySplit` moved once to the device (one copy per
  split and device, shared by every loader in the process); shuffling, ``RandomCrop(32, padding=4)``
  + ``RandomHorizontalFlip`` and normalization are batched tensor ops there.
* :class:`FolderLoader`: a ``DataLoader`` over an ``ImageFolder`` with per-sample seeds.

Both follow the :class:`Loader` protocol. ``set_epoch_seed(seed)`` fixes the next epoch's order and
augmentation; ``iter_from(s)`` yields exactly batches ``s, s + 1, ...`` of that epoch (what a full
iteration would yield from its batch ``s`` on), so a run stopped mid-epoch resumes step-exactly.

Data-parallel runs (``rank``, ``world``): ``batch_size`` is the global batch. Every rank draws the
epoch's order and augmentation for the whole epoch exactly as one process would, and yields only
its part of each global batch (:func:`rank_part`), so that N ranks together see what one process
sees, batch by batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, Sampler

from mixkd.data.cache import shared_to_device
from mixkd.data.layout import BatchLayout
from mixkd.data.spec import ArraySplit, DataSpec
from mixkd.errors import MixkdError

CROP_PADDING = 4  # RandomCrop(32, padding=4)
MAX_DEFAULT_WORKERS = 4


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int | None) -> int:
    """Data-loading processes: ``workers``, or when None what the machine has (at most 4).

    Never more than the cores available, which is what torch's DataLoader warns about."""
    if workers is None:
        return min(MAX_DEFAULT_WORKERS, available_cores())
    if workers < 0:
        raise MixkdError(f"workers must be 0 or more, got {workers}")
    return int(workers)


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

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches ``start, start + 1, ...`` (``iter_from(0)`` is ``iter(loader)``)."""
        ...

    def set_epoch_seed(self, seed: int) -> None:
        """Make the next epoch's order and augmentation a pure function of ``seed``."""
        ...


def rank_part(size: int, rank: int, world: int) -> tuple[int, int]:
    """The [start, end) of rank ``rank``'s part of a batch of ``size`` samples split over ``world``
    ranks: ``[r * size / world, (r + 1) * size / world)``, rounded down (equal parts when ``world``
    divides ``size``)."""
    return rank * size // world, (rank + 1) * size // world


def _check_batch(batch_size: int, rank: int, world: int, drop_last: bool) -> None:
    """A batch size of at least 1 that, when batches are full (``drop_last``), divides over the ranks."""
    if batch_size < 1:
        raise MixkdError(f"batch size must be at least 1, got {batch_size}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..world-1 and world at least 1, got rank {rank} of {world}")
    if drop_last and batch_size % world:
        raise MixkdError(f"the global batch size {batch_size} does not divide over {world} processes: "
                         f"use a batch size that is a multiple of {world}, or another number of processes")


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def _check_start(start: int, batches: int) -> int:
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= batches:
        raise ValueError(f"start batch must be an integer in 0..{batches}, got {start!r}")
    return start


class DeviceLoader:
    """Batches of an in-memory :class:`ArraySplit`, with everything done on ``device``.

    The uint8 split is moved to ``device`` once (and shared with other loaders of the same split
    on that device). At the start of each epoch (each ``iter()``), the permutation, the crop offsets
    and the flips of every sample are drawn from the loader's own generator, which lives on
    ``device``; the same code runs on CPU and CUDA.

    With ``world > 1`` it yields rank ``rank``'s part of each global batch of ``batch_size``.

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
        rank: int = 0,
        world: int = 1,
        crop: bool = True,
        flip: bool = True,
        sample: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        layout: BatchLayout | None = None,
        strong: Any = None,
    ) -> None:
        _check_batch(batch_size, rank, world, drop_last)
        self.layout = layout or BatchLayout()
        if (strong is None) == self.layout.strong:
            raise ValueError("a DeviceLoader gets a strong pipeline exactly when its layout has a strong view")
        self.strong = strong  # the strong view's pipeline (mixkd.augment.Pipeline: crop, flip, extra, sample_extra)
        teacher_view = self.layout.teacher_view
        self.device = torch.device(device)
        self.batch_size = int(batch_size)  # the global batch; this rank yields its part of each
        self.rank, self.world = rank, world
        self.shuffle = shuffle
        self.augment = augment and (crop or flip)
        self.crop, self.flip = crop, flip
        self.sample, self.teacher_view = sample, teacher_view
        self._epoch_seed = seed
        self.drop_last = drop_last
        self.images = shared_to_device(split.images, self.device)  # read-only: never written into
        self.labels = shared_to_device(split.labels, self.device)
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
        self._epoch_seed = seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _check_start(start, len(self))
        return self._batches(start)

    def _draw(self, n: int, crop: bool | None = None, flip: bool | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Crop offsets and flips of ``n`` samples from the loader's generator (today's draws, in
        today's order, for flip + crop; flip alone keeps the offsets at the padding, i.e. no shift).
        ``crop``, ``flip``: None, the loader's (the strong view passes its pipeline's)."""
        g, dev = self._gen, self.device
        crop = self.crop if crop is None else crop
        flip_on = self.flip if flip is None else flip
        if crop:
            span = 2 * CROP_PADDING + 1
            off_y = torch.randint(0, span, (n,), generator=g, device=dev)
            off_x = torch.randint(0, span, (n,), generator=g, device=dev)
        else:
            off_y = off_x = torch.full((n,), CROP_PADDING, dtype=torch.long, device=dev)
        if flip_on:
            flip = torch.rand(n, generator=g, device=dev) < 0.5  # like RandomHorizontalFlip(p=0.5)
        else:
            flip = torch.zeros(n, dtype=torch.bool, device=dev)
        return off_y, off_x, flip

    def _batch_seed(self, b: int, view: int) -> int:
        """The seed of batch ``b``'s per-sample policies (view 0: the student's, 1: the teacher's own draw,
        2: the strong view's, offset by 2**31 so that it meets no batch's view 0 or 1: torch's CPU generator
        reads only a seed's low 32 bits, so an offset of 2**32 would give view 0's draws). In a data-parallel
        run rank r's part is offset by r x 0x9E3779B1 (Knuth's golden-ratio constant: no rank meets another's
        seeds in those 32 bits), so that the ranks' parts get draws of their own: the policies draw per
        position in the batch they are given, so one seed would give every rank the same boxes. Their draws
        in an N-rank run differ from one process's (those of flip and crop, drawn here for the global batch, do not)."""
        return view_seed(self._epoch_seed, 2 * b + view + (view // 2) * 2**31 + self.rank * 0x9E3779B1)

    def _finish(self, x: torch.Tensor, b: int, view: int) -> torch.Tensor:
        sample = self.strong.sample_extra if view == 2 and self.strong.extra else self.sample if view < 2 else None
        if sample is None:
            return self._normalize(x)
        return sample(x, self._batch_seed(b, view))

    def _batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The whole epoch's randomness is drawn first, whatever ``start``: batch b is the same
        # tensor whether the epoch is iterated from 0 or from b.
        n, dev, g = self.num_samples, self.device, self._gen
        order = torch.randperm(n, generator=g, device=dev) if self.shuffle else None
        if self.augment:
            off_y, off_x, flip = self._draw(n)
            if self.teacher_view == "independent":  # drawn after the student's: those stay today's
                t_off_y, t_off_x, t_flip = self._draw(n)
            if order is None:
                order = torch.arange(n, device=dev)
        strong_native = self.strong is not None and self.strong.flip
        if strong_native:  # drawn after the student's and the teacher's: those stay today's
            s_off_y, s_off_x, s_flip = self._draw(n, self.strong.crop, self.strong.flip)
            if order is None:
                order = torch.arange(n, device=dev)
        for b in range(start, len(self)):
            s, e = b * self.batch_size, min((b + 1) * self.batch_size, n)
            if self.world > 1:
                lo, hi = rank_part(e - s, self.rank, self.world)
                s, e = s + lo, s + hi
                if s == e:  # a last partial batch smaller than the world: nothing for this rank
                    continue
            if order is None:
                idx = torch.arange(s, e, device=dev)
                xb, yb = self.images[s:e], self.labels[s:e]
            else:
                idx = order[s:e]
                yb = self.labels.index_select(0, idx)
                if self.augment:
                    xb = self._crop_flip(idx, off_y[s:e], off_x[s:e], flip[s:e])
                else:
                    xb = self.images.index_select(0, idx)
            x, teacher = self._finish(xb, b, 0), None
            if self.teacher_view == "clean":
                teacher = self._normalize(self.images.index_select(0, idx))
            elif self.teacher_view == "independent":
                xt = (self._crop_flip(idx, t_off_y[s:e], t_off_x[s:e], t_flip[s:e]) if self.augment
                      else self.images.index_select(0, idx))
                teacher = self._finish(xt, b, 1)
            strong = None
            if self.strong is not None:  # its own draw of its pipeline's flip / crop and per-sample policies
                xs = (self._crop_flip(idx, s_off_y[s:e], s_off_x[s:e], s_flip[s:e]) if strong_native
                      else self.images.index_select(0, idx))
                strong = self._finish(xs, b, 2)
            yield self.layout.pack(x, yb, teacher=teacher, strong=strong, index=idx if self.layout.index else None)

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
        return x.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)  # a new tensor: .to copies


def view_seed(seed: int, offset: int) -> int:
    """A seed derived from ``seed`` for another draw (a view, a batch, a rank: ``offset``), as the loaders
    derive them: ``seed * 1,000,003 + offset`` (a prime factor: the derived seeds of two seeds do not meet
    for small offsets), kept a positive int64."""
    return (seed * 1_000_003 + offset) % (2**63 - 1)


class _SeededBatchSampler(Sampler):
    """Yields batches of (index, sample_seed) pairs: the order and each sample's augmentation seed
    are drawn in the main process from one generator, for the whole epoch, so they depend neither on
    the worker count nor on the world size. Each batch is rank ``rank``'s part of a global batch of
    ``batch_size``; ``start`` skips the epoch's first ``start`` global batches."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, generator: torch.Generator,
                 rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.generator, self.rank, self.world = generator, rank, world
        self.start = 0

    def __len__(self) -> int:
        return _num_batches(self.n, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = self.generator
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        for b in range(self.start, len(self)):
            s, e = b * self.batch_size, min((b + 1) * self.batch_size, self.n)
            lo, hi = rank_part(e - s, self.rank, self.world)
            if hi > lo:  # a last partial batch smaller than the world may leave this rank nothing
                yield list(zip(order[s + lo:s + hi].tolist(), seeds[s + lo:s + hi].tolist(), strict=True))


class _SeededFolder(Dataset):
    """An ImageFolder whose transform runs under a per-sample seed, leaving global RNGs intact.

    A sample is ``(views, target, index)``: ``views`` the student's image, then, with a
    ``teacher_transform``, the teacher's (``independent_teacher``: the same transform under a seed of its
    own; else the transform, e.g. the folder's test view, under the sample's seed), then, with a
    ``strong_transform``, the strong view (that transform under a seed of its own)."""

    def __init__(self, folder: torchvision.datasets.ImageFolder, transform: Any, teacher_transform: Any = None,
                 independent_teacher: bool = False, strong_transform: Any = None) -> None:
        self.folder, self.transform = folder, transform
        self.teacher_transform, self.independent_teacher = teacher_transform, independent_teacher
        self.strong_transform = strong_transform

    def __len__(self) -> int:
        return len(self.folder)

    @staticmethod
    def _seeded(transform: Any, img: Any, seed: int) -> Any:
        if transform is None:
            return img
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return transform(img)

    def __getitem__(self, key: tuple[int, int]) -> tuple[tuple[torch.Tensor, ...], int, int]:
        index, seed = key
        path, target = self.folder.samples[index]
        img = self.folder.loader(path)
        views = (self._seeded(self.transform, img, seed),)
        if self.teacher_transform is not None:
            teacher_seed = view_seed(seed, 1) if self.independent_teacher else seed
            views += (self._seeded(self.teacher_transform, img, teacher_seed),)
        if self.strong_transform is not None:
            views += (self._seeded(self.strong_transform, img, view_seed(seed, 2)),)
        if self.folder.target_transform is not None:
            target = self.folder.target_transform(target)
        return views, target, index


class FolderLoader:
    """A ``DataLoader`` over an ``ImageFolder`` that moves batches to ``device``.

    Shuffling and each sample's augmentation are seeded from ``set_epoch_seed``, so an epoch is
    reproducible whatever the number of workers (persistent when ``workers > 0``; None: what the
    machine has, see :func:`resolve_workers`). With ``world > 1`` it loads rank ``rank``'s part of each
    global batch of ``batch_size`` (and only those images). ``transform`` overrides the folder's own transform
    (used for un-augmented training).
    """

    def __init__(
        self,
        folder: torchvision.datasets.ImageFolder,
        batch_size: int,
        device: torch.device | str,
        *,
        shuffle: bool,
        drop_last: bool,
        workers: int | None = None,
        transform: Any = None,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        layout: BatchLayout | None = None,
        teacher_transform: Any = None,
        strong_transform: Any = None,
    ) -> None:
        _check_batch(batch_size, rank, world, drop_last)
        self.layout = layout or BatchLayout()
        if (teacher_transform is None) != (self.layout.teacher_view == "same"):
            raise ValueError("a FolderLoader gets a teacher_transform exactly when its teacher_view is not same")
        if (strong_transform is None) == self.layout.strong:
            raise ValueError("a FolderLoader gets a strong_transform exactly when its layout has a strong view")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)  # the global batch; this rank loads its part of each
        self.rank, self.world = rank, world
        self.drop_last = drop_last
        self.num_samples = len(folder)
        self.workers = resolve_workers(workers)
        self._gen = torch.Generator()
        self._gen.manual_seed(seed)
        self._sampler = _SeededBatchSampler(self.num_samples, self.batch_size, shuffle, drop_last, self._gen,
                                            rank, world)
        dataset = _SeededFolder(folder, folder.transform if transform is None else transform, teacher_transform,
                                independent_teacher=self.layout.teacher_view == "independent",
                                strong_transform=strong_transform)
        self._loader = DataLoader(
            dataset,
            batch_sampler=self._sampler,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.workers > 0,
            # The DataLoader draws worker base seeds from this one (not from the global RNG, and
            # not from self._gen: with persistent workers it draws only on the first epoch).
            # Worker seeds do not matter: each sample's transform runs under its own seed.
            generator=torch.Generator().manual_seed(0),
        )

    def __len__(self) -> int:
        return len(self._sampler)

    def close(self) -> None:
        """End the worker processes now (they are persistent: they would otherwise live until this loader
        is collected, or be killed at exit before removing their ``/tmp/pymp-*`` folders)."""
        workers = getattr(self._loader, "_iterator", None)  # the DataLoader's persistent iterator, once started
        if workers is not None:
            workers._shutdown_workers()
            self._loader._iterator = None

    def set_epoch_seed(self, seed: int) -> None:
        self._gen.manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _check_start(start, len(self))
        # Read when the DataLoader starts the epoch's sampler, i.e. at the first batch.
        self._sampler.start = start
        return self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for views, y, index in self._loader:
            x, *rest = (v.to(self.device, non_blocking=True) for v in views)
            strong = rest.pop() if self.layout.strong else None  # the last view (see _SeededFolder)
            yield self.layout.pack(x, y.to(self.device, dtype=torch.int64, non_blocking=True),
                                   teacher=rest[0] if rest else None, strong=strong,
                                   index=index.to(self.device, non_blocking=True) if self.layout.index else None)


def make_loaders(
    spec: DataSpec,
    batch_size: int,
    device: torch.device | str,
    *,
    eval_batch_size: int = 1024,
    augment: bool = True,
    drop_last: bool = True,
    workers: int | None = None,
    rank: int = 0,
    world: int = 1,
    pipeline: Any = None,
    layout: BatchLayout | None = None,
    strong: Any = None,
) -> tuple[DeviceLoader | FolderLoader, DeviceLoader | FolderLoader]:
    """(train_loader, test_loader) for ``spec``.

    The train loader shuffles, augments when ``augment`` and drops the last partial batch when
    ``drop_last``; the test loader keeps the dataset order, never augments and keeps every sample.
    ``workers`` only matters for ``imagefolder`` (None: what the machine has). With ``world > 1``
    both loaders yield rank ``rank``'s part of each global batch (``batch_size`` and
    ``eval_batch_size`` are global; the training batch must divide over ``world``).

    ``pipeline``: the run's augmentation (:class:`mixkd.augment.Pipeline`; None: flip + crop): in-memory
    datasets draw its flip / crop here and run its other per-sample policies on the device, image
    folders get its ``folder_transform``. ``layout``: what a training batch holds (:mod:`mixkd.data.layout`;
    None: the student's view and the labels). A ``clean`` teacher view of an image folder is its test view
    (resize and centre crop); an ``independent`` one its training transform under a seed of its own.
    ``strong``: the strong view's pipeline (a :class:`mixkd.augment.Pipeline` of per-sample policies), exactly
    when ``layout`` has a strong view: its own draw of that pipeline for every sample (in-memory datasets: its
    flip / crop drawn after the other views', its other policies seeded per batch; image folders: its
    ``folder_transform`` under a seed of its own).
    """
    layout = layout or BatchLayout()
    if spec.train is None or spec.test is None:  # (an image folder's test view is also its clean teacher view)
        raise ValueError("make_loaders needs the train and test splits: load the dataset with both splits")
    train: DeviceLoader | FolderLoader
    if isinstance(spec.train, ArraySplit):
        native = {} if pipeline is None else {"crop": pipeline.crop, "flip": pipeline.flip,
                                              "sample": pipeline.sample_extra if pipeline.extra else None}
        train = DeviceLoader(spec.train, batch_size, device, spec.mean, spec.std, shuffle=True, augment=augment,
                             drop_last=drop_last, rank=rank, world=world, layout=layout, strong=strong, **native)
    else:
        test_tf = spec.test.transform
        transform = None if augment else test_tf
        if augment and pipeline is not None:  # flip + crop: the folder's RandomResizedCrop + flip; else its test view
            transform = pipeline.folder_transform(spec.train.transform if pipeline.crop else test_tf)
        student_tf = spec.train.transform if transform is None else transform
        teacher_tf = {"same": None, "independent": student_tf, "clean": test_tf}[layout.teacher_view]
        strong_tf = None if strong is None else strong.folder_transform(spec.train.transform if strong.crop else test_tf)
        train = FolderLoader(spec.train, batch_size, device, shuffle=True, drop_last=drop_last, workers=workers,
                             transform=transform, rank=rank, world=world, layout=layout, teacher_transform=teacher_tf,
                             strong_transform=strong_tf)
    if len(train) == 0:
        raise MixkdError(
            f"batch size {batch_size} is larger than the {train.num_samples} training samples of "
            f"{spec.name!r} (the last partial batch is dropped): use a smaller batch size"
        )
    return train, make_test_loader(spec, device, eval_batch_size, workers=workers, rank=rank, world=world)


def make_test_loader(
    spec: DataSpec, device: torch.device | str, batch_size: int = 1024, *, workers: int | None = None,
    rank: int = 0, world: int = 1,
) -> DeviceLoader | FolderLoader:
    """The test split in dataset order, un-augmented, every sample kept (with ``world > 1``: rank
    ``rank``'s part of each batch; :func:`mixkd.metrics.evaluate` sums the parts over the ranks)."""
    if spec.test is None:
        raise ValueError("make_test_loader needs the test split: load the dataset with splits including 'test'")
    if isinstance(spec.test, ArraySplit):
        return DeviceLoader(spec.test, batch_size, device, spec.mean, spec.std, shuffle=False, augment=False,
                            drop_last=False, rank=rank, world=world)
    return FolderLoader(spec.test, batch_size, device, shuffle=False, drop_last=False, workers=workers,
                        rank=rank, world=world)
