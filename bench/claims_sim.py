"""Error rates of the claims' verdicts (mixkd.claims.check), measured by simulation.

Tables shaped like configs/studies/cifar100-resnet56-resnet20.yaml (a plain and a mixup teacher ->
one student; in each row KD T=1, KD T=4, KD+FMU, KD+PMU f=0.1 exact and reference, KD+PMU f=0.41,
STD, STD+FMU, STD+PMU f=0.1 exact and reference, STD+PMU f=0.41; the student alone), each run's top-1
drawn as true mean + N(0, sigma^2), n seeds per cell (n = 1 with check(..., noise=sigma)). Scenarios:

* null: every cell's true mean equal (70). A strict claim (1, 2, 4, 5) is then false: a "holds" is a
  false holds. Claim 3 (non-inferiority, margin 0.5) is then true: a "does not hold" is false.
* boundary: the non-inferiority comparisons exactly at -margin (plain KD T=4 = T=1 - 0.5; STD =
  KD T=4 - 0.5; STD+PMU = every other column - 0.5): claims 1 and 3 are false: a "holds" is false.
* effect: per claim, a table where the claim is true with every comparison 3 sigma beyond its
  threshold (strict: +3 sigma; non-inferiority: -0.5 + 3 sigma): "holds" is the power, and a "does not
  hold" is false.

Then tables that once fooled the claims (issue 25), each under the null and the 3σ effects above, at
sigma = 0.5 (``--cases``; the second table of BENCHMARKS.md):

* duplicated: the table concatenated with itself (a second row per (cell, seed): refused); the same
  without seeds (repeated values count once); tied: every cell's runs one draw copied under distinct
  seeds (zero spread: inconclusive without noise; with --noise sigma, one run of sigma);
* partial: every row dropped with probability 0.3 (cells with fewer runs, rows without their
  partner: named, and never "holds" over them); hidden: the claim true in the table's rows and false
  by 3σ in one more row whose partner cells are missing (a "holds" is false);
* unequal spreads: half the cells (every other one) at sigma 1.0, the others at 0.2 (one run a side:
  noise 1.0, the larger); and the issue's one noisy run (sigma 1.0) against three tight ones (0.2), with
  --noise 1.0 and without.

Claim 6 (``--claim6``; the third table): Wang et al.'s rank correlation of the policies' T. stddev with their
students' mean top-1, in one teacher -> student row for two KD methods (KD, DKD; Holm over the two), k policies
(k = 5, 7, 9), n seeds a policy (1, 3), sigma = 0.5. Each policy's T. stddev is a distinct random value; its
students' true mean is 70 (null: no ranking, a "holds" or a "does not hold" is false), or falls by 0.5 sigma per
rank of T. stddev (effect: the claim true, "holds" is the power, "does not hold" false), or rises so
(reversed: the claim false, a "holds" is false).

    python bench/claims_sim.py [--reps 400] [--seed 0]      # prints the markdown table of BENCHMARKS.md
    python bench/claims_sim.py --cases --reps 400 --seed 0  # the issue-25 cases' table
    python bench/claims_sim.py --claim6 --reps 400 --seed 0 # claim 6's table
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import time
from typing import Any

from mixkd.claims import DEFAULT_MARGIN, check
from mixkd.errors import MixkdError
from mixkd.results import Cell, Context, Result

KD = [("kd1", Cell("kd", 1.0)), ("kd4", Cell("kd", 4.0)), ("kd_fmu", Cell("kd", 4.0, "mixup", 1.0)),
      ("kd_pmu", Cell("kd", 4.0, "mixup", 0.1, None, "exact")), ("kd_pmu_ref", Cell("kd", 4.0, "mixup", 0.1, None, "reference")),
      ("kd_pmu_share", Cell("kd", 4.0, "mixup", 0.41, None, "exact")), ("std", Cell("std")),
      ("std_fmu", Cell("std", None, "mixup", 1.0)), ("std_pmu", Cell("std", None, "mixup", 0.1, None, "exact")),
      ("std_pmu_ref", Cell("std", None, "mixup", 0.1, None, "reference")),
      ("std_pmu_share", Cell("std", None, "mixup", 0.41, None, "exact"))]
TEACHERS = ("none", "mixup")
BASE = 70.0
M = DEFAULT_MARGIN


def _means(scenario: str, claim: int | None, sigma: float) -> dict[tuple[str, str], float]:
    """True mean per (teacher mix, cell name); ('', 'alone') for the student alone."""
    mean = {(t, name): BASE for t in TEACHERS for name, _ in KD} | {("", "alone"): BASE}
    e = 3 * sigma
    if scenario == "boundary":
        mean["none", "kd4"] = BASE - M
        for t in TEACHERS:
            mean[t, "std"] = mean[t, "kd4"] - M
            mean[t, "std_pmu"] = min(v for (tt, n), v in mean.items() if tt == t and n != "std_pmu") - M
    elif scenario == "effect":
        for t in TEACHERS:
            if claim == 1:
                if t == "mixup":
                    mean[t, "kd1"] = mean[t, "kd4"] + e
                else:
                    mean[t, "kd4"] = mean[t, "kd1"] - M + e
            elif claim == 2:
                mean[t, "kd_pmu"] = mean[t, "kd_fmu"] + e
                mean[t, "std_pmu"] = mean[t, "std_fmu"] + e
            elif claim == 3:
                mean[t, "std"] = mean[t, "kd4"] - M + e
                mean[t, "std_pmu"] = max(v for (tt, n), v in mean.items() if tt == t and n != "std_pmu") - M + e
            elif claim == 4:
                for name, _ in KD:
                    mean[t, name] = BASE + e
            elif claim == 5:
                for kd in ("kd", "std"):
                    for v in ("pmu", "pmu_ref", "pmu_share"):
                        mean[t, f"{kd}_{v}"] = mean[t, f"{kd}_fmu"] + e
    return mean


def table(mean: dict[tuple[str, str], float], n: int, sigma: float, rng: random.Random) -> list[Result]:
    rows = []
    for seed in range(n):
        rows.append(Result(Context(None, None, "resnet20"), Cell(), seed, rng.gauss(mean["", "alone"], sigma)))
        for t in TEACHERS:
            ctx = Context("resnet56", t, "resnet20")
            rows += [Result(ctx, cell, seed, rng.gauss(mean[t, name], sigma)) for name, cell in KD]
    return rows


def rates(scenario: str, claim: int | None, n: int, sigma: float, reps: int, rng: random.Random) -> dict[int, dict]:
    """{claim: {verdict: share}} over ``reps`` tables."""
    mean = _means(scenario, claim, sigma)
    counts: dict[int, dict[str, int]] = {c: {"holds": 0, "does not hold": 0} for c in range(1, 6)}
    for _ in range(reps):
        for result in check(table(mean, n, sigma, rng), noise=sigma if n == 1 else None):
            if result.verdict in counts[result.number]:
                counts[result.number][result.verdict] += 1
    return {c: {v: k / reps for v, k in d.items()} for c, d in counts.items()}


# ---- issue 25's cases ------------------------------------------------------------------------------

def _rows(mean: dict[tuple[str, str], float], seeds: dict[tuple[str, str], int], sigmas: dict[tuple[str, str], float],
          rng: random.Random, tied: bool = False, student: str = "resnet20", teacher: str = "resnet56",
          skip: frozenset = frozenset()) -> list[Result]:
    """One table: every (teacher mix, cell) of ``mean`` with its own seed count and sigma."""
    rows = []
    for key, mu in mean.items():
        if key in skip:
            continue
        t, name = key
        cell = Cell() if name == "alone" else dict(KD)[name]
        ctx = Context(None, None, student) if name == "alone" else Context(teacher, t, student)
        first = rng.gauss(mu, sigmas[key])
        rows += [Result(ctx, cell, seed, first if tied else (first if seed == 0 else rng.gauss(mu, sigmas[key])),
                        f"{teacher}-{t}-{student}-{name}-s{seed}") for seed in range(seeds[key])]
    return rows


# Per claim, the cells of a row where it is false (by 3 sigma) whose partners are missing (scenario "hidden"):
# (teacher mix, cells kept, their shift in sigmas; the row's other cells are left out).
HIDDEN = {1: ("mixup", ["kd1"], -3), 2: ("none", ["kd_pmu", "std_pmu"], -3), 3: ("none", ["std"], -3),
          4: ("none", [name for name, _ in KD], -3), 5: ("none", ["kd_pmu", "kd_pmu_ref", "kd_pmu_share"], -3)}


def case_table(case: str, scenario: str, claim: int | None, sigma: float, n: int,
               rng: random.Random) -> tuple[list[Result], float | None]:
    """(runs, noise to assume) of one simulated table of ``case``."""
    mean = _means(scenario, claim, sigma)
    keys = list(mean)
    seeds, sigmas = dict.fromkeys(keys, n), dict.fromkeys(keys, sigma)
    noise = sigma if n == 1 or case == "tied, noise = σ" else None
    if case.startswith("unequal"):
        for i, key in enumerate(keys):
            sigmas[key] = 1.0 if i % 2 else 0.2
        noise = 1.0 if n == 1 else None  # one run a side: the larger sigma assumed
        if case.startswith("unequal 1 vs 3"):  # the noisy cells have one run, the tight ones three
            seeds = {k: 1 if sigmas[k] == 1.0 else 3 for k in keys}
            noise = 1.0 if case.endswith("noise 1.0") else None
    rows = _rows(mean, seeds, sigmas, rng, tied=case.startswith("tied"))
    if case == "duplicated":
        rows = rows + rows
    elif case == "duplicated, no seeds":
        rows = [Result(r.context, r.cell, None, r.top1, r.run) for r in rows + rows]
    elif case == "partial":
        rows = [r for r in rows if rng.random() >= 0.3]
    elif case == "hidden" and claim is not None:
        t, names, shift = HIDDEN[claim]
        bad = {(t, name): BASE + shift * sigma - (M if claim == 3 else 0.0) for name in names}
        student = "resnet32" if claim == 4 else "resnet20"
        rows += _rows(bad, dict.fromkeys(bad, n), dict.fromkeys(bad, sigma), rng, student=student, teacher="resnet110")
    return rows, noise


CASES = ("duplicated", "duplicated, no seeds", "tied", "tied, noise = σ", "partial", "hidden", "unequal", "unequal 1 vs 3, noise 1.0",
         "unequal 1 vs 3")


def case_rates(case: str, n: int, sigma: float, reps: int, rng: random.Random) -> dict[str, Any]:
    """False verdicts of ``case`` at ``n`` seeds: null (strict claims: holds; claim 3: does not hold; claim 5's
    answer: a sampling called better than the other), effect (does not hold; power), hidden (holds), refusals."""
    c = {"fh": {k: 0 for k in range(1, 6)}, "fd": {k: 0 for k in range(1, 6)}, "fde": {k: 0 for k in range(1, 6)},
         "pow": {k: 0 for k in range(1, 6)}, "direct": 0, "refused": 0, "tables": 0}
    for _ in range(reps):
        plans = [("hidden", k) for k in range(1, 6)] if case == "hidden" else \
            [("null", None), *(("effect", k) for k in range(1, 6))]
        for scenario, claim in plans:
            rows, noise = case_table(case, "effect" if case == "hidden" else scenario, claim, sigma, n, rng)
            c["tables"] += 1
            try:
                results = {r.number: r for r in check(rows, noise=noise)}
            except MixkdError:
                c["refused"] += 1
                continue
            if case == "hidden":
                c["fh"][claim] += results[claim].verdict == "holds"
            elif scenario == "null":
                for k, r in results.items():
                    c["fh" if k != 3 else "fd"][k] += r.verdict == ("holds" if k != 3 else "does not hold")
                answer = getattr(results[5], "answer", None) or ""  # (None before issue 25: for a baseline run)
                c["direct"] += answer.startswith(("the released sampling", "exact 10%"))
            else:
                c["fde"][claim] += results[claim].verdict == "does not hold"
                c["pow"][claim] += results[claim].verdict == "holds"
    return {**{k: {j: v / reps for j, v in d.items()} for k, d in c.items() if isinstance(d, dict)},
            "direct": c["direct"] / reps, "refused": c["refused"] / c["tables"]}


def cases_table(reps: int, rng: random.Random) -> None:
    sigma = 0.5
    lines = ["| table | seeds a side | false holds, claims 1/2/4/5 (null; hidden: 1/2/3/4/5) | false does-not-hold, "
             "claim 3 (null) | false does-not-hold, claims 1-5 (3σ effect) | claim 5 answer: a sampling called "
             "better (null) | refused | power, claims 1-5 (3σ effect) |", "|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    start = time.time()
    for case in CASES:
        for n in ((3,) if case.startswith(("unequal 1 vs 3", "tied, noise")) else (1, 3)):
            r = case_rates(case, n, sigma, reps, rng)

            def pct(values: list[float]) -> str:
                return "/".join(f"{100 * v:.1f}" for v in values)

            hidden = case == "hidden"
            fh = [r["fh"][k] for k in ((1, 2, 3, 4, 5) if hidden else (1, 2, 4, 5))]
            fd, fde = [r["fd"][3]], [r["fde"][k] for k in range(1, 6)]
            worst = max([worst, *fh, *([] if hidden else [*fd, *fde, r["direct"]])])
            seeds = "1 vs 3" if case.startswith("unequal 1 vs 3") else f"{n}{' (noise = σ)' if n == 1 else ''}"
            lines.append(f"| {case} | {seeds} | {pct(fh)} | {'–' if hidden else pct(fd)} | "
                         f"{'–' if hidden else pct(fde)} | {'–' if hidden else pct([r['direct']])} | "
                         f"{100 * r['refused']:.0f}% | {'–' if hidden else pct([r['pow'][k] for k in range(1, 6)])} |")
    print("\n".join(lines))
    print(f"\nEach entry: % of {reps} simulated tables, sigma = {sigma} (unequal: 0.2 and 1.0). Worst false verdict "
          f"{100 * worst:.1f}% (target 5%; Monte-Carlo error at 5%: ±{100 * 2 * math.sqrt(0.05 * 0.95 / reps):.1f} "
          "points, 2 s.e.); refused tables give no verdict.")
    print(f"{platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"{time.time() - start:.0f} s, --cases --reps {reps}")


# ---- claim 6: rank correlations of T. stddev -------------------------------------------------------

def claim6_table_rows(k: int, n: int, slope: float, sigma: float, rng: random.Random) -> list[Result]:
    """One table for claim 6: k policies x n seeds x (KD, DKD) in one row; true mean 70 + slope x rank(T. stddev)."""
    ctx_of = {}
    rows = []
    stddevs = rng.sample(range(1, 1000), k)
    ranks = {t: i for i, t in enumerate(sorted(stddevs))}
    for p, t in enumerate(stddevs):
        ctx_of[p] = Context("resnet56", "none", "resnet20", (("augment", f"policy{p}"),))
        for kd in ("kd", "dkd"):
            for seed in range(n):
                rows.append(Result(ctx_of[p], Cell(kd, 4.0), seed, rng.gauss(BASE + slope * ranks[t], sigma),
                                   f"{kd}-p{p}-s{seed}", t_stddev=t / 1e4))
    return rows


def claim6_rates(k: int, n: int, slope: float, sigma: float, reps: int, rng: random.Random) -> dict[str, float]:
    """Shares of claim 6's verdicts ('holds', 'does not hold') and of its single correlations that hold
    ('one holds': each of KD's and DKD's, as if a table had one method)."""
    counts = {"holds": 0, "does not hold": 0, "one holds": 0}
    for _ in range(reps):
        claim = check(claim6_table_rows(k, n, slope, sigma, rng))[-1]
        counts[claim.verdict] = counts.get(claim.verdict, 0) + 1
        counts["one holds"] += sum(c.verdict == "holds" for c in claim.comparisons) / len(claim.comparisons)
    return {v: counts[v] / reps for v in ("holds", "does not hold", "one holds")}


def claim6_table(reps: int, rng: random.Random) -> None:
    sigma, step = 0.5, 0.5
    lines = ["| policies | seeds a policy | false holds (null; one correlation) | false does-not-hold (null) | "
             "false holds (reversed, "
             f"+{step:g}σ a rank) | false does-not-hold (effect, −{step:g}σ a rank) | power (effect) |",
             "|---|---|---|---|---|---|---|"]
    worst = 0.0
    start = time.time()
    for k in (5, 7, 9):
        for n in (1, 3):
            null = claim6_rates(k, n, 0.0, sigma, reps, rng)
            reversed_ = claim6_rates(k, n, step * sigma, sigma, reps, rng)
            effect = claim6_rates(k, n, -step * sigma, sigma, reps, rng)
            false = [null["does not hold"], reversed_["holds"], effect["does not hold"]]
            worst = max([worst, null["holds"], null["one holds"], *false])
            lines.append(f"| {k} | {n} | {100 * null['holds']:.1f} ({100 * null['one holds']:.1f}) | "
                         + " | ".join(f"{100 * v:.1f}" for v in false) + f" | {100 * effect['holds']:.1f} |")
    print("\n".join(lines))
    print(f"\nEach entry: % of {reps} simulated tables (claim 6's verdict over KD and DKD), sigma = {sigma}. Worst "
          f"false verdict {100 * worst:.1f}% (target 5%; Monte-Carlo error at 5%: "
          f"±{100 * 2 * math.sqrt(0.05 * 0.95 / reps):.1f} points, 2 s.e.).")
    print(f"{platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"{time.time() - start:.0f} s, --claim6 --reps {reps}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=400, help="tables per scenario, seed count and sigma")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", action="store_true", help="issue 25's tables: duplicated, partial, unequal spreads")
    parser.add_argument("--claim6", action="store_true", help="claim 6's rank correlations: null, reversed, effect")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    if args.claim6:
        claim6_table(args.reps, rng)
        return
    if args.cases:
        cases_table(args.reps, rng)
        return
    start = time.time()
    seeds, sigmas = (1, 2, 3, 5), (0.3, 0.5, 1.0)
    # the worst (largest) rate over sigma for each claim, seed count and kind of error
    lines = ["| claim | seeds a side | false holds (null) | false holds (at -margin) | false does-not-hold (null) | "
             "false does-not-hold (3σ effect) | power, 3σ effect |", "|---|---|---|---|---|---|---|"]
    worst = {"false holds": 0.0, "false does not hold": 0.0}
    for n in seeds:
        per: dict[int, dict[str, list[float]]] = {c: {k: [] for k in ("fh0", "fhb", "fd0", "fde", "pow")}
                                                  for c in range(1, 6)}
        for sigma in sigmas:
            null = rates("null", None, n, sigma, args.reps, rng)
            boundary = rates("boundary", None, n, sigma, args.reps, rng)
            for c in range(1, 6):
                effect = rates("effect", c, n, sigma, args.reps, rng)[c]
                if c != 3:  # strict (claim 1 has a strict half): false under the null
                    per[c]["fh0"].append(null[c]["holds"])
                else:  # non-inferiority: true under the null
                    per[c]["fd0"].append(null[c]["does not hold"])
                if c in (1, 3):
                    per[c]["fhb"].append(boundary[c]["holds"])
                per[c]["fde"].append(effect["does not hold"])
                per[c]["pow"].append(effect["holds"])
        for c in range(1, 6):
            p = per[c]

            def cell(key: str, p=p) -> str:
                values = p[key]
                return "–" if not values else "/".join(f"{100 * v:.1f}" for v in values)

            for key, kind in (("fh0", "false holds"), ("fhb", "false holds"), ("fd0", "false does not hold"),
                              ("fde", "false does not hold")):
                worst[kind] = max([worst[kind], *p[key]])
            lines.append(f"| {c} | {n}{' (noise = σ)' if n == 1 else ''} | {cell('fh0')} | {cell('fhb')} | "
                         f"{cell('fd0')} | {cell('fde')} | {cell('pow')} |")
    mc = 100 * 2 * math.sqrt(0.05 * 0.95 / args.reps)
    print("\n".join(lines))
    print(f"\nEach cell: % of {args.reps} simulated tables at sigma = {' / '.join(map(str, sigmas))} points per run. "
          f"Worst false holds {100 * worst['false holds']:.1f}%, worst false does-not-hold "
          f"{100 * worst['false does not hold']:.1f}% (target 5%; Monte-Carlo error at 5%: ±{mc:.1f} points, 2 s.e.).")
    print(f"{platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"{time.time() - start:.0f} s, --reps {args.reps} --seed {args.seed}")


if __name__ == "__main__":
    main()
