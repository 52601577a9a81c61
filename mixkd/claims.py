"""The study's five claims and Wang et al.'s (claim 6), checked on any results table: comparisons, rank
correlations, 95% intervals, verdicts.

``check(rows, noise=None, margin=0.5)`` takes a results table (see :mod:`mixkd.results` for its
columns: a list of dicts, a pandas DataFrame, or :class:`~mixkd.results.Result` records) and returns
one :class:`ClaimResult` per claim. ``mixkd claims TABLE.csv`` prints the same, and ``mixkd study
report`` writes it into ``report.md`` and ``claims.json``.

**A comparison** of two columns A and B of one row (the same teacher, student and settings) is the
difference of their means over seeds, ``mean(A) - mean(B)`` in points of top-1, with a 95% interval:

* a side's spread is *measured* when it has two or more runs that differ; a single run, or runs all equal
  (zero spread: tied values, or a row given twice), measure none;
* both spreads measured: Welch's t interval (unequal variances, Welch-Satterthwaite degrees of freedom);
* a spread not measured: the comparison is **inconclusive** ("no spread measured"), unless a per-run
  standard deviation ``noise`` (sigma, ``--noise``) is assumed: then that side's mean has variance
  sigma², as **one** run's, for a single run and for runs all equal alike (equal values may be one run
  given twice: the assumed sigma is a floor, never a narrower interval), the other side's measured
  variance of its mean beside it, degrees of freedom those of the measured side alone
  (Welch-Satterthwaite with the assumed side known; a normal interval when both are assumed), and the
  verdict says "assuming sigma = ..." and for which side. A single run is never given the other side's
  spread: runs of unequal spreads made that interval decide wrongly (26.5% false holds, issue 25).

A (cell, seed) given twice in one context is refused (one line naming both rows); runs without a seed
whose values repeat in their cell are counted once, and said so.

Runs are not paired by seed: mixkd's seed sets a run's initialization, data order and mixing, but no
measurement here shows that two methods' runs of one seed are correlated, so the unpaired interval
is the one whose error rate is known (``bench/claims_sim.py``).

A *strict* comparison (A > B) **holds** when its interval lies above 0 and **does not hold** when
the evidence is against it; a *non-inferiority* comparison (A >= B, "at least as well") holds when
the interval lies above ``-margin`` (``margin`` in points, default 0.5, printed beside the verdict)
and does not hold when the evidence puts it below ``-margin``; otherwise **inconclusive**.

**A claim** is made of *parts* (e.g. claim 1: "from a Mix-T teacher T = 1 > T = 4" and "from a
plain teacher T = 4 >= T = 1"), each resting on one comparison per row of the table where it
applies. Its **scope** is named: the rows (contexts) where it was tested, and those where it applies
but could not be (one of a comparison's cells is missing: the missing cell is named), in the text and
in ``claims.json``. The claim **holds** when every part was tested, in every context where it
applies, and every comparison holds (each at 95%: an
intersection-union test, whose false "holds" rate is at most 2.5%); it **does not hold** when a
comparison is decisively against it, with the one-sided p-values of all its comparisons adjusted by
Holm's method (family-wise error at most 2.5%); it is **inconclusive** otherwise, and lists the parts
and contexts that were not tested; **not tested** when no part has a comparison. These four words are the verdicts
in the text, ``report.md`` and ``claims.json``.

**Claim 6** (Wang et al., NeurIPS 2022: a teacher's T. stddev under an augmentation policy, ``mixkd
augment-score``, ranks the policies as their students do) rests on rank correlations, not on differences: in
each teacher → student row (its other settings equal) and KD method (and temperature), the augmentations
(the ``augment`` column, and any mixing the run adds) are points, each with its T. stddev (the ``t_stddev``
column) and its students' mean metric over seeds. Spearman's rho of the two, with a 95% interval from
Fisher's z = atanh(rho) and Fieller's variance 1.06 / (k − 3) for k points: the part **holds** when the
interval lies below 0 (lower T. stddev, better students), **does not hold** when the evidence puts rho above
0 (one-sided p-values, Holm over the claim's correlations, 2.5%); inconclusive otherwise. Where the table
gives the students' test loss (``test_loss``, Wang et al.'s own measure), a second part per method asks the
same of it, the other way round (rho above 0: lower T. stddev, lower test loss). A row needs
at least 5 policies with a T. stddev (at 4 a perfect ranking has probability 1/24 by chance): one with
fewer, or a policy without a T. stddev, is named in the scope. Its interval comes from the number of
policies, not from a per-run spread: one seed a policy is enough (``noise`` plays no part), more seeds
make the means, and so the ranking, less noisy.

Error rates measured by simulation (``bench/claims_sim.py``, tables in BENCHMARKS.md): false "holds"
and false "does not hold" below 5% at 1 (with ``noise``), 2, 3 and 5 seeds per cell, and (``--cases``)
on tables duplicated, tied, partial (rows dropped, or a row where the claim is false missing its
partner cells) and of unequal spreads, claim 5's answer included.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from scipy import special

from mixkd.config import reference_mixed_share
from mixkd.errors import MixkdError
from mixkd.results import (
    DEFAULT_AUGMENT,
    METRIC_COLUMNS,
    PARTIAL_FRACTION,
    Cell,
    Context,
    Result,
    fraction_notes,
    kd_label,
    kd_order,
    natural,
    repeated_runs,
    results_from_rows,
)

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
    basis: str  # "Welch", "Welch, sigma assumed on one side", "assumed sigma", "unmeasured"
    sigma: float | None = None  # the assumed per-run sigma, where a side measures no spread
    unmeasured: tuple[tuple[str, str], ...] = ()  # ("a" or "b", why it measures no spread), e.g. ("b", "one run")

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


def _spread(values: list[float]) -> tuple[float | None, str]:
    """(sample variance, "") when ``values`` measure a spread, else (None, why not)."""
    if len(values) < 2:
        return None, "one run"
    variance = _variance(values)
    return (variance, "") if variance > 0 else (None, f"{len(values)} runs, all equal: zero spread")


def difference_interval(a: list[float], b: list[float], noise: float | None = None) -> Interval:
    """The statistics of ``mean(a) - mean(b)`` under the rules of the module's docstring."""
    na, nb = len(a), len(b)
    if na == 0 or nb == 0:
        raise ValueError("a comparison needs at least one run a side")
    diff = statistics.fmean(a) - statistics.fmean(b)
    (va, why_a), (vb, why_b) = _spread(a), _spread(b)
    unmeasured = tuple((side, why) for side, why in (("a", why_a), ("b", why_b)) if why)
    if unmeasured and noise is None:
        return Interval(diff, None, 0.0, "unmeasured", None, unmeasured)
    # the mean's variance per side: measured s²/n, or assumed sigma² (one run's, also for runs all equal)
    parts = [(v / n, n - 1) if v is not None else (noise ** 2, None) for v, n in ((va, na), (vb, nb))]
    total = sum(p for p, _ in parts)
    denom = sum(p ** 2 / dof for p, dof in parts if dof is not None)
    df = total ** 2 / denom if denom > 0 else math.inf
    basis = "Welch" if not unmeasured else ("assumed sigma" if len(unmeasured) == 2 else
                                            "Welch, sigma assumed on one side")
    return Interval(diff, math.sqrt(total), df, basis, noise if unmeasured else None, unmeasured)


def detectable_difference(na: int, nb: int, sigma: float, power: float = POWER) -> float:
    """The true difference (beyond a comparison's threshold) that its interval decides with probability
    ``power``, for runs of per-run spread ``sigma`` (normal approximation with t quantiles; a single run's
    side with sigma assumed, as :func:`difference_interval` does)."""
    sides = [(sigma ** 2 / n, n - 1) if n >= 2 else (sigma ** 2, None) for n in (na, nb)]
    total = sum(v for v, _ in sides)
    denom = sum(v ** 2 / dof for v, dof in sides if dof is not None)
    df = float(na + nb - 2) if na >= 2 and nb >= 2 else (total ** 2 / denom if denom else math.inf)
    return (_quantile(1 - SIDE, df) + _quantile(power, df)) * math.sqrt(total)


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
    direct: bool = False  # a direct comparison of two PMU samplings (claim 5): says which is better

    @property
    def threshold(self) -> float:
        return 0.0 if self.margin is None else -self.margin

    @property
    def statement(self) -> str:
        if self.direct:
            return f"{self.a.label} vs {self.b.label}"
        return f"{self.a.label} {'>' if self.margin is None else '≥'} {self.b.label}"

    @property
    def outcome(self) -> str:
        """The verdict in words: for a direct comparison, which side is better."""
        if not self.direct:
            return self.verdict
        return {"holds": f"{self.a.label} better", "does not hold": f"{self.b.label} better"}.get(
            self.verdict, "no difference decided")

    @property
    def assumed(self) -> str:
        """'assuming sigma = 0.4 for KD T=4 (one run)': where a side measures no spread and sigma is assumed."""
        iv = self.interval
        if iv.sigma is None:
            return ""
        if len(iv.unmeasured) == 2 and iv.unmeasured[0][1] == iv.unmeasured[1][1]:
            return f"assuming sigma = {iv.sigma:g} for both sides ({iv.unmeasured[0][1]} each)"
        sides = [f"{(self.a if side == 'a' else self.b).label} ({why})" for side, why in iv.unmeasured]
        return f"assuming sigma = {iv.sigma:g} for {' and '.join(sides)}"

    @property
    def qualifier(self) -> str:
        """What the verdict assumes or allows: the margin of a non-inferiority, an assumed sigma."""
        bits = [f"margin {self.margin:g}"] if self.margin is not None else []
        return ", ".join(bits + ([self.assumed] if self.assumed else []))

    def as_dict(self) -> dict[str, Any]:
        iv = self.interval
        return {"part": self.part, "teacher": self.context.teacher_label if self.context.teacher else None,
                "student": self.context.student, "settings": dict(self.context.settings),
                "statement": self.statement, "kind": "direct" if self.direct else "strict" if self.margin is None
                else "non-inferiority",
                "margin": self.margin, "a": self.a.as_dict(), "b": self.b.as_dict(), "difference": iv.difference,
                "interval_95": None if iv.se is None else [iv.low, iv.high], "se": iv.se,
                "df": None if iv.se is None or math.isinf(iv.df) else iv.df, "basis": iv.basis,
                "assumed_sigma": iv.sigma, "no_spread": dict(iv.unmeasured),
                "p_holds": self.p_holds, "p_against": self.p_against, "p_against_holm": self.p_against_holm,
                "verdict": self.verdict, **({"outcome": self.outcome} if self.direct else {})}


# ---- the claims ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    """A planned comparison: part, context, the cells of A and B, and its margin (None: strict); ``direct``: a
    direct comparison of two samplings (claim 5), which says which is better and is not part of the verdict.
    A claim plans a pair wherever one of its cells is present: where the other is missing, the pair is a gap
    of the claim's scope."""

    part: str
    context: Context
    a: Cell
    b: Cell
    margin: float | None
    direct: bool = False


@dataclass
class Grid:
    """The runs grouped: distilled cells per context, the student alone per (student, settings)."""

    cells: dict[Context, dict[Cell, Side]]
    alone: dict[tuple[str, tuple], Side]
    notes: list[str]

    @property
    def kd_methods(self) -> list[str]:
        found = {cell.kd for cells in self.cells.values() for cell in cells}
        return sorted(found, key=kd_order)

    def side(self, context: Context, cell: Cell) -> Side | None:
        if cell.alone:
            return self.alone.get((context.student, context.settings))
        return self.cells.get(context, {}).get(cell)

    def missing(self, pair: Pair) -> list[str]:
        """The labels of the pair's cells that have no runs ('resnet32 alone' for the student alone)."""
        return [f"{pair.context.student} alone" if cell.alone else cell.label
                for cell in (pair.a, pair.b) if self.side(pair.context, cell) is None]


def _kd_name(method: str) -> str:
    return kd_label(method)


def _close(x: float | None, y: float) -> bool:
    return x is not None and abs(x - y) < 1e-9


def _pairs_1(grid: Grid, margin: float) -> list[Pair]:
    out = []
    t1, t4 = Cell("kd", 1.0), Cell("kd", 4.0)
    for ctx, cells in grid.cells.items():
        if t1 in cells or t4 in cells:
            if ctx.teacher_mix == "mixup":
                out.append(Pair("Mix-T teacher: KD T=1 > KD T=4", ctx, t1, t4, None))
            elif ctx.teacher_mix == "none":
                out.append(Pair("plain teacher: KD T=4 ≥ KD T=1", ctx, t4, t1, margin))
    return out


def _pmu_exact(cell: Cell, fraction: float = PARTIAL_FRACTION) -> bool:
    return cell.mixing == "partial" and cell.sampling == "exact" and _close(cell.fraction, fraction)


def _full_of(cell: Cell) -> Cell:
    return Cell(cell.kd, cell.temperature, cell.mix, 1.0, cell.alpha, None, cell.augment)


def _partial_of(full: Cell, fraction: float = PARTIAL_FRACTION, sampling: str = "exact") -> Cell:
    return Cell(full.kd, full.temperature, full.mix, fraction, full.alpha, sampling, full.augment)


def _parts_2(grid: Grid) -> list[str]:
    return [f"{_kd_name(m)}: PMU > FMU" for m in grid.kd_methods or ["kd"]]


def _pairs_2(grid: Grid, margin: float) -> list[Pair]:
    out = []
    for ctx, cells in grid.cells.items():
        for cell in cells:
            if _pmu_exact(cell):
                out.append(Pair(f"{_kd_name(cell.kd)}: PMU > FMU", ctx, cell, _full_of(cell), None))
            elif cell.mixing == "full":
                out.append(Pair(f"{_kd_name(cell.kd)}: PMU > FMU", ctx, _partial_of(cell), cell, None))
    return list(dict.fromkeys(out))


STD_PMU = Cell("std", None, "mixup", PARTIAL_FRACTION, None, "exact")


def _pairs_3(grid: Grid, margin: float) -> list[Pair]:
    out = []
    std, kd4 = Cell("std"), Cell("kd", 4.0)
    part2 = "STD+PMU not below any other distilled column"
    for ctx, cells in grid.cells.items():
        if std in cells or kd4 in cells:
            out.append(Pair("STD ≥ KD T=4", ctx, std, kd4, margin))
        ours = [c for c in cells if c.kd == "std" and c.mix == "mixup" and _pmu_exact(c)] or [STD_PMU]
        for cell in ours:
            out += [Pair(part2, ctx, cell, other, margin) for other in cells if other != cell]
    return out


def _parts_4(grid: Grid) -> list[str]:
    return [f"{_kd_name(m)} > student alone" for m in grid.kd_methods or ["kd"]]


def _pairs_4(grid: Grid, margin: float) -> list[Pair]:
    return [Pair(f"{_kd_name(cell.kd)} > student alone", ctx, cell, Cell(), None)
            for ctx, cells in grid.cells.items() for cell in cells]


_PART5 = ("exact 10% > FMU", "reference 10% > FMU", "exact at the reference's share > FMU")
_DIRECT5 = ("reference 10% vs exact 10%", "reference 10% vs exact at the reference's share")


def _pairs_5(grid: Grid, margin: float) -> list[Pair]:
    out = []
    for ctx, cells in grid.cells.items():
        batch = ctx.setting("batch_size")
        share = reference_mixed_share(int(float(batch)) if batch else REFERENCE_BATCH, PARTIAL_FRACTION)
        fulls = [c for c in cells if c.mixing == "full"]
        fulls += [_full_of(c) for c in cells if c.mixing == "partial" and _close(c.fraction, PARTIAL_FRACTION)]
        for full in dict.fromkeys(fulls):
            exact, ref = _partial_of(full), _partial_of(full, sampling="reference")
            at_share = [c for c in cells if c.mixing == "partial" and c.sampling == "exact" and c.fraction is not None
                        and abs(c.fraction - share) <= SHARE_TOLERANCE and (c.kd, c.temperature, c.mix, c.alpha)
                        == (full.kd, full.temperature, full.mix, full.alpha)] or [_partial_of(full, round(share, 2))]
            for part, cell in zip(_PART5, [exact, ref, at_share[0]]):
                if cell in cells or full in cells:
                    out.append(Pair(part, ctx, cell, full, None))
            for part, other in zip(_DIRECT5, [exact, at_share[0]]):
                if ref in cells or other in cells:
                    out.append(Pair(part, ctx, ref, other, None, direct=True))
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
                 "at the reference's share (41%); the direct comparisons of reference 10% with exact 10% and with "
                 "exact at the same share say which sampling the gain comes from (the answer).",
              _fixed(*_PART5), _pairs_5,
              {"exact 10% > FMU": "FMU and PMU f=0.1 sampling exact students (same teacher, KD method, T)",
               "reference 10% > FMU": "FMU and PMU f=0.1 sampling reference students",
               "exact at the reference's share > FMU": "FMU and PMU sampling exact students at the reference's mixed "
                                                       "share (f=0.41 at batch 64)",
               _DIRECT5[0]: "PMU f=0.1 students with sampling reference and sampling exact",
               _DIRECT5[1]: "PMU students with sampling reference (f=0.1) and sampling exact at the reference's "
                            "share (f=0.41 at batch 64)"}),
]


def _needs(spec: ClaimSpec, part: str) -> str:
    return spec.needs.get(part) or next((v for k, v in spec.needs.items() if part.endswith(k)), "")


@dataclass(frozen=True)
class Gap:
    """A context where a part applies (one of its cells has runs) but cannot be tested: ``missing`` cells."""

    part: str
    context: Context
    missing: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"part": self.part, "context": self.context.label, "missing": list(self.missing)}


@dataclass
class Part:
    name: str
    needs: str
    comparisons: list[Comparison]
    gaps: list[Gap] = field(default_factory=list)
    direct: bool = False  # a direct comparison (claim 5's samplings): reported, not part of the claim's verdict

    @property
    def verdict(self) -> str:
        verdicts = {c.verdict for c in self.comparisons}
        if not verdicts:
            return "not tested"
        if "does not hold" in verdicts and not self.direct:
            return "does not hold"
        if self.direct and len(verdicts) == 1:
            return verdicts.pop()
        return "holds" if verdicts == {"holds"} and not self.gaps else "inconclusive"

    @property
    def outcome(self) -> str:
        """The verdict, or for a direct part which side is better ('differs by context' when both are)."""
        if not self.direct:
            return self.verdict
        if not self.comparisons:
            return "not tested"
        outcomes = {c.outcome for c in self.comparisons}
        return outcomes.pop() if len(outcomes) == 1 else "differs by context: " + "; ".join(
            f"{c.context.label}: {c.outcome}" for c in self.comparisons)

    def as_dict(self) -> dict[str, Any]:
        return {"part": self.name, "verdict": self.verdict, "needs": self.needs if not self.comparisons else None,
                "comparisons": len(self.comparisons), "direct": self.direct,
                "untested": [g.as_dict() for g in self.gaps], **({"outcome": self.outcome} if self.direct else {})}


@dataclass
class ClaimResult:
    number: int
    text: str
    parts: list[Part]
    notes: list[str] = field(default_factory=list)
    answer: str | None = None  # claim 5: where the PMU gain comes from, from its direct comparisons

    @property
    def comparisons(self) -> list[Comparison]:
        return [c for p in self.parts for c in p.comparisons]

    @property
    def not_tested(self) -> list[str]:
        return [f"{p.name}: needs {p.needs}" for p in self.parts if not p.comparisons and not p.direct]

    @property
    def verdict(self) -> str:
        verdicts = [p.verdict for p in self.parts if not p.direct]
        if all(v == "not tested" for v in verdicts):
            return "not tested"
        if "does not hold" in verdicts:
            return "does not hold"
        return "holds" if all(v == "holds" for v in verdicts) else "inconclusive"

    @property
    def tested_contexts(self) -> list[str]:
        """The rows (teacher → student) where the claim was tested: its scope."""
        return list(dict.fromkeys(c.context.label for p in self.parts if not p.direct for c in p.comparisons))

    @property
    def untested(self) -> list[Gap]:
        """Where the claim applies but could not be tested, with the missing cells (parts of the verdict)."""
        return [g for p in self.parts if not p.direct for g in p.gaps]

    def scope_text(self, most: int = 6) -> str:
        """'tested on A, B; not tested on C (missing: resnet32 alone)': the scope, in one line."""
        tested = self.tested_contexts
        missing: dict[str, list[str]] = {}
        for g in self.untested:
            missing.setdefault(g.context.label, [])
            missing[g.context.label] += [m for m in g.missing if m not in missing[g.context.label]]
        bits = [f"tested on {_listed(tested, most)}" if tested else "tested on no context"]
        if missing:
            bits.append("not tested on " + _listed([f"{ctx} (missing: {', '.join(m)})" for ctx, m in missing.items()],
                                                   most))
        return "; ".join(bits)

    @property
    def qualifier(self) -> str:
        """The margin and any assumed sigma the verdict rests on."""
        margins = sorted({c.margin for c in self.comparisons if c.margin is not None})
        sigmas = sorted({c.interval.sigma for c in self.comparisons if c.interval.sigma is not None})
        bits = [f"margin {m:g}" for m in margins] + [f"assuming sigma = {s:g} where runs measure no spread"
                                                     for s in sigmas]
        return ", ".join(bits)

    def seeds(self) -> str:
        """'n = 3 vs 3', 'n = 1 vs 1 to 3 vs 3': the seed counts of its comparisons."""
        counts = sorted({(c.a.n, c.b.n) for c in self.comparisons if isinstance(c, Comparison)})
        if not counts:
            return "no runs"
        first, last = counts[0], counts[-1]
        return f"n = {first[0]} vs {first[1]}" + (f" to {last[0]} vs {last[1]}" if last != first else "")

    def as_dict(self) -> dict[str, Any]:
        return {"claim": self.number, "text": self.text, "verdict": self.verdict, "qualifier": self.qualifier,
                "scope": {"tested": self.tested_contexts, "untested": [g.as_dict() for g in self.untested]},
                "answer": self.answer, "parts": [p.as_dict() for p in self.parts], "not_tested": self.not_tested,
                "notes": self.notes, "comparisons": [c.as_dict() for c in self.comparisons]}


def _listed(items: list[str], most: int) -> str:
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def _grid(results: list[Result], metric: str = "top1") -> Grid:
    """Runs pooled by (context, cell); a teacher -> student pair whose runs differ in other settings is split
    into one row per setting, and said so. Runs without a seed whose value repeats in their cell count once."""
    cells: dict[Context, dict[Cell, Side]] = defaultdict(dict)
    alone: dict[tuple[str, tuple], Side] = {}
    notes = []
    for r in results:
        if r.cell.alone:
            if r.cell.mix != "none":
                continue  # trained alone with mixing: no claim uses it
            side = alone.setdefault((r.context.student, r.context.settings), Side(r.context, r.cell))
        else:
            side = cells[r.context].setdefault(r.cell, Side(r.context, r.cell))
        value = r.value(metric)
        if r.seed is None:
            twin = next((run for run, seed, v in zip(side.runs, side.seeds, side.values) if seed is None and v == value),
                        None)
            if twin is not None:
                notes.append(f"{r.context.label}, {r.cell.label}: {twin} and {r.run} give {value:g} without a seed: "
                             "counted as one run (a row given twice cannot be told from a tie: give the seeds)")
                continue
        side.runs.append(r.run)
        side.seeds.append(r.seed)
        side.values.append(value)
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


def pairs(results: list[Result], margin: float = DEFAULT_MARGIN,
          metric: str = "top1") -> tuple[Grid, dict[int, list[Pair]]]:
    """The runs grouped, and every claim's planned comparisons, gaps included (no statistics: also for a plan)."""
    grid = _grid(results, metric)
    return grid, {spec.number: spec.pairs(grid, margin) for spec in CLAIMS}


def _sort_key(pair: Pair, parts: list[str]) -> tuple:
    ctx = pair.context
    return (parts.index(pair.part) if pair.part in parts else len(parts), ctx.teacher_mix != "none",
            natural(ctx.teacher or ""), natural(ctx.student), ctx.settings, pair.a.sort_key(), pair.b.sort_key())


def _judge(comparisons: list[Comparison], direct: bool = False) -> None:
    """Verdicts of one family of comparisons: "holds" when the interval clears the threshold (each at 2.5%: a
    claim holds only when every comparison does); "does not hold" after Holm's adjustment over the family. The
    direct comparisons decide each way at 2.5%, unadjusted: the answer they give names a sampling only when every
    row agrees (:func:`_answer_5`)."""
    against = [c.p_against for c in comparisons] if direct else holm([c.p_against for c in comparisons])
    for c, adjusted in zip(comparisons, against):
        c.p_against_holm = adjusted
        if c.interval.se is not None and c.interval.low > c.threshold:
            c.verdict = "holds"
        elif adjusted < SIDE:
            c.verdict = "does not hold"


def _gaps(grid: Grid, planned: list[Pair]) -> list[Gap]:
    """The planned pairs that miss a cell, one per (part, context, missing cells)."""
    return list(dict.fromkeys(Gap(p.part, p.context, tuple(grid.missing(p))) for p in planned if grid.missing(p)))


# ---- claim 6: the teacher's T. stddev ranks the augmentation policies -------------------------------

MIN_POLICIES = 5  # Fisher's z with Fieller's variance needs k - 3 > 0; at k = 4 a perfect ranking has exact p 1/24
FIELLER_VARIANCE = 1.06  # var(atanh(Spearman's rho)) ~ 1.06 / (k - 3) (Fieller, Hartley, Pearson 1957)
RHO_CLIP = 1 - 1e-9  # |rho| = 1 (a perfect ranking): atanh finite, the interval then ends within 1e-9 of -1 or 1
CLAIM6_TEXT = ("(Wang et al., NeurIPS 2022) The teacher's T. stddev ranks the augmentation policies as the students "
               "do: the lower a policy's T. stddev, the higher its students' mean top-1 (Spearman's rank correlation "
               "of T. stddev with the students' mean below 0) and, where the table gives it, the lower their mean "
               "test loss (above 0), per KD method and teacher → student row.")
CLAIM6_NEEDS = (f"students of that KD method under at least {MIN_POLICIES} augmentation policies (the augment column) of "
                "one teacher → student row, each with the teacher's T. stddev (the t_stddev column: mixkd augment-score)")


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank: Pearson's correlation of the ranks); 0 where
    either variable has a single rank (no ordering to compare)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = math.fsum((a - mx) ** 2 for a in rx), math.fsum((b - my) ** 2 for b in ry)
    return 0.0 if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


@dataclass(frozen=True)
class RankInterval:
    """Spearman's rho of ``k`` points with its 95% interval: Fisher's z = atanh(rho), standard error
    sqrt(1.06 / (k - 3)), normal quantiles, back through tanh."""

    rho: float
    k: int
    basis: str = "Fisher z, Fieller's variance 1.06/(k−3)"
    sigma: float | None = None  # (a comparison's field: no sigma is ever assumed for a rank correlation)
    unmeasured: tuple = ()

    @property
    def z(self) -> float:
        return math.atanh(max(-RHO_CLIP, min(RHO_CLIP, self.rho)))

    @property
    def se(self) -> float:
        return math.sqrt(FIELLER_VARIANCE / (self.k - 3))

    @property
    def low(self) -> float:
        return math.tanh(self.z - _quantile(1 - SIDE, math.inf) * self.se)

    @property
    def high(self) -> float:
        return math.tanh(self.z + _quantile(1 - SIDE, math.inf) * self.se)

    def p_negative(self) -> float:
        """One-sided p-value against "the true rho is at least 0" (small: rho below 0, the claim's way)."""
        return float(special.ndtr(self.z / self.se))

    def p_positive(self) -> float:
        """One-sided p-value against "the true rho is at most 0" (small: rho above 0, against the claim)."""
        return float(special.ndtr(-self.z / self.se))


@dataclass(frozen=True)
class Point:
    """One augmentation of a rank correlation: its label, the teacher's T. stddev, the students' runs."""

    label: str
    t_stddev: float
    side: Side

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.label, "t_stddev": self.t_stddev, **self.side.as_dict()}


@dataclass
class Correlation:
    """Claim 6 in one row and KD method: the policies' T. stddev against their students' mean metric."""

    part: str
    context: Context
    method: str  # 'KD T=4'
    points: list[Point]
    interval: RankInterval
    p_holds: float
    p_against: float
    p_against_holm: float = 1.0
    verdict: str = "inconclusive"
    margin: float | None = None
    direct: bool = False
    qualifier: str = ""
    measure: str = "top-1"  # or "test loss"
    sign: int = -1  # the claim's direction: rho < 0 (top-1) or rho > 0 (test loss)

    @property
    def statement(self) -> str:
        return f"{self.method}: ρ(T. stddev, {self.measure}) {'<' if self.sign < 0 else '>'} 0 over {len(self.points)} policies"

    @property
    def decided_for(self) -> bool:
        """The interval lies on the claim's side of 0."""
        return self.interval.high < 0 if self.sign < 0 else self.interval.low > 0

    @property
    def outcome(self) -> str:
        return self.verdict

    def as_dict(self) -> dict[str, Any]:
        iv = self.interval
        return {"part": self.part, "teacher": self.context.teacher_label if self.context.teacher else None,
                "student": self.context.student, "settings": dict(self.context.settings), "statement": self.statement,
                "kind": "rank correlation", "method": self.method, "measure": self.measure, "points": [p.as_dict() for p in self.points],
                "rho": iv.rho, "k": iv.k, "interval_95": [iv.low, iv.high], "se_z": iv.se, "basis": iv.basis,
                "p_holds": self.p_holds, "p_against": self.p_against, "p_against_holm": self.p_against_holm,
                "verdict": self.verdict}


def _policy_label(cell: Cell) -> str:
    """'flip_crop+cutout', 'flip_crop+mixup', 'flip_crop+mixup f=0.1': the augmentation a point stands for, named as
    ``--augment`` and ``mixkd augment-score`` name it (the cell's policies, and the mixing its mix settings add)."""
    policy = cell.augment or DEFAULT_AUGMENT
    if cell.mix == "none" or cell.mix in policy.split("+"):
        return policy
    plain = dataclasses.replace(cell, augment=None)
    return " ".join([f"{policy}+{cell.mix}", *(s for s in plain._settings(False) if s[:2] != "T=" and s != "cutmix")])


def _rank_groups(results: list[Result]) -> dict[tuple, dict[str, list[Result]]]:
    """{(row, KD method, T): {augmentation label: runs}} over the distilled runs of the rows and methods where a
    run names an augmentation policy (the augment column) or a T. stddev."""
    groups: dict[tuple, dict[str, list[Result]]] = defaultdict(lambda: defaultdict(list))
    named: set[tuple] = set()
    for r in results:
        if r.cell.alone:
            continue
        key = (r.context, r.cell.kd, r.cell.temperature)
        groups[key][_policy_label(r.cell)].append(r)
        if r.cell.augment is not None or r.t_stddev is not None:
            named.add(key)
    return {key: by_policy for key, by_policy in groups.items() if key in named}


MEASURES = (("top-1", -1, "better top-1"), ("test loss", 1, "lower test loss"))  # (measure, sign, part's words)


def _claim6(results: list[Result], metric: str) -> ClaimResult:
    """Claim 6: per row and KD method, the rank correlation of the policies' T. stddev with their students' mean
    top-1 (``metric``), and with their mean test loss where the table gives one (``test_loss``)."""
    groups, notes = _rank_groups(results), []
    correlations, gaps = [], []
    for (ctx, kd, temperature), by_policy in sorted(groups.items(), key=lambda kv: (
            kd_order(kv[0][1]), natural(kv[0][0].teacher or ""), natural(kv[0][0].student), kv[0][0].settings,
            kv[0][2] or 0)):
        method = Cell(kd, temperature).label
        stddev: dict[str, float] = {}
        for label, runs in by_policy.items():
            given = [r.t_stddev for r in runs if r.t_stddev is not None]
            if given and max(given) - min(given) > 1e-12:
                notes.append(f"{ctx.label}, {method}, {label}: its runs give different T. stddevs "
                             f"({', '.join(f'{g:.3g}' for g in sorted(set(given)))}); their mean is used")
            if given:
                stddev[label] = statistics.fmean(given)
        for measure, sign, words in MEASURES:
            if measure == "test loss" and not any(r.test_loss is not None for runs in by_policy.values() for r in runs):
                continue  # the table gives no test loss for this row: that part does not apply
            part = f"{_kd_name(kd)}: lower T. stddev, {words}"
            points, lacking = [], []
            for label, runs in sorted(by_policy.items(), key=lambda kv: natural(kv[0])):
                values = [r.value(metric) if measure == "top-1" else r.test_loss for r in runs]
                if label not in stddev or any(v is None for v in values):
                    lacking.append(f"T. stddev of {label}" if label not in stddev else f"test loss of {label}")
                    continue
                side = Side(ctx, runs[0].cell, [r.run for r in runs], [r.seed for r in runs], values)
                points.append(Point(label, stddev[label], side))
            if len(points) < MIN_POLICIES:
                more = MIN_POLICIES - len(points)
                gaps.append(Gap(part, ctx, (f"{more} more polic{'y' if more == 1 else 'ies'} with T. stddev "
                                            f"(has {len(points)})", *lacking)))
                continue
            if lacking:
                gaps.append(Gap(part, ctx, tuple(lacking)))  # tested on the policies that have one; named in the scope
            iv = RankInterval(spearman([p.t_stddev for p in points], [p.side.mean for p in points]), len(points))
            toward, away = (iv.p_negative(), iv.p_positive()) if sign < 0 else (iv.p_positive(), iv.p_negative())
            correlations.append(Correlation(part, ctx, method, points, iv, toward, away, measure=measure, sign=sign))
    for c, adjusted in zip(correlations, holm([c.p_against for c in correlations])):
        c.p_against_holm = adjusted
        if c.decided_for:
            c.verdict = "holds"
        elif adjusted < SIDE:
            c.verdict = "does not hold"
    names = list(dict.fromkeys([*(c.part for c in correlations), *(g.part for g in gaps)])) or [
        "lower T. stddev, better top-1"]
    parts = [Part(n, CLAIM6_NEEDS, [c for c in correlations if c.part == n], [g for g in gaps if g.part == n])
             for n in names]
    return ClaimResult(6, CLAIM6_TEXT, parts, notes)


def correlation_text(c: Correlation) -> str:
    """'resnet56 (plain) → resnet20: KD T=4: ρ(T. stddev, top-1) < 0 over 7 policies: ρ = -0.89, 95% interval
    [-0.98, -0.42] (Fisher z, ...): holds'."""
    iv = c.interval
    return (f"{c.context.label}: {c.statement}: ρ = {iv.rho:+.2f}, 95% interval [{iv.low:+.2f}, {iv.high:+.2f}] "
            f"({iv.basis}): {c.verdict}; " + ", ".join(f"{p.label} {p.t_stddev:.3g} → {p.side.mean:.2f}"
                                                       for p in sorted(c.points, key=lambda p: p.t_stddev)))


def check(rows: Any, noise: float | None = None, margin: float = DEFAULT_MARGIN,
          metric: str = "top1") -> list[ClaimResult]:
    """Every claim of :data:`CLAIMS` on a results table (a list of dicts with the columns of
    :mod:`mixkd.results`, a pandas DataFrame, or Result records): one :class:`ClaimResult` each, with
    its verdict, scope, parts, differences, 95% intervals and seed counts. ``noise``: the per-run standard
    deviation (points) assumed where runs measure no spread (one run, or runs all equal); ``margin``: the
    points a non-inferiority ("at least as well") may fall short by; ``metric``: ``top1`` (last epoch) or
    ``best_top1`` (best epoch)."""
    if noise is not None and not (noise > 0 and math.isfinite(noise)):
        raise MixkdError(f"noise (sigma per run) must be a positive number of points, got {noise}")
    if not (margin >= 0 and math.isfinite(margin)):
        raise MixkdError(f"margin must be a non-negative number of points, got {margin}")
    if metric not in METRIC_COLUMNS:
        raise MixkdError(f"unknown metric '{metric}'; use one of: {', '.join(METRIC_COLUMNS)}")
    results = results_from_rows(rows)
    lacking = next((r for r in results if r.value(metric) is None), None)
    if lacking is not None:
        raise MixkdError(f"{lacking.extra.get('where') or lacking.run} has no {metric} ({METRIC_COLUMNS[metric]}): "
                         f"give it for every run, or use the metric top1")
    repeated_runs(results)
    grid, planned = pairs(results, margin, metric)
    grid.notes[:0] = fraction_notes(results)
    out = []
    for spec in CLAIMS:
        names = spec.parts(grid)
        tested = [p for p in planned[spec.number] if not grid.missing(p)]
        comparisons = []
        for p in sorted(tested, key=lambda p: _sort_key(p, names)):
            a, b = grid.side(p.context, p.a), grid.side(p.context, p.b)
            iv = difference_interval(a.values, b.values, noise)
            threshold = 0.0 if p.margin is None else -p.margin
            comparisons.append(Comparison(p.part, p.context, a, b, p.margin, iv, iv.p_above(threshold),
                                          iv.p_below(threshold), direct=p.direct))
        _judge([c for c in comparisons if not c.direct])
        _judge([c for c in comparisons if c.direct], direct=True)
        gaps = _gaps(grid, planned[spec.number])
        direct = {p.part for p in planned[spec.number] if p.direct}
        names += [p for p in dict.fromkeys([*(c.part for c in comparisons), *(g.part for g in gaps)])
                  if p not in names and p not in direct]
        names += [p for p in _DIRECT5 if p in direct]
        parts = [Part(n, _needs(spec, n), [c for c in comparisons if c.part == n], [g for g in gaps if g.part == n],
                      n in direct) for n in names]
        notes = list(grid.notes)
        if spec.number in (2, 3):
            notes += _unpaired_pmu(grid)
        result = ClaimResult(spec.number, spec.text, parts, notes)
        if spec.number == 5:
            result.answer = _answer_5(result)
        out.append(result)
    six = _claim6(results, metric)
    six.notes[:0] = grid.notes
    out.append(six)
    return out


def _answer_5(claim: ClaimResult) -> str:
    """Where the PMU gain comes from, from claim 5's direct comparisons (and its parts against FMU): a sampling is
    named better only when every row's direct comparison says so (each at 2.5%: an intersection-union answer)."""
    by = {p.name: p for p in claim.parts}
    ref_exact, ref_share = by.get(_DIRECT5[0]), by.get(_DIRECT5[1])
    if ref_exact is None or not ref_exact.comparisons:
        return ("cannot say where the gain comes from: no row has PMU f=0.1 students with both sampling reference and "
                "sampling exact")
    verdicts = {c.verdict for c in ref_exact.comparisons}
    gains = "; ".join(f"{p.name}: {p.verdict}" for p in claim.parts if not p.direct and p.comparisons)
    suffix = f" (against FMU: {gains})" if gains else ""
    if verdicts == {"holds"}:
        text = ("the released sampling (reference 10%, about 41% mixed) beats exact 10% in every row tested: the gain "
                "comes from the released code's sampling, not from the paper's 10%")
        share = {c.verdict for c in ref_share.comparisons} if ref_share is not None else set()
        if share == {"inconclusive"}:
            text += "; exact at the reference's share is not told apart from it (consistent with the share mixed)"
        elif share == {"does not hold"}:
            text += "; exact at the reference's share beats it: the share mixed, not the sampling's draws"
        elif share == {"holds"}:
            text += "; it beats exact at the same share too: not the share alone"
        return text + suffix
    if verdicts == {"does not hold"}:
        return "exact 10% (the paper's text) beats the released sampling in every row tested" + suffix
    return ("reference 10% and exact 10% are not told apart in every row (" + "; ".join(
        f"{c.context.label}: {c.outcome}" for c in ref_exact.comparisons) + "): the table cannot say which sampling "
        "the gain comes from" + suffix)


def _unpaired_pmu(grid: Grid) -> list[str]:
    """Rows whose PMU at the study's fraction has only reference sampling: claims 2 and 3 cannot use them."""
    notes = []
    for ctx, cells in grid.cells.items():
        for cell in cells:
            if cell.mixing == "partial" and cell.sampling == "reference" and _close(cell.fraction, PARTIAL_FRACTION):
                exact = Cell(cell.kd, cell.temperature, cell.mix, cell.fraction, cell.alpha, "exact", cell.augment)
                if exact not in cells:
                    notes.append(f"{ctx.label}: {cell.label} has no sampling exact twin: claims 2 and 3 use exact PMU "
                                 "only (claim 5 uses it)")
    return notes


RECIPE_EPOCHS = 240  # the study's schedule (docs/study-claims-reference.md)


def schedule_note(rows: Any) -> str:
    """What the runs' schedule lets the claims say: short runs handicap standardized KD; a table that does not
    give the epochs cannot tell schedules apart (its runs of one cell are pooled whatever their schedule)."""
    results = results_from_rows(rows)
    epochs = sorted({int(float(r.context.setting("epochs"))) for r in results if r.context.setting("epochs")})
    if not epochs:
        return ("schedule: the table does not give the runs' epochs, so runs of different schedules would be pooled "
                "as seeds of one experiment (add an 'epochs' column to keep them apart); the claims are the paper's "
                "at its 240-epoch recipe, and a short schedule handicaps standardized KD (its gradient has no T² factor)")
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
    study assumes where runs measure no spread (None: comparisons with a single run on a side stay
    inconclusive)."""
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
            if not grid.missing(p) and not p.direct:
                by_part[p.part].append(p)
        missing = [n for n in names if not by_part.get(n)]
        gaps = _gaps(grid, [p for p in planned[spec.number] if not p.direct])
        counts = sorted({(grid.side(p.context, p.a).n, grid.side(p.context, p.b).n)
                         for ps in by_part.values() for p in ps})
        single = any(a == 1 or b == 1 for a, b in counts)
        problems = []
        if missing:
            problems.append("no runs for " + "; ".join(f"'{n}' (needs {_needs(spec, n)})" for n in missing))
        if gaps:
            problems.append(ClaimResult(spec.number, spec.text, [Part(n, "", [], [g for g in gaps if g.part == n])
                                                                 for n in names]).scope_text().split("; ", 1)[-1])
        if single and noise is None:
            problems.append("without an assumed sigma: a single run measures no spread (give the study "
                            "claims: {noise: SIGMA}, or use mixkd claims --noise)")
        if problems:
            verdict = "cannot decide: " + "; ".join(problems)
        else:
            k = sum(map(len, by_part.values()))
            one = max(detectable_difference(a, b, assumed) for a, b in counts)
            every = max(detectable_difference(a, b, assumed, POWER ** (1 / k)) for a, b in counts)
            n_text = ", ".join(f"{a} vs {b}" for a, b in counts)
            verdict = (f"decidable: {k} comparisons, seeds {n_text}; smallest detectable difference {one:.2f} points "
                       f"per comparison, {every:.2f} for all {k} to hold together"
                       + (f" (a single run: assuming sigma = {noise:g})" if single else ""))
        lines.append(f"  claim {spec.number}: {verdict}")
    lines.append(f"  claim 6: {_plan_6(results)}")
    return lines


def _plan_6(results: list[Result]) -> str:
    """Whether the runs can decide claim 6, and the smallest rank correlation each of its tests detects."""
    groups = _rank_groups(results)
    if not groups:
        return ("cannot decide: no runs name an augmentation policy (a study's augment: list, or the table's augment "
                "column)")
    counts = sorted({len(by_policy) for by_policy in groups.values()})
    if counts[0] < MIN_POLICIES:
        return (f"cannot decide: {counts[0]} policies in a row and KD method, fewer than the {MIN_POLICIES} a rank "
                "correlation's interval needs")
    rhos = [-math.tanh((_quantile(1 - SIDE, math.inf) + _quantile(POWER, math.inf))
                       * RankInterval(0.0, k).se) for k in counts]
    return (f"decidable once each policy's T. stddev is given (mixkd augment-score on each teacher; the t_stddev "
            f"column): {len(groups)} rank correlations over {', '.join(map(str, counts))} policies; smallest "
            f"detectable correlation ρ = {', '.join(f'{r:.2f}' for r in rhos)} ({POWER:.0%} power, where the policies' "
            "mean top-1s rank as their true ones: noisier means detect less)")


# ---- output -------------------------------------------------------------------------------------

RULES = [
    "difference = mean(A) − mean(B) over seeds, in points of top-1; positive goes the claim's way",
    "95% interval: Welch's t when both sides measure a spread (two or more runs that differ); a side that measures "
    "none (one run, or runs all equal) makes the comparison inconclusive, unless a per-run sigma is given (--noise): "
    "then that side counts as one run of that sigma (a floor) and the verdict says 'assuming sigma'",
    "strict (A > B): holds when the interval is above 0; non-inferiority (A ≥ B, margin δ): holds when the interval "
    "is above −δ; does not hold when the evidence is below that threshold at the 2.5% level after Holm's adjustment "
    "over the claim's comparisons; inconclusive otherwise",
    "a claim holds when every part was tested in every row where it applies and every comparison holds; does not "
    "hold when a comparison does not; inconclusive otherwise (its untested parts and rows listed, with the missing "
    "cells); not tested when no part has a comparison",
    "runs are pooled only when equal in every setting but the seed; no pairing by seed; a (cell, seed) given twice "
    "is refused",
]


def claims_json(claims: list[ClaimResult], noise: float | None = None, margin: float = DEFAULT_MARGIN,
                metric: str = "top1") -> dict[str, Any]:
    """``claims.json``: ``{"metric", "metric_label", "level", "margin", "noise", "verdicts", "rules", "notes",
    "claims": [...]}``."""
    return {"metric": metric, "metric_label": METRIC_COLUMNS.get(metric, metric), "level": LEVEL, "margin": margin,
            "noise": noise, "verdicts": list(VERDICTS), "rules": RULES, "notes": _shared_notes(claims),
            "claims": [c.as_dict() for c in claims]}


UNMEASURED_HINT = ("a side that measures no spread (one run, or runs all equal) leaves its comparison inconclusive: "
                   "assume a per-run sigma to decide (mixkd claims TABLE.csv --noise SIGMA, e.g. on a study folder's "
                   "claims-table.csv, or the study file's claims: {noise: SIGMA})")


def comparison_text(c: Comparison) -> str:
    """'resnet56 (mixup) → resnet20: KD T=1 > KD T=4: +1.20 points, 95% interval [+0.40, +2.00], n = 3 vs 3
    (Welch): holds'."""
    extra = f" ({c.qualifier})" if c.qualifier else ""
    iv = c.interval
    head = f"{c.context.label}: {c.statement}: {iv.difference:+.2f} points"
    if iv.se is None:
        why = "; ".join(f"{(c.a if side == 'a' else c.b).label}: {reason}" for side, reason in iv.unmeasured)
        return f"{head}, n = {c.a.n} vs {c.b.n}, no spread measured ({why}): {c.outcome}{extra}"
    return (f"{head}, 95% interval [{iv.low:+.2f}, {iv.high:+.2f}], n = {c.a.n} vs {c.b.n} ({iv.basis}): "
            f"{c.outcome}{extra}")


def _shared_notes(claims: list[ClaimResult]) -> list[str]:
    """The notes every claim has (the table's: conversions, settings apart, runs counted once)."""
    if not claims:
        return []
    return [n for n in claims[0].notes if all(n in c.notes for c in claims)]


def format_claims(claims: list[ClaimResult], details: bool = True, metric: str = "top1") -> str:
    """The claims as plain text (``mixkd claims``, ``mixkd demo``, ``mixkd study run``)."""
    lines = [f"metric: student {METRIC_COLUMNS.get(metric, metric)} (%)"]
    shared = _shared_notes(claims)
    for claim in claims:
        extra = f" ({claim.qualifier})" if claim.qualifier else ""
        lines.append(f"claim {claim.number}: {claim.verdict}{extra}: {claim.text}")
        lines.append(f"  scope: {claim.scope_text()}")
        for part in claim.parts:
            if not part.comparisons:
                lines.append(f"  {part.name}: not tested: needs {part.needs}")
                continue
            label = " (direct: not part of the verdict)" if part.direct else ""
            lines.append(f"  {part.name}{label}: {part.outcome} ({len(part.comparisons)} comparison"
                         f"{'s' * (len(part.comparisons) > 1)})")
            if details:
                lines += [f"    {correlation_text(c) if isinstance(c, Correlation) else comparison_text(c)}"
                          for c in part.comparisons]
        if claim.answer:
            lines.append(f"  answer: {claim.answer}")
        lines += [f"  note: {n}" for n in claim.notes if n not in shared]
    lines += [f"note: {n}" for n in shared]
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
            if part.direct:
                bits.append(f"{part.name} (direct): {part.outcome}")
            else:
                bits.append(f"{part.name}: {part.verdict} ({', '.join(f'{n} {v if n == 1 else _PLURAL[v]}' for v, n in counts.items() if n)})")
        else:
            bits.append(f"{part.name}: not tested (needs {part.needs})")
    bits.append(f"scope: {claim.scope_text()}")
    bits += [f"answer: {claim.answer}"] if claim.answer else []
    return "; ".join(bits)


def claims_markdown(claims: list[ClaimResult], metric_label: str = "top-1 at the last epoch",
                    notes: list[str] | tuple[str, ...] = (),
                    other: tuple[str, list[ClaimResult]] | None = None) -> list[str]:
    """The report's ``## Claims`` section, as lines (``notes``: more notes under the verdicts; ``other``: (label,
    claims) on another metric, e.g. the best epoch's top-1, whose verdicts stand beside in their own column)."""
    lines = ["## Claims", "",
             f"The study's claims tested on this folder's finished runs (student {metric_label}, %). Each rests on "
             "comparisons of two columns of the table above in the same teacher → student row (seeds pooled); "
             "`claims.json` has every comparison with its runs, values and p-values. Verdicts: holds, does not "
             "hold, inconclusive, not tested.", "",
             *[f"- {rule}" for rule in RULES], "",
             f"| # | claim | verdict, {metric_label} |" + (f" verdict, {other[0]} |" if other else "") + " parts |",
             "|---|---|---|" + ("---|" if other else "") + "---|"]
    beside = {c.number: c for c in other[1]} if other else {}
    for c in claims:
        extra = f" ({c.qualifier})" if c.qualifier else ""
        also = ""
        if other:
            o = beside.get(c.number)
            also = f" {o.verdict if o else '–'}" + (f": {o.answer}" if o is not None and o.answer else "") + " |"
        lines.append(f"| {c.number} | {c.text} | **{c.verdict}**{extra} |{also} {_summary(c)} |")
    lines.append("")
    notes = list(dict.fromkeys([*notes, *(n for c in claims for n in c.notes)]))
    if notes:
        lines += [f"- note: {n}" for n in notes] + [""]
    rows = [(c.number, cmp) for c in claims for cmp in c.comparisons if isinstance(cmp, Comparison)]
    ranks = [cmp for c in claims for cmp in c.comparisons if isinstance(cmp, Correlation)]
    if ranks:
        lines += ["### Rank correlations (claim 6)", "",
                  "| teacher → student | KD method | measure | policies: T. stddev → students' mean | ρ | 95% interval "
                  "| verdict |", "|---|---|---|---|---|---|---|"]
        for cmp in ranks:
            iv = cmp.interval
            points = "; ".join(f"{p.label}: {p.t_stddev:.3g} → {_side_text(p.side)}"
                               for p in sorted(cmp.points, key=lambda p: p.t_stddev))
            lines.append(f"| {cmp.context.label} | {cmp.method} | {cmp.measure} | {points} | {iv.rho:+.2f} | "
                         f"[{iv.low:+.2f}, {iv.high:+.2f}] | {cmp.verdict} |")
        lines.append("")
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
                         f"{cmp.outcome}{extra} |")
        lines.append("")
    return lines
