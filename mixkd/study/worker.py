"""One study job, executed in the current process (a local worker process or a Ray task): a run,
or the analysis of a finished run (``mixkd analyze``, when the study file asks for it).

The run logs itself to ``<run dir>/log.txt`` (a start line with its settings, one line per epoch,
the result); anything else it prints (warnings) is appended there too, never to the study's
terminal. A failure is written to ``<run dir>/error.txt`` (a run) or ``<run dir>/analysis-error.txt``
(an analysis): one line saying what went wrong, then the traceback. It is returned, never raised,
so that one failure cannot stop the others; a failed analysis leaves its run's result as it was.

A student's ``kd.teacher`` is relative to its own run directory (``../../teachers/<id>``), so a
study folder works from any working directory and after it has been moved.
"""

from __future__ import annotations

import io
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from mixkd.files import atomic_write_text, open_nofollow

ERROR_NAME = "error.txt"
ANALYSIS_ERROR_NAME = "analysis-error.txt"
LOG_NAME = "log.txt"


def _failure(e: Exception, path: Path, start: float) -> dict[str, Any]:
    from mixkd.errors import MixkdError

    lines = str(e).strip().splitlines() or [""]
    message = lines[0] if isinstance(e, MixkdError) else f"{type(e).__name__}: {lines[0]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, message + "\n\n" + traceback.format_exc())
    return {"ok": False, "message": message, "seconds": time.perf_counter() - start}


class _LazyLog(io.TextIOBase):
    """A text stream appending to a run's log file, opened at the first write only (a run that
    cannot start leaves no log behind)."""

    def __init__(self, path: Path):
        self.path, self._file = path, None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open_nofollow(self.path, "a")
        n = self._file.write(text)
        self._file.flush()
        return n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


def execute_run(config: dict[str, Any], run_dir: str, analysis: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume, or find finished) the run ``config`` in ``run_dir`` in this process, as a pack of
    one (:class:`mixkd.study.packworker.PackWorker`, the same path as every study worker); with
    ``analysis`` (:func:`mixkd.analysis.analyze_run`'s subset, batch_size, seed), analyze the finished
    run instead.

    Returns ``{"ok": True, "top1": ..., "seconds": ...}`` or ``{"ok": False, "message": ..., "seconds": ...}``.
    """
    if analysis is not None:
        return execute_analysis(config, run_dir, analysis)
    from mixkd.study.packworker import PackWorker

    worker = PackWorker(1)
    worker.submit((run_dir, config, run_dir, None))
    done: list = []
    with _LazyLog(Path(run_dir) / LOG_NAME) as log, redirect_stdout(log), redirect_stderr(log):
        while not done:
            done = worker.work()
    return done[0][1]


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
        with open_nofollow(out / LOG_NAME, "a") as log, redirect_stdout(log), redirect_stderr(log):
            print(f"analysis ({', '.join(f'{k} {v}' for k, v in options.items())}):", flush=True)
            analyze_run(out, device=config.get("device") or "auto", log=lambda line: print(line, flush=True),
                        **options)
        return {"ok": True, "seconds": time.perf_counter() - start}
    except Exception as e:  # noqa: BLE001 - recorded; the run's own result stays
        return _failure(e, out / ANALYSIS_ERROR_NAME, start)

