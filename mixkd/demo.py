"""``mixkd demo``: the quickstart study (``configs/studies/quickstart.yaml``) on scikit-learn's
digits, in under two minutes on 2 CPU cores (on the GPU when there is one): a plain and a mixup
teacher, students over the study's methods and T = 1 and 4, analyses, then the report (table,
heatmap, curves, analysis tables, t-SNE) and the claims' verdicts. Running it again trains nothing."""

from __future__ import annotations

import sys
from pathlib import Path

from mixkd.errors import MixkdError


def configs_dir() -> Path:
    """The shipped configs: inside the installed package (``mixkd/configs``, from a wheel), else the
    repository's ``configs/`` (a clone, an editable install)."""
    packaged = Path(__file__).resolve().parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "configs"


QUICKSTART = configs_dir() / "studies" / "quickstart.yaml"


def run_demo(out: str | Path = "runs/demo", epochs: int | None = None, device: str = "auto", seed: int = 0,
             workers: int | None = None) -> list[dict]:
    """Run the quickstart study into ``out`` and write its report; returns one row per run
    (as in ``results.csv``). ``epochs`` overrides every run's epochs; ``seed`` every group's seeds;
    ``device`` every run's device (``auto``: the GPU when there is one)."""
    from mixkd.study import collect, load_study, write_report
    from mixkd.study.cli import run_and_report
    from mixkd.study.report import claims_text, paper_table

    if not QUICKSTART.is_file():
        raise MixkdError(f"the quickstart study file is missing ({QUICKSTART}): reinstall mixkd, or run: "
                         "mixkd study run <path to quickstart.yaml>")
    study = load_study(QUICKSTART, overrides=[f"epochs={epochs}"] if epochs else None,
                       seeds=[seed] if seed else None)
    out = Path(out)
    shown = device
    if device == "auto":
        import torch

        shown = "auto: cuda" if torch.cuda.is_available() else "auto: cpu"
    print(f"mixkd demo: the quickstart study ({QUICKSTART.name}): {len(study.runs)} runs on digits "
          f"(8x8 upsampled to 32x32, 10 classes), device {shown}, into {out}/")
    if run_and_report(study, out, workers=workers, device=device, progress=sys.stderr.isatty(), report=False) == 130:
        raise KeyboardInterrupt  # the folder is resumable: run the demo again
    report = write_report(out)
    rows = collect(out)
    print("\n" + paper_table(rows) + "\n")
    print(f"report (table and figures): {report}; every run: {out / 'results.csv'}")
    print("\n" + claims_text(out, details=False))
    return rows
