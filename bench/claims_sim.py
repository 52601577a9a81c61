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

    python bench/claims_sim.py [--reps 400] [--seed 0]      # prints the markdown table of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import time

from mixkd.claims import DEFAULT_MARGIN, check
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=400, help="tables per scenario, seed count and sigma")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
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
