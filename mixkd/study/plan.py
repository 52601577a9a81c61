"""``mixkd study plan``: the runs a study expands to, their status, and the compute they need.

Compute is estimated from throughput measured by finished runs in the study folder (``images_per_s``
in ``result.json``) for the same dataset, model, teacher and batch size. Where none has finished yet,
CIFAR-100 runs with a recipe that was measured on an H100 (:data:`H100_MEASURED`) get a labelled "H100
estimate from measured figures", one run at a time and, with ``--pack K``, K runs packed in one process;
everything else says "unknown" rather than guess.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from mixkd.errors import MixkdError
from mixkd.run_folder import RESULT_NAME, RunFolder
from mixkd.study.folder import analysis_status, check_run
from mixkd.study.spec import PlannedRun, Study

# Training images per epoch where no finished run has measured it.
TRAIN_IMAGES = {"cifar100": 50_000, "cifar10": 50_000, "digits": 1_437}

Key = tuple[str, str, str | None, int]  # dataset, model, teacher model, batch size

# Images/s measured on one NVIDIA H100 (torch 2.11) with mixkd: CIFAR-100-shaped 32x32 images, batch 64, the
# training step captured in a CUDA graph; {K: aggregate images/s of K runs packed in one process, each on its
# own CUDA stream}. Keyed by (model, teacher model or None for training alone, precision). Training only
# (no evaluation) unless said. Sources: docs/study-claims-reference.md ("mixkd itself on one NVIDIA H100 (torch 2.11,
# 2026-11-26, commit d0f2224)") and issue 11; nothing here is extrapolated.
H100_MEASURED: dict[tuple[str, str | None, str], dict[int, float]] = {
    # distillation steps, PMU 10% + standardized KD, random CIFAR-shaped data: one run (variant d, bf16 graph)
    # and 2 / 4 / 8 runs packed (prototype ../shared/bench/multirun_prototype.py); KD steps cost about the same
    ("resnet20", "resnet56", "bf16"): {1: 20_225, 2: 31_823, 4: 47_055, 8: 58_105},
    ("resnet8x4", "resnet32x4", "bf16"): {1: 25_569, 2: 35_902, 4: 40_895, 8: 41_482},
    ("wrn_16_2", "wrn_40_2", "bf16"): {1: 25_651},
    # the same step in fp32 (variant c, graph)
    ("resnet20", "resnet56", "fp32"): {1: 13_556},
    ("resnet8x4", "resnet32x4", "fp32"): {1: 14_309},
    ("wrn_16_2", "wrn_40_2", "fp32"): {1: 14_762},
    # `mixkd train --model resnet8x4 --epochs 80` on real CIFAR-100, two runs side by side (two processes),
    # evaluation included: 80 x 50,000 images in 171 s (bf16) / 242 s (fp32) per run. One run alone is at least
    # as fast as with a neighbour, so K = 1 is a lower bound; K = 2 is the pair's sum (not packed in one process).
    ("resnet8x4", None, "bf16"): {1: 23_392, 2: 46_784},
    ("resnet8x4", None, "fp32"): {1: 16_529, 2: 33_058},
}
H100_SOURCE = "docs/study-claims-reference.md: mixkd on one NVIDIA H100, bf16/fp32 CUDA graph, batch 64, commit d0f2224"


def finished_line(out: Path) -> str:
    """What to do with a finished study folder: read its report, or write it."""
    if (Path(out) / "report.md").is_file():
        return f"every run is finished; the report is {Path(out) / 'report.md'}"
    return f"every run is finished; write the report with: mixkd study report {out}"


def _key(cfg: dict[str, Any], teacher_model: str | None) -> Key:
    return cfg["dataset"], cfg["model"], teacher_model if cfg["task"] == "distill" else None, cfg["batch_size"]


def measurements(out: Path) -> tuple[dict[Key, list[float]], dict[str, float], set[str]]:
    """(images/s per key, training images per epoch per dataset, devices) from finished runs under ``out``."""
    speed: dict[Key, list[float]] = defaultdict(list)
    images: dict[str, float] = {}
    devices: set[str] = set()
    for path in sorted(out.glob(f"**/{RESULT_NAME}")) if out.is_dir() else []:
        folder = RunFolder(path.parent)
        try:
            result, cfg = folder.read_result(), folder.read_config_tree()
        except (OSError, MixkdError):  # a damaged run measures nothing
            continue
        if not result or not result.get("images_per_s"):
            continue
        speed[_key(cfg, result.get("teacher_model"))].append(result["images_per_s"])
        devices.add(str(result.get("device", "?")))
        if folder.metrics.exists() and cfg["dataset"] not in images:
            for line in folder.metrics.read_text().splitlines()[:1]:
                try:
                    row = json.loads(line)
                    images[cfg["dataset"]] = float(row["images_per_s"]) * float(row["epoch_seconds"])
                except (ValueError, KeyError, TypeError):  # a damaged line measures nothing
                    pass
    return speed, images, devices


def compute_line(what: str, todo: int, known: list[float], devices: set[str], out: Path) -> str:
    """'<what> the N unfinished runs: X GPU-hours (...)', or why it is unknown."""
    if not known:
        return (f"{what} the {todo} unfinished runs: unknown (no finished run in {out} of the same model, teacher "
                "and batch size to measure throughput from yet)")
    unit = "CPU-hours" if all(d.startswith("cpu") for d in devices) else "GPU-hours"
    missing = todo - len(known)
    return (f"{what} the {todo} unfinished runs: {sum(known) / 3600:.2f} {unit} "
            f"(training only, from throughput measured on {'; '.join(sorted(devices))})"
            + (f"; unknown for {missing} runs with no finished run of the same model, teacher and batch size yet"
               if missing else ""))


def estimate_seconds(runs: list[PlannedRun], out: Path) -> tuple[dict[str, float | None], set[str]]:
    """Estimated training seconds of each run (None where unknown) and the devices measured."""
    speed, images, devices = measurements(out)
    estimates: dict[str, float | None] = {}
    for run in runs:
        cfg = run.config.model_dump()
        rates = speed.get(_key(cfg, run.teacher_model))
        per_epoch = images.get(cfg["dataset"], TRAIN_IMAGES.get(cfg["dataset"]))
        estimates[run.id] = cfg["epochs"] * per_epoch / statistics.median(rates) if rates and per_epoch else None
    return estimates, devices


def h100_rates(cfg: dict[str, Any], teacher_model: str | None) -> dict[int, float] | None:
    """The measured H100 figures (:data:`H100_MEASURED`) for a run's config, or None where its recipe was
    not measured (another dataset, batch size, precision or model; eager steps; the CPU)."""
    if cfg["dataset"] != "cifar100" or cfg["batch_size"] != 64 or not cfg["graph"] or cfg["device"] == "cpu":
        return None
    return H100_MEASURED.get((cfg["model"], teacher_model if cfg["task"] == "distill" else None, cfg["precision"]))


def packed_rate(rates: dict[int, float], k: int) -> float:
    """Aggregate images/s of ``k`` packed runs: the figure measured at the largest K <= k (packing more runs
    was never measured to lower the aggregate, so this errs on the slow side)."""
    return rates[max(n for n in rates if n <= k)]


def h100_estimate(runs: list[PlannedRun], out: Path, pack: int = 1) -> tuple[float, list[PlannedRun], list[str]]:
    """Seconds of training on one H100 for ``runs`` from the measured figures, one pack of up to ``pack`` runs
    of the same recipe at a time; the runs with no measured figure, and what they lack."""
    groups: dict[tuple, list[PlannedRun]] = defaultdict(list)
    unknown, lacking = [], []
    for run in runs:
        cfg = run.config.model_dump()
        rates = h100_rates(cfg, run.teacher_model)
        if rates is None:
            unknown.append(run)
            what = (f"distilling {run.teacher_model} -> {cfg['model']}" if cfg["task"] == "distill"
                    else f"training {cfg['model']}") + f" ({cfg['dataset']}, {cfg['precision']}, batch {cfg['batch_size']})"
            if what not in lacking:
                lacking.append(what)
            continue
        groups[cfg["model"], run.teacher_model if cfg["task"] == "distill" else None, cfg["precision"],
               cfg["epochs"]].append(run)
    seconds = 0.0
    for (model, teacher, precision, epochs), members in groups.items():
        rates = H100_MEASURED[model, teacher, precision]
        n = len(members)
        for size in [pack] * (n // pack) + ([n % pack] if n % pack else []):
            seconds += epochs * TRAIN_IMAGES["cifar100"] * size / packed_rate(rates, size)
    return seconds, unknown, lacking


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def format_plan(study: Study, out: str | Path, pack: int | None = None) -> str:
    """The text of ``mixkd study plan``; ``pack``: also estimate ``mixkd study run --pack K`` on one H100."""
    out = Path(out)
    runs = study.runs
    status = {}
    for r in runs:
        on_disk, mismatch = check_run(r, out)
        status[r.id] = "mismatch" if mismatch else on_disk
    estimates, devices = estimate_seconds(runs, out)
    n_teachers = sum(r.role == "teacher" for r in runs)
    counts = {s: sum(v == s for v in status.values()) for s in ("done", "started", "failed", "mismatch")}
    lines = [f"study {study.name} ({study.source}): {len(runs)} runs: {n_teachers} teachers, "
             f"{len(runs) - n_teachers} students",
             f"folder {out}: {counts['done']} done, {counts['started']} started, {counts['failed']} failed"
             + (f", {counts['mismatch']} made with other settings than this file (mismatch: 'mixkd study run' "
                "reports them as failed; delete them to run them again)" if counts["mismatch"] else "")]
    analyzed = [r for r in runs if r.analysis is not None]
    if analyzed:
        subsets = sorted({str(r.analysis["subset"] or "all") for r in analyzed})
        done = sum(analysis_status(out, r.id) == "done" for r in analyzed)
        lines.append(f"analyses (mixkd analyze after the run, test images: {', '.join(subsets)}): {len(analyzed)} runs, "
                     f"{done} done")
    lines.append("")
    width = max(len(r.id) for r in runs) if runs else 10
    h100 = {}  # runs with no measurement in the folder: one run's seconds on an H100, from measured figures
    for run in runs:
        if estimates[run.id] is None:
            cfg = run.config.model_dump()
            rates = h100_rates(cfg, run.teacher_model)
            if rates is not None:
                h100[run.id] = cfg["epochs"] * TRAIN_IMAGES["cifar100"] / rates[1]
    lines.append(f"{'#':>4}  {'run':<{width}}  {'epochs':>6}  {'estimate':>8}  status")
    for i, run in enumerate(runs, 1):
        epochs = run.config.epochs
        estimate = _duration(estimates[run.id]) if run.id not in h100 else "~" + _duration(h100[run.id])
        lines.append(f"{i:>4}  {run.id:<{width}}  {epochs:>6}  {estimate:>8}  {status[run.id]}")
    if h100:
        lines.append(f"  ~: H100 estimate from measured figures, one run at a time ({H100_SOURCE}; training only)")
    todo = [r.id for r in runs if status[r.id] != "done"]
    known = [estimates[i] for i in todo if estimates[i] is not None]
    lines.append("")
    if not todo:
        lines.append(finished_line(out))
    else:
        lines.append(compute_line("estimated compute for", len(todo), known, devices, out))
    fallback = [r for r in runs if r.id in todo and r.id in h100]
    if fallback:
        unmeasured = [r for r in runs if r.id in todo and estimates[r.id] is None and r.id not in h100]
        _, _, lacking = h100_estimate(unmeasured, out)
        for k in sorted({1, pack or 1}):
            seconds, _, _ = h100_estimate(fallback, out, k)
            how = "one run at a time" if k == 1 else (f"with --pack {k} (packs of up to {k} runs of the same "
                                                      "recipe, one pack at a time)")
            lines.append(f"H100 estimate from measured figures, {how}: {_duration(seconds)} of training for "
                         f"{len(fallback)} unfinished runs"
                         + (f"; unknown for {len(unmeasured)} runs (no measured H100 figure for "
                            f"{', '.join(lacking)})" if unmeasured else ""))
    return "\n".join(lines)
