"""A study folder's runs as rows (``results.csv``) and as results records (:mod:`mixkd.results`).

Everything is read from the run directories (``config.yaml`` and ``result.json``; ``error.txt``
for failures): the study file is not needed, so a folder copied from a cluster, or assembled by
hand, reports the same. Runs under ``teachers/`` are teachers; every other run is a student. Each
row also carries its run's :class:`~mixkd.results.Cell` and :class:`~mixkd.results.Context`
(``row["cell"]``, ``row["context"]``; not written to the CSV), built once from its config: the
tables, figures and claims read those, never the method back from the mix fraction.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from mixkd.errors import MixkdError
from mixkd.files import atomic_write, read_json
from mixkd.results import DEFAULT_AUGMENT, Result, cell_from_config, context_from_config, natural
from mixkd.run_folder import ANALYSIS_NAME, CONFIG_NAME, RunFolder, teacher_run
from mixkd.study.folder import STATE_HINT, STATE_NAME, analysis_status, run_status, state_problem
from mixkd.study.spec import Study, mix_label

COLUMNS = ["id", "role", "status", "dataset", "model", "method", "teacher", "teacher_model", "teacher_mix",
           "temperature", "mix_method", "mix_fraction", "mix_alpha", "mix_sampling", "augment", "seed", "epochs", "batch_size", "lr",
           "top1", "best_top1", "best_epoch", "top5", "nll", "teacher_top1", "wall_seconds", "images_per_s",
           "device", "error"]
# From each run's analysis.json (mixkd.analysis.summary_row): ECE as a fraction, agreement and accuracies in %.
ANALYSIS_METRICS = ["ece", "confidence", "entropy", "agreement", "kl", "fgsm_8", "pgd_2", "pgd_8"]
COLUMNS += ["analysis", *ANALYSIS_METRICS, "analysis_error"]


def _teacher(out: Path, path: str | None) -> tuple[str | None, str | None, str | None]:
    """(teacher id, its mix label, its model) for a student's ``kd.teacher``."""
    if not path:
        return None, None, None
    teacher_id = teacher_run(path, out, "teachers")  # also after the folder moved
    if teacher_id:
        cfg = RunFolder(out / teacher_id).read_config_tree()
        return teacher_id, mix_label(cfg.get("mix", {})), cfg.get("model")
    return str(path), "external", None


def _row(out: Path, run_id: str, cfg: dict[str, Any], result: dict[str, Any] | None) -> dict[str, Any]:
    mix, kd, result = cfg.get("mix") or {}, cfg.get("kd") or {}, result or {}
    cell = cell_from_config(cfg)
    role = "teacher" if run_id.startswith("teachers/") else "student"
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(id=run_id, role=role, status=run_status(out, run_id), dataset=cfg.get("dataset"),
               model=cfg.get("model"), mix_method=cell.mix, mix_fraction=cell.fraction or 0.0,
               mix_alpha=mix.get("alpha") if cell.mix != "none" else None,
               mix_sampling=mix.get("sampling", "exact") if cell.mix != "none" else None,
               augment=cell.augment or DEFAULT_AUGMENT, seed=cfg.get("seed"),
               epochs=cfg.get("epochs"), batch_size=cfg.get("batch_size"), lr=(cfg.get("optim") or {}).get("lr"),
               method="teacher" if role == "teacher" else cell.method, temperature=cell.temperature)
    teacher_model = None
    if cfg.get("task") == "distill":
        teacher, teacher_mix, teacher_model = _teacher(out, kd.get("teacher"))
        teacher_model = result.get("teacher_model") or kd.get("teacher_model") or teacher_model
        row.update(teacher=teacher, teacher_mix=teacher_mix, teacher_model=teacher_model)
    for key in ("top1", "best_top1", "best_epoch", "top5", "nll", "teacher_top1", "wall_seconds", "images_per_s",
                "device"):
        row[key] = result.get(key)
    if row["status"] == "failed":
        row["error"] = (RunFolder(out / run_id).error.read_text().splitlines() or [""])[0]
    _analysis_columns(out, run_id, row)
    row["cell"] = cell
    row["context"] = context_from_config(cfg, teacher_model, row["teacher_mix"])
    if cfg.get("task") == "distill":
        row["t_stddev"] = _t_stddev(out, row["teacher"], cfg)
    return row


def _t_stddev(out: Path, teacher: str | None, cfg: dict[str, Any]) -> float | None:
    """The T. stddev that ``mixkd augment-score`` saved in the student's teacher run folder for the student's
    augmentation (its ``augment`` spec, with ``+mixup`` / ``+cutmix`` where it mixes every sample by ``mix:``);
    None where none was saved (claim 6 then names the policy as lacking one)."""
    spec = cfg.get("augment")
    if not teacher or not spec:
        return None
    mix = cfg.get("mix") or {}
    method = mix.get("method") or "none"
    if method != "none" and method not in spec.split("+"):
        if float(mix.get("fraction", 1.0)) < 1.0:
            return None  # partial mixing: not a policy augment-score scores
        spec = f"{spec}+{method}"
    from mixkd.analysis.augment_score import read_scores

    folder = out / teacher if (out / teacher).is_dir() else Path(teacher)
    return read_scores(folder).get(spec) if folder.is_dir() else None


def _analysis_columns(out: Path, run_id: str, row: dict[str, Any]) -> None:
    from mixkd.analysis import summary_row

    status = analysis_status(out, run_id)
    if status == "done":
        try:
            values = summary_row(out / run_id)
        except (MixkdError, KeyError, TypeError, ValueError) as e:  # an analysis.json of another layout
            row.update(analysis="unreadable", analysis_error=f"cannot read its {ANALYSIS_NAME}: {e}")
            return
        row["analysis"] = "done"
        row.update({k: values.get(k) for k in ANALYSIS_METRICS})
    elif status == "failed":
        row["analysis"] = "failed"
        row["analysis_error"] = (RunFolder(out / run_id).analysis_error.read_text().splitlines() or [""])[0]


def collect(out: str | Path) -> list[dict[str, Any]]:
    """One row per run directory under ``out``."""
    out = Path(out)
    rows = []
    for cfg_path in sorted(out.glob(f"**/{CONFIG_NAME}"), key=lambda p: natural(p.parent.relative_to(out).as_posix())):
        run_id = cfg_path.parent.relative_to(out).as_posix()
        if run_id == ".":
            continue
        folder = RunFolder(cfg_path.parent)
        try:
            cfg, result = folder.read_config_tree(), folder.read_result()
        except OSError as e:
            raise MixkdError(f"cannot read run {cfg_path.parent}: {e}") from None
        rows.append(_row(out, run_id, cfg, result))
    state = out / STATE_NAME
    if state.exists():  # runs that never started (blocked by a failed teacher) have no directory
        seen = {r["id"] for r in rows}
        saved = read_json(state, STATE_HINT)
        problem = state_problem(saved) if isinstance(saved, dict) else "not a JSON object"
        if problem:
            raise MixkdError(f"{state} is damaged ({problem}); {STATE_HINT}")
        for run_id, entry in saved.get("runs", {}).items():
            if run_id not in seen and entry.get("status") == "blocked":
                row = dict.fromkeys(COLUMNS)
                row.update(id=run_id, role="teacher" if run_id.startswith("teachers/") else "student",
                           status="blocked", error=entry.get("error"), cell=None, context=None)
                rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)

    atomic_write(path, write)


def results_of(rows: list[dict[str, Any]], metric: str = "top1") -> list[Result]:
    """The finished students of ``rows`` (as :func:`collect` makes them) that have a ``metric`` (``top1``: last
    epoch, ``best_top1``: best epoch) as results records, with both."""
    out = []
    for r in rows:
        value = r.get(metric)
        if r.get("role") != "student" or r.get("status") != "done" or value is None or math.isnan(float(value)):
            continue
        best = r.get("best_top1")
        out.append(Result(r["context"], r["cell"], r.get("seed"), float(r["top1"]) if r.get("top1") is not None else math.nan, r["id"],
                          best_top1=None if best is None else float(best), t_stddev=r.get("t_stddev"),
                          test_loss=None if r.get("nll") is None else float(r["nll"])))
    return out


def planned_results(study: Study) -> list[Result]:
    """A study's planned students as results records with top-1 NaN (not yet run): what the claims can compare."""
    out = []
    for run in study.runs:
        if run.role != "student":
            continue
        cfg = run.config.model_dump()
        teacher_label = None
        if run.teacher_run:
            teacher_label = mix_label(study.run(run.teacher_run).config.mix.model_dump())
        elif run.teacher_checkpoint:
            teacher_label = "external"
        out.append(Result(context_from_config(cfg, run.teacher_model, teacher_label), cell_from_config(cfg), run.seed,
                          math.nan, run.id))
    return out
