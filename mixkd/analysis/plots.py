"""PNG figures of an analysis; drawn from the values saved in ``analysis.json`` / ``tsne.npz``.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mixkd.files import atomic_write

DPI = 120


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, bbox_inches="tight"))
    return path


def class_colour(c: int):
    """Class ``c``'s colour, the same in every picture."""
    return colormaps["tab10"](c % 10)


def reliability_diagram(calibrations: Mapping[str, dict], out: str | Path) -> Path:
    """One panel per model: accuracy per confidence bin against the diagonal, with the ECE.
    ``calibrations``: name -> {"ece", "calibration": {"bin_edges", "bin_accuracy", "bin_confidence", "bin_count"}}."""
    fig = Figure(figsize=(4 * len(calibrations), 4))
    for k, (name, m) in enumerate(calibrations.items()):
        cal = m["calibration"]
        ax = fig.add_subplot(1, len(calibrations), k + 1)
        edges = np.asarray(cal["bin_edges"])
        width = np.diff(edges)
        acc = np.array([np.nan if a is None else a for a in cal["bin_accuracy"]])
        conf = np.array([np.nan if c is None else c for c in cal["bin_confidence"]])
        ax.bar(edges[:-1], np.nan_to_num(acc), width=width, align="edge", edgecolor="black", color="tab:blue",
               label="accuracy")
        gap_lo, gap_hi = np.minimum(acc, conf), np.maximum(acc, conf)
        ax.bar(edges[:-1], np.nan_to_num(gap_hi - gap_lo), bottom=np.nan_to_num(gap_lo), width=width, align="edge",
               color="none", edgecolor="tab:red", hatch="//", label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{name}: ECE {100 * m['ece']:.2f}%")
        ax.legend(loc="upper left", fontsize=8)
    return _save(fig, out)


def logit_std_histogram(distributions: Mapping[str, dict], out: str | Path) -> Path:
    """Overlaid (density) histograms of the per-sample logit standard deviation, one per model.
    ``distributions``: name -> {"hist_edges", "hist_counts", "mean"}."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for k, (name, d) in enumerate(distributions.items()):
        edges, counts = np.asarray(d["hist_edges"]), np.asarray(d["hist_counts"], dtype=float)
        density = counts / max(counts.sum(), 1) / np.diff(edges)
        colour = colormaps["tab10"](k)
        ax.stairs(density, edges, fill=True, alpha=0.35, color=colour)
        ax.stairs(density, edges, color=colour, label=f"{name} (mean {d['mean']:.2f})")
    ax.set(xlabel="per-sample std of the logits over classes", ylabel="density",
           title="logit standard deviation (what standardized KD divides by)")
    ax.legend(fontsize=8)
    return _save(fig, out)


def _scatter(ax, panel: Mapping, title: str) -> None:
    emb, labels = np.asarray(panel["embedding"]), np.asarray(panel["labels"])
    for c in np.unique(labels):
        pts = emb[labels == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=6, color=class_colour(int(c)), label=panel["class_names"][int(c)],
                   linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def tsne_scatter(panel: Mapping, out: str | Path, title: str | None = None) -> Path:
    """One t-SNE picture; ``panel``: {"embedding", "labels", "class_names", "title"}."""
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot(1, 1, 1)
    _scatter(ax, panel, title or panel["title"])
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2, frameon=False)
    return _save(fig, out)


def montage(panels: Sequence[Mapping], titles: Sequence[str], out: str | Path, columns: int | None = None) -> Path:
    """t-SNE pictures side by side (``columns`` per row, default all in one row), one legend."""
    n = len(panels)
    cols = min(columns or n, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.6 * cols + 1.6, 3.6 * rows))
    for k, (panel, title) in enumerate(zip(panels, titles)):
        _scatter(fig.add_subplot(rows, cols, k + 1), panel, title)
    handles, names = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=8, markerscale=2, frameon=False)
    fig.subplots_adjust(right=1 - 1.4 / (3.6 * cols + 1.6))
    return _save(fig, out)


def robustness_curves(curves: Mapping[str, Mapping], out: str | Path) -> Path:
    """Accuracy under attack against epsilon, one panel per attack (FGSM, PGD), one line per model.
    ``curves``: name -> {"eps_255": [0, 1, 2, 4, 8], "fgsm": [...], "pgd": [...]} (accuracies in %)."""
    fig = Figure(figsize=(10, 4))
    for k, (attack, text) in enumerate((("fgsm", "FGSM"), ("pgd", "PGD-10, step eps/4, random start"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for m, (name, c) in enumerate(curves.items()):
            ax.plot(c["eps_255"], c[attack], marker="o", color=colormaps["tab10"](m % 10), label=name)
        ax.set(xlabel="epsilon (x 1/255, L-inf, pixel space)", ylabel="accuracy under attack (%)", title=text,
               ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out)
