"""Models with the weights of a checkpoint, and the frozen teacher of a distillation.

A checkpoint is a mixkd run folder or ``.safetensors`` file, a RepDistiller ``.pth``, a library's own
weights file (a timm ``.safetensors`` or ``.pth``, a torchvision ``.pth``: ``--teacher resnet34.pth
--teacher-model tv:resnet34``), a Hugging Face hub cache folder (``models--timm--resnet18.a1_in1k``
or one of its ``snapshots/<hash>`` folders) or an ``hf-hub:timm/resnet18.a1_in1k`` name found in the
local hub cache. Everything is read offline (``HF_HUB_OFFLINE``: nothing is ever downloaded) and
loaded strictly (a key mismatch is one line naming the file and the first keys). A hub folder's
``config.json`` names the architecture (``timm:<architecture>``) and the preprocessing its weights
expect.

A teacher whose weights come from a library (not from a mixkd run) and whose name is ``timm:``/``tv:``
gets that preprocessing (:class:`mixkd.models.preprocess.Preprocessed`) when it differs from the
dataset's (``kd.teacher_input``: ``auto``, the default; ``model`` for the ``tv_*`` names too;
``dataset`` never); the choice is said in the run's log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mixkd.checkpoint import load_checkpoint, load_weights
from mixkd.errors import MixkdError
from mixkd.header import CHECKPOINT_NAME
from mixkd.models import create_model, model_problem
from mixkd.models.preprocess import Preprocessed, Preprocessing, pretrained_preprocessing
from mixkd.run_folder import HUB_PREFIX

HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
TEACHER_INPUTS = ("auto", "model", "dataset")


class WeightsSource:
    """Where a checkpoint's weights are: ``path`` (a file), and a hub folder's ``config.json`` (or None)."""

    def __init__(self, path: Path, hub_config: dict | None = None, hub_dir: Path | None = None):
        self.path, self.hub_config, self.hub_dir = path, hub_config, hub_dir

    @property
    def architecture(self) -> str | None:
        """``timm:<architecture>`` of a hub folder's ``config.json``; None for a plain file."""
        arch = (self.hub_config or {}).get("architecture")
        return f"timm:{arch}" if isinstance(arch, str) and arch else None


def is_hub_source(source: str | Path) -> bool:
    """Whether ``source`` names Hugging Face hub weights: ``hf-hub:org/name`` or a folder laid out as the
    hub cache lays it out (``models--org--name``, or a snapshot folder holding ``config.json``)."""
    s = str(source)
    if s.startswith(HUB_PREFIX):
        return True
    p = Path(s).expanduser()
    return p.is_dir() and not (p / CHECKPOINT_NAME).exists() and (
        p.name.startswith("models--") or (p / "config.json").is_file() or (p / "snapshots").is_dir())


def resolve_source(source: str | Path) -> WeightsSource:
    """The weights file (and hub config) that ``source`` names (see the module docstring)."""
    s = str(source)
    if s.startswith(HUB_PREFIX):
        return _snapshot_source(_cached_snapshot(s[len(HUB_PREFIX):]), s)
    p = Path(s).expanduser()
    if is_hub_source(p):
        if (p / "snapshots").is_dir():
            return _snapshot_source(_snapshot_of(p), s)
        return _snapshot_source(p, s)
    return WeightsSource(p)


def _cached_snapshot(repo_id: str) -> Path:
    """The local cache's snapshot folder of hub repository ``repo_id``, read offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, whatever else asks
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        raise MixkdError(f"{HUB_PREFIX}{repo_id} needs huggingface_hub, which is not installed: "
                         "pip install 'mixkd[timm]'") from None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, an invalid repo id (HFValidationError), ...
        why = " ".join(str(e).split())[:160] or type(e).__name__
        raise MixkdError(f"{HUB_PREFIX}{repo_id} is not in the local Hugging Face cache ({HF_HUB_CACHE}): download "
                         f"it first (hf download {repo_id}) or pass a weights file ({why})") from None


def _snapshot_of(repo_dir: Path) -> Path:
    """The snapshot of a hub cache folder ``models--org--name``: the one ``refs/main`` names, else the only one."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file() and (repo_dir / "snapshots" / ref.read_text().strip()).is_dir():
        return repo_dir / "snapshots" / ref.read_text().strip()
    snapshots = sorted(d for d in (repo_dir / "snapshots").iterdir() if d.is_dir())
    if len(snapshots) != 1:
        raise MixkdError(f"hub cache folder {repo_dir} has {len(snapshots)} snapshots and no refs/main naming one: "
                         "pass the snapshots/<hash> folder itself")
    return snapshots[0]


def _snapshot_source(folder: Path, source: str) -> WeightsSource:
    weights = next((folder / n for n in HUB_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise MixkdError(f"hub folder {folder} ({source}) holds no weights file ({', '.join(HUB_WEIGHTS)})")
    config = None
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise MixkdError(f"hub folder {folder}: config.json is not readable JSON ({e})") from None
        if not isinstance(config, dict):
            raise MixkdError(f"hub folder {folder}: config.json is not a JSON object")
    return WeightsSource(weights, config, folder)


def load_model(checkpoint: str, arch: str | None, num_classes: int, flag: str = "--model",
               image_size: int | None = None) -> tuple[torch.nn.Module, str]:
    """A model with the weights of ``checkpoint`` (see the module docstring). ``arch`` may be omitted when
    the checkpoint names its architecture (mixkd checkpoints and hub folders do). ``image_size``: the
    dataset's, which a mixkd run of a fixed-size model (a timm ViT) was built for."""
    model, arch, _, _ = _load(checkpoint, arch, num_classes, flag, image_size)
    return model, arch


def _load(checkpoint: str, arch: str | None, num_classes: int, flag: str, image_size: int | None):
    source = resolve_source(checkpoint)
    ckpt = load_checkpoint(source.path)
    arch = arch or ckpt.model_name or source.architecture
    if not arch:
        raise MixkdError(f"{checkpoint} does not say its architecture; pass {flag} (see 'mixkd models')")
    problem = model_problem(arch)
    if problem:
        raise MixkdError(f"{flag}: {problem}")
    from_library = "format" not in ckpt.meta  # not written by mixkd: a library's (or RepDistiller's) weights
    # a library's weights are for the model at its own input size; a mixkd run's for the dataset's
    model = create_model(arch, num_classes, None if from_library else image_size)
    load_weights(model, ckpt.state_dict, str(source.path), arch)
    return model, arch, source, from_library


def load_teacher(checkpoint: str, arch: str | None, num_classes: int, device, channels_last: bool = False,
                 data: Preprocessing | None = None, teacher_input: str = "auto"
                 ) -> tuple[torch.nn.Module, str]:
    """A frozen teacher in eval mode (see :func:`load_model`), fed its own preprocessing when its weights
    ask for it and ``data`` (the dataset's) differs (see the module docstring); then the returned model
    has a ``preprocess_note`` saying which preprocessing it gets."""
    teacher, arch, source, from_library = _load(checkpoint, arch, num_classes, "--teacher-model",
                                                data.size if data is not None else None)
    note = None
    if data is not None and from_library:
        teacher, note = _with_preprocessing(teacher, arch, source, data, teacher_input)
    teacher.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if note:
        teacher.preprocess_note = note
    return teacher, arch


def _with_preprocessing(teacher: torch.nn.Module, arch: str, source: WeightsSource, data: Preprocessing,
                        teacher_input: str) -> tuple[torch.nn.Module, str | None]:
    if teacher_input not in TEACHER_INPUTS:
        raise ValueError(f"teacher_input must be one of {TEACHER_INPUTS}, got {teacher_input!r}")
    own = pretrained_preprocessing(arch, source.hub_config)
    library_name = ":" in arch
    if own is None or teacher_input == "dataset" or (teacher_input == "auto" and not library_name):
        if own is None or own.same_input(data):
            return teacher, None
        why = "kd.teacher_input: dataset" if teacher_input == "dataset" else f"{arch} is a mixkd name; kd.teacher_input: model uses it"
        return teacher, (f"teacher {arch}: the dataset's preprocessing ({data.describe()}), not its pretrained "
                         f"config's ({own.describe()}; {why})")
    if own.same_input(data):
        return teacher, (f"teacher {arch}: the dataset's preprocessing, which is its pretrained config's "
                         f"({data.describe()})")
    where = "its hub config.json" if source.hub_config and source.hub_config.get("pretrained_cfg") else "its pretrained config"
    return Preprocessed(teacher, data, own), (
        f"teacher {arch}: its own preprocessing from {where} ({own.describe()}; the dataset's crop is kept), "
        f"applied on the device to the batches normalised for the student ({data.describe()})")
