"""``mixkd study report DIR``: ``results.csv`` and ``report.md`` (with PNG figures) from a study folder.

Everything is read from the run directories (``config.yaml`` and ``result.json``; ``error.txt``
for failures): the study file is not needed, so a folder copied from a cluster, or assembled by
hand, reports the same. Runs under ``teachers/`` are teachers; every other run is a student.

* the paper-style table: rows teacher -> student pairs, columns the distillation methods, cells
  mean +- std over seeds, best per row in bold, teacher and student-alone accuracy beside;
* heatmaps of student top-1 over (teacher, student), one panel per temperature (the Mix-T figure);
* top-1 against temperature, and against mix fraction (0 = no mixing, 1 = full mixup), when swept.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from mixkd.errors import MixkdError
from mixkd.study.runner import STATE_NAME, STUDY_COPY, run_status
from mixkd.study.spec import mix_label
from mixkd.study.worker import ERROR_NAME

COLUMNS = ["id", "role", "status", "dataset", "model", "method", "teacher", "teacher_model", "teacher_mix",
           "temperature", "mix_method", "mix_fraction", "mix_alpha", "seed", "epochs", "batch_size", "lr",
           "top1", "best_top1", "best_epoch", "top5", "nll", "teacher_top1", "wall_seconds", "images_per_s",
           "device", "error"]
SHORT = {"kd": "KD", "kd_fmu": "KD+FMU", "kd_pmu": "KD+PMU", "std": "STD", "std_fmu": "STD+FMU", "std_pmu": "STD+PMU"}
METRICS = {"top1": "top-1 at the last epoch", "best_top1": "best top-1 over epochs"}
FIGURES = {"heatmap": "heatmap.png", "temperature": "top1-vs-temperature.png", "fraction": "top1-vs-fraction.png"}


def _natural(text: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(text).lower())]


def _teacher(out: Path, path: str | None) -> tuple[str | None, str | None, str | None]:
    """(teacher id, its mix label, its model) for a student's ``kd.teacher``."""
    if not path:
        return None, None, None
    p = Path(path)
    local = out / "teachers" / p.name
    if p.parent.name == "teachers" and (local / "config.yaml").exists():  # also after the folder moved
        cfg = yaml.safe_load((local / "config.yaml").read_text()) or {}
        return f"teachers/{p.name}", mix_label(cfg.get("mix", {})), cfg.get("model")
    return str(path), "external", None


def _row(out: Path, run_id: str, cfg: dict[str, Any], result: dict[str, Any] | None) -> dict[str, Any]:
    mix, kd, result = cfg.get("mix") or {}, cfg.get("kd") or {}, result or {}
    mixing = mix.get("method", "none")
    fraction = float(mix.get("fraction", 1.0)) if mixing != "none" else 0.0
    suffix = "" if mixing == "none" else ("_fmu" if fraction >= 1 else "_pmu")
    role = "teacher" if run_id.startswith("teachers/") else "student"
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(id=run_id, role=role, status=run_status(out, run_id), dataset=cfg.get("dataset"),
               model=cfg.get("model"), mix_method=mixing, mix_fraction=fraction,
               mix_alpha=mix.get("alpha") if mixing != "none" else None, seed=cfg.get("seed"),
               epochs=cfg.get("epochs"), batch_size=cfg.get("batch_size"), lr=(cfg.get("optim") or {}).get("lr"))
    if cfg.get("task") == "distill":
        base = kd.get("method", "kd")
        teacher, teacher_mix, teacher_model = _teacher(out, kd.get("teacher"))
        row.update(method=base + suffix, teacher=teacher, teacher_mix=teacher_mix,
                   teacher_model=result.get("teacher_model") or kd.get("teacher_model") or teacher_model,
                   temperature=kd.get("temperature", 4.0) if base == "kd" else None)
    else:
        row["method"] = "teacher" if role == "teacher" else "alone" + suffix
    for key in ("top1", "best_top1", "best_epoch", "top5", "nll", "teacher_top1", "wall_seconds", "images_per_s",
                "device"):
        row[key] = result.get(key)
    if row["status"] == "failed":
        row["error"] = ((out / run_id / ERROR_NAME).read_text().splitlines() or [""])[0]
    return row


def collect(out: str | Path) -> list[dict[str, Any]]:
    """One row per run directory under ``out``."""
    out = Path(out)
    rows = []
    for cfg_path in sorted(out.glob("**/config.yaml"), key=lambda p: _natural(p.parent.relative_to(out).as_posix())):
        run_id = cfg_path.parent.relative_to(out).as_posix()
        if run_id == ".":
            continue
        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
            result_path = cfg_path.parent / "result.json"
            result = json.loads(result_path.read_text()) if result_path.exists() else None
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise MixkdError(f"cannot read run {cfg_path.parent}: {e}") from None
        rows.append(_row(out, run_id, cfg, result))
    state = out / STATE_NAME
    if state.exists():  # runs that never started (blocked by a failed teacher) have no directory
        seen = {r["id"] for r in rows}
        for run_id, entry in json.loads(state.read_text()).get("runs", {}).items():
            if run_id not in seen and entry.get("status") == "blocked":
                row = dict.fromkeys(COLUMNS)
                row.update(id=run_id, role="teacher" if run_id.startswith("teachers/") else "student",
                           status="blocked", error=entry.get("error"))
                rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


# ---- aggregation ------------------------------------------------------------------------------

def _stats(values: list[float]) -> tuple[float, float, int] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def _cell(stats: tuple[float, float, int] | None, n_max: int, bold: bool = False) -> str:
    if stats is None:
        return "–"
    mean, std, n = stats
    text = f"{mean:.2f} ± {std:.2f}" if n > 1 or n_max > 1 else f"{mean:.2f}"
    text = f"**{text}**" if bold else text
    return text + (f" (n={n})" if n < n_max else "")


def teacher_name(row: dict[str, Any]) -> str:
    return f"{row['teacher_model']} ({row['teacher_mix']})"


def column_key(row: dict[str, Any], with_temperature: bool = True) -> tuple:
    order = list(SHORT).index(row["method"]) if row["method"] in SHORT else len(SHORT)
    temp = row["temperature"] if with_temperature else None
    frac = row["mix_fraction"] if row["method"].endswith("_pmu") else None
    alpha = row["mix_alpha"] if row["mix_alpha"] not in (None, 1.0) else None
    return order, row["method"], temp, frac, alpha, row["mix_method"] if row["mix_method"] == "cutmix" else None


def _sortable(key: tuple) -> tuple:
    return tuple((v is None, 0 if v is None else v) for v in key)


def column_label(key: tuple) -> str:
    _, method, temp, frac, alpha, cutmix = key
    parts = [SHORT.get(method, method)]
    parts += [f"T={temp:g}"] if temp is not None else []
    parts += [f"f={frac:g}"] if frac is not None else []
    parts += [f"α={alpha:g}"] if alpha is not None else []
    parts += ["cutmix"] if cutmix else []
    return " ".join(parts)


def _pair_key(row: dict[str, Any]) -> tuple:
    return row["teacher_mix"] != "plain", _natural(row["teacher_model"]), row["teacher_mix"], _natural(row["model"])


def paper_table(rows: list[dict[str, Any]], metric: str = "top1") -> str:
    """The markdown table: teacher -> student rows, method columns, best per row in bold."""
    done = [r for r in rows if r["status"] == "done" and r[metric] is not None]
    distill = [r for r in done if r["teacher"] is not None]
    if not distill:
        return "No distillation run has finished yet."
    alone = defaultdict(list)
    for r in done:
        if r["method"] == "alone":
            alone[r["model"]].append(r[metric])
    cells: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    teachers: dict[tuple, dict[str, float]] = defaultdict(dict)
    pairs: dict[tuple, tuple] = {}
    for r in distill:
        pair = (teacher_name(r), r["model"])
        pairs[pair] = _pair_key(r)
        cells[pair][column_key(r)].append(r[metric])
        teachers[pair][r["teacher"]] = r["teacher_top1"]
    columns = sorted({c for pair in cells.values() for c in pair}, key=_sortable)
    n_max = max(len(v) for pair in cells.values() for v in pair.values())
    lines = ["| teacher → student | teacher | student alone | " + " | ".join(map(column_label, columns)) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for pair in sorted(cells, key=pairs.get):
        stats = [_stats(cells[pair].get(c, [])) for c in columns]
        best = max((s[0] for s in stats if s), default=None)
        row = [f"{pair[0]} → {pair[1]}", _cell(_stats(list(teachers[pair].values())), 1),
               _cell(_stats(alone.get(pair[1], [])), n_max)]
        row += [_cell(s, n_max, bold=s is not None and s[0] == best and len(columns) > 1) for s in stats]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---- figures ----------------------------------------------------------------------------------

def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    return Figure(figsize=(width, height), layout="constrained")


def plot_heatmaps(rows: list[dict[str, Any]], metric: str, path: Path) -> bool:
    """Student top-1 over (teacher, student): one row of panels per method, one panel per temperature."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        if r["status"] == "done" and r["temperature"] is not None and r[metric] is not None:
            groups[column_key(r, with_temperature=False)].append(r)

    def size(key: tuple) -> tuple[int, int]:
        return len({teacher_name(r) for r in groups[key]}), len({r["model"] for r in groups[key]})

    # methods swept over a real grid (>= 2 teachers and >= 2 students); else any with two cells
    keys = [k for k in groups if min(size(k)) > 1] or [k for k in groups if size(k)[0] * size(k)[1] > 1]
    if not keys:
        return False
    keys.sort(key=_sortable)
    data = [r for k in keys for r in groups[k]]
    temps = sorted({r["temperature"] for r in data})
    teachers = sorted({teacher_name(r) for r in data}, key=lambda t: (not t.endswith("(plain)"), _natural(t)))
    students = sorted({r["model"] for r in data}, key=_natural)
    grids: dict[tuple, list[list[float]]] = {}
    for key in keys:
        for temp in temps:
            cell: dict[tuple, list[float]] = defaultdict(list)
            for r in groups[key]:
                if r["temperature"] == temp:
                    cell[(teacher_name(r), r["model"])].append(r[metric])
            if cell:
                grids[key, temp] = [[statistics.fmean(cell[t, s]) if (t, s) in cell else math.nan for s in students]
                                    for t in teachers]
    means = [v for grid in grids.values() for line in grid for v in line if not math.isnan(v)]
    lo, hi = min(means), max(max(means), min(means) + 0.1)
    panel_w, panel_h = max(2.6, 0.8 * len(students) + 1.0), max(2.2, 0.35 * len(teachers) + 1.3)
    fig = _figure(2.2 + panel_w * len(temps), 0.4 + panel_h * len(keys))
    axes = fig.subplots(len(keys), len(temps), squeeze=False)
    image = None
    for i, key in enumerate(keys):
        for j, temp in enumerate(temps):
            ax, grid = axes[i][j], grids.get((key, temp))
            if grid is None:
                ax.axis("off")
                continue
            image = ax.imshow(grid, cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
            for ti, line in enumerate(grid):
                for si, v in enumerate(line):
                    if not math.isnan(v):
                        ax.text(si, ti, f"{v:.1f}", ha="center", va="center", fontsize=8,
                                color="white" if v < (lo + hi) / 2 else "black")
            ax.set_xticks(range(len(students)), students, rotation=30, ha="right", fontsize=8)
            ax.set_yticks(range(len(teachers)), teachers if j == 0 else [""] * len(teachers), fontsize=8)
            ax.set_title(f"{column_label(key)} T={temp:g}", fontsize=9)
            ax.set_xlabel("student", fontsize=8)
    fig.colorbar(image, ax=axes, label="student top-1 (%)")
    fig.suptitle(f"student {METRICS[metric]} (%) over (teacher, student)", fontsize=10)
    fig.savefig(path, dpi=110)
    return True


def _swept(lines: dict[str, dict[float, list[float]]]) -> dict[str, dict[float, list[float]]]:
    """The lines with at least two points."""
    return {label: points for label, points in lines.items() if len(points) > 1}


def _curves(ax, lines: dict[str, dict[float, list[float]]], xlabel: str, title: str) -> None:
    for label in sorted(lines, key=_natural):
        xs = sorted(lines[label])
        stats = [_stats(lines[label][x]) for x in xs]
        ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("student top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot_temperature_curves(rows: list[dict[str, Any]], metric: str, path: Path) -> bool:
    """Top-1 against temperature: one panel per method, one line per teacher -> student pair."""
    groups: dict[tuple, dict[str, dict[float, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if r["status"] == "done" and r["temperature"] is not None and r[metric] is not None:
            groups[column_key(r, False)][f"{teacher_name(r)} → {r['model']}"][r["temperature"]].append(r[metric])
    swept = [k for k in sorted(groups, key=_sortable) if _swept(groups[k])]
    if not swept:
        return False
    fig = _figure(4.2 * len(swept), 3.6)
    for ax, key in zip(fig.subplots(1, len(swept), squeeze=False)[0], swept):
        _curves(ax, _swept(groups[key]), "temperature T", column_label(key))
    fig.savefig(path, dpi=110)
    return True


def plot_fraction_curves(rows: list[dict[str, Any]], metric: str, path: Path) -> bool:
    """Top-1 against the mixed share of the batch (0: no mixing, 1: full mixup), per KD loss."""
    mixup = [r for r in rows if r["mix_method"] == "mixup" and r["teacher"] is not None]
    alpha = statistics.mode([r["mix_alpha"] for r in mixup]) if mixup else 1.0
    groups: dict[str, dict[str, dict[float, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if (r["status"] != "done" or r["teacher"] is None or r[metric] is None or r["mix_method"] == "cutmix"
                or r["mix_alpha"] not in (None, alpha)):
            continue
        loss = r["method"].split("_")[0]
        label = f"{teacher_name(r)} → {r['model']}" + (f" T={r['temperature']:g}" if r["temperature"] else "")
        groups[loss][label][r["mix_fraction"]].append(r[metric])
    swept = [k for k in sorted(groups) if _swept(groups[k])]
    if not swept:
        return False
    fig = _figure(4.8 * len(swept), 3.8)
    for ax, loss in zip(fig.subplots(1, len(swept), squeeze=False)[0], swept):
        _curves(ax, _swept(groups[loss]), "mixed share of each batch", f"{SHORT[loss]} (mixup α={alpha:g})")
    fig.savefig(path, dpi=110)
    return True


# ---- the report -------------------------------------------------------------------------------

def write_report(out: str | Path, metric: str = "top1") -> Path:
    """Write ``results.csv``, ``report.md`` and its figures into study folder ``out``; returns report.md."""
    out = Path(out)
    if metric not in METRICS:
        raise MixkdError(f"unknown metric '{metric}'; use one of: {', '.join(METRICS)}")
    if not out.is_dir():
        raise MixkdError(f"study folder not found: {out}")
    rows = collect(out)
    if not rows:
        raise MixkdError(f"no runs found in {out}; is it a study folder (mixkd study run FILE --out {out})?")
    write_csv(rows, out / "results.csv")
    name, description = out.name, ""
    if (out / STUDY_COPY).exists():
        spec = yaml.safe_load((out / STUDY_COPY).read_text()) or {}
        name, description = spec.get("name", name), spec.get("description", "")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "blocked", "started", "new")}
    lines = [f"# Study {name}", ""] + ([description.strip(), ""] if description else [])
    lines += [f"{len(rows)} runs in `{out}`: {counts['done']} finished, {counts['failed']} failed, "
              f"{counts['blocked']} blocked, {counts['started'] + counts['new']} unfinished. Every run is in `results.csv`.", "",
              "## Teacher → student", "",
              f"Student {METRICS[metric]} (%), mean ± std over seeds (n = runs where fewer than the most); "
              "best method per row in **bold**; teacher and student-alone accuracy beside.", "",
              paper_table(rows, metric), ""]
    figures = [("heatmap", plot_heatmaps, "Student top-1 over (teacher, student), one panel per temperature"),
               ("temperature", plot_temperature_curves, "Student top-1 against temperature"),
               ("fraction", plot_fraction_curves, "Student top-1 against the mixed share of the batch")]
    for key, plot, title in figures:
        target = out / FIGURES[key]
        if plot(rows, metric, target):
            lines += [f"## {title}", "", f"![{title}]({FIGURES[key]})", ""]
        else:
            target.unlink(missing_ok=True)
    unfinished = [r for r in rows if r["status"] != "done"]
    if unfinished:
        lines += ["## Unfinished runs", ""]
        lines += [f"- `{r['id']}`: {r['status']}" + (f": {r['error']}" if r["error"] else "") for r in unfinished]
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
