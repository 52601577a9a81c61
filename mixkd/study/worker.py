"""One study run, executed in the current process: a local worker process or a Ray task.

The run's output goes to ``<run dir>/log.txt``; a failure is written to ``<run dir>/error.txt``
(one line saying what went wrong, then the traceback) and returned, never raised, so that one
failed run cannot stop the others.
"""

from __future__ import annotations

import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

ERROR_NAME = "error.txt"
LOG_NAME = "log.txt"


def execute_run(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Run (or resume, or find finished) the run ``config`` in ``run_dir``.

    Returns ``{"ok": True, "top1": ..., "seconds": ...}`` or ``{"ok": False, "message": ..., "seconds": ...}``.
    """
    from mixkd.config import RunConfig
    from mixkd.engine import Run
    from mixkd.errors import MixkdError

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
        lines = str(e).strip().splitlines() or [""]
        message = lines[0] if isinstance(e, MixkdError) else f"{type(e).__name__}: {lines[0]}"
        out.mkdir(parents=True, exist_ok=True)
        (out / ERROR_NAME).write_text(message + "\n\n" + traceback.format_exc())
        return {"ok": False, "message": message, "seconds": time.perf_counter() - start}
