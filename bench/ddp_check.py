"""The GPU script's DDP check (bench/device.sh ddp): a 2-process run against the 1-process run of the same
config, epoch by epoch, and the throughput of each.

    python bench/ddp_check.py ONE_PROCESS_RUN TWO_PROCESS_RUN [--rtol 1e-3]

Prints one line per epoch (both training losses and their relative difference), one images/s line per
run (the mean of its epochs' images/s, as metrics.jsonl has them), and a verdict; exit 1 when a loss
differs by more than ``--rtol`` or the runs' epochs differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("one", type=Path)
    p.add_argument("two", type=Path)
    p.add_argument("--rtol", type=float, default=1e-3)
    args = p.parse_args(argv)
    a, b = rows(args.one), rows(args.two)
    worst = 0.0
    for x, y in zip(a, b):
        diff = abs(x["train_loss"] - y["train_loss"]) / max(abs(x["train_loss"]), 1e-12)
        worst = max(worst, diff)
        print(f"epoch {x['epoch']}: loss 1 process {x['train_loss']:.6f}, 2 processes {y['train_loss']:.6f} "
              f"(relative difference {diff:.2e}); test top-1 {x['test_top1']:.2f}% / {y['test_top1']:.2f}%")
    for name, r in (("1 process", a), ("2 processes", b)):
        speed = sum(row["images_per_s"] for row in r) / max(len(r), 1)
        print(f"images/s, {name}: {speed:.0f} (mean over {len(r)} epochs; {r[-1]['images_per_s']:.0f} in the last)")
    ok = len(a) == len(b) > 0 and worst <= args.rtol
    print(f"ddp check: {'losses agree' if ok else 'LOSSES DIFFER'} (largest relative difference {worst:.2e}, "
          f"tolerance {args.rtol:g}; {len(a)} vs {len(b)} epochs)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
