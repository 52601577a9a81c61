"""``mixkd study plan``: the runs a study expands to, their status, and the compute they need.

Compute is estimated from throughput measured by finished runs in the study folder (``images_per_s``
in ``result.json``) for the same dataset, model, teacher and batch size; where none has finished
yet the estimate says "unknown" rather than guess.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from mixkd.config import RunConfig
from mixkd.study.runner import analysis_status, check_run
from mixkd.study.spec import PlannedRun, Study

# Training images per epoch where no finished run has measured it.
TRAIN_IMAGES = {"cifar100": 50_000, "cifar10": 50_000, "digits": 1_437}

Key = tuple[str, str, str | None, int]  # dataset, model, teacher model, batch size


def _key(cfg: dict[str, Any], teacher_model: str | None) -> Key:
    return cfg["dataset"], cfg["model"], teacher_model if cfg["task"] == "distill" else None, cfg["batch_size"]


def measurements(out: Path) -> tuple[dict[Key, list[float]], dict[str, float], set[str]]:
    """(images/s per key, training images per epoch per dataset, devices) from finished runs under ``out``."""
    speed: dict[Key, list[float]] = defaultdict(list)
    images: dict[str, float] = {}
    devices: set[str] = set()
    for path in sorted(out.glob("**/result.json")) if out.is_dir() else []:
        try:
            result = json.loads(path.read_text())
            cfg = yaml.safe_load((path.parent / "config.yaml").read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if not result.get("images_per_s"):
            continue
        speed[_key(cfg, result.get("teacher_model"))].append(result["images_per_s"])
        devices.add(str(result.get("device", "?")))
        metrics = path.parent / "metrics.jsonl"
        if metrics.exists() and cfg["dataset"] not in images:
            for line in metrics.read_text().splitlines()[:1]:
                row = json.loads(line)
                images[cfg["dataset"]] = row["images_per_s"] * row["epoch_seconds"]
    return speed, images, devices


def estimate_seconds(runs: list[PlannedRun], out: Path) -> tuple[dict[str, float | None], set[str]]:
    """Estimated training seconds of each run (None where unknown) and the devices measured."""
    speed, images, devices = measurements(out)
    estimates: dict[str, float | None] = {}
    for run in runs:
        cfg = RunConfig.model_validate(run.config_for(out)).model_dump()
        rates = speed.get(_key(cfg, run.teacher_model))
        per_epoch = images.get(cfg["dataset"], TRAIN_IMAGES.get(cfg["dataset"]))
        estimates[run.id] = cfg["epochs"] * per_epoch / statistics.median(rates) if rates and per_epoch else None
    return estimates, devices


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def format_plan(study: Study, out: str | Path) -> str:
    out = Path(out)
    runs = study.runs
    status = {r.id: check_run(r, out)[0] for r in runs}
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
    lines.append(f"{'#':>4}  {'run':<{width}}  {'epochs':>6}  {'estimate':>8}  status")
    for i, run in enumerate(runs, 1):
        epochs = run.config.get("epochs", RunConfig.model_fields["epochs"].default)
        lines.append(f"{i:>4}  {run.id:<{width}}  {epochs:>6}  {_duration(estimates[run.id]):>8}  {status[run.id]}")
    todo = [r.id for r in runs if status[r.id] != "done"]
    known = [estimates[i] for i in todo if estimates[i] is not None]
    lines.append("")
    if not todo:
        lines.append("every run is finished; write the report with: mixkd study report " + str(out))
    elif not known:
        lines.append(f"estimated compute for the {len(todo)} unfinished runs: unknown (no finished run in {out} "
                     "to measure throughput from yet)")
    else:
        unit = "CPU-hours" if all(d.startswith("cpu") for d in devices) else "GPU-hours"
        missing = len(todo) - len(known)
        lines.append(f"estimated compute for the {len(todo)} unfinished runs: {sum(known) / 3600:.2f} {unit} "
                     f"(training only, from throughput measured on {'; '.join(sorted(devices))})"
                     + (f"; unknown for {missing} runs with no finished run of the same model, teacher and "
                        "batch size yet" if missing else ""))
    return "\n".join(lines)
