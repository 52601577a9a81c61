"""The GPU script's DDP check (bench/device.sh ddp): a 2-process run against the 1-process run of the same
config, epoch by epoch, and the throughput of each.

    python bench/ddp_check.py ONE_PROCESS_RUN TWO_PROCESS_RUN [--rtol 1e-3] [--eval EVAL_JSON]

Prints one line per epoch (both training losses and their relative difference), one images/s line per
run (the mean of its epochs' images/s, as metrics.jsonl has them), and a verdict; exit 1 when a loss
differs by more than ``--rtol`` or the runs' epochs differ. ``--eval``: the output of ``mixkd eval
TWO_PROCESS_RUN --json``, compared with the 2-process run's result.json (its figures must be the saved
model's: identical on the CPU; on a GPU top-1 and top-5 equal and the NLL within 1e-5, since cuDNN picks
its kernels per batch size and each process evaluates half of each batch); exit 1 when they differ more.
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
    p.add_argument("--eval", type=Path, help="`mixkd eval TWO --json` output, compared with TWO's result.json")
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
    if args.eval is not None:
        ok = eval_agrees(json.loads((args.two / "result.json").read_text()), json.loads(args.eval.read_text())) and ok
    return 0 if ok else 1


def eval_agrees(result: dict, evaluated: dict) -> bool:
    """Print the run's reported figures beside `mixkd eval`'s of its checkpoint; whether they agree."""
    keys = ("top1", "top5", "nll")
    print("reported by the 2-process run: " + ", ".join(f"{k} {result[k]!r}" for k in keys))
    print(f"mixkd eval of its checkpoint ({evaluated.get('precision')}, {evaluated.get('precision_from')}): "
          + ", ".join(f"{k} {evaluated[k]!r}" for k in keys))
    nll = abs(result["nll"] - evaluated["nll"]) / max(abs(evaluated["nll"]), 1e-12)
    if all(result[k] == evaluated[k] for k in keys):
        print("eval check: identical figures")
        return True
    ok = result["top1"] == evaluated["top1"] and result["top5"] == evaluated["top5"] and nll <= 1e-5
    print(f"eval check: {'figures agree' if ok else 'FIGURES DIFFER'} (NLL relative difference {nll:.2e}, tolerance 1e-5)")
    return ok


if __name__ == "__main__":
    sys.exit(main())
