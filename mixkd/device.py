"""The machine a run is on: which device ``--device`` means, and how results name it."""

from __future__ import annotations

import platform

import torch
import torchvision

from mixkd import __version__
from mixkd.errors import MixkdError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA where available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MixkdError(f"device '{name}' asked for, but CUDA is not available here; use --device cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the thread count (numbers depend on it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {n} thread{'s' * (n != 1)})"


def library_versions() -> dict[str, str]:
    return {"mixkd": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}
