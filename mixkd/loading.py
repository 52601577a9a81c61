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
``dataset`` never; ``model_crop`` as ``model``, its crop applied to the training views too); the
choice is said in the run's log.

The model's crop (its pretrained config's ``crop_pct``) is an evaluation setting, applied where the
model is evaluated or sees an evaluation view:

* its accuracy on an image folder (``mixkd eval`` of library weights, a distillation's teacher check):
  the test split is read through the model's own eval transform when it differs from the dataset's
  (:func:`own_test_view`);
* its evaluation views on the device (the ``clean`` teacher view, an in-memory dataset's test batches):
  a tighter crop than the dataset's is a centre crop then the resize; a wider one is kept, said in the log;
* the training views (``same``/``independent`` teacher views: random crops that the student sees too)
  keep the student's field of view: the teacher was trained on such random crops, not on its
  evaluation crop, and its logits should describe the image the student is fitted on;
  ``kd.teacher_input: model_crop`` crops them too (the teacher then sees a narrower field than the student).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from mixkd.checkpoint import load_checkpoint, load_weights
from mixkd.data import ArraySplit, DataSpec
from mixkd.data.imagefolder import IndexedImageFolder, with_test_transform
from mixkd.errors import MixkdError
from mixkd.header import CHECKPOINT_NAME
from mixkd.models import create_model, model_problem
from mixkd.models.preprocess import Preprocessed, Preprocessing, crop_ratio, pretrained_preprocessing
from mixkd.run_folder import HUB_PREFIX

HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
TEACHER_INPUTS = ("auto", "model", "dataset", "model_crop")
# views that are the dataset's evaluation view: the clean teacher view (mixkd.data.layout), the test split
EVAL_VIEWS = ("clean", "test")


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


def load_for_eval(checkpoint: str, arch: str | None, spec: DataSpec
                  ) -> tuple[torch.nn.Module, str, DataSpec, str | None]:
    """:func:`load_model` for evaluating on ``spec``'s test split: a ``timm:``/``tv:`` model with a library's
    weights gets its own preprocessing (on an image folder its own eval transform, see :func:`own_test_view`;
    on an in-memory dataset on the device, crop included). Returns the model, its name, the spec to
    evaluate on (``spec``, or its test split read through the model's eval transform) and the log line
    saying which preprocessing was used (None: the dataset's, no model's)."""
    model, arch, source, from_library = _load(checkpoint, arch, spec.num_classes, "--model", spec.image_size)
    own = _own(arch, source, "auto") if from_library else None
    if own is None:
        return model, arch, spec, None
    if isinstance(spec.test, IndexedImageFolder):
        view = own_test_view(spec, own, arch)
        return (model, arch, spec, None) if view is None else (model, arch, *view)
    model, note = _with_own(model, arch, source, _data_preprocessing(spec), own, crop_view=True)
    return model, arch, spec, note


def _data_preprocessing(spec: DataSpec) -> Preprocessing:
    """The dataset's test view as a :class:`Preprocessing` (an image folder's: bilinear resize, centre crop)."""
    return Preprocessing(spec.image_size, spec.mean, spec.std, "bilinear", spec.crop_pct,
                         resize=round(spec.image_size / spec.crop_pct))


def own_test_view(spec: DataSpec, own: Preprocessing | None, label: str) -> tuple[DataSpec, str] | None:
    """An image folder's ``spec`` whose test split is read through ``own``'s eval transform (the library's
    own), and the log line saying so, where ``own``'s evaluation view differs from the dataset's test
    view; None where the dataset's is kept (the same view, no model preprocessing, not an image folder)."""
    if own is None or own.transforms is None or not isinstance(spec.test, IndexedImageFolder):
        return None
    data = _data_preprocessing(spec)
    if own.same_eval(data):
        return None
    return with_test_transform(spec, own.eval_transform()), (
        f"{label} evaluated with its own eval transform ({own.describe()}), not the dataset's test "
        f"transform ({data.describe()})")


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
                 data: Preprocessing | None = None, teacher_input: str = "auto", view: str = "same"
                 ) -> tuple[torch.nn.Module, str]:
    """A frozen teacher in eval mode (see :func:`load_model`), fed its own preprocessing when its weights
    ask for it and ``data`` (the dataset's: its ``crop_pct`` that of the dataset's test view) differs (see
    the module docstring); ``view``: what the teacher reads, a teacher view of the distillation (``same``, ``independent``,
    ``clean``: :data:`mixkd.data.layout.TEACHER_VIEWS`) or ``test`` (the test split, as ``mixkd analyze``
    reads it), which decides whether its crop applies. Then the
    returned model has a ``preprocess_note`` saying which preprocessing it gets, and, where it gets its
    own, ``pretrained_preprocessing`` (for :func:`own_test_view`)."""
    if teacher_input not in TEACHER_INPUTS:
        raise ValueError(f"teacher_input must be one of {TEACHER_INPUTS}, got {teacher_input!r}")
    teacher, arch, source, from_library = _load(checkpoint, arch, num_classes, "--teacher-model",
                                                data.size if data is not None else None)
    note, own = None, None
    if data is not None and from_library:
        own = _own(arch, source, teacher_input)
        if own is None:
            note = _dataset_note(arch, source, data, teacher_input)
        else:
            crop_view = view in EVAL_VIEWS or teacher_input == "model_crop"
            teacher, note = _with_own(teacher, arch, source, data, own, crop_view, view)
    teacher.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if note:
        teacher.preprocess_note = note
    if own is not None:
        teacher.pretrained_preprocessing = own
    return teacher, arch


def _own(arch: str, source: WeightsSource, teacher_input: str) -> Preprocessing | None:
    """The pretrained config's preprocessing that ``teacher_input`` gives the model; None: the dataset's."""
    if teacher_input == "dataset" or (teacher_input == "auto" and ":" not in arch):
        return None
    return pretrained_preprocessing(arch, source.hub_config)


def _dataset_note(arch: str, source: WeightsSource, data: Preprocessing, teacher_input: str) -> str | None:
    own = pretrained_preprocessing(arch, source.hub_config)
    if own is None or own.same_input(data):
        return None
    why = "kd.teacher_input: dataset" if teacher_input == "dataset" else f"{arch} is a mixkd name; kd.teacher_input: model uses it"
    return (f"teacher {arch}: the dataset's preprocessing ({data.describe()}), not its pretrained "
            f"config's ({own.describe()}; {why})")


def _with_own(model: torch.nn.Module, arch: str, source: WeightsSource, data: Preprocessing, own: Preprocessing,
              crop_view: bool, view: str = "evaluation") -> tuple[torch.nn.Module, str]:
    """``model`` fed ``own`` on the device (renormalised, cropped where ``crop_view`` and its crop is
    tighter than ``data``'s, resized), and the log line saying so."""
    label = f"teacher {arch}" if view != "evaluation" else arch
    ratio = crop_ratio(own, data) if crop_view else None
    crop = ratio if ratio is not None and ratio < 1 - 1e-6 else None
    if not crop_view:
        crop_note = (f"its crop {own.crop_pct:g} is an evaluation setting: the {view} training view is "
                     "kept, as the student sees it (kd.teacher_input: model_crop applies it)") if own.crop_pct else None
    elif ratio is None:
        crop_note = "the dataset's crop is kept"
    elif crop is not None:
        crop_note = (f"its crop {own.crop_pct:g} applied: a centre crop of {crop:.4g} of the {view} view's side "
                     f"(the dataset's crop {data.crop_pct:g}), then resized to {own.size}")
    elif ratio > 1 + 1e-6:
        crop_note = (f"its crop {own.crop_pct:g} is wider than the dataset's {data.crop_pct:g}, which cannot be "
                     "recovered from the cropped images: the dataset's crop is kept")
    else:
        crop_note = f"its crop is the dataset's ({data.crop_pct:g})"
    crop_note = f"; {crop_note}" if crop_note else ""
    if own.same_input(data) and crop is None:
        return model, (f"{label}: the dataset's batches as they are, which have its pretrained config's size, mean and "
                       f"std ({dataclasses.replace(data, crop_pct=None).describe()}){crop_note}")
    where = "its hub config.json" if source.hub_config and source.hub_config.get("pretrained_cfg") else "its pretrained config"
    return Preprocessed(model, data, own, crop), (
        f"{label}: its own preprocessing from {where} ({own.describe()}{crop_note}), applied on the device to "
        f"the batches normalised for the {'student' if view != 'evaluation' else 'dataset'} ({data.describe()})")



def teacher_accuracy_input(teacher: torch.nn.Module, spec: DataSpec, data: Preprocessing
                           ) -> tuple[tuple[DataSpec, str] | None, torch.nn.Module, list[str]]:
    """What the accuracy check of a teacher of :func:`load_teacher` reads: on an image folder, the test split
    through its own eval transform (:func:`own_test_view`, or None: the run's test batches); the module to
    evaluate on the run's test batches (``data``: the dataset's test view): the teacher, with its crop on
    the device where its distillation view is an uncropped training view; and the log lines saying so."""
    own = getattr(teacher, "pretrained_preprocessing", None)
    name = getattr(teacher, "mixkd_name", "")
    test_view = own_test_view(spec, own, f"teacher {name}: its accuracy")
    if test_view is not None:
        return test_view, teacher, [test_view[1]]
    ratio = crop_ratio(own, data) if own is not None and isinstance(spec.test, ArraySplit) else None
    if ratio is None or ratio >= 1 - 1e-6 or (isinstance(teacher, Preprocessed) and teacher.crop is not None):
        return None, teacher, []
    inner = teacher.model if isinstance(teacher, Preprocessed) else teacher
    device = next(inner.parameters()).device
    return None, Preprocessed(inner, data, own, ratio).to(device), [
        f"teacher {name}: its accuracy on the test batches with its crop {own.crop_pct:g} (a centre crop of "
        f"{ratio:.4g} of their side, then resized to {own.size}, on the device)"]
