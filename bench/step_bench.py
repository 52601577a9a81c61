"""Throughput of the distillation step (partial mixup + standardized KD), images/s.

Variants, all measured in the same run on the same device:
  a  a loop in the released MIX-KD code's style: DataLoader (8 workers) over PIL images,
     RandomCrop(32, 4) + flip + ToTensor + Normalize, partial mixup on the CPU in NumPy, fp32,
     eager, teacher and student called separately, torch.optim.SGD
  b  mixkd eager (device-resident data, mixing on the device), fp32
  c  mixkd with the step captured as a CUDA graph, fp32
  d  mixkd CUDA graph, bf16 autocast + channels-last
  e  the same as d at batch 512 (the ceiling of the step)
  f  K concurrent runs of d (separate processes), summed

  python bench/step_bench.py --data-dir ../shared/data --json bench-results.json        # GPU
  python bench/step_bench.py --small                                                     # CPU smoke mode

Weights are random: the step's cost does not depend on them. Without --data-dir the images are
random uint8 arrays of CIFAR's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mixkd.data import CIFAR100_MEAN, CIFAR100_STD, ArraySplit, DeviceLoader, load_dataset
from mixkd.engine import Learner, device_name
from mixkd.losses import KDObjective, soft_cross_entropy, standardize, std_kd_loss
from mixkd.mix import MixSpec
from mixkd.models import create_model
from mixkd.step import SGD, GraphedTrainStep, TrainStep

PAIRS = ["resnet32x4:resnet8x4", "resnet56:resnet20", "wrn_40_2:wrn_16_2", "vgg13:vgg8", "resnet32x4:ShuffleV2"]
FRACTION, ALPHA = 0.1, 1.0


def cifar_arrays(data_dir: str | None, n: int) -> ArraySplit:
    if data_dir:
        return load_dataset("cifar100", data_dir).train
    g = torch.Generator().manual_seed(0)
    return ArraySplit(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 100, (n,), generator=g))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(loader, step, device, batch, steps, warmup) -> float:
    """images/s of ``step(x, y)`` over ``steps`` batches after ``warmup`` untimed ones (epochs wrap)."""
    done, t0 = 0, None
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                _sync(device)
                t0 = time.perf_counter()
            if done == warmup + steps:
                break
            step(x, y)
            done += 1
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


# ---- (a) the released code's style ------------------------------------------------------------
class PILDataset(torch.utils.data.Dataset):
    def __init__(self, split: ArraySplit):
        from torchvision import transforms

        self.images = split.images.permute(0, 2, 3, 1).numpy()  # HWC uint8, as torchvision's CIFAR100
        self.labels = split.labels.numpy()
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def released_style_pmu(x: torch.Tensor, y: torch.Tensor, num_classes: int):
    """Partial mixup as the released code does it: NumPy on the CPU, unmixed indices drawn with replacement."""
    b = x.shape[0]
    x_np, y_np = x.numpy(), np.eye(num_classes, dtype=np.float32)[y.numpy()]
    unmixed = np.random.randint(0, b, int(b * (1 - FRACTION)))
    lam = np.random.beta(ALPHA, ALPHA, size=b).astype(np.float32)
    lam[unmixed] = 1.0
    p1, p2 = np.random.permutation(b), np.random.permutation(b)
    xm = lam[:, None, None, None] * x_np[p1] + (1 - lam[:, None, None, None]) * x_np[p2]
    ym = lam[:, None] * y_np[p1] + (1 - lam[:, None]) * y_np[p2]
    return torch.from_numpy(xm), torch.from_numpy(ym)


def bench_released(teacher, student, split, device, batch, steps, warmup, workers):
    loader = torch.utils.data.DataLoader(PILDataset(split), batch_size=batch, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=workers > 0)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def step(x, y):
        x, target = released_style_pmu(x, y, 100)
        x, target = x.to(device), target.to(device)
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        loss = 0.1 * soft_cross_entropy(standardize(s_logits), target) + 0.9 * std_kd_loss(s_logits, t_logits)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed_steps(loader, step, device, batch, steps, warmup)


# ---- (b-e) mixkd's step ----------------------------------------------------------------------------
def bench_mixkd(teacher, student, split, device, batch, steps, warmup, graph, precision):
    channels_last = precision == "bf16"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher.to(memory_format=fmt)
    student.to(memory_format=fmt)
    learner = Learner(student, teacher, KDObjective("std"))
    learner.channels_last = channels_last
    gen = torch.Generator(device=device).manual_seed(0)
    cls = GraphedTrainStep if graph else TrainStep
    step = cls(learner, SGD(student.parameters(), lr=0.05), MixSpec("mixup", ALPHA, FRACTION), 100, gen, precision)
    loader = DeviceLoader(split, batch, device, CIFAR100_MEAN, CIFAR100_STD, shuffle=True, augment=True,
                          drop_last=True)
    return timed_steps(loader, step, device, batch, steps, warmup)


def models_for(pair: str, device):
    t_name, s_name = pair.split(":")
    torch.manual_seed(0)
    teacher = create_model(t_name, 100).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, create_model(s_name, 100).to(device).train()


def run_variant(variant: str, pair: str, split, device, args) -> float:
    teacher, student = models_for(pair, device)
    if variant == "a":
        return bench_released(teacher, student, split, device, 64, args.steps, args.warmup, args.workers)
    batch = 512 if variant == "e" else 64
    steps = max(args.steps // 8, 5) if variant == "e" else args.steps
    graph = variant in ("c", "d", "e") and device.type == "cuda"  # on the CPU, d is bf16 eager
    precision = "fp32" if variant in ("b", "c") else "bf16"
    return bench_mixkd(teacher, student, split, device, batch, steps, args.warmup, graph, precision)


def concurrent(pair: str, k: int, args) -> float:
    """Summed images/s of k processes each running variant d."""
    cmd = [sys.executable, __file__, "--worker", pair, "--steps", str(args.steps * 2), "--warmup", str(args.warmup),
           "--device", args.device] + (["--small"] if args.small else [])
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
    return sum(float(p.communicate()[0].strip().splitlines()[-1]) for p in procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="folder with cifar-100-python/ (default: random arrays of CIFAR's shape)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", default=",".join(PAIRS), help="teacher:student,...")
    ap.add_argument("--variants", default="abcdef")
    ap.add_argument("--steps", type=int, default=300, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers of variant a")
    ap.add_argument("--concurrency", default="2,4", help="process counts for variant f")
    ap.add_argument("--small", action="store_true", help="CPU smoke mode: one small pair, a few steps")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.worker:  # one process of variant f
        split = cifar_arrays(args.data_dir, 512 if args.small else 50_000)
        print(run_variant("d", args.worker, split, device, args))
        return
    if args.small:
        args.pairs, args.steps, args.warmup, args.workers, args.concurrency = "resnet8:resnet8", 3, 1, 1, "2"
    variants = [v for v in args.variants if v in "abcdef"]
    if device.type != "cuda":
        skipped = [v for v in variants if v in "ce"]
        variants = [v for v in variants if v not in "ce"]
        if skipped:
            print(f"note: variants {','.join(skipped)} need CUDA graphs; skipped on {device}", file=sys.stderr)
    split = cifar_arrays(args.data_dir, 512 if args.small else 50_000)
    rows = []
    for pair in args.pairs.split(","):
        row = {"pair": pair.replace(":", " -> ")}
        for v in variants:
            if v == "f":
                for k in (int(c) for c in args.concurrency.split(",")):
                    row[f"f{k}"] = concurrent(pair, k, args)
            else:
                row[v] = run_variant(v, pair, split, device, args)
            print(f"  {row['pair']}: {v} done", file=sys.stderr, flush=True)
        rows.append(row)
    import torchvision

    meta = {"device": device_name(device), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "steps": args.steps,
            "data": args.data_dir or "random arrays", "cpu_count": os.cpu_count()}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = [c for c in rows[0] if c != "pair"]
    print(f"\ndistillation step, PMU 10% + standardized KD, images/s on {meta['device']} (torch {meta['torch']})")
    print(f"{'pair':28s}" + "".join(f"{c:>10s}" for c in cols) + ("   d/a" if "a" in cols and "d" in cols else ""))
    for r in rows:
        ratio = f"  {r['d'] / r['a']:5.1f}x" if "a" in r and "d" in r else ""
        print(f"{r['pair']:28s}" + "".join(f"{r[c]:10.0f}" for c in cols) + ratio)


if __name__ == "__main__":
    main()
