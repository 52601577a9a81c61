"""A timm model's training step in mixkd against the same model in a plain PyTorch loop: paired runs.

Both sides build the same timm model from the same initial weights and take steps on the same batch
with the same mixing (mixup on the whole batch, Beta(1, 1)): the plain loop is what a user writes
(``timm.create_model``, mixup by hand, soft-target cross-entropy, ``torch.optim.SGD`` with momentum
and weight decay); mixkd's is :class:`mixkd.step.TrainStep` with the ``alone`` method on the model
``create_model('timm:...')`` builds. With ``--teacher`` both sides also distill (Hinton KD, T = 4,
the teacher under ``no_grad``). In each round both take one step in a random order; mixkd's time over
the plain loop's in that round is one paired sample; the table gives the median ratio and its
distribution-free 95% interval. On the CPU the clock is the process's CPU time (one thread by
default), so other processes on a shared machine slow the wall clock, not the measure.

  python bench/timm_bench.py                                   # timm:resnet18, batch 64, 32 x 32
  python bench/timm_bench.py --teacher timm:resnet18 --model timm:resnet10t
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from scipy.stats import binom

from mixkd.config import KDConfig
from mixkd.distiller import make_distiller
from mixkd.mix import MixSpec
from mixkd.models import create_model
from mixkd.step import SGD, TrainStep


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    v, n = sorted(values), len(values)
    k = max(int(binom.ppf((1 - level) / 2, n, 0.5)) - 1, 0)
    return v[k], v[n - 1 - k]


def plain_step(model, teacher, optimizer, x, y, num_classes, generator, temperature=4.0):
    """What a plain PyTorch loop does: mixup by hand, soft-target CE (+ KD), SGD."""
    lam = torch.distributions.Beta(1.0, 1.0).sample().item()
    perm = torch.randperm(x.shape[0], generator=generator)
    xm = lam * x + (1 - lam) * x[perm]
    target = F.one_hot(y, num_classes).float()
    target = lam * target + (1 - lam) * target[perm]
    optimizer.zero_grad(set_to_none=True)
    logits = model(xm)
    loss = torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
    if teacher is not None:
        with torch.no_grad():
            t = teacher(xm)
        kd = F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean")
        loss = 0.1 * loss + 0.9 * temperature**2 * kd
    loss.backward()
    optimizer.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:resnet18")
    ap.add_argument("--teacher", default=None, help="also distill from this model (random weights)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, s = args.classes, args.image_size
    x, y = torch.randn(args.batch_size, 3, s, s), torch.randint(0, n, (args.batch_size,))

    plain = timm.create_model(args.model.removeprefix("timm:"), num_classes=n)
    ours = create_model(args.model, n, s)
    ours.load_state_dict(plain.state_dict())
    teacher = None
    if args.teacher:
        teacher = create_model(args.teacher, n, s).eval().requires_grad_(False)
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    kd = KDConfig(method="kd") if teacher is not None else None
    distiller = make_distiller("kd" if teacher is not None else "alone", ours, teacher, kd)
    distiller.train()
    plain.train()
    step = TrainStep(distiller, SGD(distiller.parameters(), lr=0.05), MixSpec("mixup", 1.0, 1.0), n,
                     torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    sides = {"plain": lambda: plain_step(plain, teacher, opt, x, y, n, gen), "mixkd": lambda: step(x, y)}
    times: dict[str, list[float]] = {"plain": [], "mixkd": []}
    for r in range(args.warmup + args.rounds):
        order = list(sides)
        random.Random(r).shuffle(order)
        for name in order:
            t0 = time.process_time()
            sides[name]()
            if r >= args.warmup:
                times[name].append(time.process_time() - t0)
    ratios = [m / p for m, p in zip(times["mixkd"], times["plain"])]
    lo, hi = median_interval(ratios)
    result = {"model": args.model, "teacher": args.teacher, "batch": args.batch_size, "image_size": s,
              "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__, "timm": timm.__version__,
              "cpu": platform.processor() or platform.machine(),
              "plain_s": statistics.median(times["plain"]), "mixkd_s": statistics.median(times["mixkd"]),
              "ratio": statistics.median(ratios), "interval": [lo, hi]}
    print(f"{args.model}" + (f" from {args.teacher}" if args.teacher else "") + f", batch {args.batch_size}, "
          f"{s}x{s}, {args.threads} thread(s), CPU clock, {args.rounds} paired rounds")
    print(f"plain PyTorch loop {result['plain_s']:.3f} s/step, mixkd {result['mixkd_s']:.3f} s/step, "
          f"median ratio mixkd/plain {result['ratio']:.3f} (95% interval {lo:.3f} - {hi:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
