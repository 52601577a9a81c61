"""Throughput of the distillation step (partial mixup + standardized KD), images/s.

Variants, all measured in the same run on the same device:
  a  a loop in the released MIX-KD code's style: DataLoader (8 workers) over PIL images,
     RandomCrop(32, 4) + flip + ToTensor + Normalize, partial mixup on the CPU in NumPy, fp32,
     eager, teacher and student called separately, torch.optim.SGD
  b  mixkd eager (device-resident data, mixing on the device), fp32
  c  mixkd with the step captured as a CUDA graph, fp32
  d  mixkd CUDA graph, bf16 autocast + channels-last
  e  the same as d at batch 8 x 64 = 512 (the ceiling of the step)
  f  K concurrent runs of d (separate processes), summed (K = --concurrency)
  g  d with teacher and student compiled (torch.compile, inductor, default mode, dynamic=False)
  h  e compiled as g
  p  K runs of d in one process (a mixkd.pack.Pack), each replayed on its own CUDA stream, summed
     (K = --pack); with several --pairs also a mixed pack holding one run of each pair
  q  p with compiled runs (as g)
  s  g with the one-hot labels, the mixing and the losses compiled too (CompileSpec scope "step")
  m  g with inductor's mode "max-autotune-no-cudagraphs"
Compiled and packed variants also report their warm-up (the first step, or the pack's first round:
compilation and graph capture) in seconds. Each packed measurement with compilation starts from a
reset dynamo cache (inductor's caches stay warm), so its warm-up holds one compilation of the pair
however many runs share it: K=8 against K=1 shows whether compilation is paid once.

  python bench/step_bench.py --data-dir ../shared/data --json bench-results.json        # GPU
  python bench/step_bench.py --small                                                     # CPU smoke mode

--small (the CPU smoke mode, which bench/device.sh's SMOKE=1 runs) measures a bench-only "tiny" pair
(conv -> batch norm -> ReLU -> pool -> linear, the kernels of a CIFAR ResNet, small enough for inductor
to compile in seconds on 2 cores) for a few steps: every variant runs, its figures mean nothing. On the
CPU there are no CUDA graphs: c is skipped, d and e run bf16 eager.

Weights are random: the step's cost does not depend on them. Without --data-dir the images are
random uint8 arrays of CIFAR's shape. At the end it prints how the figures compare with the targets
of the packed-runs issue (best K >= 90% of e; mixed pack >= 80% of the mean e of its pairs) and the
compilation issue (g >= 20x the released loop on the same GPU kind, from ../shared/REFERENCE.md;
best compiled K >= e; K=8 warm-up within 2x of K=1).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters

from mixkd.data import CIFAR100_MEAN, CIFAR100_STD, ArraySplit, DeviceLoader, load_dataset
from mixkd.device import device_name
from mixkd.distiller import make_distiller
from mixkd.losses import soft_cross_entropy, standardize, std_kd_loss
from mixkd.mix import MixSpec
from mixkd.models import create_model
from mixkd.step import SGD, CompileSpec, GraphedTrainStep, TrainStep

PAIRS = ["resnet32x4:resnet8x4", "resnet56:resnet20", "wrn_40_2:wrn_16_2", "vgg13:vgg8", "resnet32x4:ShuffleV2"]
VARIANTS = "abcdefghpqsm"
FRACTION, ALPHA = 0.1, 1.0
# The released MIX-KD loop, images/s (../shared/REFERENCE.md, torch 2.11): the H100 figures were measured
# on the same machine as mixkd's table there (2026-11-26), the H200 ones in the speed anchors.
RELEASED_LOOP = {
    "H100": {"resnet32x4:resnet8x4": 1636, "resnet56:resnet20": 1374, "wrn_40_2:wrn_16_2": 1389},
    "H200": {"resnet32x4:resnet8x4": 1445, "resnet56:resnet20": 1147, "wrn_40_2:wrn_16_2": 1276},
}
COMPILED = {"g": CompileSpec(), "h": CompileSpec(), "s": CompileSpec("step"),
            "m": CompileSpec(mode="max-autotune-no-cudagraphs")}


class Tiny(torch.nn.Module):
    """The smoke mode's model ("tiny"): conv -> batch norm -> ReLU -> pool -> linear."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def bench_model(name: str, num_classes: int) -> torch.nn.Module:
    return Tiny(num_classes) if name == "tiny" else create_model(name, num_classes)


def cifar_arrays(data_dir: str | None, n: int) -> ArraySplit:
    if data_dir:
        return load_dataset("cifar100", data_dir).train
    g = torch.Generator().manual_seed(0)
    return ArraySplit(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 100, (n,), generator=g))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(loader):
    while True:
        yield from loader


def timed_steps(loader, step, device, batch, steps, warmup) -> tuple[float, float]:
    """(images/s of ``step(x, y)`` over ``steps`` batches after ``warmup`` untimed ones, seconds of the first)."""
    it = batches(loader)
    t0 = time.perf_counter()
    step(*next(it))
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step(*next(it))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    _sync(device)
    return steps * batch / (time.perf_counter() - t0), first


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


def bench_released(teacher, student, split, device, batch, steps, warmup, workers) -> float:
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

    return timed_steps(loader, step, device, batch, steps, warmup)[0]


# ---- (b-e, g, h, s, m) mixkd's step --------------------------------------------------------------
def models_for(pair: str, device):
    t_name, s_name = pair.split(":")
    torch.manual_seed(0)
    teacher = bench_model(t_name, 100).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, bench_model(s_name, 100).to(device).train()


def make_run(pair: str, split, device, batch: int, graph: bool, precision: str,
             compile: CompileSpec | None = None, seed: int = 0):
    """One run of the study's step: (step, loader)."""
    teacher, student = models_for(pair, device)
    channels_last = precision == "bf16"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher.to(memory_format=fmt)
    student.to(memory_format=fmt)
    learner = make_distiller("std", student, teacher)
    learner.channels_last = channels_last
    gen = torch.Generator(device=device).manual_seed(seed)
    cls = GraphedTrainStep if graph else TrainStep
    step = cls(learner, SGD(student.parameters(), lr=0.05), MixSpec("mixup", ALPHA, FRACTION), 100, gen, precision,
               compile)
    loader = DeviceLoader(split, batch, device, CIFAR100_MEAN, CIFAR100_STD, shuffle=True, augment=True,
                          drop_last=True, seed=seed)
    return step, loader


def run_variant(variant: str, pair: str, split, device, args) -> tuple[float, float]:
    """(images/s, seconds of the first step) of one single-run variant."""
    if variant == "a":
        teacher, student = models_for(pair, device)
        return bench_released(teacher, student, split, device, args.batch, args.steps, args.warmup, args.workers), 0.0
    batch = 8 * args.batch if variant in "eh" else args.batch
    steps = max(args.steps // 8, 5) if variant in "eh" else args.steps
    graph = variant != "b" and device.type == "cuda"  # on the CPU, d is bf16 eager
    precision = "fp32" if variant in ("b", "c") else "bf16"
    step, loader = make_run(pair, split, device, batch, graph, precision, COMPILED.get(variant))
    return timed_steps(loader, step, device, batch, steps, args.warmup)


# ---- (p, q) packed runs ----------------------------------------------------------------------------
class BenchRun:
    """A run for :class:`mixkd.pack.Pack` that steps through its loader forever (no epochs, no evaluation)."""

    phase = "training"

    def __init__(self, step, loader, batch: int):
        self.step, self.loader = step, loader
        self.batch_size = batch  # what Pack counts as a step's images
        self.step_in_epoch = 0

    def start(self) -> None:
        self._batches = batches(self.loader)

    def advance(self) -> bool:
        self.step(*next(self._batches))
        self.step_in_epoch += 1
        return True

    def fail(self) -> None:
        pass

    def stop(self, reason: str) -> None:
        pass


def packed(pairs: list[str], split, device, args, compile: bool, reset: bool = False,
           timed: bool = True) -> tuple[float | None, float, int]:
    """(summed images/s, seconds of the first round, graphs dynamo compiled in it) of one run per entry
    of ``pairs`` in one pack.

    ``reset``: start from an empty dynamo cache, so the first round traces the models again (inductor's
    in-memory and on-disk caches stay). ``timed=False``: the first round only (images/s None).
    """
    from mixkd.pack import Pack

    if reset:
        torch._dynamo.reset()
    graph = device.type == "cuda"
    spec = CompileSpec() if compile else None
    runs = [BenchRun(*make_run(pair, split, device, args.batch, graph, "bf16", spec, seed=i), args.batch)
            for i, pair in enumerate(pairs)]
    pack = Pack(device, len(runs))
    for run in runs:
        outcome = pack.admit(run)
        if outcome is not None:
            raise RuntimeError(f"a benchmark run did not start: {outcome['message']}") from outcome.get("error")

    def one_round():
        ended = pack.round()
        if ended:
            raise RuntimeError(f"a packed run failed: {ended[0][1]['message']}") from ended[0][1].get("error")

    graphs = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    one_round()
    _sync(device)
    first = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"] - graphs
    rate = None
    if timed:
        for _ in range(max(args.warmup - 1, 0)):
            one_round()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            one_round()
        _sync(device)
        rate = len(runs) * args.steps * args.batch / (time.perf_counter() - t0)
    runs = pack = None  # free the runs' memory before the next measurement
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rate, first, graphs


def concurrent(pair: str, k: int, args) -> float:
    """Summed images/s of k processes each running variant d."""
    cmd = [sys.executable, __file__, "--worker", pair, "--steps", str(args.steps * 2), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--device", args.device] + (["--small"] if args.small else [])
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
    return sum(float(p.communicate()[0].strip().splitlines()[-1]) for p in procs)


# ---- targets -----------------------------------------------------------------------------------------
def _gpu_kind(device_label: str) -> str | None:
    return next((kind for kind in RELEASED_LOOP if kind in device_label), None)


def targets(rows: list[dict], ks: list[int], device_label: str) -> list[dict]:
    """The issues' targets, each with the ratio measured here."""
    out = []

    def add(issue, what, ratio, goal, at_most=False):
        out.append({"issue": issue, "what": what, "ratio": ratio, "target": goal, "at_most": at_most,
                    "met": ratio <= goal if at_most else ratio >= goal})

    singles = [r for r in rows if not r.get("mixed")]
    kind = _gpu_kind(device_label)
    for r in singles:
        key = r["pair"].replace(" -> ", ":")
        best_p = max((r[f"p{k}"] for k in ks if f"p{k}" in r), default=None)
        best_q = max((r[f"q{k}"] for k in ks if f"q{k}" in r), default=None)
        if best_p is not None and "e" in r:
            add(9, f"{r['pair']}: best packed K / batch-512 ceiling e", best_p / r["e"], 0.9)
        if best_q is not None and "e" in r:
            add(12, f"{r['pair']}: best packed K, compiled / uncompiled ceiling e", best_q / r["e"], 1.0)
        if "g" in r and kind and key in RELEASED_LOOP[kind]:
            add(12, f"{r['pair']}: compiled d (g) / released loop on {kind} ({RELEASED_LOOP[kind][key]:,})",
                r["g"] / RELEASED_LOOP[kind][key], 20.0)
        for v, name in (("s", "mixing and losses compiled too (s)"), ("m", "max-autotune-no-cudagraphs (m)")):
            if v in r and "g" in r:  # the issue's "also try": kept only if it measurably helps
                add(12, f"{r['pair']}: {name} / compiled d (g)", r[v] / r["g"], 1.0)
        if "q1_reset_warmup_s" in r and "q8_reset_warmup_s" in r:
            add(12, f"{r['pair']}: warm-up of 8 compiled runs in a pack / of 1", r["q8_reset_warmup_s"] /
                r["q1_reset_warmup_s"], 2.0, at_most=True)
        if r.get("q1_reset_graphs") and "q8_reset_graphs" in r:
            add(12, f"{r['pair']}: graphs compiled for 8 runs / for 1 ({r['q8_reset_graphs']} / "
                f"{r['q1_reset_graphs']})", r["q8_reset_graphs"] / r["q1_reset_graphs"], 1.0, at_most=True)
    for r in (r for r in rows if r.get("mixed")):
        ceilings = [s["e"] for s in singles if s["pair"] in r["pairs"] and "e" in s]
        if len(ceilings) == len(r["pairs"]):
            for v, issue, goal in (("p", 9, 0.8), ("q", 12, 1.0)):
                if v in r:
                    add(issue, f"mixed pack{', compiled' if v == 'q' else ''} / mean e of its pairs",
                        r[v] / (sum(ceilings) / len(ceilings)), goal)
    return out


def _table(title: str, rows: list[dict], cols: list[str], fmt: str, names: dict | None = None,
           formats: dict | None = None) -> None:
    rows = [r for r in rows if any(c in r for c in cols)]
    if not rows or not cols:
        return
    names = names or {}
    print(f"\n{title}")
    print(f"{'pair':28s}" + "".join(f"{names.get(c, c):>10s}" for c in cols))
    for r in rows:
        print(f"{r['pair']:28s}" + "".join(format(r[c], (formats or {}).get(c, fmt)).rjust(10) if c in r else " " * 10 for c in cols))


def print_tables(rows: list[dict], tgts: list[dict], meta: dict) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("pair", "pairs", "mixed")))
    warm = [k for k in keys if k.endswith("_warmup_s")]
    rates = [k for k in keys if k not in warm and not k.endswith("_graphs")]
    packs = [k for k in rates if k[0] in "pq"]
    singles = [k for k in rates if k not in packs]
    print(f"\ndistillation step, PMU 10% + standardized KD, batch {meta['batch']}, on {meta['device']} "
          f"(torch {meta['torch']}, {meta['steps']} steps after {meta['warmup']}, {meta['data']})")
    single_rows = [dict(r, **({"d/a": r["d"] / r["a"]} if "a" in r and "d" in r else {})) for r in rows]
    if any("d/a" in r for r in single_rows):
        singles.append("d/a")
    _table("one run, images/s (a: released style, b: eager, c: graph fp32, d: graph bf16, e: batch 8x, "
           "f: processes, g/h: d/e compiled, s: g + mixing and losses compiled, m: g max-autotune)",
           [r for r in single_rows if not r.get("mixed")], singles, ".0f", formats={"d/a": ".1f"})
    _table("K runs in one process, each on its own CUDA stream, summed images/s (p: uncompiled, q: compiled)",
           rows, packs, ".0f")
    _table("warm-up seconds: the first step, or the pack's first round (compilation + graph capture; "
           "reset: from an empty dynamo cache)", rows, warm, ".1f",
           {k: k.removesuffix("_warmup_s").replace("_reset", " reset") for k in warm})
    if tgts:
        print("\ntargets")
        for t in tgts:
            sign = "<=" if t["at_most"] else ">="
            print(f"  issue {t['issue']:2d}  {t['what']:76s} {t['ratio']:7.2f}  ({sign} {t['target']:g}: "
                  f"{'met' if t['met'] else 'NOT met'})")


def _stop(signum, frame):
    raise KeyboardInterrupt  # a time limit's SIGTERM: print what was measured, then exit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="folder with cifar-100-python/ (default: random arrays of CIFAR's shape)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", help=f"teacher:student,... (default {','.join(PAIRS)}; with --small tiny:tiny)")
    ap.add_argument("--variants", default="abcdef", help=f"letters of {VARIANTS} (see above)")
    ap.add_argument("--steps", type=int, default=300, help="timed steps per variant (rounds of a pack)")
    ap.add_argument("--warmup", type=int, default=30, help="untimed steps (rounds) before them, the first included")
    ap.add_argument("--batch", type=int, default=64, help="batch size (e: 8x it)")
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers of variant a")
    ap.add_argument("--concurrency", default="2,4", help="process counts for variant f")
    ap.add_argument("--pack", default="2,4,8", help="runs per pack for variants p and q")
    ap.add_argument("--no-warmup-check", action="store_true",
                    help="with q, skip timing the warm-up of 1 and 8 compiled runs of the first pair")
    ap.add_argument("--no-mixed", action="store_true", help="no mixed pack (one run of each pair) in p and q")
    ap.add_argument("--small", action="store_true", help="CPU smoke mode: the tiny pair, a few steps (see above)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.worker:  # one process of variant f
        split = cifar_arrays(args.data_dir, 512 if args.small else 50_000)
        print(run_variant("d", args.worker, split, device, args)[0])
        return
    if args.small:
        args.steps, args.warmup, args.workers, args.concurrency = 3, 1, 1, "2"
        args.pairs, args.pack, args.batch = args.pairs or "tiny:tiny", "2", 16
    args.pairs = args.pairs or ",".join(PAIRS)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {''.join(sorted(unknown))}; choose from {VARIANTS}")
    variants = [v for v in VARIANTS if v in args.variants]
    if device.type != "cuda" and "c" in variants:
        variants.remove("c")
        print(f"note: variant c needs CUDA graphs; skipped on {device}", file=sys.stderr)
    ks = [int(k) for k in args.pack.split(",")]
    pairs = args.pairs.split(",")
    split = cifar_arrays(args.data_dir, 512 if args.small else 50_000)
    import torchvision

    meta = {"device": device_name(device), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "steps": args.steps,
            "warmup": args.warmup, "batch": args.batch, "data": args.data_dir or "random arrays",
            "cpu_count": os.cpu_count()}
    rows: list[dict] = []

    def report(final: bool, complete: bool = False) -> None:
        tgts = targets(rows, ks, meta["device"])
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "complete": complete, "rows": rows,
                                                   "targets": tgts}, indent=2))
        if final:
            print_tables(rows, tgts, meta)

    def note(row, key):
        value = row[key]
        print(f"  {row['pair']}: {key} = {value:.1f}", file=sys.stderr, flush=True)
        report(False)  # the JSON so far (a run stopped by a time limit keeps what it measured)

    signal.signal(signal.SIGTERM, _stop)
    try:
        for n, pair in enumerate(pairs):
            row = {"pair": pair.replace(":", " -> ")}
            rows.append(row)
            for v in variants:
                if v == "f":
                    for k in (int(c) for c in args.concurrency.split(",")):
                        row[f"f{k}"] = concurrent(pair, k, args)
                        note(row, f"f{k}")
                elif v in "pq":
                    for k in ks:
                        row[f"{v}{k}"], row[f"{v}{k}_warmup_s"], _ = packed([pair] * k, split, device, args, v == "q")
                        note(row, f"{v}{k}")
                    if v == "q" and n == 0 and not args.no_warmup_check:
                        # compilation is paid once: 1 and 8 compiled runs of the pair, each from an empty dynamo cache
                        for k in (1, 8):
                            _, row[f"q{k}_reset_warmup_s"], row[f"q{k}_reset_graphs"] = packed(
                                [pair] * k, split, device, args, True, True, False)
                            note(row, f"q{k}_reset_warmup_s")
                else:
                    row[v], first = run_variant(v, pair, split, device, args)
                    if v in COMPILED:
                        row[f"{v}_warmup_s"] = first
                    note(row, v)
        if len(pairs) > 1 and not args.no_mixed and any(v in "pq" for v in variants):
            row = {"pair": f"mixed pack ({len(pairs)} pairs)", "mixed": True,
                   "pairs": [p.replace(":", " -> ") for p in pairs]}
            rows.append(row)
            for v in (v for v in variants if v in "pq"):
                row[v], row[f"{v}_warmup_s"], _ = packed(pairs, split, device, args, v == "q")
                note(row, v)
    except KeyboardInterrupt:
        print("stopped early: the tables hold what was measured", file=sys.stderr, flush=True)
        report(True)
        sys.exit(130)
    report(True, complete=True)


if __name__ == "__main__":
    main()
