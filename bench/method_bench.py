"""What a training step costs with each KD method, relative to Hinton KD: paired runs in one call.

Every method gets its own student (same initial weights), the same teacher, the same batches and
the same mixing (partial mixup, 10%); in each round every method takes one step, in a shuffled
order, and the ratio of its time to the KD step's time in that round is one paired sample. The
table gives the median ratio with a distribution-free 95% interval (order statistics of the
binomial(n, 1/2)), so drifts of a shared machine hit both sides of a pair alike. On the CPU the clock
is the process's CPU time (``--clock cpu``, one thread by default): other processes on a shared
machine then slow the wall clock, not the measure. A second table times the distillation terms alone
(forward and backward on (B, 100) logits), the part of the step the methods change.

  python bench/method_bench.py                                  # CPU: resnet56 -> resnet20, batch 64
  python bench/method_bench.py --device cuda --rounds 200       # GPU (eager step)
  python bench/method_bench.py --methods kd,at,nst --memory      # also each method's peak step memory
  python bench/method_bench.py --catalogue --memory              # mdistiller's catalogue and CTKD against KD
  python bench/method_bench.py --logit                          # every logit method, and each with "+ls"

A method written ``NAME+ls`` is NAME with logit standardization (``kd.standardize: true``, its other
settings its defaults), e.g. ``dkd+ls`` (DKD + LS).

``--memory`` runs each method again in a process of its own (one at a time) and reports the peak of
three training steps' memory over what the process held after a first one (models, the method's
modules, the optimizer's state): on the CPU the peak resident set (``VmHWM`` after resetting it through
``/proc/self/clear_refs``), on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from scipy.stats import binom

from mixkd.data.layout import BatchLayout
from mixkd.distiller import make_distiller
from mixkd.losses import DISTILLATION_DEFAULTS, distillation_loss
from mixkd.mix import MixSpec
from mixkd.models import create_model
from mixkd.step import SGD, TrainStep

METHODS = ("kd", "std", "dkd", "lskd", "dist", "fitnet")
FEATURE_METHODS = ("kd", "at", "nst", "sp", "pkt", "rkd", "kdsvd", "vid", "ofd", "reviewkd", "crd", "ctkd")
LOGIT_METHODS = ("kd", "std", "dkd", "lskd", "dist", "ctkd", "kd+ls", "dkd+ls", "dist+ls")
TRAIN_SIZE = 50_000  # CIFAR-100's training set (500 a class): what per-sample state (CRD's memory) is sized for


def distiller(name: str, student: torch.nn.Module, teacher: torch.nn.Module):
    """The distiller of ``name`` (``NAME+ls``: NAME with ``standardize: true``), its defaults otherwise."""
    method, _, variant = name.partition("+")
    if variant not in ("", "ls"):
        raise SystemExit(f"--methods: {name!r}: the only variant is NAME+ls (logit standardization)")
    d = make_distiller(method, student, teacher, {"standardize": True} if variant else None)
    d.set_training_set(torch.arange(TRAIN_SIZE) % 100)
    return d


def method_batch(d, x: torch.Tensor, y: torch.Tensor, strong: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch ``d``'s step reads (mixkd.data.layout): ``(x, y)``, plus ``strong`` as its strong view for a
    method that reads one (MLKD; the loader's RandAugment is not timed here) and the indices for one that reads them."""
    layout = BatchLayout.for_method(d.inputs)
    return layout.pack(x, y, strong=strong if layout.strong else None,
                       index=torch.arange(len(y), device=y.device) if layout.index else None)


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """The distribution-free interval for the median: order statistics k and n-1-k with
    P(k < Binomial(n, 1/2) < n - k) >= level."""
    v, n = sorted(values), len(values)
    k = int(binom.ppf((1 - level) / 2, n, 0.5)) - 1
    k = max(k, 0)
    return v[k], v[n - 1 - k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="resnet56:resnet20")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--catalogue", action="store_true", help="the methods: " + ",".join(FEATURE_METHODS))
    ap.add_argument("--logit", action="store_true", help="the methods: " + ",".join(LOGIT_METHODS))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None, help="default: cpu on the CPU, wall on CUDA")
    ap.add_argument("--json", default=None)
    ap.add_argument("--memory", action="store_true", help="also each method's peak step memory (one process each)")
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # the child process of --memory
    args = ap.parse_args()
    if args.memory_of:
        print(json.dumps(peak_step_memory(args, args.memory_of)))
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock_name = args.clock or ("wall" if device.type == "cuda" else "cpu")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    teacher_name, student_name = args.pair.split(":")
    methods = list(FEATURE_METHODS if args.catalogue else LOGIT_METHODS if args.logit else args.methods.split(","))
    torch.manual_seed(0)
    teacher = create_model(teacher_name, 100).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student0 = create_model(student_name, 100).to(device)
    steps, batches = {}, {}
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device, generator=g)
    y = torch.randint(0, 100, (args.batch_size,), device=device, generator=g)
    strong = torch.randn(args.batch_size, 3, 32, 32, device=device, generator=g)
    for m in methods:
        student = create_model(student_name, 100).to(device)
        student.load_state_dict(student0.state_dict())
        d = distiller(m, student, teacher)
        d.set_epoch(10, 240)
        steps[m] = TrainStep(d, SGD(d.parameters(), lr=0.05), MixSpec("mixup", 1.0, 0.1), 100,
                             torch.Generator(device=device).manual_seed(1))
        batches[m] = method_batch(d, x, y, strong)
    order = random.Random(0)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.warmup + args.rounds):
        for m in order.sample(methods, len(methods)):
            t0 = clock()
            steps[m](*batches[m])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r >= args.warmup:
                times[m].append(clock() - t0)
    device_text = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"{args.pair}, batch {args.batch_size}, PMU 10%, fp32 eager, {args.rounds} paired rounds, {device_text}, "
          f"{clock_name} clock, torch {torch.__version__}")
    print("| method | median step (s) | median ratio to KD (paired) | 95% interval |")
    print("|---|---|---|---|")
    rows = {}
    for m in methods:
        ratios = [a / b for a, b in zip(times[m], times["kd"], strict=True)]
        lo, hi = median_interval(ratios)
        rows[m] = {"median_s": statistics.median(times[m]), "ratio": statistics.median(ratios), "lo": lo, "hi": hi}
        print(f"| {m} | {rows[m]['median_s']:.3f} | {rows[m]['ratio']:.3f} | {lo:.3f} - {hi:.3f} |")
    terms = term_times(methods, args.batch_size, device, clock)
    print("\n| method | its distillation term, forward + backward (ms, median of 200) |\n|---|---|")
    for m, t in terms.items():
        print(f"| {m} | {1e3 * t:.3f} |")
    memory = {}
    if args.memory:
        memory = {m: child_memory(args, m) for m in methods}
        print("\n| method | peak step memory over what stays between steps (MiB) | ratio to KD |\n|---|---|---|")
        for m, mib in memory.items():
            print(f"| {m} | {mib:.1f} | {mib / memory['kd']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device_text, "clock": clock_name, "rows": rows, "times": times,
                       "terms": terms, "memory_mib": memory}, f, indent=1)


def term_times(methods: list[str], batch: int, device: torch.device, clock) -> dict[str, float]:
    """Median time of each logit method's term (distillation_loss), forward and backward, on (batch, 100) logits."""
    g = torch.Generator(device=device).manual_seed(3)
    s = torch.randn(batch, 100, device=device, generator=g).requires_grad_(True)
    t = torch.randn(batch, 100, device=device, generator=g)
    y = torch.nn.functional.one_hot(torch.randint(0, 100, (batch,), device=device, generator=g), 100).float()
    out = {}
    for m in (m for m in methods if m in DISTILLATION_DEFAULTS):
        samples = []
        for _ in range(220):
            t0 = clock()
            distillation_loss(m, s, t, y).backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append(clock() - t0)
        out[m] = statistics.median(samples[20:])
    return out


def _resident_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_step_memory(args, method: str, steps: int = 3) -> float:
    """MiB: the peak memory of ``steps`` training steps of ``method`` over what the process held after its
    first step (models, the method's modules, the optimizer's state): what a step allocates and frees
    (activations kept for the backward, gradients, the method's temporaries). This process: a child of
    ``--memory``."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher_name, student_name = args.pair.split(":")
    torch.manual_seed(0)
    teacher = create_model(teacher_name, 100).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    d = distiller(method, create_model(student_name, 100).to(device), teacher)
    d.set_epoch(10, 240)
    step = TrainStep(d, SGD(d.parameters(), lr=0.05), MixSpec("mixup", 1.0, 0.1), 100,
                     torch.Generator(device=device).manual_seed(1))
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device, generator=g)
    y = torch.randint(0, 100, (args.batch_size,), device=device, generator=g)
    x, y = method_batch(d, x, y, torch.randn(args.batch_size, 3, 32, 32, device=device, generator=g))
    step(x, y)  # the first step allocates the optimizer's state; the peak is measured over what stays after it
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        base = 1024 * _resident_kib("VmRSS")
    for _ in range(steps):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = 1024 * _resident_kib("VmHWM")
    return (peak - base) / 2**20


def child_memory(args, method: str) -> float:
    """:func:`peak_step_memory` of ``method`` in a fresh process (peaks are per process)."""
    cmd = [sys.executable, __file__, "--memory-of", method, "--pair", args.pair, "--batch-size", str(args.batch_size),
           "--device", args.device, "--threads", str(args.threads)]
    # glibc: every block of 64 KiB or more its own mapping, returned when freed, so that the resident set
    # follows what is allocated (else freed heap stays resident and its reuse hides a peak)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return float(json.loads(out.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
