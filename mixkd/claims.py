"""The study's five claims, checked on any results table: comparisons, 95% intervals, verdicts.

``check(rows, noise=None, margin=0.5)`` takes a results table (see :mod:`mixkd.results` for its
columns: a list of dicts, a pandas DataFrame, or :class:`~mixkd.results.Result` records) and returns
one :class:`ClaimResult` per claim. ``mixkd claims TABLE.csv`` prints the same, and ``mixkd study
report`` writes it into ``report.md`` and ``claims.json``.

**A comparison** of two columns A and B of one row (the same teacher, student and settings) is the
difference of their means over seeds, ``mean(A) - mean(B)`` in points of top-1, with a 95% interval:

* two or more runs a side: Welch's t interval (unequal variances, Welch-Satterthwaite degrees of
  freedom);
* one run on one side, two or more on the other: Student's t with the spread of the side that has
  one (``s * sqrt(1/n_a + 1/n_b)``, ``n - 1`` degrees of freedom, equal spreads assumed: the only
  spread measured);
* one run a side: no spread is measured, and the comparison is **inconclusive**, unless a per-run
  standard deviation ``noise`` (sigma) is given: then a normal interval ``diff +- 1.96 sigma sqrt(2)``,
  and the verdict says "assuming sigma = ...". ``noise`` is used only where the runs measure no spread.

Runs are not paired by seed: mixkd's seed sets a run's initialization, data order and mixing, but no
measurement here shows that two methods' runs of one seed are correlated, so the unpaired interval
is the one whose error rate is known (``bench/claims_sim.py``).

A *strict* comparison (A > B) **holds** when its interval lies above 0 and **does not hold** when
the evidence is against it; a *non-inferiority* comparison (A >= B, "at least as well") holds when
the interval lies above ``-margin`` (``margin`` in points, default 0.5, printed beside the verdict)
and does not hold when the evidence puts it below ``-margin``; otherwise **inconclusive**.

**A claim** is made of *parts* (e.g. claim 1: "from a Mix-T teacher T = 1 > T = 4" and "from a
plain teacher T = 4 >= T = 1"), each resting on one comparison per row of the table where it
applies. The claim **holds** when every part was tested and every comparison holds (each at 95%: an
intersection-union test, whose false "holds" rate is at most 2.5%); it **does not hold** when a
comparison is decisively against it, with the one-sided p-values of all its comparisons adjusted by
Holm's method (family-wise error at most 2.5%); it is **inconclusive** otherwise, and lists the parts
that were not tested; **not tested** when no part has a comparison. These four words are the verdicts
in the text, ``report.md`` and ``claims.json``.

Error rates measured by simulation (``bench/claims_sim.py``, table in BENCHMARKS.md): false "holds"
and false "does not hold" below 5% at 1 (with ``noise``), 2, 3 and 5 seeds per cell.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from scipy import special

from mixkd.errors import MixkdError
from mixkd.mix import reference_mixed_share
from mixkd.results import KD_SHORT, PARTIAL_FRACTION, Cell, Context, Result, natural, results_from_rows

LEVEL = 0.95
SIDE = (1 - LEVEL) / 2  # each tail of the 95% interval: the level of each one-sided decision
DEFAULT_MARGIN = 0.5  # points of top-1: "at least as well" allows this much less
DEFAULT_SIGMA = 0.4  # points: an assumed per-run spread for planning (CIFAR-100 +-0.3 to 0.5: docs/study-claims-reference.md)
SIGMA_SOURCE = "CIFAR-100 run-to-run spread about ±0.3 to 0.5 points (docs/study-claims-reference.md)"
POWER = 0.8  # the smallest detectable difference: the one decided with this probability
REFERENCE_BATCH = 64  # the recipe's batch size, for the reference sampling's mixed share when none is given
SHARE_TOLERANCE = 0.01  # an exact PMU within this of the reference's mixed share "mixes as much"
VERDICTS = ("holds", "does not hold", "inconclusive", "not tested")


# ---- one comparison's statistics ----------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """``mean(a) - mean(b)`` with its standard error, degrees of freedom and 95% interval (``se`` None:
    no spread measured, no interval)."""

    difference: float
    se: float | None
    df: float
    basis: str  # "Welch", "Student t, one run on one side", "assumed sigma", "unmeasured"
    sigma: float | None = None  # the assumed per-run sigma, for basis "assumed sigma"

    @property
    def half_width(self) -> float | None:
        return None if self.se is None else _quantile(1 - SIDE, self.df) * self.se

    @property
    def low(self) -> float | None:
        return None if self.se is None else self.difference - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.se is None else self.difference + self.half_width

    def p_above(self, threshold: float) -> float:
        """One-sided p-value against "the true difference is at most ``threshold``" (small: above it)."""
        return self._tail((self.difference - threshold), upper=True)

    def p_below(self, threshold: float) -> float:
        """One-sided p-value against "the true difference is at least ``threshold``" (small: below it)."""
        return self._tail((self.difference - threshold), upper=False)

    def _tail(self, distance: float, upper: bool) -> float:
        if self.se is None:
            return 1.0
        if self.se == 0:
            return 0.0 if (distance > 0) == upper and distance != 0 else 1.0
        z = -distance / self.se if upper else distance / self.se  # P(T > t) = P(T < -t)
        return float(special.ndtr(z) if math.isinf(self.df) else special.stdtr(self.df, z))


@functools.lru_cache(maxsize=4096)
def _quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (the normal's for df = inf)."""
    return float(special.ndtri(p) if math.isinf(df) else special.stdtrit(df, p))


def _variance(values: list[float]) -> float:
    """The sample variance (n - 1), in plain floats (statistics.variance computes in exact fractions: slow)."""
    mean = math.fsum(values) / len(values)
    return math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)


def difference_interval(a: list[float], b: list[float], noise: float | None = None) -> Interval:
    """The statistics of ``mean(a) - mean(b)`` under the rules of the module's docstring."""
    na, nb = len(a), len(b)
    if na == 0 or nb == 0:
        raise ValueError("a comparison needs at least one run a side")
    diff = statistics.fmean(a) - statistics.fmean(b)
    if na >= 2 and nb >= 2:
        va, vb = _variance(a) / na, _variance(b) / nb
        se = math.sqrt(va + vb)
        denom = (va ** 2 / (na - 1) if va else 0.0) + (vb ** 2 / (nb - 1) if vb else 0.0)
        df = (va + vb) ** 2 / denom if denom > 0 else float(na + nb - 2)
        return Interval(diff, se, df, "Welch")
    if na + nb > 2:
        spread = math.sqrt(_variance(a if na > 1 else b))
        return Interval(diff, spread * math.sqrt(1 / na + 1 / nb), float(max(na, nb) - 1),
                        "Student t, one run on one side")
    if noise is not None:
        return Interval(diff, noise * math.sqrt(2), math.inf, "assumed sigma", noise)
    return Interval(diff, None, 0.0, "unmeasured")


def detectable_difference(na: int, nb: int, sigma: float, power: float = POWER) -> float:
    """The true difference (beyond a comparison's threshold) that its interval decides with probability
    ``power``, for runs of per-run spread ``sigma`` (normal approximation with t quantiles)."""
    if na >= 2 and nb >= 2:
        df = float(na + nb - 2)  # Welch's degrees of freedom for equal spreads and sizes, about
    elif na + nb > 2:
        df = float(max(na, nb) - 1)
    else:
        df = math.inf
    return (_quantile(1 - SIDE, df) + _quantile(power, df)) * sigma * math.sqrt(1 / na + 1 / nb)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (family-wise error control), in their order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


# ---- sides and comparisons ----------------------------------------------------------------------

@dataclass
class Side:
    """The runs of one cell in one context (seeds pooled)."""

    context: Context
    cell: Cell
    runs: list[str] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.cell.label

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
        return {"label": self.label, "runs": self.runs, "seeds": self.seeds, "values": self.values,
                "mean": self.mean, "std": self.std, "n": self.n}


@dataclass
class Comparison:
    part: str
    context: Context
    a: Side
    b: Side
    margin: float | None  # None: strict (A > B); else non-inferiority (A >= B - margin)
    interval: Interval
    p_holds: float  # one-sided p-value for "holds" (against: the difference is at most the threshold)
    p_against: float  # one-sided p-value for "does not hold", before Holm
    p_against_holm: float = 1.0
    verdict: str = "inconclusive"

    @property
    def threshold(self) -> float:
        return 0.0 if self.margin is None else -self.margin

    @property
    def statement(self) -> str:
        return f"{self.a.label} {'>' if self.margin is None else '≥'} {self.b.label}"

    @property
    def qualifier(self) -> str:
        """What the verdict assumes or allows: the margin of a non-inferiority, an assumed sigma."""
        bits = [f"margin {self.margin:g}"] if self.margin is not None else []
        bits += [f"assuming sigma = {self.interval.sigma:g}"] if self.interval.basis == "assumed sigma" else []
        return ", ".join(bits)

    def as_dict(self) -> dict[str, Any]:
        iv = self.interval
        return {"part": self.part, "teacher": self.context.teacher_label if self.context.teacher else None,
                "student": self.context.student, "settings": dict(self.context.settings),
                "statement": self.statement, "kind": "strict" if self.margin is None else "non-inferiority",
                "margin": self.margin, "a": self.a.as_dict(), "b": self.b.as_dict(), "difference": iv.difference,
                "interval_95": None if iv.se is None else [iv.low, iv.high], "se": iv.se,
                "df": None if iv.se is None or math.isinf(iv.df) else iv.df, "basis": iv.basis,
                "assumed_sigma": iv.sigma, "p_holds": self.p_holds, "p_against": self.p_against,
                "p_against_holm": self.p_against_holm, "verdict": self.verdict}


# ---- the claims ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    """A planned comparison: part, context, the cells of A and B, and its margin (None: strict)."""

    part: str
    context: Context
    a: Cell
    b: Cell
    margin: float | None


@dataclass
class Grid:
    """The runs grouped: distilled cells per context, the student alone per (student, settings)."""

    cells: dict[Context, dict[Cell, Side]]
    alone: dict[tuple[str, tuple], Side]
    notes: list[str]

    @property
    def kd_methods(self) -> list[str]:
        found = {cell.kd for cells in self.cells.values() for cell in cells}
        return sorted(found, key=lambda m: (list(KD_SHORT).index(m) if m in KD_SHORT else len(KD_SHORT), m))

    def side(self, context: Context, cell: Cell) -> Side | None:
        if cell.alone:
            return self.alone.get((context.student, context.settings))
        return self.cells.get(context, {}).get(cell)


def _kd_name(method: str) -> str:
    return KD_SHORT.get(method, method.upper())


def _close(x: float | None, y: float) -> bool:
    return x is not None and abs(x - y) < 1e-9


def _pairs_1(grid: Grid, margin: float) -> list[Pair]:
    out = []
    for ctx, cells in grid.cells.items():
        t1, t4 = Cell("kd", 1.0), Cell("kd", 4.0)
        if t1 in cells and t4 in cells:
            if ctx.teacher_mix == "mixup":
                out.append(Pair("Mix-T teacher: KD T=1 > KD T=4", ctx, t1, t4, None))
            elif ctx.teacher_mix == "none":
                out.append(Pair("plain teacher: KD T=4 ≥ KD T=1", ctx, t4, t1, margin))
    return out


def _pmu_exact(cell: Cell, fraction: float = PARTIAL_FRACTION) -> bool:
    return cell.mixing == "partial" and cell.sampling == "exact" and _close(cell.fraction, fraction)


def _full_of(cell: Cell) -> Cell:
    return Cell(cell.kd, cell.temperature, cell.mix, 1.0, cell.alpha, None)


def _parts_2(grid: Grid) -> list[str]:
    return [f"{_kd_name(m)}: PMU > FMU" for m in grid.kd_methods or ["kd"]]


def _pairs_2(grid: Grid, margin: float) -> list[Pair]:
    out = []
    for ctx, cells in grid.cells.items():
        for cell in cells:
            if _pmu_exact(cell) and _full_of(cell) in cells:
                out.append(Pair(f"{_kd_name(cell.kd)}: PMU > FMU", ctx, cell, _full_of(cell), None))
    return out


def _pairs_3(grid: Grid, margin: float) -> list[Pair]:
    out = []
    for ctx, cells in grid.cells.items():
        std, kd4 = Cell("std"), Cell("kd", 4.0)
        if std in cells and kd4 in cells:
            out.append(Pair("STD ≥ KD T=4", ctx, std, kd4, margin))
        for cell in cells:
            if cell.kd == "std" and cell.mix == "mixup" and _pmu_exact(cell):
                out += [Pair("STD+PMU not below any other distilled column", ctx, cell, other, margin)
                        for other in cells if other != cell]
    return out


def _parts_4(grid: Grid) -> list[str]:
    return [f"{_kd_name(m)} > student alone" for m in grid.kd_methods or ["kd"]]


def _pairs_4(grid: Grid, margin: float) -> list[Pair]:
    out = []
    for ctx, cells in grid.cells.items():
        if grid.alone.get((ctx.student, ctx.settings)) is not None:
            out += [Pair(f"{_kd_name(cell.kd)} > student alone", ctx, cell, Cell(), None) for cell in cells]
    return out


_PART5 = ("exact 10% > FMU", "reference 10% > FMU", "exact at the reference's share > FMU")


def _pairs_5(grid: Grid, margin: float) -> list[Pair]:
    out = []
    for ctx, cells in grid.cells.items():
        batch = ctx.setting("batch_size")
        share = reference_mixed_share(int(float(batch)) if batch else REFERENCE_BATCH, PARTIAL_FRACTION)
        for full in cells:
            if full.mixing != "full":
                continue
            exact = Cell(full.kd, full.temperature, full.mix, PARTIAL_FRACTION, full.alpha, "exact")
            ref = Cell(full.kd, full.temperature, full.mix, PARTIAL_FRACTION, full.alpha, "reference")
            at_share = [c for c in cells if c.mixing == "partial" and c.sampling == "exact" and c.fraction is not None
                        and abs(c.fraction - share) <= SHARE_TOLERANCE and (c.kd, c.temperature, c.mix, c.alpha)
                        == (full.kd, full.temperature, full.mix, full.alpha)]
            for part, cell in zip(_PART5, [exact, ref, *at_share[:1]]):
                if cell in cells:
                    out.append(Pair(part, ctx, cell, full, None))
    return out


@dataclass(frozen=True)
class ClaimSpec:
    number: int
    text: str
    parts: Any  # grid -> the part names, in order (every one must be tested for the claim to hold)
    pairs: Any  # (grid, margin) -> [Pair]
    needs: dict[str, str]  # part (or its suffix after ': ') -> the runs it needs


def _fixed(*names: str):
    return lambda grid: list(names)


CLAIMS: list[ClaimSpec] = [
    ClaimSpec(1, "Students of a mixup teacher (Mix-T) do better at T = 1 than at T = 4; from a plain teacher T = 4 "
                 "does at least as well as T = 1.",
              _fixed("Mix-T teacher: KD T=1 > KD T=4", "plain teacher: KD T=4 ≥ KD T=1"), _pairs_1,
              {"Mix-T teacher: KD T=1 > KD T=4": "KD students at T = 1 and T = 4 of a mixup teacher",
               "plain teacher: KD T=4 ≥ KD T=1": "KD students at T = 1 and T = 4 of a plain teacher"}),
    ClaimSpec(2, f"Partial mixup (PMU: {PARTIAL_FRACTION:g} of each batch, sampling exact) in the student beats full "
                 "mixup (FMU), under every KD method present.", _parts_2, _pairs_2,
              {"PMU > FMU": f"students with PMU (f={PARTIAL_FRACTION:g}, sampling exact) and with FMU under that KD "
                            "method (same teacher, T and alpha)"}),
    ClaimSpec(3, "Standardized KD (STD) does at least as well as Hinton KD at T = 4; STD + PMU is not below any other "
                 "distilled column of its teacher and student (T = 1 included).",
              _fixed("STD ≥ KD T=4", "STD+PMU not below any other distilled column"), _pairs_3,
              {"STD ≥ KD T=4": "STD and KD (T = 4) students of the same teacher",
               "STD+PMU not below any other distilled column": f"STD+PMU (f={PARTIAL_FRACTION:g}, sampling exact) and "
                                                               "other distilled students of the same teacher"}),
    ClaimSpec(4, "Any KD beats the student trained alone: every distilled column, under every KD method present.",
              _parts_4, _pairs_4, {"> student alone": "the student alone and students distilled with that method"}),
    ClaimSpec(5, "(mixkd's own question, not the paper's: where the PMU gain comes from.) PMU beats FMU however it mixes: exact 10% "
                 "(the paper's text), reference 10% (the released code: about 41% of a batch of 64 mixed) and exact "
                 "at the reference's share (41%); the parts say which of them gives the gain.",
              _fixed(*_PART5), _pairs_5,
              {"exact 10% > FMU": "FMU and PMU f=0.1 sampling exact students (same teacher, KD method, T)",
               "reference 10% > FMU": "FMU and PMU f=0.1 sampling reference students",
               "exact at the reference's share > FMU": "FMU and PMU sampling exact students at the reference's mixed "
                                                       "share (f=0.41 at batch 64)"}),
]


def _needs(spec: ClaimSpec, part: str) -> str:
    return spec.needs.get(part) or next((v for k, v in spec.needs.items() if part.endswith(k)), "")


@dataclass
class Part:
    name: str
    needs: str
    comparisons: list[Comparison]

    @property
    def verdict(self) -> str:
        verdicts = {c.verdict for c in self.comparisons}
        if not verdicts:
            return "not tested"
        if "does not hold" in verdicts:
            return "does not hold"
        return "holds" if verdicts == {"holds"} else "inconclusive"

    def as_dict(self) -> dict[str, Any]:
        return {"part": self.name, "verdict": self.verdict, "needs": self.needs if not self.comparisons else None,
                "comparisons": len(self.comparisons)}


@dataclass
class ClaimResult:
    number: int
    text: str
    parts: list[Part]
    notes: list[str] = field(default_factory=list)

    @property
    def comparisons(self) -> list[Comparison]:
        return [c for p in self.parts for c in p.comparisons]

    @property
    def not_tested(self) -> list[str]:
        return [f"{p.name}: needs {p.needs}" for p in self.parts if not p.comparisons]

    @property
    def verdict(self) -> str:
        verdicts = [p.verdict for p in self.parts]
        if all(v == "not tested" for v in verdicts):
            return "not tested"
        if "does not hold" in verdicts:
            return "does not hold"
        return "holds" if all(v == "holds" for v in verdicts) else "inconclusive"

    @property
    def qualifier(self) -> str:
        """The margin and any assumed sigma the verdict rests on."""
        margins = sorted({c.margin for c in self.comparisons if c.margin is not None})
        sigmas = sorted({c.interval.sigma for c in self.comparisons if c.interval.basis == "assumed sigma"})
        bits = [f"margin {m:g}" for m in margins] + [f"assuming sigma = {s:g} where one run a side" for s in sigmas]
        return ", ".join(bits)

    def seeds(self) -> str:
        """'n = 3 vs 3', 'n = 1 vs 1 to 3 vs 3': the seed counts of its comparisons."""
        counts = sorted({(c.a.n, c.b.n) for c in self.comparisons})
        if not counts:
            return "no runs"
        first, last = counts[0], counts[-1]
        return f"n = {first[0]} vs {first[1]}" + (f" to {last[0]} vs {last[1]}" if last != first else "")

    def as_dict(self) -> dict[str, Any]:
        return {"claim": self.number, "text": self.text, "verdict": self.verdict, "qualifier": self.qualifier,
                "parts": [p.as_dict() for p in self.parts], "not_tested": self.not_tested, "notes": self.notes,
                "comparisons": [c.as_dict() for c in self.comparisons]}


def _grid(results: list[Result]) -> Grid:
    """Runs pooled by (context, cell); a teacher -> student pair whose runs differ in other settings is split
    into one row per setting, and said so."""
    cells: dict[Context, dict[Cell, Side]] = defaultdict(dict)
    alone: dict[tuple[str, tuple], Side] = {}
    for r in results:
        if r.cell.alone:
            if r.cell.mix != "none":
                continue  # trained alone with mixing: no claim uses it
            side = alone.setdefault((r.context.student, r.context.settings), Side(r.context, r.cell))
        else:
            side = cells[r.context].setdefault(r.cell, Side(r.context, r.cell))
        side.runs.append(r.run)
        side.seeds.append(r.seed)
        side.values.append(r.top1)
    notes = []
    split: dict[tuple, list[Context]] = defaultdict(list)
    for ctx in [*cells, *(s.context for s in alone.values())]:
        split[ctx.teacher, ctx.teacher_mix, ctx.student].append(ctx)
    for contexts in split.values():
        if len(contexts) > 1:
            keys = sorted({k for c in contexts for k, _ in c.settings})
            values = "; ".join(", ".join(f"{k}={c.setting(k, '?')}" for k in keys) for c in contexts)
            notes.append(f"{contexts[0].label}: runs differ in {', '.join(keys)} ({values}); compared only with runs "
                         "of the same settings, never pooled")
    return Grid(dict(cells), alone, notes)


def pairs(results: list[Result], margin: float = DEFAULT_MARGIN) -> tuple[Grid, dict[int, list[Pair]]]:
    """The runs grouped, and every claim's planned comparisons (no statistics: also for a plan)."""
    grid = _grid(results)
    return grid, {spec.number: spec.pairs(grid, margin) for spec in CLAIMS}


def _sort_key(pair: Pair, parts: list[str]) -> tuple:
    ctx = pair.context
    return (parts.index(pair.part) if pair.part in parts else len(parts), ctx.teacher_mix != "none",
            natural(ctx.teacher or ""), natural(ctx.student), ctx.settings, pair.a.sort_key(), pair.b.sort_key())


def check(rows: Any, noise: float | None = None, margin: float = DEFAULT_MARGIN) -> list[ClaimResult]:
    """Every claim of :data:`CLAIMS` on a results table (a list of dicts with the columns of
    :mod:`mixkd.results`, a pandas DataFrame, or Result records): one :class:`ClaimResult` each, with
    its verdict, parts, differences, 95% intervals and seed counts. ``noise``: the per-run standard
    deviation (points) assumed where one run a side measures none; ``margin``: the points a
    non-inferiority ("at least as well") may fall short by."""
    if noise is not None and not (noise > 0 and math.isfinite(noise)):
        raise MixkdError(f"noise (sigma per run) must be a positive number of points, got {noise}")
    if not (margin >= 0 and math.isfinite(margin)):
        raise MixkdError(f"margin must be a non-negative number of points, got {margin}")
    results = results_from_rows(rows)
    grid, planned = pairs(results, margin)
    out = []
    for spec in CLAIMS:
        names = spec.parts(grid)
        comparisons = []
        for p in sorted(planned[spec.number], key=lambda p: _sort_key(p, names)):
            a, b = grid.side(p.context, p.a), grid.side(p.context, p.b)
            iv = difference_interval(a.values, b.values, noise)
            threshold = 0.0 if p.margin is None else -p.margin
            comparisons.append(Comparison(p.part, p.context, a, b, p.margin, iv, iv.p_above(threshold),
                                          iv.p_below(threshold)))
        for c, adjusted in zip(comparisons, holm([c.p_against for c in comparisons])):
            c.p_against_holm = adjusted
            if c.interval.se is not None and c.interval.low > c.threshold:
                c.verdict = "holds"
            elif adjusted < SIDE:
                c.verdict = "does not hold"
        names += [p for p in dict.fromkeys(c.part for c in comparisons) if p not in names]
        parts = [Part(n, _needs(spec, n), [c for c in comparisons if c.part == n]) for n in names]
        notes = list(grid.notes)
        if spec.number in (2, 3):
            notes += _unpaired_pmu(grid)
        out.append(ClaimResult(spec.number, spec.text, parts, notes))
    return out


def _unpaired_pmu(grid: Grid) -> list[str]:
    """Rows whose PMU at the study's fraction has only reference sampling: claims 2 and 3 cannot use them."""
    notes = []
    for ctx, cells in grid.cells.items():
        for cell in cells:
            if cell.mixing == "partial" and cell.sampling == "reference" and _close(cell.fraction, PARTIAL_FRACTION):
                exact = Cell(cell.kd, cell.temperature, cell.mix, cell.fraction, cell.alpha, "exact")
                if exact not in cells:
                    notes.append(f"{ctx.label}: {cell.label} has no sampling exact twin: claims 2 and 3 use exact PMU "
                                 "only (claim 5 uses it)")
    return notes


RECIPE_EPOCHS = 240  # the study's schedule (docs/study-claims-reference.md)


def schedule_note(rows: Any) -> str:
    """What the runs' schedule lets the claims say: short runs handicap standardized KD."""
    results = results_from_rows(rows)
    epochs = sorted({int(float(r.context.setting("epochs"))) for r in results if r.context.setting("epochs")})
    if not epochs:
        return ("schedule: the table does not give the runs' epochs; the claims are the paper's at its 240-epoch "
                "recipe, and a short schedule handicaps standardized KD (its gradient has no T² factor)")
    shown = ", ".join(map(str, epochs)) + (" epoch" if epochs == [1] else " epochs")
    if max(epochs) >= RECIPE_EPOCHS:
        return f"schedule: {shown}, the study's recipe ({RECIPE_EPOCHS}): the verdicts speak for that recipe"
    return (f"schedule: {shown}, short of the study's {RECIPE_EPOCHS}: the verdicts say how these short runs "
            "rank, not how the full recipe does; short runs handicap standardized KD (STD), whose gradient lacks "
            "Hinton KD's T² factor (16 at T = 4), so a verdict against STD (claim 3, the STD parts of claims 2 and 4) "
            "does not carry over to 240 epochs")


# ---- what a study can decide ---------------------------------------------------------------------

def plan(rows: Any, sigma: float | None = None, noise: float | None = None,
         margin: float = DEFAULT_MARGIN) -> list[str]:
    """Lines saying, for each claim, whether a study whose runs are ``rows`` (results records; top-1 may be
    NaN: not yet run) can decide it, and the smallest difference it detects at its seed counts for an
    assumed per-run sigma (``sigma``; default ``noise`` or :data:`DEFAULT_SIGMA`). ``noise``: the sigma the
    study assumes where one run a side measures none (None: such comparisons stay inconclusive)."""
    assumed = sigma if sigma is not None else (noise if noise is not None else DEFAULT_SIGMA)
    results = results_from_rows(rows)
    grid, planned = pairs(results, margin)
    source = "the study's claims.noise" if sigma is None and noise is not None else SIGMA_SOURCE
    lines = [f"claims (assumed sigma = {assumed:g} points per run, {source}; 95% intervals; smallest detectable "
             f"difference: the true difference beyond a comparison's threshold decided with {POWER:.0%} probability, "
             "for one comparison and for all of a claim's together (comparisons taken as independent: the "
             f"conservative case); non-inferiority margin {margin:g}):"]
    for spec in CLAIMS:
        names = spec.parts(grid)
        by_part: dict[str, list[Pair]] = defaultdict(list)
        for p in planned[spec.number]:
            by_part[p.part].append(p)
        missing = [n for n in names if not by_part.get(n)]
        counts = sorted({(grid.side(p.context, p.a).n, grid.side(p.context, p.b).n)
                         for ps in by_part.values() for p in ps})
        single = any(a == 1 and b == 1 for a, b in counts)
        if missing:
            verdict = "cannot decide: no runs for " + "; ".join(f"'{n}' (needs {_needs(spec, n)})" for n in missing)
        elif single and noise is None:
            verdict = ("cannot decide without an assumed sigma: one run a side measures no spread (give the study "
                       "claims: {noise: SIGMA}, or use mixkd claims --noise)")
        else:
            k = sum(map(len, by_part.values()))
            one = max(detectable_difference(a, b, assumed) for a, b in counts)
            every = max(detectable_difference(a, b, assumed, POWER ** (1 / k)) for a, b in counts)
            n_text = ", ".join(f"{a} vs {b}" for a, b in counts)
            verdict = (f"decidable: {k} comparisons, seeds {n_text}; smallest detectable difference {one:.2f} points "
                       f"per comparison, {every:.2f} for all {k} to hold together"
                       + (f" (one run a side: assuming sigma = {noise:g})" if single else ""))
        lines.append(f"  claim {spec.number}: {verdict}")
    return lines


# ---- output -------------------------------------------------------------------------------------

RULES = [
    "difference = mean(A) − mean(B) over seeds, in points of top-1; positive goes the claim's way",
    "95% interval: Welch's t with two or more runs a side; Student's t with the other side's spread when one side "
    "has one run; with one run a side no spread is measured: inconclusive, unless a per-run sigma is given "
    "(--noise), then a normal interval 'assuming sigma'",
    "strict (A > B): holds when the interval is above 0; non-inferiority (A ≥ B, margin δ): holds when the interval "
    "is above −δ; does not hold when the evidence is below that threshold at the 2.5% level after Holm's adjustment "
    "over the claim's comparisons; inconclusive otherwise",
    "a claim holds when every part was tested and every comparison holds; does not hold when a comparison does not; "
    "inconclusive otherwise (its untested parts listed); not tested when no part has a comparison",
    "runs are pooled only when equal in every setting but the seed; no pairing by seed",
]


def claims_json(claims: list[ClaimResult], noise: float | None = None, margin: float = DEFAULT_MARGIN,
                metric: str = "top1") -> dict[str, Any]:
    """``claims.json``: ``{"metric", "level", "margin", "noise", "verdicts", "rules", "claims": [...]}``."""
    return {"metric": metric, "level": LEVEL, "margin": margin, "noise": noise, "verdicts": list(VERDICTS),
            "rules": RULES, "claims": [c.as_dict() for c in claims]}


UNMEASURED_HINT = ("one run a side measures no spread: assume a per-run sigma to decide (mixkd claims TABLE.csv "
                   "--noise SIGMA, e.g. on a study folder's claims-table.csv, or the study file's claims: {noise: SIGMA})")


def comparison_text(c: Comparison) -> str:
    """'resnet56 (mixup) → resnet20: KD T=1 > KD T=4: +1.20 points, 95% interval [+0.40, +2.00], n = 3 vs 3
    (Welch): holds'."""
    extra = f" ({c.qualifier})" if c.qualifier else ""
    iv = c.interval
    head = f"{c.context.label}: {c.statement}: {iv.difference:+.2f} points"
    if iv.se is None:
        return f"{head}, n = {c.a.n} vs {c.b.n}, no spread measured: {c.verdict}{extra}"
    return (f"{head}, 95% interval [{iv.low:+.2f}, {iv.high:+.2f}], n = {c.a.n} vs {c.b.n} ({iv.basis}): "
            f"{c.verdict}{extra}")


def format_claims(claims: list[ClaimResult], details: bool = True) -> str:
    """The claims as plain text (``mixkd claims``, ``mixkd demo``, ``mixkd study run``)."""
    lines = []
    for claim in claims:
        extra = f" ({claim.qualifier})" if claim.qualifier else ""
        lines.append(f"claim {claim.number}: {claim.verdict}{extra}: {claim.text}")
        for part in claim.parts:
            if not part.comparisons:
                lines.append(f"  {part.name}: not tested: needs {part.needs}")
                continue
            lines.append(f"  {part.name}: {part.verdict} ({len(part.comparisons)} comparison"
                         f"{'s' * (len(part.comparisons) > 1)})")
            if details:
                lines += [f"    {comparison_text(c)}" for c in part.comparisons]
        lines += [f"  note: {n}" for n in claim.notes]
    if any(c.interval.se is None for claim in claims for c in claim.comparisons):
        lines.append(UNMEASURED_HINT)
    return "\n".join(lines)


def _side_text(side: Side) -> str:
    return f"{side.mean:.2f} ± {side.std:.2f} (n={side.n})" if side.n > 1 else f"{side.mean:.2f} (n=1)"


_PLURAL = {"holds": "hold", "does not hold": "do not hold", "inconclusive": "inconclusive"}


def _summary(claim: ClaimResult) -> str:
    bits = []
    for part in claim.parts:
        if part.comparisons:
            counts = {v: sum(c.verdict == v for c in part.comparisons) for v in VERDICTS[:3]}
            bits.append(f"{part.name}: {part.verdict} ({', '.join(f'{n} {v if n == 1 else _PLURAL[v]}' for v, n in counts.items() if n)})")
        else:
            bits.append(f"{part.name}: not tested (needs {part.needs})")
    return "; ".join(bits)


def claims_markdown(claims: list[ClaimResult], metric_label: str = "top-1 at the last epoch",
                    notes: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The report's ``## Claims`` section, as lines (``notes``: more notes under the verdicts)."""
    lines = ["## Claims", "",
             f"The study's claims tested on this folder's finished runs (student {metric_label}, %). Each rests on "
             "comparisons of two columns of the table above in the same teacher → student row (seeds pooled); "
             "`claims.json` has every comparison with its runs, values and p-values. Verdicts: holds, does not "
             "hold, inconclusive, not tested.", "",
             *[f"- {rule}" for rule in RULES], "",
             "| # | claim | verdict | parts |", "|---|---|---|---|"]
    for c in claims:
        extra = f" ({c.qualifier})" if c.qualifier else ""
        lines.append(f"| {c.number} | {c.text} | **{c.verdict}**{extra} | {_summary(c)} |")
    lines.append("")
    notes = list(dict.fromkeys([*notes, *(n for c in claims for n in c.notes)]))
    if notes:
        lines += [f"- note: {n}" for n in notes] + [""]
    rows = [(c.number, cmp) for c in claims for cmp in c.comparisons]
    if rows:
        lines += ["### Comparisons", "",
                  "| # | teacher → student | comparison | A | B | A − B | 95% interval | basis | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for number, cmp in rows:
            iv = cmp.interval
            interval = f"[{iv.low:+.2f}, {iv.high:+.2f}]" if iv.se is not None else "–"
            extra = f" ({cmp.qualifier})" if cmp.qualifier else ""
            lines.append(f"| {number} | {cmp.context.label} | {cmp.statement} | {_side_text(cmp.a)} | "
                         f"{_side_text(cmp.b)} | {iv.difference:+.2f} | {interval} | {iv.basis} | "
                         f"{cmp.verdict}{extra} |")
        lines.append("")
    return lines
