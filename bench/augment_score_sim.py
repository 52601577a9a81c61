"""Coverage of mixkd augment-score's 95% interval for T. stddev, measured by simulation.

Batch-mean class probabilities drawn as N batches x C classes of independent normal noise, class c's standard
deviation sd_c (spread from 0.5 to 1.5 times 1e-3: the true T. stddev is their mean); per table, the basic
interval (what augment-score prints) and the percentile interval of the same resamples; the share of tables
whose interval holds the true value (nominal 95%), at N = 10, 50 (the default) and 200 batches.

    python bench/augment_score_sim.py [--reps 200] [--classes 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from mixkd.analysis.augment_score import BOOTSTRAP_REPS, bootstrap_interval, t_stddev


def coverage(n: int, classes: int, reps: int, gen: torch.Generator) -> tuple[float, float]:
    """(basic, percentile) coverage over ``reps`` tables of ``n`` batches."""
    sd = torch.linspace(0.5, 1.5, classes, dtype=torch.float64) * 1e-3
    true = float(sd.mean())
    basic = percentile = 0
    for _ in range(reps):
        means = torch.randn(n, classes, generator=gen, dtype=torch.float64) * sd
        low, high = bootstrap_interval(means, BOOTSTRAP_REPS, generator=gen)
        est = t_stddev(means)
        basic += low <= true <= high
        percentile += 2 * est - high <= true <= 2 * est - max(low, 0.0)  # the same resamples' quantiles
    return basic / reps, percentile / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    print("| batches | basic interval (augment-score) | percentile interval |\n|---|---|---|")
    for n in (10, 50, 200):
        basic, percentile = coverage(n, args.classes, args.reps, gen)
        print(f"| {n} | {100 * basic:.1f}% | {100 * percentile:.1f}% |")
    print(f"\n{args.reps} tables each, {args.classes} classes, {BOOTSTRAP_REPS} resamples; "
          f"{platform.machine()}, python {platform.python_version()}, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
