"""Run configuration: validated, loaded from YAML and flags, written back fully resolved.

Precedence: defaults < ``--config`` YAML file < command-line flags < ``key=value`` overrides.
Invalid values are rejected here, before any data is read or any model is built: every number has a
valid range (``mixkd train --help`` shows it beside each flag), a YAML file that repeats a key or whose
aliases expand beyond :data:`MAX_YAML_VALUES` values is refused (:func:`load_yaml`, also used for
study files).
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from mixkd.errors import MixkdError
from mixkd.files import read_text
from mixkd.registry import KD_METHODS, Settings, load_plugin

# The study's step schedule (epochs 150, 180, 210 of 240) as fractions of the run, so a shorter run
# keeps the same shape (80 epochs -> 50, 60, 70).
MILESTONE_FRACTIONS = (0.625, 0.75, 0.875)
# Keys that describe the machine, not the run: a run resumed (elsewhere) takes them from the new command.
MACHINE_KEYS = ("device", "progress", "data_dir", "download", "workers", "tensorboard", "save_every",
                "save_every_minutes", "threads", "track")


def machine_key(key: str) -> bool:
    """Whether dotted config key ``key`` is machine-local (one of :data:`MACHINE_KEYS` or inside one:
    ``track.backend``)."""
    return key.split(".", 1)[0] in MACHINE_KEYS


def _numeric(annotation: Any) -> bool:
    """Whether a field's type holds numbers (int, float, a list of them) and no bool."""
    args = typing.get_args(annotation)
    if args:
        return bool not in args and any(_numeric(a) for a in args)
    return annotation in (int, float)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v: Any, info: ValidationInfo) -> Any:
        """A number is not true/false: pydantic would read ``epochs: true`` as 1 epoch."""
        if _numeric(cls.model_fields[info.field_name].annotation) and (
                isinstance(v, bool) or (isinstance(v, list) and any(isinstance(x, bool) for x in v))):
            raise ValueError("expected a number, not true/false")
        return v


SEED_MAX = 2**63 - 1  # what torch.manual_seed takes


class OptimConfig(_Section):
    lr: float | None = Field(None, gt=0, description="learning rate; default 0.05, 0.01 for MobileNetV2/tv_mobilenet_v2/ShuffleV1/ShuffleV2")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    milestones: list[int] | None = Field(None, description="epochs at which lr is multiplied by lr_decay; default 62.5/75/87.5% of the run")
    lr_decay: float = Field(0.1, gt=0, le=1)


class MixConfig(_Section):
    method: Literal["none", "mixup", "cutmix"] = "none"
    alpha: float = Field(1.0, ge=1e-3, le=1e3, description="Beta(alpha, alpha) for lambda")
    fraction: float = Field(1.0, ge=0, le=1, description="share of each batch that is mixed (1 = full mixup)")
    sampling: Literal["exact", "reference"] = Field("exact", description="'reference' reproduces the released code's with-replacement choice")


def reference_mixed_share(batch_size: int, fraction: float) -> float:
    """Expected share of mixed samples under ``sampling='reference'`` (:func:`mixkd.mix.mixed_mask`): here,
    without torch, for the claims (``mixkd claims`` imports no torch)."""
    return (1.0 - 1.0 / batch_size) ** int(batch_size * (1.0 - fraction))


class TrackConfig(_Section):
    """Where the run is also logged (:mod:`mixkd.tracking`): an experiment tracker. Machine-local: a
    resumed run may change it. ``track: mlflow`` in a YAML file is short for ``track: {backend: mlflow}``."""

    backend: Literal["none", "mlflow", "wandb"] = Field("none", description="experiment tracker: none, mlflow (pip install 'mixkd[mlflow]') or wandb (pip install 'mixkd[wandb]')")
    uri: str | None = Field(None, description="mlflow: the tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory); wandb: the folder of its files (default: $WANDB_DIR, else the working directory)")
    project: str = Field("mixkd", min_length=1, description="the MLflow experiment / W&B project the runs go to")
    parent: str | None = Field(None, description="set by a study: the tracked id of the study's parent run (its runs are its children)")


def kd_context(dataset: str | None, model: str | None, teacher_model: str | None) -> dict[str, str]:
    """What a KD method's per-context defaults match (:meth:`mixkd.registry.Entry.defaults`): the
    dataset and, when the teacher's architecture is known, the pair ``teacher->student``."""
    context = {"dataset": dataset} if dataset else {}
    if teacher_model and model:
        context["pair"] = f"{teacher_model}->{model}"
    return context


def _teacher_architecture(kd: dict[str, Any]) -> str | None:
    """The teacher's architecture: ``kd.teacher_model``, else what its checkpoint's header says (None
    when it says nothing or cannot be read: the checks of mixkd.validate say why, later)."""
    if kd.get("teacher_model"):
        return kd["teacher_model"]
    teacher = kd.get("teacher")
    if not isinstance(teacher, str) or not teacher:
        return None
    from mixkd.header import CHECKPOINT_NAME, checkpoint_header

    path = Path(teacher).expanduser()
    try:
        meta = checkpoint_header(path / CHECKPOINT_NAME if path.is_dir() else path)
    except (MixkdError, OSError, ValueError):
        return None
    model = meta.get("model")
    return model if isinstance(model, str) else None


class KDConfig(_Section):
    """The teacher, the KD method and its settings: ``kd.method`` and one flat ``kd.<setting>`` key per
    setting of that method (its typed settings in :data:`mixkd.registry.KD_METHODS`). A setting left out
    takes the method's default for the run (its authors', per dataset and teacher->student pair where they
    have them) and is written back resolved; one the method does not have is refused, and so is a method
    that is not registered (load a method of your own with ``plugins:`` / ``--plugin FILE``)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    teacher: str | None = Field(None, description="teacher checkpoint: a mixkd run dir/checkpoint, a RepDistiller .pth, a timm .safetensors/.pth or torchvision .pth, a Hugging Face hub cache folder or hf-hub:ORG/NAME (local cache, offline)")
    teacher_model: str | None = Field(None, description="teacher architecture (needed for a .pth: tv:resnet34 for torchvision's resnet34 weights, timm:resnet18 for timm's; a hub folder names its own)")
    method: str = Field("kd", description="a registered KD method (mixkd.registry.KD_METHODS: mixkd/methods/, or a plugin's)")
    teacher_input: Literal["auto", "model", "dataset", "model_crop"] = Field("auto", description="the teacher's input preprocessing: auto: its pretrained config's (size, mean, std, interpolation; its crop on evaluation views only) when its weights come from a library file and its name is timm:/tv:, else the dataset's; model: its pretrained config's for the tv_* names too; dataset: always the dataset's; model_crop: as model, its crop applied to the training views too (docs/models.md)")

    @model_validator(mode="before")
    @classmethod
    def _settings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return resolve_kd(data, {})

    def settings(self) -> Settings:
        """The method's typed settings (resolved already: the values held here)."""
        return KD_METHODS.get(self.method).resolve(self.model_extra, where="kd")

    def params(self) -> dict[str, Any]:
        """The method's settings, resolved, by name."""
        return dict(self.model_extra or {})


# The kd keys of every method: where the teacher is, what it is, and what input it gets.
TEACHER_KEYS = ("teacher", "teacher_model", "teacher_input")


def resolve_kd(kd: dict[str, Any], context: dict[str, str]) -> dict[str, Any]:
    """The ``kd`` section ``kd`` with its method's settings resolved for ``context`` (a setting given as
    None is unset). An unregistered method, a setting the method does not have or an invalid value:
    one :class:`MixkdError` line."""
    method = kd.get("method", "kd")
    if not isinstance(method, str):
        raise MixkdError(f"kd.method must be a method's name, got {method!r}")
    own = {k: kd[k] for k in TEACHER_KEYS if k in kd}
    given = {k: v for k, v in kd.items() if k not in (*TEACHER_KEYS, "method")}
    settings = KD_METHODS.get(method).resolve(given, context, where="kd")
    return {**own, "method": method, **settings.model_dump()}


class RunConfig(_Section):
    task: Literal["train", "distill"] = "train"
    model: str = Field("resnet8x4", description="architecture trained (the student when distilling)")
    dataset: Literal["cifar100", "cifar10", "digits", "imagefolder"] = "cifar100"
    data_dir: str = "./data"
    download: bool = False
    image_size: int | None = Field(None, ge=8, le=4096, description="imagefolder crop size (default 224)")
    epochs: int = Field(240, ge=1, le=100_000)
    batch_size: int = Field(64, ge=2, le=65_536)
    eval_batch_size: int = Field(1024, ge=1, le=1_000_000)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:N")
    out: str | None = Field(None, description="run directory")
    save_every: int = Field(10, ge=1, le=100_000, description="checkpoint every N epochs (and at the end)")
    save_every_minutes: float = Field(10.0, ge=0, le=1e6, description="also checkpoint mid-epoch every M minutes (0: never)")
    workers: int | None = Field(None, ge=0, le=256, description="data-loading processes (image folders only); default: the cores available, at most 4")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads of torch in mixkd train/distill (default: torch's own, which OMP_NUM_THREADS sets, else the cores); a study's are its --threads")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on the CPU; bf16: forward passes under bf16 autocast, channels-last; losses stay fp32")
    graph: bool = Field(True, description="on CUDA, capture the training step as a CUDA graph (false: eager)")
    sync_bn: bool = Field(False, description="data-parallel runs (torchrun, srun): BatchNorm with the statistics of the global batch; no effect on one process")
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the teacher and student inside the step; auto: on for CUDA runs of in-memory datasets (24-37% faster on an H100), off on the CPU and for imagefolder")
    tensorboard: bool = False
    progress: bool = True
    augment: str = Field("flip_crop", min_length=1, max_length=500, description="augmentation policies joined by '+': per-sample ones (none, flip, flip_crop, cutout, autoaugment, randaugment, trivialaugment, random_erasing, or a plugin's), then at most one batch policy (mixup, cutmix, cutmix_pick); docs/augmentation.md")
    augment_settings: dict[str, dict[str, Any]] = Field(default_factory=dict, description="settings of the augment policies by name, e.g. {cutout: {size: 8}, randaugment: {magnitude: 14}}")
    teacher_view: Literal["same", "independent", "clean"] = Field("same", description="what the teacher sees: same (the student's augmented, mixed batch), independent (its own draw of the augmentation and mix), clean (the un-augmented image)")
    optim: OptimConfig = OptimConfig()
    mix: MixConfig = MixConfig()
    kd: KDConfig = Field(default_factory=KDConfig)
    plugins: list[str] = Field([], description="plugin files (.py) or modules that register KD methods of your own "
                               "(mixkd.registry.load_plugin); relative paths are from the config file's folder")
    track: TrackConfig = TrackConfig()

    @field_validator("track", mode="before")
    @classmethod
    def _track(cls, v: Any) -> Any:
        return {"backend": v} if isinstance(v, str) else v  # track: mlflow

    @model_validator(mode="before")
    @classmethod
    def _plugins_and_kd(cls, data: Any) -> Any:
        """Load the plugins (before anything names what they register), then resolve the KD method's
        settings for this run's dataset and teacher->student pair."""
        if not isinstance(data, dict):
            return data
        plugins = data.get("plugins") or []
        if not isinstance(plugins, list):
            plugins = [plugins]
        data = {**data, "plugins": [load_plugin(p).ref if isinstance(p, str) else p for p in plugins]}
        kd = data.get("kd")
        if kd is None or isinstance(kd, dict):
            kd = dict(kd or {})
            teacher = _teacher_architecture(kd) if data.get("task") == "distill" else None
            context = kd_context(data.get("dataset", "cifar100"), data.get("model", "resnet8x4"), teacher)
            data["kd"] = resolve_kd(kd, context)
        return data

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, v: Any) -> Any:
        return ("on" if v else "off") if isinstance(v, bool) else v  # YAML reads a bare on/off as a bool

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.task == "distill" and not self.kd.teacher:
            raise ValueError("kd.teacher: distillation needs a teacher checkpoint (--teacher)")
        m = self.optim.milestones
        if m is not None and any(e < 1 or e > 100_000 for e in m):
            raise ValueError("optim.milestones: epochs must be in [1, 100000]")
        if m is not None and m != sorted(m):
            raise ValueError(f"optim.milestones {m}: give the epochs in increasing order ({sorted(m)})")
        if m is not None and m and m[-1] > self.epochs:
            raise ValueError(f"optim.milestones {m}: epoch {m[-1]} is past the last epoch ({self.epochs}), where the "
                             "lr never changes; drop it or choose the milestones of this run (--milestones, optim.milestones)")
        return self

    def milestones(self) -> list[int]:
        if self.optim.milestones is not None:
            return list(self.optim.milestones)
        return [round(f * self.epochs) for f in MILESTONE_FRACTIONS]

    def milestone_note(self) -> str | None:
        """A note where the default schedule (62.5/75/87.5% of the run, rounded) squeezes two decays
        into one epoch of a short run (``--epochs 3``: [2, 2, 3], the lr falls 100x for the last epoch)."""
        used = [e for e in self.milestones() if e < self.epochs]  # a milestone at the end never applies
        if self.optim.milestones is not None or len(set(used)) == len(used):
            return None
        factors = ", ".join(f"x{self.optim.lr_decay ** sum(e >= m for m in used):g}" for e in range(self.epochs))
        return (f"note: with {self.epochs} epochs the default milestones are {self.milestones()} (62.5/75/87.5% of "
                f"the run, rounded): the lr of each epoch is {factors} the base lr; set --milestones to choose")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def resolve_precision(precision: str, device_type: str) -> str:
    """The precision a run uses: ``auto`` is bf16 on CUDA (same accuracy, about 1.4x the speed; see
    BENCHMARKS.md) and fp32 elsewhere; ``fp32`` and ``bf16`` are kept as they are."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise MixkdError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return precision


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    given = first.get("input")
    got = "" if first["type"] == "extra_forbidden" or isinstance(given, dict) else f" (got {given!r})"
    more = f"; and {len(err.errors()) - 1} more problem(s)" if len(err.errors()) > 1 else ""
    if not first["loc"]:  # a check of the whole config: its message names the key
        return f"invalid {source}: {msg}{more}"
    return f"invalid {source}: {loc}: {msg}{got}{more}"


def value_range(key: str) -> str | None:
    """The valid range of a numeric config key (dotted), as ``[0, 1)``; None for other keys."""
    model: type[BaseModel] = RunConfig
    *sections, name = key.split(".")
    for s in sections:
        model = model.model_fields[s].annotation
    field = model.model_fields.get(name)
    return None if field is None else field_range(field)


def field_range(field: FieldInfo) -> str | None:
    """The valid range of a numeric pydantic field, as ``[0, 1)``; None when it has no bounds."""
    def num(v) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    low = high = None
    for m in field.metadata:
        for attr, bracket in (("ge", "["), ("gt", "(")):
            if getattr(m, attr, None) is not None:
                low = f"{bracket}{num(getattr(m, attr))}"
        for attr, bracket in (("le", "]"), ("lt", ")")):
            if getattr(m, attr, None) is not None:
                high = f"{num(getattr(m, attr))}{bracket}"
    if low is None and high is None:
        return None
    return f"{low or '(-inf'}, {high or 'inf)'}"


MAX_YAML_VALUES = 100_000  # values a YAML file may expand to, aliases counted each time they are used


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} is given twice (lines {seen[key]} and "
                            f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
                    seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _expanded_size(root) -> int:
    """How many values the node graph stands for once every alias is expanded (each distinct node
    is counted once and its size reused, so a 'billion laughs' file is measured without expanding it)."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a recursive alias counts once
        children = [v for kv in node.value for v in kv] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        total = 1 + sum(size(c) for c in children)
        sizes[id(node)] = min(total, MAX_YAML_VALUES + 1)
        return sizes[id(node)]

    return size(root)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML ``text`` safely: one :class:`MixkdError` naming ``source`` (and the line) for invalid
    YAML, a repeated key, or aliases that expand beyond :data:`MAX_YAML_VALUES` values."""
    try:
        root = yaml.compose(text, Loader=_StrictLoader)
        if root is None:
            return None
        if _expanded_size(root) > MAX_YAML_VALUES:
            raise MixkdError(f"{source} expands to more than {MAX_YAML_VALUES:,} values through YAML aliases "
                             "(&anchor / *alias): write the values out")
        loader = _StrictLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise MixkdError(f"{source}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    except RecursionError:
        raise MixkdError(f"{source} nests its values too deeply to be a mixkd file") from None


def int_in(low: int, high: int, flag: str):
    """An argparse ``type``: an integer in [low, high]; out of range, a :class:`MixkdError` naming
    ``flag`` (one line, as every bad input; ``mixkd``'s main prints it)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise MixkdError(f"{flag} must be in [{low}, {high}], got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise MixkdError(f"config file not found: {p}")
    data = load_yaml(read_text(p, f"config file {p}"), f"config file {p}") or {}
    if not isinstance(data, dict):
        raise MixkdError(f"config file {p} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree['a']['b'] = value for key 'a.b' (dashes in key parts read as underscores)."""
    parts = [p.replace("-", "_") for p in key.split(".")]
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise MixkdError(f"override {key}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'mix.fraction=0.1' -> ('mix.fraction', 0.1); values are parsed as YAML scalars."""
    if "=" not in text:
        raise MixkdError(f"cannot read override '{text}': write key=value, e.g. mix.fraction=0.1")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def build_config(file: str | Path | None = None, flags: dict[str, Any] | None = None,
                 overrides: list[str] | None = None) -> RunConfig:
    """Merge defaults, a YAML file, flags (dotted keys -> values, None = not given) and overrides."""
    tree: dict[str, Any] = read_yaml(file) if file else {}
    if file and isinstance(tree.get("plugins"), str | list):  # relative to the config file's folder
        listed = tree["plugins"] if isinstance(tree["plugins"], list) else [tree["plugins"]]
        tree["plugins"] = [load_plugin(p, Path(file).parent).ref if isinstance(p, str) else p for p in listed]
    flags = dict(flags or {})
    given = flags.pop("plugins", None) or []  # --plugin: relative to the working directory, added to the file's
    if given:
        tree["plugins"] = list(dict.fromkeys([*(tree.get("plugins") or []), *(load_plugin(p).ref for p in given)]))
    for key, value in flags.items():
        if value is not None:
            set_dotted(tree, key, value)
    for text in overrides or []:
        set_dotted(tree, *parse_override(text))
    source = f"config {file}" if file else "config"
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise MixkdError(_format_validation_error(e, source)) from None
    except MixkdError as e:
        raise MixkdError(f"invalid {source}: {e}") from None


def load_run_config(path: str | Path) -> RunConfig:
    return build_config(file=path)
