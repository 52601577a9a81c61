"""``mixkd study report DIR``: ``results.csv`` and ``report.md`` (with PNG figures) from a study folder.

Everything is read from the run directories (``config.yaml`` and ``result.json``; ``error.txt``
for failures): the study file is not needed, so a folder copied from a cluster, or assembled by
hand, reports the same. Runs under ``teachers/`` are teachers; every other run is a student.

* the paper-style table: rows teacher -> student pairs, columns the distillation methods, cells
  mean +- std over seeds, best per row in bold, teacher and student-alone accuracy beside (partial
  mixup with ``mix.sampling: reference`` in columns of its own, "(reference sampling)");
* heatmaps of student top-1 over (teacher, student), one panel per temperature (the Mix-T figure);
* top-1 against temperature, and against mix fraction (0 = no mixing, 1 = full mixup), when swept;
* where runs were analyzed (``analysis.json``, see :mod:`mixkd.analysis`): per-method means of the
  analysis metrics, the same table's layout for ECE, entropy, agreement with the teacher and PGD
  accuracy at 8/255, robustness curves per method, and a t-SNE montage (teacher | student alone |
  KD | ...) of one teacher -> student pair (the study file's ``analysis.tsne_pair``, else the pair
  with the most analyzed methods).
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
from mixkd.files import atomic_write, atomic_write_text
from mixkd.study.claims import claims_json, claims_markdown, evaluate_claims
from mixkd.study.runner import STATE_NAME, STUDY_COPY, analysis_status, run_status
from mixkd.study.spec import METHODS, mix_label
from mixkd.study.worker import ANALYSIS_ERROR_NAME, ERROR_NAME

COLUMNS = ["id", "role", "status", "dataset", "model", "method", "teacher", "teacher_model", "teacher_mix",
           "temperature", "mix_method", "mix_fraction", "mix_alpha", "mix_sampling", "seed", "epochs", "batch_size", "lr",
           "top1", "best_top1", "best_epoch", "top5", "nll", "teacher_top1", "wall_seconds", "images_per_s",
           "device", "error"]
# From each run's analysis.json (mixkd.analysis.summary_row): ECE as a fraction, agreement and accuracies in %.
ANALYSIS_METRICS = ["ece", "confidence", "entropy", "agreement", "kl", "fgsm_8", "pgd_2", "pgd_8"]
COLUMNS += ["analysis", *ANALYSIS_METRICS, "analysis_error"]
SHORT = {"kd": "KD", "kd_fmu": "KD+FMU", "kd_pmu": "KD+PMU", "std": "STD", "std_fmu": "STD+FMU", "std_pmu": "STD+PMU"}
METRICS = {"top1": "top-1 at the last epoch", "best_top1": "best top-1 over epochs"}
FIGURES = {"heatmap": "heatmap.png", "temperature": "top1-vs-temperature.png", "fraction": "top1-vs-fraction.png",
           "robustness": "analysis-robustness.png", "tsne": "analysis-tsne.png"}
# The analysis tables in the paper-style layout: (summary_row key, better: max / min / None).
ANALYSIS_TABLES = [("ece", "min"), ("entropy", None), ("agreement", "max"), ("pgd_8", "max")]


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
               mix_alpha=mix.get("alpha") if mixing != "none" else None,
               mix_sampling=mix.get("sampling", "exact") if mixing != "none" else None, seed=cfg.get("seed"),
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
    _analysis_columns(out, run_id, row)
    return row


def _analysis_columns(out: Path, run_id: str, row: dict[str, Any]) -> None:
    from mixkd.analysis import summary_row

    status = analysis_status(out, run_id)
    if status == "done":
        try:
            values = summary_row(out / run_id)
        except (MixkdError, KeyError, TypeError, ValueError) as e:  # an analysis.json of another layout
            row.update(analysis="unreadable", analysis_error=f"cannot read its analysis.json: {e}")
            return
        row["analysis"] = "done"
        row.update({k: values.get(k) for k in ANALYSIS_METRICS})
    elif status == "failed":
        row["analysis"] = "failed"
        row["analysis_error"] = ((out / run_id / ANALYSIS_ERROR_NAME).read_text().splitlines() or [""])[0]


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
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)

    atomic_write(path, write)


# ---- aggregation ------------------------------------------------------------------------------

def _stats(values: list[float]) -> tuple[float, float, int] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def _cell(stats: tuple[float, float, int] | None, n_max: int, bold: bool = False, digits: int = 2) -> str:
    if stats is None:
        return "–"
    mean, std, n = stats
    text = f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 or n_max > 1 else f"{mean:.{digits}f}"
    text = f"**{text}**" if bold else text
    return text + (f" (n={n})" if n < n_max else "")


def teacher_name(row: dict[str, Any]) -> str:
    return f"{row['teacher_model']} ({row['teacher_mix']})"


def column_key(row: dict[str, Any], with_temperature: bool = True) -> tuple:
    """(order, method, temperature, fraction, alpha, "cutmix", sampling): a column of the table; each
    setting None where it does not apply or is the default (alpha 1, mixup, sampling exact)."""
    order = list(SHORT).index(row["method"]) if row["method"] in SHORT else len(SHORT)
    temp = row["temperature"] if with_temperature else None
    pmu = row["method"].endswith("_pmu")
    frac = row["mix_fraction"] if pmu else None
    alpha = row["mix_alpha"] if row["mix_alpha"] not in (None, 1.0) else None
    cutmix = row["mix_method"] if row["mix_method"] == "cutmix" else None
    return order, row["method"], temp, frac, alpha, cutmix, _pmu_sampling(row)


def _pmu_sampling(row: dict[str, Any]) -> str | None:
    """A partial-mixup run's ``mix.sampling`` unless it is ``exact`` (the paper's: exactly the fraction
    mixed); None for the other runs (full mixup mixes every sample under either sampling)."""
    sampling = row.get("mix_sampling")
    return sampling if row["method"].endswith("_pmu") and sampling not in (None, "", "exact") else None


def _sortable(key: tuple) -> tuple:
    """A column key's sort key: settings left at their default (None) after the set ones, except the
    sampling, whose default (exact) comes first, beside its reference-sampling twin."""
    *head, sampling = key
    return (*((v is None, 0 if v is None else v) for v in head), (sampling is not None, sampling or ""))


def column_label(key: tuple) -> str:
    _, method, temp, frac, alpha, cutmix, sampling = key
    parts = [SHORT.get(method, method)]
    parts += [f"T={temp:g}"] if temp is not None else []
    parts += [f"f={frac:g}"] if frac is not None else []
    parts += [f"α={alpha:g}"] if alpha is not None else []
    parts += ["cutmix"] if cutmix else []
    parts += [f"({sampling} sampling)"] if sampling else []
    return " ".join(parts)


def _pair_key(row: dict[str, Any]) -> tuple:
    return row["teacher_mix"] != "plain", _natural(row["teacher_model"]), row["teacher_mix"], _natural(row["model"])


def _pair_table(rows: list[dict[str, Any]], value, teacher_value, better: str | None = "max",
                digits: int = 2) -> str | None:
    """Teacher -> student rows, method columns, cells mean +- std over seeds of ``value(row)`` (None:
    no value), best per row (``better``: max, min or None) in bold; the teacher (``teacher_value``
    of its students' rows) and the student alone beside. None when no distillation run has a value."""
    done = [r for r in rows if r["status"] == "done" and value(r) is not None]
    distill = [r for r in done if r["teacher"] is not None]
    if not distill:
        return None
    alone = defaultdict(list)
    for r in done:
        if r["method"] == "alone":
            alone[r["model"]].append(value(r))
    cells: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    teachers: dict[tuple, dict[str, float]] = defaultdict(dict)
    pairs: dict[tuple, tuple] = {}
    for r in distill:
        pair = (teacher_name(r), r["model"])
        pairs[pair] = _pair_key(r)
        cells[pair][column_key(r)].append(value(r))
        teachers[pair][r["teacher"]] = teacher_value(r)
    columns = sorted({c for pair in cells.values() for c in pair}, key=_sortable)
    n_max = max(len(v) for pair in cells.values() for v in pair.values())
    lines = ["| teacher → student | teacher | student alone | " + " | ".join(map(column_label, columns)) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for pair in sorted(cells, key=pairs.get):
        stats = [_stats(cells[pair].get(c, [])) for c in columns]
        means = [s[0] for s in stats if s]
        best = (max if better == "max" else min)(means) if better and means else None
        row = [f"{pair[0]} → {pair[1]}", _cell(_stats(list(teachers[pair].values())), 1, digits=digits),
               _cell(_stats(alone.get(pair[1], [])), n_max, digits=digits)]
        row += [_cell(s, n_max, bold=s is not None and s[0] == best and len(columns) > 1, digits=digits) for s in stats]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def paper_table(rows: list[dict[str, Any]], metric: str = "top1") -> str:
    """The markdown table: teacher -> student rows, method columns, best per row in bold."""
    table = _pair_table(rows, lambda r: r[metric], lambda r: r["teacher_top1"])
    return table if table is not None else "No distillation run has finished yet."


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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    return True


def plot_fraction_curves(rows: list[dict[str, Any]], metric: str, path: Path) -> bool:
    """Top-1 against the mixed share of the batch (0: no mixing, 1: full mixup), per KD loss. Partial
    mixup with ``sampling: reference`` is left out: it mixes more than its fraction (REFERENCE claim 5)."""
    mixup = [r for r in rows if r["mix_method"] == "mixup" and r["teacher"] is not None]
    alpha = statistics.mode([r["mix_alpha"] for r in mixup]) if mixup else 1.0
    groups: dict[str, dict[str, dict[float, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if (r["status"] != "done" or r["teacher"] is None or r[metric] is None or r["mix_method"] == "cutmix"
                or r["mix_alpha"] not in (None, alpha) or _pmu_sampling(r)):
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    return True


# ---- analyses ---------------------------------------------------------------------------------

def _analyzed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "done" and r["analysis"] == "done"]


def _method_label(row: dict[str, Any], long: bool = False) -> str:
    """'teacher (mixup)', 'student alone', 'KD T=4', ... (long: 'KD + partial mixup (T=4, f=0.1)')."""
    if row["role"] == "teacher":
        return f"teacher ({mix_label({'method': row['mix_method'], 'fraction': row['mix_fraction'] or 1.0, 'alpha': row['mix_alpha'] or 1.0})})"
    if row["teacher"] is None:
        return "student alone" if row["method"] == "alone" else row["method"]
    key = column_key(row)
    if not long:
        return column_label(key)
    _, method, temp, frac, alpha, cutmix, sampling = key
    extra = [f"T={temp:g}"] if temp is not None else []
    extra += [f"f={frac:g}"] if frac is not None else []
    extra += [f"α={alpha:g}"] if alpha is not None else []
    extra += ["cutmix"] if cutmix else []
    extra += [f"{sampling} sampling"] if sampling else []
    name = METHODS[method].label if method in METHODS else SHORT.get(method, method)
    return name + (f" ({', '.join(extra)})" if extra else "")


def _method_groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Analyzed runs per method label: teachers (by mixing), the student alone, then the table's columns."""
    def order(r: dict[str, Any]) -> tuple:
        if r["role"] == "teacher":
            return 0, r["mix_method"] != "none", _method_label(r)
        if r["teacher"] is None:
            return 1, False, _method_label(r)
        return 2, False, _sortable(column_key(r))

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(_analyzed(rows), key=order):
        groups.setdefault(_method_label(r), []).append(r)
    return groups


def method_summary_table(out: Path, rows: list[dict[str, Any]]) -> str:
    """Rows the methods, columns mixkd.analysis.TABLE_COLUMNS: means over every analyzed run of a method."""
    from mixkd.analysis import TABLE_COLUMNS, summarize

    lines = ["| method | runs | " + " | ".join(h.replace("|", "\\|") for _, h, _ in TABLE_COLUMNS) + " |",
             "|---|---|" + "---|" * len(TABLE_COLUMNS)]
    for label, group in _method_groups(rows).items():
        mean = summarize([out / r["id"] for r in group])["mean"]
        cells = ["–" if mean.get(k) is None else f"{mean[k] * scale:.2f}" for k, _, scale in TABLE_COLUMNS]
        lines.append(f"| {label} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def analysis_tables(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, markdown) per metric of ANALYSIS_TABLES, in the paper-style table's layout."""
    from mixkd.analysis import TABLE_COLUMNS

    headers = {k: (h, scale) for k, h, scale in TABLE_COLUMNS}
    teachers = {r["id"]: r for r in rows if r["role"] == "teacher"}
    tables = []
    for key, better in ANALYSIS_TABLES:
        header, scale = headers.get(key, (key, 1.0))

        def value(r: dict[str, Any], key=key, scale=scale) -> float | None:
            return r[key] * scale if r["analysis"] == "done" and r[key] is not None else None

        def teacher_value(r: dict[str, Any], value=value) -> float | None:
            t = teachers.get(r["teacher"])
            return value(t) if t is not None and t["status"] == "done" else None

        table = _pair_table(rows, value, teacher_value, better, digits=3 if key == "entropy" else 2)
        if table is not None:
            tables.append((f"{header}" + {"min": ", lower is better", "max": ", higher is better"}.get(better, ""),
                           table))
    return tables


def plot_robustness(out: Path, rows: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy under FGSM and PGD against epsilon, one line per method (mean over its analyzed runs)."""
    from mixkd.analysis import robustness_curves

    groups = _method_groups(rows)
    if not groups:
        return False
    try:
        robustness_curves({label: [out / r["id"] for r in group] for label, group in groups.items()}, path)
    except MixkdError:  # analyses made with different epsilons cannot be averaged
        return False
    return True


def _teacher_matches(row: dict[str, Any], want: str) -> bool:
    """Whether a student's teacher is ``want``: a teacher group name, its label in run ids
    (resnet56_mixup), or its run id."""
    if row["teacher"] in (want, f"teachers/{want}"):
        return True
    label = row["id"].split("-from-", 1)[1].rsplit(f"-{row['method']}", 1)[0] if "-from-" in row["id"] else ""
    if label and want in (label, re.sub(r"-s\d+$", "", label)):
        return True
    model = row["teacher_model"] or ""
    return bool(model) and label.startswith(f"{model}_") and label[len(model) + 1:].split("-")[0] == want


def tsne_pair(rows: list[dict[str, Any]], wanted: tuple[str, str] | None = None) -> tuple[str, str] | None:
    """(teacher run id or checkpoint, student model) of the montage: ``wanted`` (teacher, student) when
    it has analyzed runs, else the pair with the most analyzed methods (plain teachers first)."""
    distill = [r for r in _analyzed(rows) if r["teacher"] is not None]
    if wanted is not None:
        distill = [r for r in distill if r["model"] == wanted[1] and _teacher_matches(r, wanted[0])] or distill
    panels: dict[tuple[str, str], set] = defaultdict(set)
    keys: dict[tuple[str, str], tuple] = {}
    for r in distill:
        panels[r["teacher"], r["model"]].add(column_key(r))
        keys[r["teacher"], r["model"]] = _pair_key(r)
    if not panels:
        return None
    return min(panels, key=lambda p: (-len(panels[p]), keys[p], p[0]))


def plot_tsne_montage(out: Path, rows: list[dict[str, Any]], pair: tuple[str, str], path: Path) -> list[str]:
    """teacher | student alone | each method, for ``pair``; returns the panels' titles."""
    from mixkd.analysis import TEACHER_TSNE_FILE, TSNE_FILE, tsne_montage

    teacher_id, model = pair
    analyzed = _analyzed(rows)
    distill = sorted((r for r in analyzed if r["teacher"] == teacher_id and r["model"] == model),
                     key=lambda r: (_sortable(column_key(r)), r["seed"] or 0))
    items, titles = [], []
    teacher_row = next((r for r in analyzed if r["id"] == teacher_id), None)
    if teacher_row is not None and (out / teacher_id / TSNE_FILE).exists():
        items.append(out / teacher_id / TSNE_FILE)
    else:  # an external teacher, or one not analyzed itself: as its students' analyses saw it
        items += [out / r["id"] / TEACHER_TSNE_FILE for r in distill if (out / r["id"] / TEACHER_TSNE_FILE).exists()][:1]
    if items:
        titles.append(f"teacher {teacher_name(distill[0])}")
    alone = sorted((r for r in analyzed if r["method"] == "alone" and r["model"] == model and r["teacher"] is None),
                   key=lambda r: r["seed"] or 0)
    chosen = alone[:1]
    seen = set()
    for r in distill:
        if column_key(r) not in seen:
            seen.add(column_key(r))
            chosen.append(r)
    for r in chosen:
        if (out / r["id"] / TSNE_FILE).exists():
            items.append(out / r["id"] / TSNE_FILE)
            titles.append(f"{model}: {_method_label(r, long=True)}")
    if len(items) < 2:
        return []
    tsne_montage(items, titles, path, columns=min(4, len(items)))
    return titles


def _analysis_section(out: Path, rows: list[dict[str, Any]], wanted_pair: tuple[str, str] | None) -> list[str]:
    analyzed = _analyzed(rows)
    for key in ("robustness", "tsne"):
        (out / FIGURES[key]).unlink(missing_ok=True)
    if not analyzed:
        return []
    from mixkd.analysis import load_analysis

    first = load_analysis(out / analyzed[0]["id"])
    subset = (f"{first.get('num_images')} of the {first.get('num_test_images')} test images"
              if first.get("num_images") != first.get("num_test_images") else "every test image")
    rob = first.get("robustness", {})
    eps = ", ".join(f"{e:g}" for e in rob.get("eps_255", []) if e)
    lines = ["## Analyses", "",
             f"`mixkd analyze` of {len(analyzed)} runs ({subset} for the metrics and attacks; each run's "
             "`analysis.json` and PNGs are in its directory, and the main metrics in `results.csv`). "
             f"ECE: 15 equal-width confidence bins; entropy in nats; agreement: top-1 agreement with the "
             f"teacher; robust accuracy: L-inf attacks in pixel space, FGSM and PGD-{rob.get('pgd_steps', 10)} "
             f"(step eps/4, random start) at eps = {eps} /255.", "",
             "### Per method", "",
             "Means over every analyzed run of a method (all its teacher → student pairs and seeds); top-1 here is "
             "on the analyzed test images.", "",
             method_summary_table(out, rows), ""]
    tables = analysis_tables(rows)
    if tables:
        lines += ["The next tables have the layout of the teacher → student table: mean ± std over seeds, best "
                  "method per row in **bold**, the teacher and the student alone beside.", ""]
    for title, table in tables:
        lines += [f"### {title}", "", table, ""]
    title = "Robustness curves per method"
    if plot_robustness(out, rows, out / FIGURES["robustness"]):
        lines += [f"### {title}", "", "Accuracy under attack against epsilon, averaged over each method's analyzed "
                  "runs (all pairs and seeds).", "", f"![{title}]({FIGURES['robustness']})", ""]
    pair = tsne_pair(rows, wanted_pair)
    titles = plot_tsne_montage(out, rows, pair, out / FIGURES["tsne"]) if pair else []
    if titles:
        teacher = next(teacher_name(r) for r in analyzed if r["teacher"] == pair[0])
        title = f"t-SNE of penultimate features: {teacher} → {pair[1]}"
        lines += [f"### {title}", "", f"Panels: {' | '.join(titles)}. The same test images in every panel "
                  "(up to 100 per class for the first 10 classes), colours fixed per class.", "",
                  f"![{title}]({FIGURES['tsne']})", ""]
    failed = [r for r in rows if r["analysis"] in ("failed", "unreadable")]
    if failed:
        lines += ["### Analyses that failed", "", "Their runs' results stand; `mixkd study run` again retries them.", ""]
        lines += [f"- `{r['id']}`: {r['analysis_error']}" for r in failed]
        lines.append("")
    return lines


def _wanted_pair(spec: dict[str, Any]) -> tuple[str, str] | None:
    pair = (spec.get("analysis") or {}).get("tsne_pair") if isinstance(spec.get("analysis"), dict) else None
    if isinstance(pair, dict) and pair.get("teacher") and pair.get("student"):
        return str(pair["teacher"]), str(pair["student"])
    return None


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
    name, description, spec = out.name, "", {}
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
    claims = evaluate_claims(rows, metric)
    atomic_write_text(out / "claims.json", json.dumps(claims_json(claims, metric), indent=1, ensure_ascii=False) + "\n")
    lines += claims_markdown(claims, METRICS[metric])
    lines += _analysis_section(out, rows, _wanted_pair(spec))
    unfinished = [r for r in rows if r["status"] != "done"]
    if unfinished:
        lines += ["## Unfinished runs", ""]
        lines += [f"- `{r['id']}`: {r['status']}" + (f": {r['error']}" if r["error"] else "") for r in unfinished]
        lines.append("")
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"
