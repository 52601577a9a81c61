"""One study job and what runs it in the current process (a local worker process, a Ray actor, or
the study's own process): the job itself, the analysis of a finished run (``mixkd analyze``, when the
study file asks for it), and the record of a failure.

A run logs itself to ``<run dir>/log.txt`` (a start line with its settings, one line per epoch,
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
from typing import Any, NamedTuple

from mixkd.config import RunConfig
from mixkd.files import atomic_write_text, make_dir, open_nofollow
from mixkd.pack import failure_message
from mixkd.run_folder import ANALYSIS_ERROR_NAME, ANALYSIS_NAME, ERROR_NAME, LOG_NAME

Outcome = dict[str, Any]  # {"ok": True, "top1": ..., "seconds": ...} or {"ok": False, "message": ..., ...}


def not_started(message: str = "not started before the stop") -> Outcome:
    """The outcome of a job a stop came before (or during whose move it came): the study keeps it
    pending, untouched, for its next run."""
    return {"ok": False, "stopped": True, "not_started": True, "seconds": None, "message": message}


class Job(NamedTuple):
    """A run to train (or resume, or find finished) in ``run_dir``; with ``analysis`` (analyze_run's
    subset, batch_size, seed), the analysis of that finished run instead."""

    run_id: str
    config: RunConfig
    run_dir: str
    analysis: dict[str, Any] | None = None


def record_failure(run_dir: Path, message: str, error: BaseException | None, name: str = ERROR_NAME) -> None:
    """``<run dir>/error.txt`` (or ``name``): the one-line message, then the traceback."""
    make_dir(run_dir)
    trace = "".join(traceback.format_exception(error)) if error is not None else ""
    atomic_write_text(run_dir / name, message + "\n\n" + trace)


class LazyLog(io.TextIOBase):
    """A text stream appending to a run's log file, opened at the first write only (a run that
    cannot start leaves no log behind)."""

    def __init__(self, path: Path):
        self.path, self._file = path, None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self._file is None:
            make_dir(self.path.parent)
            self._file = open_nofollow(self.path, "a")
        n = self._file.write(text)
        self._file.flush()
        return n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


def execute_analysis(config: RunConfig, run_dir: str, options: dict[str, Any]) -> Outcome:
    """``mixkd analyze`` the finished run in ``run_dir`` (on ``config``'s device) unless it has its
    ``analysis.json`` already. Returns ``{"ok": True, "seconds": ...}`` or ``{"ok": False, "message": ...}``."""
    # mixkd.analysis draws its figures with matplotlib (heavy): loaded by the workers that analyze only
    from mixkd.analysis import analyze_run

    out = make_dir(run_dir)  # a study's run folder: never a link
    (out / ANALYSIS_ERROR_NAME).unlink(missing_ok=True)
    start = time.perf_counter()
    if (out / ANALYSIS_NAME).exists():
        return {"ok": True, "seconds": 0.0, "skipped": True}
    try:
        with open_nofollow(out / LOG_NAME, "a") as log, redirect_stdout(log), redirect_stderr(log):
            print(f"analysis ({', '.join(f'{k} {v}' for k, v in options.items())}):", flush=True)
            analyze_run(out, device=config.device, log=lambda line: print(line, flush=True), **options)
        return {"ok": True, "seconds": time.perf_counter() - start}
    except Exception as e:  # noqa: BLE001 - recorded; the run's own result stays
        message = failure_message(e)
        record_failure(out, message, e, ANALYSIS_ERROR_NAME)
        return {"ok": False, "message": message, "seconds": time.perf_counter() - start}
