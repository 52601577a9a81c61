"""Process-level sharing of datasets: loaded splits, and their copies on each device.

Several runs in one process (a pack of runs, a study worker) that use the same dataset share one
host copy of its splits (:func:`cached`) and, on each device, one device copy of their tensors
(:func:`shared_to_device`). Shared tensors are read-only by convention: loaders never write into
them (every batch is a new tensor).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")

MAX_CACHED_SPLITS = 6  # e.g. train and test of three datasets; the oldest is dropped first

_lock = threading.Lock()
_splits: OrderedDict[Hashable, object] = OrderedDict()
# (id of the source tensor, device) -> (weak reference to the source, weak reference to its copy)
_device_copies: dict[tuple[int, str], tuple[weakref.ref, weakref.ref]] = {}


def cached(key: Hashable, load: Callable[[], T]) -> T:
    """``load()`` once per ``key`` in this process (the last :data:`MAX_CACHED_SPLITS` keys are kept).

    The key must say everything the result depends on (for files: their paths, sizes and
    modification times, so that a changed file is read again)."""
    with _lock:
        if key in _splits:
            _splits.move_to_end(key)
            return _splits[key]  # type: ignore[return-value]
    value = load()  # outside the lock: loading may take seconds; a concurrent duplicate load is harmless
    with _lock:
        _splits[key] = value
        _splits.move_to_end(key)
        while len(_splits) > MAX_CACHED_SPLITS:
            _splits.popitem(last=False)
    return value


def shared_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor.to(device)``, made once per (tensor, device) while a copy is alive.

    Loaders of the same split on the same device then hold one device copy (freed with the last
    loader that uses it). On the tensor's own device this is the tensor itself."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if tensor.device == device:
        return tensor
    key = (id(tensor), str(device))
    with _lock:
        entry = _device_copies.get(key)
        if entry is not None:
            source, copy = entry[0](), entry[1]()
            if source is tensor and copy is not None:
                return copy
        for k in [k for k, (s, c) in _device_copies.items() if s() is None or c() is None]:
            del _device_copies[k]
    copy = tensor.to(device)
    with _lock:
        _device_copies[key] = (weakref.ref(tensor), weakref.ref(copy))
    return copy


def clear_cache() -> None:
    """Forget every cached split (device copies are freed with the loaders that hold them)."""
    with _lock:
        _splits.clear()
