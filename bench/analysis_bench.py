"""Wall time of one full `mixkd analyze` (all metrics, FGSM + PGD-10 at 4 epsilons) on CIFAR-100's
10,000 test images, teacher included. The issue's budget: at most 2 minutes on one H100/H200.

  python bench/analysis_bench.py --data-dir ../shared/data --device cuda            # real CIFAR-100
  python bench/analysis_bench.py --device cuda                                      # random images
  python bench/analysis_bench.py --device cuda --amp --pairs resnet32x4:resnet8x4,wrn_40_2:wrn_16_2
  python bench/analysis_bench.py --device cpu --subset 200 --pairs resnet8:resnet8  # CPU smoke test

Weights are random (the cost does not depend on them); without --data-dir the images are random
uint8 arrays of CIFAR-100's shape. Prints one line per pair: total wall seconds (CUDA init excluded,
data loading included) and the seconds of each stage; --json FILE writes them too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from mixkd.analysis import AnalysisOptions, analyze_models
from mixkd.data import CIFAR100_MEAN, CIFAR100_STD, ArraySplit, DataSpec, load_dataset
from mixkd.device import device_name, resolve_device
from mixkd.models import create_model


def synthetic_cifar100(n: int = 10_000) -> DataSpec:
    g = torch.Generator().manual_seed(0)
    test = ArraySplit(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                      torch.arange(n, dtype=torch.int64) % 100)
    return DataSpec("cifar100", 100, 32, CIFAR100_MEAN, CIFAR100_STD, [f"class_{i}" for i in range(100)], test, test)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder holding cifar-100-python/ (default: random images)")
    p.add_argument("--device", default="auto")
    p.add_argument("--pairs", default="resnet32x4:resnet8x4", help="teacher:student,... ('none' as teacher: no teacher)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--subset", type=int)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--repeat", type=int, default=1, help="analyses per pair (the first includes cuDNN autotuning)")
    p.add_argument("--json", help="write the timings to this file")
    args = p.parse_args()

    device = resolve_device(args.device)
    spec = load_dataset("cifar100", args.data_dir) if args.data_dir else synthetic_cifar100()
    if device.type == "cuda":
        torch.zeros(1, device=device)  # CUDA context outside the timing
    print(f"device {device_name(device)}, torch {torch.__version__}, data {'CIFAR-100' if args.data_dir else 'random'}, "
          f"batch {args.batch_size}, amp {args.amp}", flush=True)
    rows = []
    for pair in args.pairs.split(","):
        teacher_name, student_name = pair.split(":")
        for k in range(args.repeat):
            torch.manual_seed(0)
            student = create_model(student_name, 100)
            teacher = None if teacher_name == "none" else create_model(teacher_name, 100)
            opts = AnalysisOptions(subset=args.subset, batch_size=args.batch_size, amp=args.amp)
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                a = analyze_models(student, spec, out, teacher=teacher, device=device, options=opts,
                                   student_label=student_name, teacher_label=teacher_name)
                wall = time.perf_counter() - t0
            stages = "  ".join(f"{s} {v:.1f}" for s, v in a["timing"].items())
            print(f"{pair} run {k + 1}: {wall:.1f} s for {a['num_images']} images  ({stages})", flush=True)
            rows.append({"pair": pair, "run": k + 1, "seconds": wall, "images": a["num_images"], "amp": args.amp,
                         "batch_size": args.batch_size, "timing": a["timing"], "device": device_name(device)})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
