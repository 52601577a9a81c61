"""A checkpoint file's name in a run folder, and its header read without its weights and without
torch (the run folder's status and the checks before a run use it)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from mixkd.errors import MixkdError

CHECKPOINT_NAME = "checkpoint.safetensors"  # in a run folder (see mixkd.run_folder)
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def checkpoint_header(path: Path) -> dict[str, Any]:
    """The metadata of a checkpoint file, without reading its weights: a mixkd ``.safetensors``'s
    model name and class count (``{}`` for other safetensors files and for ``.pth`` files, which
    carry none). Raises :class:`MixkdError` for a file that is truncated or not a checkpoint."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8 and 0 < (n := int.from_bytes(head, "little")) <= min(MAX_HEADER_BYTES, size - 8):
            first = f.read(1)
            if first == b"{":
                return _safetensors_meta(path, first + f.read(n - 1), 8 + n, size)
    if head[:2] == b"PK":  # torch.save's zip format: the central directory at its end lists the entries
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise MixkdError(f"checkpoint {path} is corrupt or truncated ({e})") from None
        return {}
    if head[:1] == b"\x80":  # torch.save's legacy pickle format: cannot be checked without loading it
        return {}
    raise MixkdError(f"checkpoint {path} is not a checkpoint file (neither safetensors nor torch.save)")


def _safetensors_meta(path: Path, header: bytes, data_start: int, size: int) -> dict[str, Any]:
    try:
        h = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MixkdError(f"checkpoint {path} is corrupt (its safetensors header is not valid JSON)") from None
    ends = [v["data_offsets"][1] for k, v in h.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    if data_start + max(ends, default=0) > size:
        raise MixkdError(f"checkpoint {path} is truncated ({size} bytes, its header describes "
                         f"{data_start + max(ends)}); use another checkpoint")
    meta = h.get("__metadata__") or {}
    try:
        return json.loads(meta["mixkd"]) if "mixkd" in meta else {}
    except (TypeError, json.JSONDecodeError):
        raise MixkdError(f"checkpoint {path} has unreadable mixkd metadata") from None
