"""Check a run's config before anything is created: every problem found, in one error.

:func:`validate_run_config` runs the cheap checks first and collects what each finds, so that a
user with several mistakes reads them all at once: config values, model names (with the closest
names), the device, the teacher checkpoint named on the command line (its header only), the data
(folders and files present, not loaded) and the batch size against the dataset's size where that
is known cheaply. It reads a few bytes at most and creates nothing on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mixkd.augment import batch_method, parse_augment
from mixkd.config import RunConfig, read_yaml
from mixkd.data import check_dataset, dataset_num_classes
from mixkd.data.layout import BatchLayout
from mixkd.distiller import method_names
from mixkd.errors import MixkdError
from mixkd.header import checkpoint_header
from mixkd.loading import is_hub_source, resolve_source
from mixkd.models import available_models, model_problem
from mixkd.models.external import split_name
from mixkd.registry import KD_METHODS
from mixkd.run_folder import CHECKPOINT_NAME, CONFIG_NAME
from mixkd.tracking import tracker_problem


def validate_run_config(cfg: RunConfig) -> None:
    """Raise one :class:`MixkdError` listing every problem :func:`run_config_problems` finds."""
    problems = run_config_problems(cfg)
    if problems:
        raise MixkdError(format_problems(problems))


def format_problems(problems: list[str]) -> str:
    """One line: the problem itself, or 'N problems: (1) ...; (2) ...'."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))


def run_config_problems(cfg: RunConfig) -> list[str]:
    """Every problem found in ``cfg``, cheapest checks first (see the module docstring)."""
    problems = _value_problems(cfg)
    problems += _method_problems(cfg)
    problems += augment_problems(cfg)
    problems += _model_problems(cfg)
    problems += _device_problems(cfg.device)
    problems += _out_problems(cfg.out)
    problems += _tracker_problems(cfg.track.backend)
    if cfg.task == "distill" and cfg.kd.teacher:
        problems += teacher_problems(cfg.kd.teacher, cfg.kd.teacher_model,
                                     dataset_num_classes(cfg.dataset, cfg.data_dir), cfg.dataset)
    problems += check_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, image_size=cfg.image_size,
                              batch_size=cfg.batch_size)
    return problems


def machine_problems(configs: list[dict[str, Any]]) -> list[str]:
    """What would fail every run of a study on this machine, checked once before any run starts: each
    device asked for (CUDA where there is none) and each dataset's files (one line per distinct
    problem, whatever the number of runs it would stop)."""
    problems: list[str] = []
    for device in dict.fromkeys(str(c.get("device", "auto")) for c in configs):
        problems += _device_problems(device)
    for backend in dict.fromkeys(str((c.get("track") or {}).get("backend", "none")) for c in configs):
        problems += _tracker_problems(backend)
    data = dict.fromkeys((c.get("dataset", "cifar100"), c.get("data_dir", "./data"), bool(c.get("download")),
                          c.get("image_size")) for c in configs)
    for dataset, data_dir, download, image_size in data:
        problems += check_dataset(dataset, data_dir, download=download, image_size=image_size)
    return list(dict.fromkeys(problems))


# ---- config values ---------------------------------------------------------------------------

def _value_problems(cfg: RunConfig) -> list[str]:
    """The config's own rules, checked again (a config changed with ``model_copy`` skips them)."""
    try:
        RunConfig.model_validate(cfg.model_dump())
    except ValidationError as e:
        out = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            out.append(f"{loc}: {msg} (got {err['input']!r})" if not isinstance(err.get("input"), dict) else f"{loc}: {msg}")
        return out
    return []


def _method_problems(cfg: RunConfig) -> list[str]:
    """``kd.method`` names a registered distiller that takes a teacher (checked for every task, so a
    config's typo is caught before it is distilled from)."""
    names = method_names()
    return [] if cfg.kd.method in names else [KD_METHODS.unknown_message(cfg.kd.method, names)]


def augment_problems(cfg: RunConfig) -> list[str]:
    """``augment``, ``augment_settings`` and ``teacher_view`` against each other and the run."""
    try:
        entries = parse_augment(cfg.augment)
    except MixkdError as err:
        return [str(err)]
    problems = []
    names = [e.name for e in entries]
    for name, values in cfg.augment_settings.items():
        if name not in names:
            problems.append(f"augment_settings.{name}: augment ({cfg.augment}) does not use {name}; remove it")
            continue
        try:
            next(e for e in entries if e.name == name).resolve(values, where=f"augment_settings.{name}")
        except MixkdError as err:
            problems.append(str(err))
    batch = batch_method(cfg.augment)
    if batch != "none" and cfg.mix.method not in ("none", batch):
        problems.append(f"augment: {cfg.augment} mixes with {batch} but mix.method (--mix) is {cfg.mix.method}: "
                        "name the batch policy once (in augment, or with --mix)")
    if batch == "cutmix_pick" and cfg.task != "distill":
        problems.append("augment: cutmix_pick picks by the teacher's scores: it needs distill with a teacher")
    if cfg.teacher_view != "same" and cfg.task != "distill":
        problems.append(f"teacher_view: {cfg.teacher_view} needs distill (train has no teacher); remove it")
    if cfg.teacher_view != "same" and batch == "cutmix_pick":
        problems.append("teacher_view: cutmix_pick scores the student's candidates with the teacher: use teacher_view: same")
    if cfg.task == "distill" and cfg.kd.method in KD_METHODS:  # what the method reads, against the teacher's view
        try:
            BatchLayout.for_method(tuple(KD_METHODS.get(cfg.kd.method).obj.inputs), cfg.teacher_view)
        except ValueError as exc:
            problems.append(f"teacher_view: {cfg.teacher_view} with kd.method {cfg.kd.method}: {exc}")
    return problems


def _model_problems(cfg: RunConfig) -> list[str]:
    names = [cfg.model]
    if cfg.task == "distill" and cfg.kd.teacher_model:
        names.append(cfg.kd.teacher_model)
    problems = [(i, model_problem(n)) for i, n in enumerate(names)]
    return [("" if i == 0 else "teacher: ") + p for i, p in problems if p]


def _tracker_problems(backend: str) -> list[str]:
    problem = tracker_problem(backend)
    return [problem] if problem else []


# ---- device and output folder ----------------------------------------------------------------

def _device_problems(device: str) -> list[str]:
    if not device.startswith("cuda"):
        return []
    import torch

    if not torch.cuda.is_available():
        return [f"device '{device}' asked for, but CUDA is not available here; use --device cpu (or auto)"]
    index = device.partition(":")[2]
    if index.isdigit() and int(index) >= torch.cuda.device_count():
        return [f"device '{device}' asked for, but there are only {torch.cuda.device_count()} CUDA device(s) "
                f"here (cuda:0..cuda:{torch.cuda.device_count() - 1})"]
    return []


def _out_problems(out: str | None) -> list[str]:
    """--out must be a folder, or creatable as one, by this user."""
    if not out:
        return []
    p = Path(out).expanduser()
    if p.exists():
        if not p.is_dir():
            return [f"--out {p} is a file, not a folder: choose another --out"]
        return [] if os.access(p, os.W_OK | os.X_OK) else [f"--out {p} is not writable by this user"]
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return [f"--out {p} cannot be created: {parent} is a file"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"--out {p} cannot be created: {parent} is not writable (a read-only file system?)"]
    return []


# ---- teacher checkpoint ----------------------------------------------------------------------

def teacher_problems(teacher: str, teacher_model: str | None, num_classes: int | None,
                     dataset: str) -> list[str]:
    """Problems with a teacher checkpoint, read from its header only: a missing or unreadable file,
    a truncated one, an architecture it does not name (then ``--teacher-model`` is needed), a class
    count that is not the dataset's."""
    if is_hub_source(teacher):
        try:
            source = resolve_source(teacher)
        except MixkdError as e:
            return [f"teacher {e}"]
        if not teacher_model and not source.architecture:
            return [f"teacher {teacher}: its config.json names no architecture: pass --teacher-model"]
        teacher, teacher_model = str(source.path), teacher_model or source.architecture
    p = Path(teacher).expanduser()
    if not p.exists():
        if teacher in available_models() or split_name(teacher):
            return [f"teacher {teacher!r} is an architecture name, not a checkpoint: pass a run directory, "
                    ".safetensors or .pth as --teacher (and the architecture as --teacher-model)"]
        return [f"teacher checkpoint not found: {p}"]
    if p.is_dir():
        if not (p / CHECKPOINT_NAME).is_file():
            return [f"teacher {p} is a folder without {CHECKPOINT_NAME}: pass a finished mixkd run directory, "
                    "a .safetensors or .pth, or a Hugging Face hub cache folder (models--ORG--NAME)"]
        p = p / CHECKPOINT_NAME
    try:
        meta = checkpoint_header(p)
    except MixkdError as e:
        return [f"teacher {e}"]
    except OSError as e:
        return [f"teacher checkpoint {p} cannot be read ({e.strerror or e})"]
    problems = []
    if not teacher_model and not meta.get("model"):
        problems.append(f"teacher checkpoint {p} does not say its architecture: pass --teacher-model "
                        "(see 'mixkd models')")
    trained_for = meta.get("num_classes")
    if isinstance(trained_for, int) and num_classes is not None and trained_for != num_classes:
        problems.append(f"teacher checkpoint {p} was trained for {trained_for} classes but {dataset} has "
                        f"{num_classes}: use a teacher trained on {dataset}")
    return problems


def unfinished_teacher_note(teacher: str | Path) -> str | None:
    """A warning where a teacher checkpoint is that of an unfinished run (it still holds the optimizer
    state, which a finished mixkd run drops): its weights are those of the epoch it reached."""
    p = Path(teacher).expanduser()
    path = p / CHECKPOINT_NAME if p.is_dir() else p
    try:
        meta = checkpoint_header(path)
    except (MixkdError, OSError):
        return None
    if "optimizer" not in meta:
        return None
    planned = ""
    try:
        epochs = read_yaml(path.parent / CONFIG_NAME).get("epochs")
        planned = f" of {epochs}" if isinstance(epochs, int) else ""
    except MixkdError:
        pass
    return (f"warning: the teacher {p} is an unfinished run (epoch {meta.get('epoch', '?')}{planned}): this "
            "distillation learns from its weights as they are now; finish the teacher first for the real thing")

