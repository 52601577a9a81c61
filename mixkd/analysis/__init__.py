"""Analyses of trained models: accuracy and likelihood, calibration, smoothness, fidelity to a
teacher, vicinal behaviour, t-SNE of features and adversarial robustness (``mixkd analyze``).

For a study report::

    from mixkd.analysis import analyze_run, load_analysis, summarize, robustness_curves, tsne_montage

    analyze_run(run_dir, device="cuda")                 # after each run: writes run_dir/analysis.json + PNGs
    summarize([run_a, run_b, run_c])["mean"]["ece"]     # per-method means over seeds
    robustness_curves({"KD": [run_a, run_b], "KD + PMU": [run_c]}, "report/robustness.png")
    tsne_montage([teacher_dir, alone_dir, kd_dir], ["teacher", "student alone", "KD"], "report/tsne.png")
"""

from mixkd.analysis.run import (
    ANALYSIS_FILE,
    PNG_FILES,
    TABLE_COLUMNS,
    AnalysisOptions,
    analyze_models,
    analyze_run,
    load_analysis,
    robustness_curves,
    summarize,
    summary_row,
)
from mixkd.analysis.tsne import TEACHER_TSNE_FILE, TSNE_FILE, load_embedding, tsne_montage

__all__ = [
    "ANALYSIS_FILE",
    "PNG_FILES",
    "TABLE_COLUMNS",
    "TEACHER_TSNE_FILE",
    "TSNE_FILE",
    "AnalysisOptions",
    "analyze_models",
    "analyze_run",
    "load_analysis",
    "load_embedding",
    "robustness_curves",
    "summarize",
    "summary_row",
    "tsne_montage",
]
