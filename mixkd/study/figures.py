"""The report's figures (PNG, matplotlib without pyplot): heatmaps over (teacher, student), top-1
against temperature and mix fraction, robustness curves, the t-SNE montage."""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from mixkd.errors import MixkdError
from mixkd.files import atomic_write
from mixkd.results import Cell, natural
from mixkd.study.tables import analyzed, method_groups, method_label, pair_key, seed_stats, teacher_name

METRICS = {"top1": "top-1 at the last epoch", "best_top1": "best top-1 over epochs"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    return Figure(figsize=(width, height), layout="constrained")


def plot_heatmaps(rows: list[dict[str, Any]], metric: str, path: Path) -> bool:
    """Student top-1 over (teacher, student): one row of panels per method, one panel per temperature."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        if r["status"] == "done" and r["temperature"] is not None and r[metric] is not None:
            groups[replace(r["cell"], temperature=None)].append(r)

    def size(key: tuple) -> tuple[int, int]:
        return len({teacher_name(r) for r in groups[key]}), len({r["model"] for r in groups[key]})

    # methods swept over a real grid (>= 2 teachers and >= 2 students); else any with two cells
    keys = [k for k in groups if min(size(k)) > 1] or [k for k in groups if size(k)[0] * size(k)[1] > 1]
    if not keys:
        return False
    keys.sort(key=Cell.sort_key)
    data = [r for k in keys for r in groups[k]]
    temps = sorted({r["temperature"] for r in data})
    teachers = sorted({teacher_name(r) for r in data}, key=lambda t: (not t.endswith("(plain)"), natural(t)))
    students = sorted({r["model"] for r in data}, key=natural)
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
            ax.set_title(f"{key.label} T={temp:g}", fontsize=9)
            ax.set_xlabel("student", fontsize=8)
    fig.colorbar(image, ax=axes, label="student top-1 (%)")
    fig.suptitle(f"student {METRICS[metric]} (%) over (teacher, student)", fontsize=10)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    return True


def _swept(lines: dict[str, dict[float, list[float]]]) -> dict[str, dict[float, list[float]]]:
    """The lines with at least two points."""
    return {label: points for label, points in lines.items() if len(points) > 1}


def _curves(ax, lines: dict[str, dict[float, list[float]]], xlabel: str, title: str) -> None:
    for label in sorted(lines, key=natural):
        xs = sorted(lines[label])
        stats = [seed_stats(lines[label][x]) for x in xs]
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
            groups[replace(r["cell"], temperature=None)][f"{teacher_name(r)} → {r['model']}"][r["temperature"]].append(r[metric])
    swept = [k for k in sorted(groups, key=Cell.sort_key) if _swept(groups[k])]
    if not swept:
        return False
    fig = _figure(4.2 * len(swept), 3.6)
    for ax, key in zip(fig.subplots(1, len(swept), squeeze=False)[0], swept):
        _curves(ax, _swept(groups[key]), "temperature T", key.label)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    return True


def plot_fraction_curves(rows: list[dict[str, Any]], metric: str, path: Path) -> bool:
    """Top-1 against the mixed share of the batch (0: no mixing, 1: full mixup), per KD loss. Partial
    mixup with ``sampling: reference`` is left out: it mixes more than its fraction (claim 5, docs/study-claims-reference.md)."""
    mixup = [r for r in rows if r["mix_method"] == "mixup" and r["teacher"] is not None]
    alpha = statistics.mode([r["mix_alpha"] for r in mixup]) if mixup else 1.0
    groups: dict[str, dict[str, dict[float, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if (r["status"] != "done" or r["teacher"] is None or r[metric] is None or r["mix_method"] == "cutmix"
                or r["mix_alpha"] not in (None, alpha) or r["cell"].sampling not in (None, "exact")):
            continue
        loss = r["cell"].kd
        label = f"{teacher_name(r)} → {r['model']}" + (f" T={r['temperature']:g}" if r["temperature"] else "")
        groups[loss][label][r["mix_fraction"]].append(r[metric])
    swept = [k for k in sorted(groups) if _swept(groups[k])]
    if not swept:
        return False
    fig = _figure(4.8 * len(swept), 3.8)
    for ax, loss in zip(fig.subplots(1, len(swept), squeeze=False)[0], swept):
        _curves(ax, _swept(groups[loss]), "mixed share of each batch", f"{Cell(loss).kd_short} (mixup α={alpha:g})")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    return True


def plot_robustness(out: Path, rows: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy under FGSM and PGD against epsilon, one line per method (mean over its analyzed runs)."""
    from mixkd.analysis import robustness_curves

    groups = method_groups(rows)
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
    distill = [r for r in analyzed(rows) if r["teacher"] is not None]
    if wanted is not None:
        distill = [r for r in distill if r["model"] == wanted[1] and _teacher_matches(r, wanted[0])] or distill
    panels: dict[tuple[str, str], set] = defaultdict(set)
    keys: dict[tuple[str, str], tuple] = {}
    for r in distill:
        panels[r["teacher"], r["model"]].add(r["cell"])
        keys[r["teacher"], r["model"]] = pair_key(r)
    if not panels:
        return None
    return min(panels, key=lambda p: (-len(panels[p]), keys[p], p[0]))


def plot_tsne_montage(out: Path, rows: list[dict[str, Any]], pair: tuple[str, str], path: Path) -> list[str]:
    """teacher | student alone | each method, for ``pair``; returns the panels' titles."""
    from mixkd.analysis import TEACHER_TSNE_FILE, TSNE_FILE, tsne_montage

    teacher_id, model = pair
    runs = analyzed(rows)
    distill = sorted((r for r in runs if r["teacher"] == teacher_id and r["model"] == model),
                     key=lambda r: (r["cell"].sort_key(), r["seed"] or 0))
    items, titles = [], []
    teacher_row = next((r for r in runs if r["id"] == teacher_id), None)
    if teacher_row is not None and (out / teacher_id / TSNE_FILE).exists():
        items.append(out / teacher_id / TSNE_FILE)
    else:  # an external teacher, or one not analyzed itself: as its students' analyses saw it
        items += [out / r["id"] / TEACHER_TSNE_FILE for r in distill if (out / r["id"] / TEACHER_TSNE_FILE).exists()][:1]
    if items:
        titles.append(f"teacher {teacher_name(distill[0])}")
    alone = sorted((r for r in runs if r["method"] == "alone" and r["model"] == model and r["teacher"] is None),
                   key=lambda r: r["seed"] or 0)
    chosen = alone[:1]
    seen = set()
    for r in distill:
        if r["cell"] not in seen:
            seen.add(r["cell"])
            chosen.append(r)
    for r in chosen:
        if (out / r["id"] / TSNE_FILE).exists():
            items.append(out / r["id"] / TSNE_FILE)
            titles.append(f"{model}: {method_label(r, long=True)}")
    if len(items) < 2:
        return []
    tsne_montage(items, titles, path, columns=min(4, len(items)))
    return titles


VERDICT_COLOURS = {"holds": "tab:green", "does not hold": "tab:red", "inconclusive": "tab:orange"}


def plot_claim_intervals(claims, path: Path) -> bool:
    """The claims' comparisons as a forest plot: each comparison's difference A - B (points) and its 95%
    interval, coloured by verdict, beside the threshold it must clear (0 for a strict comparison, -margin
    for an 'at least as well' one); comparisons that measured no spread are left out. False: nothing to draw."""
    rows = [(claim.number, c) for claim in claims for c in claim.comparisons if c.interval.se is not None]
    if not rows:
        return False
    fig = _figure(9.0, 0.9 + 0.32 * len(rows))
    ax = fig.add_subplot()
    for y, (_, c) in enumerate(reversed(rows)):
        iv, colour = c.interval, VERDICT_COLOURS.get(c.verdict, "tab:gray")
        ax.plot([iv.low, iv.high], [y, y], color=colour, linewidth=2.5, solid_capstyle="butt")
        ax.plot([iv.difference], [y], "o", color=colour, markersize=5)
        threshold = 0.0 if c.margin is None else -c.margin
        ax.plot([threshold, threshold], [y - 0.4, y + 0.4], color="black", linewidth=1)
    ax.axvline(0.0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{n}: {c.context.label}: {c.statement}" for n, c in reversed(rows)], fontsize=7)
    ax.set_xlabel("A − B (points), 95% interval; black tick: the threshold the interval must clear")
    handles = [ax.plot([], [], color=colour, linewidth=2.5, label=verdict)[0]
               for verdict, colour in VERDICT_COLOURS.items()]
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_title("Claims: every comparison", fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    return True
