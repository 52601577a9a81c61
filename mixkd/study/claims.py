"""The study's claims, tested on a study folder's finished runs: comparisons, seed spread, verdicts.

Each claim (the study's four, and a fifth of ours, see :data:`CLAIMS`) rests on comparisons of two
*sides*, each a column of the report's table in one teacher -> student row: the finished runs of one
method (with its temperature, mixed fraction, alpha, mix mode and mix sampling) distilled from one
teacher (architecture and mixing, seeds pooled, as the table pools them) into one student
architecture, or the student trained alone. A side's values are its runs' metric (by default the
last epoch's top-1, in %), one per seed.

The difference is ``mean(A) - mean(B)`` in points, signed so that a positive difference goes the
claim's way. It is *decisive* when it stands out of the seed noise:

* both sides with at least 3 seeds: the bootstrap 95% interval of the difference (resample each
  side's seeds with replacement, within that side; take the difference of the two resampled means;
  10,000 resamples, numpy generator seed 0; the 2.5th and 97.5th percentiles) excludes 0, and
  ``|difference| > NOISE_FLOOR``;
* fewer seeds: ``|difference| > max(pooled seed std of the two sides, NOISE_FLOOR)`` (pooled std:
  ``sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2))``);
* one seed a side: no spread is measured at all, so the threshold is ``SINGLE_SEED_FLOOR`` (1 point,
  twice the top of CIFAR-100's run-to-run spread) and the rule says "single seed".

``NOISE_FLOOR`` is 0.3 points, the low end of the run-to-run spread of CIFAR-100 top-1 (about +-0.3
to 0.5 points, RepDistiller / the study): a difference that small is never decisive.

A comparison "A beats B" (``sense="greater"``) *holds* when the difference is decisive and
positive, *does not hold* when decisive and negative, and is *inconclusive* otherwise. "A does at
least as well as B" (``sense="at least"``) holds unless A is decisively worse. A claim holds when
every comparison it rests on holds, does not hold when any does not, is inconclusive otherwise, and
is *not tested* when the folder has none of its comparisons (the parts it lacks are listed).

Claims 2 and 3 are the paper's, about its partial mixup: exactly the fraction (10%) of each batch
mixed, ``mix.sampling: exact``. In a folder with both samplings they use the exact-sampling PMU
columns only; the exact-vs-reference difference is claim 5's. A folder whose PMU runs all have one
sampling uses them as they are.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

NOISE_FLOOR = 0.3  # points of top-1: the low end of CIFAR-100's run-to-run spread (REFERENCE: +-0.3 to 0.5)
SINGLE_SEED_FLOOR = 1.0  # one seed a side: the spread is unmeasured; twice the top of that spread
BOOTSTRAP_MIN_SEEDS = 3
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
_EPS = 1e-9  # a difference equal to the threshold, up to float rounding, is not decisive
VERDICTS = ("holds", "does not hold", "inconclusive", "not tested")

Sense = Literal["greater", "at least"]
_SHORT = {"alone": "student alone", "kd": "KD", "kd_fmu": "KD+FMU", "kd_pmu": "KD+PMU", "std": "STD",
          "std_fmu": "STD+FMU", "std_pmu": "STD+PMU"}


# ---- statistics ---------------------------------------------------------------------------------

def bootstrap_interval(a: list[float], b: list[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(a) - mean(b)``: each side's values resampled with
    replacement within that side (``resamples`` times, numpy ``default_rng(seed)``)."""
    rng = np.random.default_rng(seed)
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ma = xa[rng.integers(0, len(xa), size=(resamples, len(xa)))].mean(axis=1)
    mb = xb[rng.integers(0, len(xb), size=(resamples, len(xb)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(ma - mb, [tail, 100 - tail])
    return float(lo), float(hi)


def pooled_std(a: list[float], b: list[float]) -> float:
    """The two sides' pooled sample standard deviation (0 when neither has two values)."""
    dof = len(a) + len(b) - 2
    if dof <= 0:
        return 0.0
    ss = sum((x - statistics.fmean(a)) ** 2 for x in a) + sum((x - statistics.fmean(b)) ** 2 for x in b)
    return math.sqrt(ss / dof)


# ---- sides and comparisons ----------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """A column of the report's table: a method and its settings (None where they do not apply)."""

    method: str
    temperature: float | None = None  # Hinton KD only
    fraction: float | None = None  # partial mixup only
    alpha: float | None = None  # mixing only
    cutmix: bool = False
    sampling: str | None = None  # partial mixup only: exact or reference

    @property
    def label(self) -> str:
        parts = [_SHORT.get(self.method, self.method)]
        parts += [f"T={self.temperature:g}"] if self.temperature is not None else []
        parts += [f"f={self.fraction:g}"] if self.fraction is not None else []
        parts += [f"α={self.alpha:g}"] if self.alpha not in (None, 1.0) else []
        parts += ["cutmix"] if self.cutmix else []
        parts += [f"({self.sampling} sampling)"] if self.sampling not in (None, "exact") else []
        return " ".join(parts)


def _num(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def cell_of(row: dict[str, Any]) -> Cell:
    method = row["method"]
    mixing = row.get("mix_method") not in (None, "", "none")
    pmu = method.endswith("_pmu")
    return Cell(method, _num(row.get("temperature")), _num(row.get("mix_fraction")) if pmu else None,
                _num(row.get("mix_alpha")) if mixing else None, row.get("mix_method") == "cutmix",
                (row.get("mix_sampling") or "exact") if pmu else None)


@dataclass
class Side:
    label: str
    runs: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "runs": self.runs, "values": self.values, "mean": self.mean, "std": self.std,
                "n": self.n}


@dataclass
class Comparison:
    part: str
    teacher: str  # the row's teacher: architecture (mixing), seeds pooled
    student: str
    a: Side
    b: Side
    sense: Sense
    difference: float
    interval: tuple[float, float] | None  # bootstrap 95% interval, with >= 3 seeds a side
    noise: float  # the threshold |difference| must pass
    rule: Literal["bootstrap", "noise", "single seed"]
    verdict: str

    @property
    def statement(self) -> str:
        return f"{self.a.label} {'>' if self.sense == 'greater' else '≥'} {self.b.label}"

    def as_dict(self) -> dict[str, Any]:
        return {"part": self.part, "teacher": self.teacher, "student": self.student, "statement": self.statement,
                "sense": self.sense, "a": self.a.as_dict(), "b": self.b.as_dict(), "difference": self.difference,
                "interval_95": list(self.interval) if self.interval else None, "noise": self.noise,
                "rule": self.rule, "verdict": self.verdict}


def compare(part: str, teacher: str, student: str, a: Side, b: Side, sense: Sense,
            noise_floor: float = NOISE_FLOOR) -> Comparison:
    """A against B under the rules of the module's docstring."""
    diff = a.mean - b.mean
    if a.n >= BOOTSTRAP_MIN_SEEDS and b.n >= BOOTSTRAP_MIN_SEEDS:
        interval: tuple[float, float] | None = bootstrap_interval(a.values, b.values)
        noise, rule = noise_floor, "bootstrap"
        decisive = (interval[0] > 0 or interval[1] < 0) and abs(diff) > noise + _EPS
    elif a.n + b.n > 2:
        interval, rule = None, "noise"
        noise = max(pooled_std(a.values, b.values), noise_floor)
        decisive = abs(diff) > noise + _EPS
    else:
        interval, rule = None, "single seed"
        noise = max(SINGLE_SEED_FLOOR, noise_floor)
        decisive = abs(diff) > noise + _EPS
    if decisive:
        verdict = "holds" if diff > 0 else "does not hold"
    else:
        verdict = "holds" if sense == "at least" else "inconclusive"
    return Comparison(part, teacher, student, a, b, sense, diff, interval, noise, rule, verdict)


# ---- the claims ---------------------------------------------------------------------------------

Context = tuple[str, str]  # (teacher name, student model)
Table = dict[Context, dict[Cell, Side]]


def _natural(text: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text.lower())]


def _teacher_label(row: dict[str, Any]) -> str:
    if row.get("teacher_mix") == "external":
        return f"{row.get('teacher_model') or '?'} ({row['teacher']})"
    return f"{row.get('teacher_model')} ({row.get('teacher_mix')})"


def _is_mixt(teacher: str) -> bool:
    """A teacher trained with full mixup (any alpha): 'resnet56 (mixup)', 'resnet56 (mixup-a0.2)'."""
    mix = teacher.rsplit(" (", 1)[-1].rstrip(")").split("-")
    return mix[0] == "mixup" and not any(p.startswith("f") for p in mix[1:])


def _is_plain(teacher: str) -> bool:
    return teacher.endswith(" (plain)")


def _kd(temperature: float) -> Cell:
    return Cell("kd", temperature)


def _pairs_claim1(table: Table, alone: dict[str, dict[Cell, Side]]):
    for (teacher, student), cells in table.items():
        t1, t4 = cells.get(_kd(1.0)), cells.get(_kd(4.0))
        if t1 and t4 and _is_mixt(teacher):
            yield "Mix-T: T = 1 > T = 4", teacher, student, t1, t4, "greater"
        if t1 and t4 and _is_plain(teacher):
            yield "plain teacher: T = 4 ≥ T = 1", teacher, student, t4, t1, "at least"


def _pairs_claim2(table: Table, alone):
    for (teacher, student), cells in table.items():
        for cell, side in cells.items():
            if cell.method.endswith("_pmu"):
                full = Cell(cell.method.replace("_pmu", "_fmu"), cell.temperature, None, cell.alpha, cell.cutmix)
                if full in cells:
                    yield "PMU > FMU", teacher, student, side, cells[full], "greater"


def _at_t4(cell: Cell) -> bool:
    return cell.temperature in (None, 4.0)


def _pairs_claim3(table: Table, alone):
    for (teacher, student), cells in table.items():
        std, kd4 = cells.get(Cell("std")), cells.get(_kd(4.0))
        if std and kd4:
            yield "STD ≥ KD at T = 4", teacher, student, std, kd4, "at least"
        for cell, side in cells.items():
            if cell.method != "std_pmu":
                continue
            for other, other_side in cells.items():
                if other.method != "std_pmu" and _at_t4(other):
                    yield "STD+PMU best at T = 4", teacher, student, side, other_side, "greater"


def _pairs_claim4(table: Table, alone: dict[str, dict[Cell, Side]]):
    for (teacher, student), cells in table.items():
        base = alone.get(student, {}).get(Cell("alone"))
        if base:
            for side in cells.values():
                yield "KD > alone", teacher, student, side, base, "greater"


def _pairs_claim5(table: Table, alone):
    for (teacher, student), cells in table.items():
        for cell, side in cells.items():
            if cell.sampling == "exact":
                ref = Cell(cell.method, cell.temperature, cell.fraction, cell.alpha, cell.cutmix, "reference")
                if ref in cells:
                    yield "exact ≥ reference", teacher, student, side, cells[ref], "at least"


@dataclass(frozen=True)
class ClaimSpec:
    number: int
    text: str
    parts: dict[str, str]  # part name -> the runs it needs (said when the folder lacks them)
    pairs: Any  # (table, alone) -> iterable of (part, teacher, student, A, B, sense)
    exact_only: bool = False  # with both PMU samplings in the folder, leave reference-sampling columns out


_EXACT_ONLY = ("With both PMU samplings in the folder, only sampling: exact runs count here (the paper's partial "
               "mixup: exactly the fraction of each batch mixed); claim 5 compares exact with reference.")

CLAIMS: list[ClaimSpec] = [
    ClaimSpec(1, "Students of a mixup teacher (Mix-T) do better at T = 1 than at T = 4; from a plain teacher T = 4 "
                 "is better or equal.",
              {"Mix-T: T = 1 > T = 4": "KD students at T = 1 and T = 4 of a mixup (Mix-T) teacher",
               "plain teacher: T = 4 ≥ T = 1": "KD students at T = 1 and T = 4 of a plain teacher"}, _pairs_claim1),
    ClaimSpec(2, "Partial mixup (PMU) in the student beats full mixup (FMU) under KD. " + _EXACT_ONLY,
              {"PMU > FMU": "KD + PMU and KD + FMU students of the same teacher (same T)"}, _pairs_claim2, True),
    ClaimSpec(3, "Standardized KD (STD) does at least as well as Hinton KD at T = 4; STD + PMU is best of all. "
                 + _EXACT_ONLY,
              {"STD ≥ KD at T = 4": "STD and KD (T = 4) students of the same teacher",
               "STD+PMU best at T = 4": "STD + PMU and other distilled students (T = 4) of the same teacher"},
              _pairs_claim3, True),
    ClaimSpec(4, "Any KD beats the student trained alone.",
              {"KD > alone": "the student alone and distilled students of the same architecture"}, _pairs_claim4),
    ClaimSpec(5, "(Ours, REFERENCE claim 5.) PMU as the paper's text defines it (sampling: exact, 10% mixed) does at "
                 "least as well as the released code's PMU (sampling: reference, about 41% mixed at batch 64); "
                 "claims 2 and 3 use only the exact runs when the folder has both.",
              {"exact ≥ reference": "PMU students with sampling: exact and sampling: reference (same teacher, "
                                    "method, T and fraction)"}, _pairs_claim5),
]


@dataclass
class Claim:
    number: int
    text: str
    comparisons: list[Comparison]
    not_tested: list[str]  # parts without comparisons: what they need

    @property
    def verdict(self) -> str:
        verdicts = {c.verdict for c in self.comparisons}
        if not verdicts:
            return "not tested"
        if "does not hold" in verdicts:
            return "does not hold"
        return "holds" if verdicts == {"holds"} else "inconclusive"

    def counts(self) -> dict[str, int]:
        return {v: sum(c.verdict == v for c in self.comparisons) for v in VERDICTS[:3]}

    def as_dict(self) -> dict[str, Any]:
        return {"claim": self.number, "text": self.text, "verdict": self.verdict, "counts": self.counts(),
                "not_tested": self.not_tested, "comparisons": [c.as_dict() for c in self.comparisons]}


def _tables(rows: list[dict[str, Any]], metric: str) -> tuple[Table, dict[str, dict[Cell, Side]]]:
    """Finished students grouped into (teacher, student) rows of cells, and the students alone per model."""
    table: Table = defaultdict(dict)
    alone: dict[str, dict[Cell, Side]] = defaultdict(dict)
    for r in rows:
        value = _num(r.get(metric))
        if r.get("role") != "student" or r.get("status") != "done" or value is None or math.isnan(value):
            continue
        cell = cell_of(r)
        if r.get("teacher"):
            cells = table[_teacher_label(r), r["model"]]
        elif cell.method == "alone":
            cells = alone[r["model"]]
        else:  # trained alone with mixup: not a column any claim uses
            continue
        side = cells.setdefault(cell, Side(cell.label))
        side.runs.append(r["id"])
        side.values.append(value)
    return table, alone


def _exact_only(table: Table) -> Table:
    """``table`` without its reference-sampling PMU columns when it also has exact-sampling ones."""
    samplings = {cell.sampling for cells in table.values() for cell in cells}
    if not {"exact", "reference"} <= samplings:
        return table
    return {ctx: {cell: side for cell, side in cells.items() if cell.sampling in (None, "exact")}
            for ctx, cells in table.items()}


def evaluate_claims(rows: list[dict[str, Any]], metric: str = "top1",
                    noise_floor: float = NOISE_FLOOR) -> list[Claim]:
    """Every claim of :data:`CLAIMS` on result rows (:func:`mixkd.study.report.collect`'s layout)."""
    table, alone = _tables(rows, metric)
    exact_table = _exact_only(table)
    key = {c: i for i, c in enumerate(sorted(table, key=lambda c: (not _is_plain(c[0]), _natural(c[0]),
                                                                   _natural(c[1]))))}
    claims = []
    for spec in CLAIMS:
        comparisons = [compare(part, teacher, student, a, b, sense, noise_floor)
                       for part, teacher, student, a, b, sense in spec.pairs(exact_table if spec.exact_only
                                                                             else table, alone)]
        order = list(spec.parts)
        comparisons.sort(key=lambda c: (order.index(c.part), key[c.teacher, c.student], c.a.label, c.b.label))
        tested = {c.part for c in comparisons}
        missing = [f"{part}: needs {needs}" for part, needs in spec.parts.items() if part not in tested]
        claims.append(Claim(spec.number, spec.text, comparisons, missing))
    return claims


# ---- output -------------------------------------------------------------------------------------

RULES = [
    "difference = mean(A) − mean(B) over seeds, in points; positive goes the claim's way",
    f"decisive, with ≥ {BOOTSTRAP_MIN_SEEDS} seeds a side: the bootstrap 95% interval excludes 0 (seeds resampled "
    f"with replacement within each side, difference of the resampled means, {BOOTSTRAP_RESAMPLES:,} resamples, "
    f"numpy seed {BOOTSTRAP_SEED}, 2.5th and 97.5th percentiles) and |difference| > {NOISE_FLOOR:g}",
    f"decisive, with fewer seeds: |difference| > max(pooled seed std of A and B, {NOISE_FLOOR:g}); {NOISE_FLOOR:g} "
    "points is the noise floor, the low end of CIFAR-100's run-to-run spread (±0.3 to 0.5)",
    f"decisive, with one seed a side (no spread measured): |difference| > {SINGLE_SEED_FLOOR:g}, twice the top of "
    "that spread",
    "'A > B' holds when decisive and positive, does not hold when decisive and negative, else is inconclusive; "
    "'A ≥ B' holds unless A is decisively worse",
    "a claim holds when all its comparisons hold, does not hold when any does not, else is inconclusive; not "
    "tested when the folder has none of its comparisons",
]


def claims_json(claims: list[Claim], metric: str = "top1") -> dict[str, Any]:
    """The claims as written to ``claims.json``: ``{"metric", "noise_floor", "rules", "claims": [...]}``."""
    return {"metric": metric, "noise_floor": NOISE_FLOOR, "bootstrap": {"min_seeds": BOOTSTRAP_MIN_SEEDS,
            "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": 0.95}, "rules": RULES,
            "claims": [c.as_dict() for c in claims]}


def _side_text(side: Side) -> str:
    return f"{side.mean:.2f} ± {side.std:.2f} (n={side.n})" if side.n > 1 else f"{side.mean:.2f} (n=1)"


_PLURAL = {"holds": "hold", "does not hold": "do not hold", "inconclusive": "inconclusive"}


def _summary(claim: Claim) -> str:
    counts = claim.counts()
    parts = [f"{len(claim.comparisons)}: " + ", ".join(f"{n} {v if n == 1 else _PLURAL[v]}"
                                                       for v, n in counts.items() if n)] if claim.comparisons else []
    parts += [f"not tested: {m}" for m in claim.not_tested]
    return "; ".join(parts)


def claims_markdown(claims: list[Claim], metric_label: str = "top-1 at the last epoch") -> list[str]:
    """The report's ``## Claims`` section, as lines."""
    lines = ["## Claims", "",
             f"The study's claims tested on this folder's finished runs (student {metric_label}, %). Each rests on "
             "comparisons of two columns of the table above in the same teacher → student row (seeds pooled); "
             "`claims.json` has every comparison with its runs and values.", "",
             *[f"- {rule}" for rule in RULES], "",
             "| # | claim | verdict | comparisons |", "|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c.number} | {c.text} | **{c.verdict}** | {_summary(c)} |")
    lines.append("")
    rows = [(c.number, cmp) for c in claims for cmp in c.comparisons]
    if rows:
        lines += ["### Comparisons", "",
                  "| # | teacher → student | comparison | A | B | A − B | 95% interval | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for number, cmp in rows:
            interval = f"[{cmp.interval[0]:+.2f}, {cmp.interval[1]:+.2f}]" if cmp.interval else "–"
            lines.append(f"| {number} | {cmp.teacher} → {cmp.student} | {cmp.statement} | {_side_text(cmp.a)} | "
                         f"{_side_text(cmp.b)} | {cmp.difference:+.2f} | {interval} | {cmp.verdict} |")
        lines.append("")
    return lines
