"""Study files: a validated grid of teacher and student runs, expanded into run ids and configs.

A study file (YAML) holds ``name``, ``defaults`` (RunConfig keys shared by every run), ``teachers``
(groups: ``models`` x ``mix`` settings x ``seeds``, or one external ``checkpoint`` + ``model``) and
``students`` (groups: ``models`` or ``pairs`` x ``teachers`` (group names) x ``methods`` x
``temperatures`` x ``fractions`` x ``alphas`` x ``mix_modes`` x ``samplings`` x ``seeds``). Each group
may add a ``recipe`` of RunConfig keys. See ``configs/studies/`` for examples.

``samplings`` (``exact``, ``reference``: ``mix.sampling``, how partial mixup picks the samples it
mixes) applies to the methods that mix partially (``kd_pmu``, ``std_pmu``) and multiplies only their
runs: full mixup mixes every sample under either sampling (``reference`` draws int(B x 0) = 0 unmixed
indices), and the other methods do not mix. A group without ``samplings:`` keeps the ``mix.sampling``
of its ``defaults:`` / ``recipe:`` / ``--set`` (``exact`` unless set), as before the axis existed; a
group with it may not also set ``recipe.mix.sampling``, and ``--set mix.sampling`` is then refused.
Runs with ``exact`` sampling keep the ids they had before the axis (no sampling part); a partial-mixup
run with ``reference`` sampling ends in ``-ref`` before its seed, whichever way it was asked for (so PMU
runs made with ``reference`` through ``defaults:`` / ``--set`` before the axis existed, under ids without
``-ref``, are planned anew). A run declared by two groups is compared as a validated RunConfig, so a key
one group leaves at its default (``mix.sampling: exact``) does not make it another run.

``analysis`` (top level, and per group to override it) asks for ``mixkd analyze`` after each run::

    analysis: {enabled: true, subset: 200, batch_size: 1000, seed: 0,
               tsne_pair: {teacher: mixup, student: resnet8}}   # top level only: the report's t-SNE montage
    students:
      - {name: mixt, ..., analysis: false}                       # not this group's runs

``analysis: true`` / ``false`` is short for ``{enabled: true / false}``; a group's ``analysis``
mapping is merged over the top-level one and means ``enabled: true`` unless it says otherwise. A run
declared by two groups is analyzed when either asks for it.

Every run gets a stable, readable id that is also its directory in the study folder, e.g.
``teachers/resnet56_mixup-s0`` or ``students/resnet20-from-resnet56_mixup-kd_pmu-T4-f0.1-s0``.
An axis appears in an id only where it applies (no temperature for standardized KD, no fraction
or sampling without partial mixup), so the same run declared by two groups is one run, e.g.
``students/resnet20-from-resnet56_mixup-kd_pmu-T4-f0.1-ref-s0`` for reference sampling.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from mixkd import __version__
from mixkd.augment import parse_augment
from mixkd.config import (
    MACHINE_KEYS,
    TEACHER_KEYS,
    RunConfig,
    load_yaml,
    machine_key,
    parse_override,
    set_dotted,
)
from mixkd.distiller import KDSettings, method_names
from mixkd.errors import MixkdError
from mixkd.files import read_text
from mixkd.models import default_lr, model_slug
from mixkd.registry import KD_METHODS, load_plugin
from mixkd.run_folder import CHECKPOINT_NAME, names_run, relative_teacher


@dataclass(frozen=True)
class Method:
    """A student's method in the catalogue: the id part, the report's column title, and what it does."""

    name: str  # its key in METHODS and its part of run ids
    label: str  # column title in the report
    task: Literal["train", "distill"]
    kd: str | None  # the KD method (mixkd.registry.KD_METHODS), None for the student alone
    mixing: Literal["none", "full", "partial"]


_MIXINGS = (("", "none", ""), ("_fmu", "full", " + full mixup"), ("_pmu", "partial", " + partial mixup"))


class StudyMethods(Mapping):
    """The study's methods: the student alone, and every KD method registered (built in, or loaded from a
    plugin) alone, with full (``_fmu``) and with partial (``_pmu``) mixup; read from the registry each
    time, so that a plugin's methods are there once it is loaded."""

    def _all(self) -> dict[str, Method]:
        methods = {"alone": Method("alone", "student alone", "train", None, "none")}
        for kd in method_names():
            title = KD_METHODS.get(kd).title
            methods |= {f"{kd}{suffix}": Method(f"{kd}{suffix}", f"{title}{text}", "distill", kd, mixing)
                        for suffix, mixing, text in _MIXINGS}
        return methods

    def __getitem__(self, name: str) -> Method:
        return self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


METHODS = StudyMethods()

# Keys the grid sets; a recipe, the defaults or an override may not set them.
GRID_KEYS = {
    "task": "set by methods:", "model": "use models: or pairs:", "seed": "use seeds:", "out": "set by mixkd study run --out",
    "kd.teacher": "use teachers:", "kd.teacher_model": "use teachers:", "kd.method": "use methods:",
    "kd.temperature": "use temperatures:", "mix.method": "use methods: (students) or mix: (teachers)",
    "mix.fraction": "use fractions: (students) or mix: (teachers)", "mix.alpha": "use alphas: (students) or mix: (teachers)",
}
# Keys that may differ between the planned config and a run directory's saved one: the run's place
# (its folder, its teacher's path: compared by teacher run id, see saved_config_mismatch) and the
# machine-local keys that a resumed run takes from the new command (config.MACHINE_KEYS), so
# that a study folder moved to another machine continues with ``--set data_dir=...`` there.
# The plugins' paths too: a moved study finds its plugin files elsewhere; their contents are compared by
# SHA-256 instead (mixkd.study.folder.check_plugins).
PLACEMENT_KEYS = {"out", "kd.teacher", "plugins", *MACHINE_KEYS}


def _listify(value: Any) -> Any:
    return value if isinstance(value, list) or value is None else [value]


def _known_method(name: str) -> str:
    known = list(METHODS)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown method '{name}'{hint}; known: {', '.join(known)} (a KD method of your own: "
                         "list its file under plugins:)")
    return name


def _pair(value: Any) -> Any:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split("->")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"expected 'teacher -> student', got {value!r}")
        return tuple(parts)
    return value


def _name(pattern: str, allowed: str):
    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(f"'{value}' is not a valid name: use {allowed}")
        return value

    return Annotated[str, AfterValidator(check)]


Name = _name(r"[A-Za-z0-9][A-Za-z0-9_.]*", "letters, digits, _ and . (it becomes part of run ids)")
StudyName = _name(r"[A-Za-z0-9][A-Za-z0-9_.-]*", "letters, digits, _, - and . (it names the study folder)")
Floats = Annotated[list[Annotated[float, Field(gt=0)]], BeforeValidator(_listify), Field(min_length=1)]
Ints = Annotated[list[int], BeforeValidator(_listify), Field(min_length=1)]
Strs = Annotated[list[str], BeforeValidator(_listify), Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MixSetting(_Strict):
    method: Literal["none", "mixup", "cutmix"] = "none"
    alpha: float = Field(1.0, gt=0)
    fraction: float = Field(1.0, gt=0, le=1)


def _analysis_flag(value: Any) -> Any:
    return {"enabled": value} if isinstance(value, bool) else value


class AnalysisSetting(_Strict):
    """What ``mixkd analyze`` does after each run (see :func:`mixkd.analysis.analyze_run`)."""

    enabled: bool = True
    subset: int | None = Field(None, ge=1, description="analyze N evenly spaced test images (None: all); t-SNE set fixed")
    batch_size: int = Field(1000, ge=1)
    seed: int = Field(0, ge=0, le=2**32 - 1, description="vicinal pairs, PGD random starts, t-SNE")

    def options(self) -> dict[str, Any] | None:
        """The keyword arguments of analyze_run, or None when disabled."""
        return {"subset": self.subset, "batch_size": self.batch_size, "seed": self.seed} if self.enabled else None


class TsnePair(_Strict):
    teacher: str = Field(description="a teacher group name, or a teacher as named in student run ids (resnet56_mixup)")
    student: str = Field(description="the student architecture")


class StudyAnalysis(AnalysisSetting):
    tsne_pair: TsnePair | None = Field(None, description="the pair of the report's t-SNE montage (default: the "
                                                         "pair with the most analyzed methods)")


GroupAnalysis = Annotated[AnalysisSetting | None, BeforeValidator(_analysis_flag)]


class TeacherGroup(_Strict):
    name: Name
    models: Strs | None = None
    mix: Annotated[list[MixSetting], BeforeValidator(_listify), Field(min_length=1)] = [MixSetting()]
    seeds: Ints = [0]
    recipe: dict[str, Any] = {}
    checkpoint: str | None = Field(None, description="an existing teacher: mixkd run dir/checkpoint or RepDistiller .pth")
    model: str | None = Field(None, description="the architecture of checkpoint")
    analysis: GroupAnalysis = None

    @model_validator(mode="after")
    def _one_kind(self) -> TeacherGroup:
        if self.checkpoint is None:
            if not self.models:
                raise ValueError("give models: (teachers to train) or checkpoint: and model: (an existing teacher)")
            if self.model is not None:
                raise ValueError("model: goes with checkpoint:; to train teachers use models:")
        else:
            if not self.model:
                raise ValueError("checkpoint: needs model:, the teacher's architecture")
            extra = sorted({"models", "mix", "seeds", "recipe", "analysis"} & self.model_fields_set)
            if extra:
                raise ValueError(f"an existing checkpoint is not trained; remove {', '.join(extra)}")
        return self


class StudentGroup(_Strict):
    name: Name | None = None
    teachers: Strs | None = None
    models: Strs | None = None
    pairs: Annotated[list[Annotated[tuple[str, str], BeforeValidator(_pair)]], BeforeValidator(_listify)] | None = None
    methods: Annotated[list[Annotated[str, AfterValidator(_known_method)]], BeforeValidator(_listify), Field(min_length=1)]
    temperatures: Floats = [4.0]
    fractions: Annotated[list[Annotated[float, Field(gt=0, lt=1)]], BeforeValidator(_listify), Field(min_length=1)] = [0.1]
    alphas: Floats = [1.0]
    mix_modes: Annotated[list[Literal["mixup", "cutmix"]], BeforeValidator(_listify), Field(min_length=1)] = ["mixup"]
    samplings: Annotated[list[Literal["exact", "reference"]], BeforeValidator(_listify), Field(min_length=1)] = ["exact"]
    augment: Strs | None = None  # augmentation specs (issue 28), crossed with the methods; None: the recipe's
    seeds: Ints = [0]
    recipe: dict[str, Any] = {}
    analysis: GroupAnalysis = None

    @property
    def sampling_axis(self) -> bool:
        """Whether the group lists ``samplings:`` (else its PMU runs keep the recipe's mix.sampling)."""
        return "samplings" in self.model_fields_set

    @model_validator(mode="after")
    def _students(self) -> StudentGroup:
        if (self.models is None) == (self.pairs is None):
            raise ValueError("give either models: (crossed with every teacher) or pairs: ('teacher -> student')")
        for spec in self.augment or []:
            try:
                parse_augment(spec)
            except MixkdError as err:
                raise ValueError(str(err).removeprefix("augment: ")) from None
        needs_teacher = [m for m in self.methods if METHODS[m].task == "distill"]
        if (needs_teacher or self.pairs) and not self.teachers:
            raise ValueError(f"methods {', '.join(needs_teacher) or 'with pairs:'} need teachers: (teacher group names)")
        return self


class ClaimsSetting(_Strict):
    """How the report's claims read this study (see :mod:`mixkd.claims`)."""

    noise: float | None = Field(None, gt=0, description="per-run sigma of top-1 (points) assumed where runs measure "
                                                        "no spread, a single run or runs all equal (None: those "
                                                        "comparisons are inconclusive)")
    margin: float = Field(0.5, ge=0, description="points a non-inferiority ('at least as well') may fall short by")


class StudyFile(_Strict):
    name: StudyName
    description: str = ""
    defaults: dict[str, Any] = {}
    teachers: list[TeacherGroup] = []
    students: list[StudentGroup] = []
    analysis: Annotated[StudyAnalysis | None, BeforeValidator(_analysis_flag)] = None
    claims: ClaimsSetting = ClaimsSetting()
    plugins: Annotated[list[str], BeforeValidator(_listify)] = Field(
        [], description="plugin files (paths from the study file's folder) or modules registering KD methods")


@dataclass
class PlannedRun:
    """One run of a study: its id (= its directory in the study folder), its validated RunConfig and,
    for a student, its method. The config is validated once, when the study file is read; it names
    no run directory (``out``: see :meth:`config_for`) and, for a student of a teacher run of the
    study, names that teacher relative to this run's directory (``../../teachers/<id>``), so that the
    folder still holds together after it is moved or copied elsewhere."""

    id: str
    role: Literal["teacher", "student"]
    group: str  # where it was declared, e.g. "students[1]"
    config: RunConfig
    model: str
    seed: int
    teacher_run: str | None = None  # id of the teacher run it depends on
    teacher_checkpoint: str | None = None  # an external teacher
    teacher_model: str | None = None
    method: Method | None = None  # students only
    temperature: float | None = None
    fraction: float | None = None
    alpha: float | None = None
    sampling: str | None = None  # partial mixup only: exact or reference
    analysis: dict[str, Any] | None = None  # analyze_run's options after the run, or None: no analysis

    def config_for(self, out: str | Path, device: str | None = None) -> RunConfig:
        """This run's RunConfig inside study folder ``out`` (``device``: a device checked with
        :func:`check_device`, replacing the study file's)."""
        return self.config.model_copy(update={"out": str(Path(out) / self.id), **({"device": device} if device else {})},
                                      deep=True)

    def teacher_path(self) -> str | None:
        """The path of this run's teacher run relative to this run's directory, or None."""
        return relative_teacher(self.id, self.teacher_run) if self.teacher_run else None


def check_device(device: str) -> str:
    """``device`` (``mixkd study run --device``) if RunConfig accepts it; else one clear error."""
    try:
        RunConfig.model_validate({"device": device})
    except ValidationError as e:
        raise MixkdError(f"--device {device}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return device


@dataclass
class Study:
    name: str
    description: str
    source: Path
    text: str
    runs: list[PlannedRun] = field(default_factory=list)
    tsne_pair: tuple[str, str] | None = None  # (teacher, student model) of the report's t-SNE montage
    overrides: list[str] = field(default_factory=list)  # the --set KEY=VALUE it was loaded with
    plugins: list[dict[str, str]] = field(default_factory=list)  # {spec, path, sha256} of each plugin it loaded

    def run(self, run_id: str) -> PlannedRun:
        return next(r for r in self.runs if r.id == run_id)


@dataclass(frozen=True)
class _TeacherRef:
    label: str  # the teacher's part of a student id
    model: str
    run_id: str | None
    checkpoint: str | None
    group: str  # its teacher group


def _fmt(value: float) -> str:
    return f"{value:g}"


def mix_label(mix: MixSetting | dict[str, Any]) -> str:
    """'plain', 'mixup', 'mixup-f0.5-a0.2', 'cutmix', ... for a mix setting."""
    m = mix.model_dump() if isinstance(mix, MixSetting) else {**MixSetting().model_dump(), **mix}
    if m["method"] == "none":
        return "plain"
    return "-".join([m["method"]] + ([f"f{_fmt(m['fraction'])}"] if m["fraction"] != 1 else [])
                    + ([f"a{_fmt(m['alpha'])}"] if m["alpha"] != 1 else []))


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "study"


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        keys.extend(_flat_keys(v, key + ".") if isinstance(v, dict) else [key])
    return keys


def _merge(*trees: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tree in trees:
        for k, v in tree.items():
            out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _without_method_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` without the kd settings that only some KD methods use (DKD's beta, FitNet's hint_weight, ...):
    a recipe, the defaults or an override is checked without them, and each run's config, whose method is
    known, with them."""
    kd = tree.get("kd")
    if not isinstance(kd, dict):
        return tree
    shared = {*TEACHER_KEYS, "method", *KDSettings.model_fields}
    return {**tree, "kd": {k: v for k, v in kd.items() if k in shared}}


class _Expander:
    def __init__(self, spec: StudyFile, source: str, overrides: dict[str, Any]):
        self.spec, self.source, self.overrides = spec, source, overrides
        self.runs: dict[str, PlannedRun] = {}
        self.teachers: dict[str, list[_TeacherRef]] = {}
        self.labels: dict[str, tuple[str, str]] = {}  # distilled run id -> (teacher group, teacher label)
        self.planned: dict[str, dict[str, Any]] = {}  # run id -> its RunConfig as a tree, to compare

    def fail(self, where: str, message: str) -> MixkdError:
        return MixkdError(f"invalid study file {self.source}: {where}: {message}")

    def check_recipe(self, tree: dict[str, Any], where: str) -> None:
        for key in _flat_keys(tree):
            if key in GRID_KEYS:
                raise self.fail(f"{where}.{key}", f"set by the study grid ({GRID_KEYS[key]})")
        try:
            RunConfig.model_validate(_merge(_without_method_keys(tree), {"task": "train"}))
        except ValidationError as e:
            err = e.errors()[0]
            msg = _unknown_key(err["loc"]) if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            raise self.fail(_where((where, *err["loc"])), msg) from None

    def check_model(self, name: str, where: str) -> None:
        if "->" in name:
            raise self.fail(where, f"'{name}' is a teacher -> student pair: pairs go under a student group's "
                                   "pairs: (with teachers:); models: lists architectures")
        try:
            default_lr(name)
        except MixkdError as e:
            raise self.fail(where, str(e)) from None

    def analysis(self, group: AnalysisSetting | None) -> dict[str, Any] | None:
        """A group's analysis options: its own ``analysis`` merged over the top-level one."""
        top = self.spec.analysis
        if group is None:
            return top.options() if top is not None else None
        base = top.model_dump(exclude={"tsne_pair"}) if top is not None else {}
        merged = {**base, "enabled": True, **group.model_dump(include=group.model_fields_set)}
        return AnalysisSetting(**merged).options()

    def recipe(self, group_recipe: dict[str, Any], where: str) -> dict[str, Any]:
        self.check_recipe(group_recipe, f"{where}.recipe")
        tree = _merge(self.spec.defaults, group_recipe, self.overrides)
        if tree.get("data_dir"):
            tree["data_dir"] = os.path.abspath(os.path.expanduser(tree["data_dir"]))
        return tree

    def add(self, tree: dict[str, Any], run_id: str, role: Literal["teacher", "student"], where: str, model: str,
            seed: int, **fields: Any) -> PlannedRun:
        """The run ``run_id`` of RunConfig ``tree`` (validated here, the one time), planned once."""
        teacher_id = fields.get("teacher_run")
        teacher = relative_teacher(run_id, teacher_id) if teacher_id else fields.get("teacher_checkpoint")
        tree = _merge(tree, {"progress": False}, {"kd": {"teacher": teacher}} if teacher else {})
        try:
            config = RunConfig.model_validate(tree)
        except ValidationError as e:
            raise self.fail(where, f"run {run_id}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        run = PlannedRun(run_id, role, where, config, model, seed, **fields)
        planned = config.model_dump(mode="json")
        first = self.runs.get(run.id)
        if first is None:
            self.runs[run.id] = run
            self.planned[run.id] = planned
            return run
        if first.analysis is None:  # analyzed when any group that declares it asks for it
            first.analysis = run.analysis
        elif run.analysis is not None and run.analysis != first.analysis:
            key = next(k for k in first.analysis if first.analysis[k] != run.analysis[k])
            raise self.fail(f"{run.group}.analysis.{key}", f"run {run.id} is also declared by {first.group} with "
                                                           f"{key} {first.analysis[key]!r}; give both the same")
        old = self.planned[run.id]  # compared as RunConfigs: a key left at its default is the same run
        if old != planned:
            key = next(k for k in _flat_keys(old) if _get(old, k) != _get(planned, k))
            raise self.fail(run.group, f"run {run.id} is also declared by {first.group} with other settings "
                                       f"({key}: {_get(old, key)!r} vs {_get(planned, key)!r}); "
                                       "give both groups the same recipe")
        return first

    def expand_teachers(self) -> None:
        for gi, g in enumerate(self.spec.teachers):
            where = f"teachers[{gi}]"
            if g.name in self.teachers:
                raise self.fail(f"{where}.name", f"teacher group '{g.name}' is defined twice")
            if g.checkpoint is not None:
                self.check_model(g.model, f"{where}.model")
                path = os.path.abspath(os.path.expanduser(g.checkpoint))
                self.teachers[g.name] = [_TeacherRef(f"{g.model}_{g.name}", g.model, None, path, g.name)]
                continue
            base = self.recipe(g.recipe, where)
            analysis = self.analysis(g.analysis)
            refs = []
            for mi, model in enumerate(g.models):
                self.check_model(model, f"{where}.models[{mi}]")
                for mix in g.mix:
                    name = f"{model}_{g.name}" + (f"-{mix_label(mix)}" if len(g.mix) > 1 else "")
                    for seed in g.seeds:
                        run_id = f"teachers/{model_slug(name)}-s{seed}"  # timm:x -> timm_x in paths
                        label = name + (f"-s{seed}" if len(g.seeds) > 1 else "")
                        config = _merge(base, {"task": "train", "model": model, "seed": seed,
                                               "mix": mix.model_dump()})
                        self.add(config, run_id, "teacher", where, model, seed, analysis=analysis)
                        refs.append(_TeacherRef(label, model, run_id, None, g.name))
            self.teachers[g.name] = refs

    def expand_students(self) -> None:
        for gi, g in enumerate(self.spec.students):
            where = f"students[{gi}]"
            refs: list[_TeacherRef] = []
            for ti, name in enumerate(g.teachers or []):
                if name not in self.teachers:
                    known = ", ".join(self.teachers) or "none"
                    raise self.fail(f"{where}.teachers[{ti}]", f"unknown teacher group '{name}'; defined: {known}")
                refs.extend(self.teachers[name])
            if g.pairs is not None:
                combos = []
                for pi, (t_model, s_model) in enumerate(g.pairs):
                    found = [(ref, s_model) for ref in refs if ref.model == t_model]
                    if not found:
                        raise self.fail(f"{where}.pairs[{pi}]", f"no teacher {t_model} in teacher groups "
                                                                f"{', '.join(g.teachers)}")
                    combos.extend(found)
                students = list(dict.fromkeys(s for _, s in g.pairs))
            else:
                students = g.models
                combos = [(ref, s) for ref in refs for s in students]
            for si, model in enumerate(students):
                self.check_model(model, f"{where}.{'models' if g.models else 'pairs'}[{si}]")
            if g.sampling_axis and _get(g.recipe, "mix.sampling") is not None:
                raise self.fail(f"{where}.recipe.mix.sampling", "set by this group's samplings:; remove one of the two")
            base = self.recipe(g.recipe, where)
            analysis = self.analysis(g.analysis)
            for method in g.methods:
                if METHODS[method].task == "train":
                    for model in students:
                        for augment, seed in itertools.product(g.augment or [None], g.seeds):
                            config = _merge(base, {"task": "train", "model": model, "seed": seed, "mix": {"method": "none"},
                                                   **({"augment": augment} if augment is not None else {})})
                            part = f"-{augment}" if augment is not None else ""
                            self.add(config, f"students/{model_slug(model)}-alone{part}-s{seed}", "student", where, model,
                                     seed,
                                     method=METHODS[method], analysis=analysis)
                    continue
                for ref, model in combos:
                    for config, run_id, fields in self.distill_runs(g, base, method, ref, model):
                        self.add(config, run_id, "student", where, model, fields.pop("seed"), analysis=analysis,
                                 **fields)
                        self.labels[run_id] = (ref.group, ref.label)

    def check_tsne_pair(self) -> None:
        """``analysis.tsne_pair`` must name a teacher (group or label) and a student of it that is analyzed."""
        pair = self.spec.analysis.tsne_pair if self.spec.analysis is not None else None
        if pair is None:
            return
        if pair.teacher not in self.teachers and not any(label == pair.teacher for _, label in self.labels.values()):
            known = ", ".join(self.teachers) or "none"
            raise self.fail("analysis.tsne_pair.teacher", f"unknown teacher '{pair.teacher}'; teacher groups: {known}")
        found = [r for r in self.runs.values()
                 if r.model == pair.student and r.id in self.labels and pair.teacher in self.labels[r.id]]
        if not found:
            raise self.fail("analysis.tsne_pair.student", f"no student {pair.student} is distilled from teacher "
                                                          f"'{pair.teacher}'")
        if not any(r.analysis is not None for r in found):
            raise self.fail("analysis.tsne_pair", f"no student {pair.student} of teacher '{pair.teacher}' is analyzed "
                                                  "(analysis is off for its groups)")

    def distill_runs(self, g: StudentGroup, base: dict, method: str, ref: _TeacherRef, model: str):
        """(RunConfig tree, run id, PlannedRun fields) of each run of ``method`` from ``ref`` to ``model``."""
        m = METHODS[method]
        temps = g.temperatures if m.kd == "kd" else [None]
        fractions = {"none": [None], "full": [1.0], "partial": g.fractions}[m.mixing]
        mixing = m.mixing != "none"
        inherited = _get(base, "mix.sampling") or "exact"  # defaults: / recipe: / --set, as before the axis
        samplings = [None] if m.mixing != "partial" else g.samplings if g.sampling_axis else [inherited]
        augments = g.augment or [None]
        for temp, frac, alpha, mode, sampling, augment, seed in itertools.product(
                temps, fractions, g.alphas if mixing else [None], g.mix_modes if mixing else [None], samplings,
                augments, g.seeds):
            parts = [method]
            parts += [f"T{_fmt(temp)}"] if temp is not None else []
            parts += [f"f{_fmt(frac)}"] if m.mixing == "partial" else []
            parts += [f"a{_fmt(alpha)}"] if alpha is not None and alpha != 1 else []
            parts += ["cutmix"] if mode == "cutmix" else []
            parts += ["ref"] if sampling == "reference" else []
            parts += [augment] if augment is not None else []
            run_id = f"students/{model_slug(model)}-from-{model_slug(ref.label)}-{'-'.join(parts)}-s{seed}"
            # the teacher's architecture, also for a teacher run not trained yet: the method's per-pair settings
            # (DKD's beta, ...) resolve here, at planning time, for the pair the run will distill
            kd = {"method": m.kd, "teacher_model": ref.model, **({"temperature": temp} if temp is not None else {})}
            mix = {"method": mode, "fraction": frac, "alpha": alpha} if mixing else {"method": "none"}
            if sampling is not None and sampling != inherited:
                mix["sampling"] = sampling
            config = _merge(base, {"task": "distill", "model": model, "seed": seed, "kd": kd, "mix": mix,
                                   **({"augment": augment} if augment is not None else {})})
            yield config, run_id, {"seed": seed, "teacher_run": ref.run_id, "teacher_checkpoint": ref.checkpoint,
                                   "teacher_model": ref.model, "method": m, "temperature": temp, "fraction": frac,
                                   "alpha": alpha, "sampling": sampling}


_ABSENT = object()


def _unknown_key(loc: tuple) -> str:
    """'unknown key', and the closest RunConfig key where one is close (epochz -> epochs)."""
    key = ".".join(str(part) for part in loc)
    known = _flat_keys(RunConfig().model_dump())
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return "unknown key" + (f" (did you mean {close[0]}?)" if close else "")


def _get(tree: dict[str, Any], dotted: str, absent: Any = None) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return absent
        node = node[part]
    return node


def parse_study(data: Any, source: str = "<study>") -> StudyFile:
    if not isinstance(data, dict):
        raise MixkdError(f"invalid study file {source}: it must hold a mapping (name:, teachers:, students:)")
    try:
        return StudyFile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        got = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(given, (dict, list)) else f" (got {given!r})"
        raise MixkdError(f"invalid study file {source}: {_where(err['loc'])}: {msg}{got}") from None


# The most runs one study file may declare: each is a training run (the largest shipped study has 228),
# and expanding a million-run grid takes minutes and gigabytes before anything is printed.
MAX_RUNS = 10_000


def count_runs(spec: StudyFile) -> tuple[int, list[tuple[str, int]]]:
    """(the runs ``spec`` declares, (group, its runs) for each group), counted from the axes' lengths
    without expanding the grid (a run declared by two groups counts twice)."""
    teachers: dict[str, Counter[str]] = {}  # group -> its teachers' architectures, one per teacher run
    groups: list[tuple[str, int]] = []
    for gi, g in enumerate(spec.teachers):
        if g.checkpoint is not None:
            teachers[g.name] = Counter([g.model])
            continue
        each = len(g.mix) * len(g.seeds)
        teachers[g.name] = Counter({m: each for m in g.models})
        groups.append((f"teachers[{gi}]", len(g.models) * each))
    for gi, g in enumerate(spec.students):
        refs = sum((teachers.get(name, Counter()) for name in g.teachers or []), Counter())
        if g.pairs is not None:
            combos, students = sum(refs[t] for t, _ in g.pairs), len({s for _, s in g.pairs})
        else:
            combos, students = refs.total() * len(g.models), len(g.models)
        n = 0
        for name in g.methods:
            m = METHODS[name]
            if m.task == "train":
                n += students * len(g.seeds)
                continue
            per = len(g.temperatures) if m.kd == "kd" else 1
            if m.mixing != "none":
                per *= len(g.alphas) * len(g.mix_modes)
            if m.mixing == "partial":
                per *= len(g.fractions) * (len(g.samplings) if g.sampling_axis else 1)
            n += combos * per * len(g.seeds)
        groups.append((f"students[{gi}]", n))
    return sum(n for _, n in groups), groups


def expand(spec: StudyFile, source: str = "<study>", overrides: list[str] | None = None) -> list[PlannedRun]:
    """All runs of a study, teachers first, each once; raises MixkdError naming the bad key, and where
    the study declares more than :data:`MAX_RUNS` runs (counted first: nothing is expanded then)."""
    total, groups = count_runs(spec)
    if total > MAX_RUNS:
        largest = ", ".join(f"{g}: {n:,}" for g, n in sorted(groups, key=lambda gn: -gn[1])[:3])
        raise MixkdError(f"study file {source} declares {total:,} runs ({largest}), more than the {MAX_RUNS:,} one "
                         "study may hold: split it into several study files, or shorten its lists (models, "
                         "temperatures, fractions, seeds, ...)")
    over: dict[str, Any] = {}
    for text in overrides or []:
        set_dotted(over, *parse_override(text))
    ex = _Expander(spec, source, over)
    ex.check_recipe(spec.defaults, "defaults")
    for key in _flat_keys(over):
        if key in GRID_KEYS:
            raise MixkdError(f"--set {key}: set by the study grid ({GRID_KEYS[key]})")
    axis = next((gi for gi, g in enumerate(spec.students) if g.sampling_axis), None)
    if _get(over, "mix.sampling") is not None and axis is not None:
        raise MixkdError(f"--set mix.sampling: set by the study grid (students[{axis}].samplings:)")
    try:
        RunConfig.model_validate(_merge(_without_method_keys(_merge(spec.defaults, over)), {"task": "train"}))
    except ValidationError as e:
        err = e.errors()[0]
        msg = _unknown_key(err["loc"]) if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise MixkdError(f"--set {_where(err['loc'])}: {msg}") from None
    ex.expand_teachers()
    ex.expand_students()
    ex.check_tsne_pair()
    return list(ex.runs.values())


def _line(text: str, loc: tuple) -> int | None:
    """The line of the value at ``loc`` (keys and list indices) in a YAML text, or None."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return None
        if node is None:
            return None
    return node.start_mark.line + 1


def check_teacher_checkpoints(spec: StudyFile, source: str, text: str = "") -> None:
    """Every existing teacher (``checkpoint:``) must be there: a file, or a run directory with its checkpoint."""
    for gi, g in enumerate(spec.teachers):
        if g.checkpoint is None:
            continue
        path = Path(os.path.abspath(os.path.expanduser(g.checkpoint)))
        if path.is_file() or (path / CHECKPOINT_NAME).is_file():
            continue
        line = _line(text, ("teachers", gi, "checkpoint"))
        what = f"{path} holds no {CHECKPOINT_NAME}" if path.is_dir() else f"{path} does not exist"
        raise MixkdError(f"invalid study file {source}: teachers[{gi}].checkpoint{f' (line {line})' if line else ''}: "
                         f"teacher checkpoint not found: {what}")


def load_study(path: str | Path, overrides: list[str] | None = None, seeds: list[int] | None = None,
               check_files: bool = True, plugins: list[str] | None = None,
               plugin_paths: dict[str, str] | None = None) -> Study:
    """Read, validate and expand a study file. ``overrides`` ('key=value') apply to every run;
    ``seeds`` replaces every group's seeds (used by ``mixkd demo --seed``). A study without runs, and
    (with ``check_files``) an existing teacher checkpoint that is not there, are errors. ``plugins``
    (``--plugin``: paths from the working directory) add to the file's ``plugins:``; ``plugin_paths``
    ({entry: path}) says where the entries of a study file copied into its folder were found."""
    p = Path(path)
    if not p.is_file():
        raise MixkdError(f"study file not found: {p} (see configs/studies/ for examples)")
    text = read_text(p, f"study file {p}")
    data = load_yaml(text, f"study file {p}")
    if seeds is not None and isinstance(data, dict):
        for group in [*(data.get("teachers") or []), *(data.get("students") or [])]:
            if isinstance(group, dict) and "checkpoint" not in group:
                group["seeds"] = list(seeds)
    if plugins and isinstance(data, dict):
        listed = data.get("plugins") or []
        data["plugins"] = [*(listed if isinstance(listed, list) else [listed]),
                           *(load_plugin(spec).ref for spec in plugins)]
    plugins = _load_plugins(data, p, plugin_paths or {})
    spec = parse_study(data, str(p))
    runs = expand(spec, str(p), overrides)
    if not runs:
        raise MixkdError(f"study file {p} defines no runs: add teachers: and students: groups "
                         "(see configs/studies/ for examples)")
    if check_files:
        check_teacher_checkpoints(spec, str(p), text)
    pair = spec.analysis.tsne_pair if spec.analysis is not None else None
    return Study(spec.name, spec.description, p, text, runs, (pair.teacher, pair.student) if pair else None,
                 list(overrides or []), plugins)


def _load_plugins(data: Any, path: Path, found: dict[str, str]) -> list[dict[str, str]]:
    """Load the study file's ``plugins:`` (relative paths from its folder) before its methods are read, and
    give every run them (``defaults.plugins``, resolved). Their {spec, path, sha256}."""
    if not isinstance(data, dict) or not data.get("plugins"):
        return []
    listed = data["plugins"] if isinstance(data["plugins"], list) else [data["plugins"]]
    loaded = []
    for spec in listed:
        if not isinstance(spec, str):
            raise MixkdError(f"invalid study file {path}: plugins: {spec!r} is not a file path or a module name")
        try:
            plugin = load_plugin(found.get(spec, spec), path.parent)
        except MixkdError as e:
            raise MixkdError(f"invalid study file {path}: {e}") from None
        loaded.append((spec, plugin))
    defaults = data.get("defaults")
    if isinstance(defaults, dict):
        own = defaults.get("plugins") or []
        defaults["plugins"] = [*(own if isinstance(own, list) else [own]), *(pl.ref for _, pl in loaded)]
    elif defaults is None:
        data["defaults"] = {"plugins": [pl.ref for _, pl in loaded]}
    return [{"spec": spec, "path": pl.path, "sha256": pl.sha256} for spec, pl in loaded]


def saved_config_mismatch(run: PlannedRun, saved: dict[str, Any], out: str | Path) -> str | None:
    """The first setting (other than paths and placement) in which a run directory's saved
    ``config.yaml`` differs from the plan, as 'key: saved -> planned', or None.

    A teacher run is compared by its id: ``/old/place/teachers/x``, ``runs/s/teachers/x`` (older
    versions) and ``../../teachers/x`` are the same teacher, so a moved folder matches its plan.
    Keys this version does not know mean a run made by another mixkd version."""
    planned = run.config_for(out).model_dump(mode="json")
    # kd settings saved empty (older versions wrote every method's keys, null where unused) are no difference
    unused = {k for k in _flat_keys(saved) if k.startswith("kd.") and _get(saved, k) is None}
    unknown = sorted(k for k in set(_flat_keys(saved)) - set(_flat_keys(planned)) - PLACEMENT_KEYS - unused
                     if not machine_key(k))
    if unknown:
        return (f"keys this mixkd ({__version__}) does not know: {', '.join(unknown)}; it was made by another "
                "mixkd version")
    teacher = _get(saved, "kd.teacher")
    if run.teacher_run and isinstance(teacher, str) and not names_run(teacher, run.teacher_run):
        return f"kd.teacher: {teacher!r} -> {run.teacher_path()!r}"
    for key in _flat_keys(planned):
        old = _get(saved, key, _ABSENT)
        if key in PLACEMENT_KEYS or machine_key(key) or old is _ABSENT:  # a key added to RunConfig since the run started
            continue
        if key == "kd.teacher_model" and old is None:  # planned before studies named their teacher runs' architecture
            continue
        if old != _get(planned, key):
            return f"{key}: {old!r} -> {_get(planned, key)!r}"
    return None
