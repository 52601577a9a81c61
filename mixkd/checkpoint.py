"""Checkpoints: one safetensors file per run, written atomically and verified on load.

A mixkd checkpoint holds the model weights (``model.*``), the optimizer state (``optim.*``) and the
RNG states (``rng.*``) as tensors, and the epoch, model name, class count and optimizer layout as
metadata, plus a SHA-256 of everything ``--resume`` trusts (the metadata JSON, every tensor's name,
dtype, shape and bytes), so that a corrupt, truncated or edited file is refused on load. Checkpoints
of older mixkd versions (format 1, whose SHA-256 covers the tensors only) still load.
RepDistiller checkpoints (``.pth`` files holding ``{"model": state_dict, ...}``) and torchvision weight
files (a bare state_dict, as ``torch.save(model.state_dict(), path)`` writes) load too, through
torch's weights-only loader and never otherwise: a ``.pth`` whose pickle calls anything but torch's
tensor builders (``os.system``, ...) holds code and is refused as such, and a zip whose records
declare more bytes than a weights file of its size can hold (a deflate bomb) or than the machine has
free is refused before anything is inflated.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mixkd.errors import MixkdError
from mixkd.files import atomic_write, atomic_write_text  # noqa: F401 - atomic_write_text: the name callers import
from mixkd.header import CHECKPOINT_NAME

FORMAT = "mixkd-checkpoint-2"  # the SHA-256 covers the metadata, dtypes and shapes too
OLD_FORMAT = "mixkd-checkpoint-1"  # the SHA-256 covers the tensors' bytes only (mixkd before 2026-12)


def _digest(tensors: dict[str, torch.Tensor], meta_json: str | None = None) -> str:
    """SHA-256 of the tensors (names and bytes) and, from format 2 on, of the metadata JSON and each
    tensor's dtype and shape: everything that loading and ``--resume`` trust."""
    h = hashlib.sha256()
    if meta_json is not None:
        h.update(FORMAT.encode() + b"\0" + meta_json.encode() + b"\0")
    for name in sorted(tensors):
        h.update(name.encode())
        if meta_json is not None:
            h.update(f"\0{tensors[name].dtype}\0{tuple(tensors[name].shape)}\0".encode())
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in layout["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": layout["param_groups"]}


def save_checkpoint(path: str | Path, model: torch.nn.Module, *, model_name: str, num_classes: int,
                    epoch: int, optimizer: torch.optim.Optimizer | None = None,
                    rng: dict[str, torch.Tensor] | None = None, extra: dict[str, Any] | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> None:
    """Write weights (+ optimizer, RNG and other run ``state`` tensors) for a run that has finished
    ``epoch`` epochs (and, mid-epoch, ``extra['step']`` steps of the next)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {"format": FORMAT, "model": model_name, "num_classes": num_classes, "epoch": epoch}
    if optimizer is not None:
        opt_tensors, layout = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        meta["optimizer"] = layout
    for name, value in (rng or {}).items():
        tensors[f"rng.{name}"] = value.detach().cpu().contiguous()
    for name, value in (state or {}).items():
        tensors[f"state.{name}"] = value.detach().cpu().contiguous()
    meta.update(extra or {})
    meta_json = json.dumps(meta)
    metadata = {"mixkd": meta_json, "sha256": _digest(tensors, meta_json)}
    atomic_write(path, lambda tmp: _save_file(tensors, tmp, metadata))


def _save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file``, its I/O failures (a full disk) raised as the ``OSError`` they are."""
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None
        raise


class Checkpoint:
    """A loaded checkpoint: ``state_dict``, ``meta`` (dict), optional optimizer and RNG state."""

    def __init__(self, state_dict, meta, optimizer_state=None, rng=None, state=None):
        self.state_dict = state_dict
        self.meta = meta
        self.optimizer_state = optimizer_state
        self.rng = rng or {}
        self.state = state or {}  # other run state (loss sums of a part-done epoch, ...)

    @property
    def model_name(self) -> str | None:
        return self.meta.get("model")

    @property
    def epoch(self) -> int:
        return int(self.meta.get("epoch", 0))

    @property
    def step(self) -> int:
        """Steps done into epoch ``epoch + 1`` (0 at an epoch boundary)."""
        return int(self.meta.get("step", 0))


def _load_safetensors(path: Path) -> Checkpoint:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MixkdError(f"checkpoint {path} is corrupt or truncated ({e}); use another checkpoint or rerun") from None
    if "mixkd" not in metadata or "sha256" not in metadata:
        state = tensors
        return Checkpoint(state, {})
    try:
        meta = json.loads(metadata["mixkd"])
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise MixkdError(f"checkpoint {path} is corrupt: its mixkd metadata is not a JSON object; use another checkpoint or rerun")
    if meta.get("format") == OLD_FORMAT:  # written before the checksum covered the metadata
        expected = _digest(tensors)
    elif meta.get("format") == FORMAT:
        expected = _digest(tensors, metadata["mixkd"])
    else:
        raise MixkdError(f"checkpoint {path} has format {meta.get('format')!r}, which this mixkd ({FORMAT}) does not "
                         "read: use the mixkd that wrote it, or rerun")
    if expected != metadata["sha256"]:
        raise MixkdError(f"checkpoint {path} is corrupt or was edited: its contents do not match the checksum "
                         "written with it; use another checkpoint or rerun")
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    run_state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    opt = _unflatten_optimizer(tensors, meta["optimizer"]) if "optimizer" in meta else None
    return Checkpoint(state, meta, opt, rng, run_state)


# A record of a torch zip inflating to more than this many times its stored size is no weights file:
# torch.save stores its records uncompressed, and floats deflate by a few percent at most.
MAX_INFLATION = 20
# Records smaller than this are never refused for their ratio (a zeroed buffer deflates to nothing).
SMALL_RECORD = 1 << 20
# Modules whose names a weights file's pickle may call: torch's tensor and storage builders, OrderedDict.
WEIGHT_MODULES = ("torch", "collections")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_zip_sizes(path: Path) -> None:
    """Refuse a torch zip whose records declare more bytes than a weights file of its size holds (a
    deflate bomb: a small file inflating to gigabytes) or than the machine has available, from the
    zip's directory alone: nothing is inflated. A file that is no zip passes (torch reads it)."""
    try:
        with zipfile.ZipFile(path) as z:
            records = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return
    for r in records:
        if r.file_size > SMALL_RECORD and r.file_size > MAX_INFLATION * max(r.compress_size, 1):
            raise MixkdError(
                f"checkpoint {path} is not a weights file: its record {r.filename} would inflate from "
                f"{r.compress_size:,} to {r.file_size:,} bytes ({r.file_size / max(r.compress_size, 1):,.0f}:1; "
                f"torch.save stores weights uncompressed); refused before inflating it")
    total, free = sum(r.file_size for r in records), available_memory()
    if free is not None and total > free:
        raise MixkdError(f"checkpoint {path} would take {_size(total)} once read, more than the {_size(free)} of "
                         "memory available; refused before reading it")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _pickle_bytes(path: Path) -> bytes:
    """The pickle of a torch file (a zip's ``data.pkl``, or the file itself: a raw or legacy pickle)."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            return z.read(name) if name else b""  # bounded: check_zip_sizes passed
    except (zipfile.BadZipFile, OSError, ValueError):
        return path.read_bytes()


def pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every global (a function or class to call) the pickles in ``data`` refer
    to, read with pickletools (nothing is unpickled): a legacy torch file holds several in a row."""
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        strings: list[str | None] = []  # what the string-pushing ops pushed, for STACK_GLOBAL
        memo: dict[int, str | None] = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.append(f"{strings[-2] if len(strings) > 1 else '?'}.{strings[-1] if strings else '?'}")
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = strings[-1] if strings else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    strings.append(memo.get(int(arg)))
                elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                    strings.append(str(arg))
        except Exception:  # noqa: BLE001 - past the pickles (a legacy file's raw storages) or damaged
            break
    return found


def _torch_reason(err: BaseException) -> str:
    """What torch says is wrong with a file, without its advice to load it unsafely."""
    skip = ("weights_only", "Weights only load failed", "Check the documentation", "Please file an issue",
            "trusted source")
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not any(s in line for s in skip)]
    return lines[0] if lines else type(err).__name__


def _load_torch(path: Path) -> Checkpoint:
    check_zip_sizes(path)
    try:
        with warnings.catch_warnings():  # torch's warnings about pickle protocols say nothing to a user
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt pickles and zips
        code = [g for g in pickle_globals(_pickle_bytes(path)) if g.split(".")[0] not in WEIGHT_MODULES]
        if code:
            raise MixkdError(f"checkpoint {path} holds code, not only weights (it calls {code[0]}): refused; mixkd "
                             "never unpickles code: ask for the weights as a state_dict or a .safetensors file") from None
        raise MixkdError(f"checkpoint {path} is corrupt, truncated or not a weights file ({_torch_reason(e)})") from None
    key = next((k for k in ("model", "state_dict") if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
    if key is not None:  # RepDistiller's {"model": ...}; timm's training script's {"state_dict": ...}
        state, meta = obj[key], {k: v for k, v in obj.items() if k != key and isinstance(v, (int, float, str))}
    elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        state, meta = obj, {}
    else:
        raise MixkdError(f"checkpoint {path} holds no state_dict: expected {{'model': state_dict, ...}} as RepDistiller "
                         "saves, {'state_dict': ...} as timm's train.py saves, or a bare state_dict as torchvision "
                         "and timm save")
    bad = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if bad is not None:
        what = f"key {bad[0]!r}" if not isinstance(bad[0], str) else f"{bad[0]!r}: a {type(bad[1]).__name__}"
        raise MixkdError(f"checkpoint {path} holds a state_dict with a value that is not a named tensor ({what}); "
                         "a state_dict maps parameter names to tensors: use another checkpoint")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    return Checkpoint(state, meta)


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A run directory stands for its checkpoint file."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise MixkdError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a mixkd ``.safetensors`` checkpoint (or run directory) or a RepDistiller ``.pth``."""
    p = resolve_checkpoint_path(path)
    return _load_safetensors(p) if _looks_like_safetensors(p) else _load_torch(p)


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian), then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return path.suffix == ".safetensors"
    header_len = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and header_len < path.stat().st_size:
        return True
    return path.suffix == ".safetensors" and head[:2] != b"PK"  # a damaged safetensors file: report it as such


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                 arch: str | None = None) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming what does not fit (``arch``: the
    model's registry name, said in the error; else its class name)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and state_dict[k].shape != own[k].shape]

    def few(keys):
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    problems = []
    if missing:
        problems.append(f"missing keys: {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches (checkpoint vs model): {few(shapes)}")
    if problems:
        name = arch or type(model).__name__
        raise MixkdError(f"checkpoint {source} does not fit {name}: " + "; ".join(problems)
                         + "; check --teacher-model / --model and the dataset's class count")
    model.load_state_dict(state_dict, strict=True)
