"""The results model: one record per trained student, its *cell* (the report's column) and its *context*
(the report's row), and every label they are shown with.

A results table has one row per trained student with the columns of :data:`COLUMNS`:

=============== =========================================================================================
``teacher``     the teacher's name (e.g. ``resnet56``); empty for a student trained alone
``teacher_mix`` how the teacher was trained: ``none``, ``mixup`` (a "Mix-T" teacher), ``cutmix``, or
                ``other`` (neither plain nor Mix-T, e.g. partial mixup or an external checkpoint)
``student``     the student's architecture
``kd``          ``none`` (trained alone), ``kd`` (Hinton KD), ``std`` (standardized KD), or any other
                KD method's name
``temperature`` the KD temperature (empty where the method has none: standardized KD, the student alone)
``mix``         the student's mixing: ``none``, ``mixup``, ``cutmix``
``mix_fraction`` the share of each batch mixed: 1 = full mixing (FMU), below 1 = partial (PMU); empty
                without mixing
``sampling``    how partial mixing picks its samples: ``exact`` (the paper's text) or ``reference`` (the
                released code's draw with replacement); empty or ignored for full or no mixing
``seed``        the run's seed
``top1``        the student's top-1 accuracy in %, last epoch (a table whose every top-1 is at most 1 is
                read as fractions and multiplied by 100, and said so)
=============== =========================================================================================

Optional columns: ``best_top1`` (the best epoch's top-1, in %: ``mixkd claims --metric best_top1``),
``mix_alpha`` (the mixup alpha; empty: 1), ``augment`` (the per-sample augmentation policies, and
cutmix_pick, as ``--augment`` names them: ``flip_crop+cutout``; empty: ``flip_crop``), ``t_stddev`` (the
teacher's T. stddev under the run's augmentation, ``mixkd augment-score``: claim 6), ``test_loss`` (the
student's test loss, last epoch: claim 6's other measure), and the settings ``dataset``, ``epochs``,
``batch_size`` and ``lr``: runs are pooled (their seeds taken as repeats of one experiment) only when they agree in every
setting but the seed, those included (a table without ``epochs`` cannot tell schedules apart: ``mixkd
claims`` says so; one that names the schedule otherwise, e.g. ``num_epochs``, is refused). Other columns
are ignored, except ``id`` (the run's name). A (cell, seed) given twice is refused. A study folder's runs become the same records (:mod:`mixkd.study.report`); the claims
(:mod:`mixkd.claims`) and the report read these records only.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixkd.errors import MixkdError
from mixkd.files import atomic_write
from mixkd.registry import KD_METHODS

COLUMNS = ("teacher", "teacher_mix", "student", "kd", "temperature", "mix", "mix_fraction", "sampling", "seed", "top1")
SETTING_COLUMNS = ("dataset", "epochs", "batch_size", "lr")  # optional: pooled only when equal
METRIC_COLUMNS = {"top1": "top-1 at the last epoch", "best_top1": "best top-1 over epochs"}  # the values
# Columns that name a schedule under another name: refused (rename to epochs), never ignored
SCHEDULE_ALIASES = ("num_epochs", "n_epochs", "total_epochs", "max_epochs", "epoch_count")
MIXES = ("none", "mixup", "cutmix")
TEACHER_MIX_VALUES = (*MIXES, "other")
SAMPLINGS = ("exact", "reference")


def kd_label(method: str) -> str:
    """A KD method's short label (table columns, claims): its registry label; a method not registered
    in this process (a plugin's, read back from a results table) by its name in capitals. Reads the
    registry without importing the methods (``mixkd claims`` imports no torch)."""
    found = KD_METHODS.describe(method)
    return found["label"] if found else method.upper()


def kd_title(method: str) -> str:
    """A KD method's long label (reports): its registry title, else :func:`kd_label`."""
    found = KD_METHODS.describe(method)
    return found["title"] if found else kd_label(method)


def kd_order(method: str) -> tuple[int, str]:
    """Where a KD method sorts: in registration order (built-ins first), then unknown ones by name."""
    names = KD_METHODS.described_names()
    return (names.index(method) if method in names else len(names), method)


def temperature_free(method: str) -> bool:
    """Whether a KD method's loss has no temperature (registered with ``uses_temperature=False``, or
    without a temperature setting): a temperature given for it is dropped."""
    found = KD_METHODS.describe(method)
    if not found:
        return False
    return found["extra"].get("uses_temperature") is False or (
        found["settings"] is not None and "temperature" not in found["settings"])


# The study's partial mixup: the share of each batch mixed (PMU 10%: docs/study-claims-reference.md).
PARTIAL_FRACTION = 0.1


def natural(text: Any) -> list:
    """A sort key that orders 'resnet8' before 'resnet14' and ignores case."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(text).lower())]


def _g(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Cell:
    """A column of the report's table: how a student was trained (None where a setting does not apply).

    ``fraction`` is 1.0 for full mixing, below 1 for partial, None without mixing; ``alpha`` None
    stands for the default Beta(1, 1); ``sampling`` is set for partial mixing only."""

    kd: str = "none"
    temperature: float | None = None
    mix: str = "none"
    fraction: float | None = None
    alpha: float | None = None
    sampling: str | None = None
    augment: str | None = None  # the per-sample policies (and cutmix_pick) when not the default flip_crop

    @property
    def alone(self) -> bool:
        return self.kd == "none"

    @property
    def mixing(self) -> str:
        """``none``, ``full`` or ``partial``."""
        if self.mix == "none":
            return "none"
        return "full" if (self.fraction or 1.0) >= 1.0 else "partial"

    @property
    def method(self) -> str:
        """The study's method name: ``alone``, ``kd``, ``kd_fmu``, ``std_pmu``, ... (``alone_pmu``: alone with mixing)."""
        base = "alone" if self.alone else self.kd
        return base + {"none": "", "full": "_fmu", "partial": "_pmu"}[self.mixing]

    @property
    def kd_short(self) -> str:
        return kd_label(self.kd)

    def _settings(self, sep_sampling: bool) -> list[str]:
        parts = [f"T={_g(self.temperature)}"] if self.temperature is not None else []
        parts += [f"f={_g(self.fraction)}"] if self.mixing == "partial" else []
        parts += [f"α={_g(self.alpha)}"] if self.alpha not in (None, 1.0) and self.mix != "none" else []
        parts += ["cutmix"] if self.mix == "cutmix" else []
        if self.mixing == "partial" and self.sampling not in (None, "exact"):
            parts += [f"({self.sampling} sampling)" if sep_sampling else f"{self.sampling} sampling"]
        if self.augment is not None:
            parts += [f"[{augment_label(self.augment)}]"]
        return parts

    @property
    def label(self) -> str:
        """The column title: 'student alone', 'KD T=4', 'STD+PMU f=0.1', 'KD+PMU T=4 f=0.1 (reference sampling)'."""
        if self.alone:
            if self.mix == "none":
                return " ".join(["student alone", *self._settings(True)])
            return ("student alone" + f" + {self.method[6:].upper()} " + " ".join(self._settings(True))).rstrip()
        name = self.kd_short + {"none": "", "full": "+FMU", "partial": "+PMU"}[self.mixing]
        return " ".join([name, *self._settings(True)])

    @property
    def long_label(self) -> str:
        """'KD + partial mixup (T=4, f=0.1)', 'standardized KD', 'student alone'."""
        if self.alone and self.mix == "none":
            return "student alone"
        name = "student alone" if self.alone else kd_title(self.kd)
        if self.mix != "none":
            name += f" + {self.mixing} {'mixup' if self.mix == 'mixup' else 'CutMix'}"
        settings = [s for s in self._settings(False) if s != "cutmix"]
        return name + (f" ({', '.join(settings)})" if settings else "")

    def sort_key(self) -> tuple:
        """Columns in order: the student alone, then KD methods (kd, std, others by name), each without,
        with full and with partial mixing, then by temperature, fraction, alpha, mix mode, sampling."""
        method = (-1, "") if self.alone else kd_order(self.kd)
        return (*method, ("none", "full", "partial").index(self.mixing), self.temperature is None,
                self.temperature or 0.0, self.fraction or 0.0, self.alpha or 1.0, self.mix,
                self.sampling not in (None, "exact"), self.sampling or "", self.augment or "")


@dataclass(frozen=True)
class Context:
    """A row of the report's table: a teacher (None for students alone) -> a student, with the settings
    every run in it shares (``epochs``, ``batch_size``, ``lr``, ... as (key, value) pairs)."""

    teacher: str | None
    teacher_mix: str | None
    student: str
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def teacher_label(self) -> str:
        """'resnet56 (plain)', 'resnet56 (mixup)'; a teacher name with its own parentheses stays as it is."""
        if self.teacher is None:
            return "none"
        if self.teacher.endswith(")") or self.teacher_mix is None:
            return self.teacher
        return f"{self.teacher} ({'plain' if self.teacher_mix == 'none' else self.teacher_mix})"

    @property
    def label(self) -> str:
        return f"{self.teacher_label} → {self.student}" if self.teacher is not None else f"{self.student} alone"

    def setting(self, key: str, default: Any = None) -> Any:
        return dict(self.settings).get(key, default)


@dataclass(frozen=True)
class Result:
    """One trained student: where it belongs (context, cell), its seed, its top-1, and its run id."""

    context: Context
    cell: Cell
    seed: int | None
    top1: float
    run: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    best_top1: float | None = field(default=None, compare=False)
    t_stddev: float | None = field(default=None, compare=False)  # the teacher's T. stddev under the run's policy
    test_loss: float | None = field(default=None, compare=False)  # the student's test loss (NLL), last epoch

    def value(self, metric: str = "top1") -> float | None:
        """The run's ``top1`` (last epoch) or ``best_top1`` (best epoch)."""
        return self.top1 if metric == "top1" else self.best_top1

    @property
    def pool_key(self) -> tuple:
        """Runs with the same key are repeats of one experiment (differing in the seed only)."""
        return self.context, self.cell


# ---- reading a results table ------------------------------------------------------------------

def _empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _text(value: Any) -> str:
    return "" if _empty(value) else str(value).strip()


class _Reader:
    """Validation of one table row, with errors that name the row and the column."""

    def __init__(self, row: dict[str, Any], where: str):
        self.row, self.where = row, where

    def fail(self, column: str, what: str) -> MixkdError:
        return MixkdError(f"{self.where}, column '{column}': {what}")

    def choice(self, column: str, allowed: Iterable[str], default: str | None = None) -> str:
        value = _text(self.row.get(column)).lower()
        if not value and default is not None:
            return default
        allowed = tuple(allowed)
        if value not in allowed:
            raise self.fail(column, f"{value or 'empty'!r} is not one of {', '.join(allowed)}")
        return value

    def number(self, column: str, required: bool = False, low: float | None = None, high: float | None = None,
               integer: bool = False) -> float | None:
        raw = self.row.get(column)
        if _empty(raw):
            if required:
                raise self.fail(column, "is empty; give a number (leave unfinished runs out of the table)")
            return None
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise self.fail(column, f"{raw!r} is not a number") from None
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            span = f" between {low:g} and {high:g}" if low is not None and high is not None else ""
            raise self.fail(column, f"{raw!r} is not a finite number{span}")
        if integer and value != int(value):
            raise self.fail(column, f"{raw!r} is not a whole number")
        return value


def result_from_row(row: dict[str, Any], where: str = "row") -> Result:
    """One table row (a mapping with the :data:`COLUMNS`) as a :class:`Result`; a bad value raises
    :class:`MixkdError` naming the row and the column."""
    r = _Reader(row, where)
    teacher = _text(row.get("teacher")) or None
    student = _text(row.get("student"))
    if not student:
        raise r.fail("student", "is empty; give the student's architecture")
    kd = _text(row.get("kd")).lower()
    if kd == "alone":  # the study's name for a student trained alone
        if teacher is not None:
            raise r.fail("kd", f"'alone' with teacher {teacher!r}: a student trained alone has an empty teacher "
                               "and kd none; a distilled one names both")
        kd = "none"
    if kd.endswith(("_fmu", "_pmu")):
        base = "none" if kd[:-4] == "alone" else kd[:-4]
        raise r.fail("kd", f"{kd!r} is a study method, not a KD method: write {base!r} here and the mixing in "
                           "the mix and mix_fraction columns")
    if not kd or not kd.replace("_", "").replace("-", "").isalnum():
        raise r.fail("kd", f"{kd or 'empty'!r} is not a KD method: use none (trained alone), kd, std or another "
                           "method's name")
    if (teacher is None) != (kd == "none"):
        raise r.fail("kd", f"{kd!r} with teacher {teacher or 'empty'!r}: a student trained alone has an empty teacher "
                           "and kd none; a distilled one names both")
    teacher_mix = r.choice("teacher_mix", TEACHER_MIX_VALUES, default="none") if teacher else None
    temperature = r.number("temperature", low=1e-9, high=1e9)
    if temperature_free(kd) or kd == "none":
        temperature = None
    elif kd == "kd" and temperature is None:
        raise r.fail("temperature", "is empty; Hinton KD (kd) needs its temperature")
    mix = r.choice("mix", MIXES, default="none")
    fraction = sampling = None
    if mix != "none":
        fraction = r.number("mix_fraction", low=1e-9, high=1.0)
        fraction = 1.0 if fraction is None else fraction
        if fraction < 1.0:
            sampling = r.choice("sampling", SAMPLINGS, default="exact")
    alpha = r.number("mix_alpha", low=1e-9, high=1e9) if mix != "none" else None
    seed = r.number("seed", integer=True)
    top1 = r.number("top1", required=True, low=0.0, high=100.0)
    best = r.number("best_top1", low=0.0, high=100.0)
    t_stddev = r.number("t_stddev", low=0.0, high=1.0)
    test_loss = r.number("test_loss", low=0.0, high=1e6)
    settings = tuple((k, _text(row.get(k))) for k in SETTING_COLUMNS if not _empty(row.get(k)))
    context = Context(teacher, teacher_mix, student, settings)
    augment = _text(row.get("augment")) or None
    cell = Cell(kd, temperature, mix, fraction, None if alpha in (None, 1.0) else alpha, sampling,
                None if augment == DEFAULT_AUGMENT else augment)
    return Result(context, cell, None if seed is None else int(seed), float(top1), _text(row.get("id")) or where,
                  {"where": where, "id": _text(row.get("id"))}, best, t_stddev, test_loss)


def _records(rows: Any) -> list[dict[str, Any]]:
    """A list of mappings, or a pandas DataFrame (duck-typed: ``to_dict(orient="records")``)."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):
        return list(rows.to_dict(orient="records"))
    rows = list(rows)
    if not all(isinstance(r, dict) for r in rows):
        raise MixkdError("a results table is a list of dicts (one per trained student) or a pandas DataFrame")
    return rows


def results_from_rows(rows: Any, source: str = "the table", first: int = 1, unit: str = "row") -> list[Result]:
    """Every row of a results table as a :class:`Result` (see the module's docstring for the columns).
    A missing column or a bad value raises :class:`MixkdError` with one line saying where."""
    if isinstance(rows, list) and all(isinstance(r, Result) for r in rows):
        return rows  # records already (an empty list too: nothing to check)
    records = _records(rows)
    if not records:
        raise MixkdError(f"{source} has no rows; give one row per trained student with the columns "
                         f"{', '.join(COLUMNS)}")
    present = set().union(*(r.keys() for r in records))
    missing = [c for c in COLUMNS if c not in present]
    if missing:
        raise MixkdError(f"{source} lacks the column{'s' * (len(missing) > 1)} {', '.join(missing)}; a results table "
                         f"has the columns {', '.join(COLUMNS)} (one row per trained student)")
    aliases = [c for c in SCHEDULE_ALIASES if c in present]
    if aliases and "epochs" not in present:
        raise MixkdError(f"{source} gives the schedule as '{aliases[0]}': name that column 'epochs', so that runs of "
                         "different schedules are never pooled as seeds of one experiment")
    return percent(source, [result_from_row(r, f"{source}, {unit} {i}") for i, r in enumerate(records, first)])


FRACTION_NOTE = ("{metric} given as fractions (every value at most 1): read as {metric} × 100 %; give percentages "
                 "to silence this note")


def percent(source: str, results: list[Result]) -> list[Result]:
    """``results`` with top-1 in %: a table whose every value of a metric is at most 1 gives fractions (multiplied
    by 100, and ``extra["fraction"]`` lists the metrics converted: :func:`fraction_notes` says so); a value
    below 1 among percentages whose range holds its 100-fold is a fraction by mistake: refused, naming the row."""
    scaled: list[str] = []
    for metric in METRIC_COLUMNS:
        values = [(r.value(metric), r) for r in results if r.value(metric) is not None]
        if not values:
            continue
        if max(v for v, _ in values) <= 1.0:
            scaled.append(metric)
            continue
        large = [v for v, _ in values if v > 1.0]
        for v, r in values:
            if 0 < v < 1.0 and min(large) <= 100 * v <= max(large):
                other = next(o for w, o in values if w > 1.0)
                raise MixkdError(f"{r.extra.get('where', r.run)}, column '{metric}': {v:g} looks like a fraction of 1 "
                                 f"while {other.extra.get('where', other.run)} gives {other.value(metric):g} in %: give "
                                 f"every {metric} in % (or every one as a fraction)")
    if not scaled:
        return results
    out = []
    for r in results:
        top1 = 100 * r.top1 if "top1" in scaled else r.top1
        best = 100 * r.best_top1 if "best_top1" in scaled and r.best_top1 is not None else r.best_top1
        out.append(Result(r.context, r.cell, r.seed, top1, r.run, {**r.extra, "fraction": scaled}, best, r.t_stddev,
                          r.test_loss))
    return out


def fraction_notes(results: list[Result]) -> list[str]:
    """The notes of :func:`percent`'s conversions."""
    scaled = next((r.extra["fraction"] for r in results if r.extra.get("fraction")), [])
    return [FRACTION_NOTE.format(metric=m) for m in scaled]


def repeated_runs(results: list[Result]) -> None:
    """Refuse a (cell, seed) given twice in one context (a row given twice gives a zero-width interval): one line
    naming both rows. Runs of one cell and seed with different ids (e.g. from teachers of different seeds) are
    distinct runs, kept."""
    seen: dict[tuple, Result] = {}
    for r in results:
        if r.seed is None:
            continue
        key = (r.context, r.cell, r.seed)
        first = seen.get(key)
        if first is not None and first.extra.get("id", first.run) == r.extra.get("id", r.run):
            where = first.extra.get("where") or first.run
            again = r.extra.get("where") or r.run
            raise MixkdError(f"{where} and {again} are one run twice ({r.context.label}, {r.cell.label}, seed {r.seed}): "
                             "give each run once (a repeated row would count as a second seed); runs that differ in "
                             "something the table does not show need distinct ids in an 'id' column")
        seen.setdefault(key, r)


def read_csv(path: str | Path) -> list[Result]:
    """A results table from a CSV file (header row with the :data:`COLUMNS`)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise MixkdError(f"results table not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MixkdError(f"cannot read the results table {path}: {e}") from None
    if not rows:
        raise MixkdError(f"{path} has no rows; give a header and one row per trained student with the columns "
                         f"{', '.join(COLUMNS)}")
    for line, row in enumerate(rows, 2):
        if None in row:  # csv.DictReader's key for the fields beyond the header's
            raise MixkdError(f"{path}, line {line} has {len(row) - 1 + len(row[None])} fields, the header "
                             f"{len(row) - 1}: quote a value that holds a comma, or give the column a name")
    return results_from_rows(rows, str(path), first=2, unit="line")  # line 1 is the header


# ---- records from run configs (a study folder's runs, a study's planned runs) --------------------------

TEACHER_MIXES = {"plain": "none", "mixup": "mixup", "cutmix": "cutmix"}


DEFAULT_AUGMENT = "flip_crop"  # RunConfig's augment default: a table without an augment column used it
_MIX_POLICIES = ("mixup", "cutmix")  # the mix column's, not the augment column's


def sample_augment(spec: str) -> str:
    """The augment column of a run's spec: its policies but mixup and CutMix (the mix column has those)."""
    return "+".join(p for p in spec.split("+") if p not in _MIX_POLICIES) or "none"


def augment_label(spec: str) -> str:
    """A spec's label from the augmentation registry ('flip_crop+cutout' -> 'flip+crop+Cutout'); imported
    here, when a table has policies, so that tables without (and ``mixkd claims`` on them) stay torch-free."""
    from mixkd.augment import augment_label as label

    return label(spec)


def cell_from_config(cfg: dict[str, Any]) -> Cell:
    """The cell of a run from its config tree (a RunConfig's keys; defaults where a key is missing)."""
    mix, kd = cfg.get("mix") or {}, cfg.get("kd") or {}
    mixing = mix.get("method") or "none"
    spec = str(cfg.get("augment") or DEFAULT_AUGMENT)
    if mixing == "none":  # mixup / CutMix named in augment instead of mix.method
        mixing = next((p for p in spec.split("+") if p in _MIX_POLICIES), "none")
    fraction = float(mix.get("fraction", 1.0)) if mixing != "none" else None
    alpha = float(mix.get("alpha", 1.0)) if mixing != "none" else None
    sampling = (mix.get("sampling") or "exact") if fraction is not None and fraction < 1 else None
    method = (kd.get("method") or "kd") if cfg.get("task") == "distill" else "none"
    temperature = None
    if method != "none" and not temperature_free(method):
        temperature = float(kd.get("temperature", 4.0))
    augment = sample_augment(spec)
    return Cell(method, temperature, mixing, fraction, None if alpha == 1.0 else alpha, sampling,
                None if augment == DEFAULT_AUGMENT else augment)


def context_from_config(cfg: dict[str, Any], teacher_model: str | None, teacher_mix_label: str | None) -> Context:
    """The context of a run: its teacher (architecture and mix label, e.g. 'plain', 'mixup', 'mixup-a0.2',
    'external'; None for a student trained alone), its student and its shared settings."""
    optim = cfg.get("optim") or {}
    settings = tuple((k, str(v)) for k, v in (("dataset", cfg.get("dataset")), ("epochs", cfg.get("epochs")),
                                              ("batch_size", cfg.get("batch_size")), ("lr", optim.get("lr")))
                     if v is not None)
    if cfg.get("task") != "distill":
        return Context(None, None, str(cfg.get("model")), settings)
    label = teacher_mix_label or "external"
    model = teacher_model or "?"
    if label in TEACHER_MIXES:
        return Context(model, TEACHER_MIXES[label], str(cfg.get("model")), settings)
    return Context(f"{model} ({label})", label.split("-")[0] if label.split("-")[0] in MIXES and "-f" not in label
                   else label, str(cfg.get("model")), settings)


def table_rows(results: list[Result]) -> list[dict[str, Any]]:
    """Results records as rows of a results table (:data:`COLUMNS`, the settings, and the run as ``id``):
    what :func:`results_from_rows` reads back."""
    rows = []
    for r in results:
        ctx, cell = r.context, r.cell
        teacher_mix = (ctx.teacher_mix if ctx.teacher_mix in TEACHER_MIX_VALUES else "other") if ctx.teacher else ""
        rows.append({"teacher": ctx.teacher or "", "teacher_mix": teacher_mix,
                     "student": ctx.student, "kd": cell.kd,
                     "temperature": "" if cell.temperature is None else f"{cell.temperature:g}", "mix": cell.mix,
                     "mix_fraction": "" if cell.fraction is None else f"{cell.fraction:g}",
                     "sampling": cell.sampling or "", "seed": "" if r.seed is None else r.seed, "top1": r.top1,
                     "best_top1": "" if r.best_top1 is None else r.best_top1,
                     "mix_alpha": "" if cell.alpha is None else f"{cell.alpha:g}",
                     "augment": cell.augment or DEFAULT_AUGMENT,
                     "t_stddev": "" if r.t_stddev is None else r.t_stddev,
                     "test_loss": "" if r.test_loss is None else r.test_loss,
                     **{k: dict(ctx.settings).get(k, "") for k in SETTING_COLUMNS}, "id": r.run})
    return rows


def write_csv(results: list[Result], path: str | Path) -> None:
    """A results table (CSV) that ``mixkd claims`` reads: one row per result."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "best_top1", "mix_alpha", "augment", "t_stddev", "test_loss",
                                                   *SETTING_COLUMNS, "id"])
            writer.writeheader()
            writer.writerows(table_rows(results))

    atomic_write(path, write)
