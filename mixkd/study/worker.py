"""One study job, executed in the current process (a local worker process or a Ray task): a run,
or the analysis of a finished run (``mixkd analyze``, when the study file asks for it).

The output goes to ``<run dir>/log.txt``; a failure is written to ``<run dir>/error.txt`` (a run)
or ``<run dir>/analysis-error.txt`` (an analysis): one line saying what went wrong, then the
traceback. It is returned, never raised, so that one failure cannot stop the others; a failed
analysis leaves its run's result as it was.
"""

from __future__ import annotations

import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

ERROR_NAME = "error.txt"
ANALYSIS_ERROR_NAME = "analysis-error.txt"
LOG_NAME = "log.txt"


def _failure(e: Exception, path: Path, start: float) -> dict[str, Any]:
    from mixkd.errors import MixkdError

    lines = str(e).strip().splitlines() or [""]
    message = lines[0] if isinstance(e, MixkdError) else f"{type(e).__name__}: {lines[0]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(message + "\n\n" + traceback.format_exc())
    return {"ok": False, "message": message, "seconds": time.perf_counter() - start}


def execute_run(config: dict[str, Any], run_dir: str, analysis: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume, or find finished) the run ``config`` in ``run_dir``; with ``analysis``
    (:func:`mixkd.analysis.analyze_run`'s subset, batch_size, seed), analyze the finished run instead.

    Returns ``{"ok": True, "top1": ..., "seconds": ...}`` or ``{"ok": False, "message": ..., "seconds": ...}``.
    """
    if analysis is not None:
        return execute_analysis(config, run_dir, analysis)
    from mixkd.config import RunConfig
    from mixkd.engine import Run

    out = Path(run_dir)
    (out / ERROR_NAME).unlink(missing_ok=True)
    if not (out / "config.yaml").exists():
        (out / LOG_NAME).unlink(missing_ok=True)  # the engine only resumes into an empty or complete run dir
    start = time.perf_counter()
    try:
        run = Run(RunConfig.model_validate(config), resume=True)  # creates the run dir and its config.yaml
        with open(out / LOG_NAME, "a") as log, redirect_stdout(log), redirect_stderr(log):
            result = run.execute()
        return {"ok": True, "top1": result["top1"], "seconds": time.perf_counter() - start}
    except Exception as e:  # noqa: BLE001 - every failure is recorded, none stops the study
        return _failure(e, out / ERROR_NAME, start)


def execute_analysis(config: dict[str, Any], run_dir: str, options: dict[str, Any]) -> dict[str, Any]:
    """``mixkd analyze`` the finished run in ``run_dir`` (on ``config``'s device) unless it has its
    ``analysis.json`` already. Returns ``{"ok": True, "seconds": ...}`` or ``{"ok": False, "message": ...}``."""
    from mixkd.analysis import ANALYSIS_FILE, analyze_run

    out = Path(run_dir)
    (out / ANALYSIS_ERROR_NAME).unlink(missing_ok=True)
    start = time.perf_counter()
    if (out / ANALYSIS_FILE).exists():
        return {"ok": True, "seconds": 0.0, "skipped": True}
    try:
        with open(out / LOG_NAME, "a") as log, redirect_stdout(log), redirect_stderr(log):
            print(f"analysis ({', '.join(f'{k} {v}' for k, v in options.items())}):", flush=True)
            analyze_run(out, device=config.get("device") or "auto", log=lambda line: print(line, flush=True),
                        **options)
        return {"ok": True, "seconds": time.perf_counter() - start}
    except Exception as e:  # noqa: BLE001 - recorded; the run's own result stays
        return _failure(e, out / ANALYSIS_ERROR_NAME, start)
