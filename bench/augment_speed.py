"""Step time of each augmentation policy against today's flip + crop (issue 28), on this machine.

    python bench/augment_speed.py [--steps 6] [--batch 64] [--student resnet20] [--teacher resnet56] [--threads 2]

Prints markdown ready for BENCHMARKS.md: the device and command, then a table of the per-sample stage
alone and a table of the step time per policy (with the same-run flip_crop baseline). With its defaults
it takes a few minutes on an idle 2-core CPU (22 policy rounds of 7 steps; CutMixPick's run the teacher
on the pool too).

A synthetic CIFAR-sized in-memory split (uint8 3x32x32, 100 classes), the device loader producing each
batch (per-sample policies run there) and one KD step (mixkd.step.TrainStep); the median of ``--steps``
timed steps after one untimed, each policy in turn, twice (ABAB order) so that drift of a shared machine
shows. Also times the per-sample stage alone with the libraries considered (torchvision.transforms.v2
per sample, kornia per sample, kornia batched: one sub-policy for the whole batch).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from mixkd.augment import AUGMENTATIONS, make_pipeline
from mixkd.data.loaders import DeviceLoader
from mixkd.data.spec import ArraySplit
from mixkd.distiller import make_distiller
from mixkd.mix import MixSpec
from mixkd.models import create_model
from mixkd.step import SGD, TrainStep

MEAN, STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
# every registered policy: the base views alone, the others on top of flip_crop (sample policies, then batch ones)
BASE = ["flip_crop", "none", "flip"]
SPECS = BASE + [f"flip_crop+{n}" for n in sorted(AUGMENTATIONS.names(), key=lambda n: AUGMENTATIONS.get(n).extra.get("stage")
                                                  == "batch") if n not in BASE]


def step_seconds(spec, split, args, teacher, student_state):
    pipe = make_pipeline(spec, image_size=32, mean=MEAN, std=STD)
    loader = DeviceLoader(split, args.batch, "cpu", MEAN, STD, shuffle=True, augment=True, drop_last=True,
                          crop=pipe.crop, flip=pipe.flip, sample=pipe.sample_extra if pipe.extra else None)
    student = create_model(args.student, 100)
    student.load_state_dict(student_state)
    d = make_distiller("kd", student, teacher)
    batch = pipe.batch
    mix = MixSpec(batch.method, 1.0, 1.0) if batch is not None and not batch.needs_models else MixSpec()
    step = TrainStep(d, SGD(d.parameters(), lr=0.01), mix, 100, torch.Generator().manual_seed(0),
                     pick=batch if batch is not None and batch.needs_models else None)
    it = iter(loader)
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        x, y = next(it)
        step(x, y)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sample_stage(args, split):
    x = split.images[: args.batch]
    out = {}
    for name in ("autoaugment", "randaugment", "trivialaugment", "random_erasing"):
        pipe = make_pipeline(name, image_size=32, mean=MEAN, std=STD)
        t0 = time.perf_counter()
        for s in range(3):
            pipe.sample(x, seed=s)
        out[f"torchvision v2, per sample: {name}"] = (time.perf_counter() - t0) / 3
    try:
        import kornia.augmentation as K
        from kornia.augmentation import auto

        kinds = {"autoaugment": lambda: auto.AutoAugment("cifar10"), "randaugment": lambda: auto.RandAugment(n=2, m=9),
                 "trivialaugment": lambda: auto.TrivialAugment(), "random_erasing": lambda: K.RandomErasing(p=0.5)}
        xf = x.float() / 255
        for name, make in kinds.items():
            aug = make()
            t0 = time.perf_counter()
            for _ in range(3):
                aug(xf)
            out[f"kornia, batched (auto policies: one sub-policy per batch): {name}"] = (time.perf_counter() - t0) / 3
            t0 = time.perf_counter()
            torch.cat([aug(s[None]) for s in xf])
            out[f"kornia, per sample: {name}"] = time.perf_counter() - t0
    except ImportError:
        pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--student", default="resnet20")
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    split = ArraySplit(torch.randint(0, 256, (args.batch * (args.steps + 2), 3, 32, 32), dtype=torch.uint8, generator=g),
                       torch.randint(0, 100, (args.batch * (args.steps + 2),), generator=g))
    torch.manual_seed(0)
    teacher = create_model(args.teacher, 100).eval()
    student_state = create_model(args.student, 100).state_dict()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"Device: {platform.machine()} CPU, {cores} cores, {args.threads} threads; torch {torch.__version__}. "
          f"Command: `python bench/augment_speed.py {' '.join(sys.argv[1:])}`".rstrip() + " (batch "
          f"{args.batch}, random uint8 3x32x32, 100 classes, {args.teacher} -> {args.student}).\n")
    stage = sample_stage(args, split)
    print(f"Per-sample stage alone, one batch of {args.batch} (mean of 3):\n")
    print("| per-sample stage | ms / batch |\n|---|---|")
    for k, v in stage.items():
        print(f"| {k} | {1000 * v:.1f} |")
    seconds = {s: [] for s in SPECS}
    for r in range(2):
        for s in SPECS:
            seconds[s].append(step_seconds(s, split, args, teacher, student_state))
            print(f"round {r + 1}/2 {s}: {1000 * seconds[s][-1]:.0f} ms / step", file=sys.stderr, flush=True)
    base = statistics.mean(seconds["flip_crop"])
    print(f"\nStep time (device loader batch + one KD step, median of {args.steps} steps after 1 untimed; two "
          "rounds in ABAB order, \"rounds\" shows each; baseline: flip_crop of the same run):\n")
    print("| --augment | step (ms) | ratio vs flip_crop | rounds (ms) | extra forward passes per step |")
    print("|---|---|---|---|---|")
    for s in SPECS:
        m = statistics.mean(seconds[s])
        print(f"| {s} | {1000 * m:.0f} | {m / base:.2f} | {' / '.join(f'{1000 * v:.0f}' for v in seconds[s])} | "
              f"{extra_passes(s, args.batch)} |")


def extra_passes(spec: str, batch: int) -> str:
    """What a step of ``spec`` runs besides the teacher and student on the batch (CutMixPick's pool)."""
    pick = make_pipeline(spec, image_size=32, mean=MEAN, std=STD).batch
    if pick is None or not pick.needs_models:
        return ""
    s = pick.settings
    return f"teacher on {s.pool} x {batch} candidates, student on {pick.kept(batch)} picked"


if __name__ == "__main__":
    main()
