"""Running a study: every planned run as a run directory of the engine, teachers before students.

The study folder holds one run directory per run id, ``study.yaml`` (the study file as last run)
and ``study-state.json`` (each run's status and error, rewritten atomically after every change).
Running again skips finished runs (``result.json`` present), resumes interrupted ones from their
checkpoints and retries failed ones. A student whose teacher failed is marked ``blocked``.
Ctrl-C stops the workers; the folder stays resumable.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from mixkd.errors import MixkdError
from mixkd.study.spec import PlannedRun, Study, saved_config_mismatch
from mixkd.study.worker import ERROR_NAME

STATE_NAME = "study-state.json"
LOCK_NAME = ".study.lock"
STUDY_COPY = "study.yaml"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_status(out: Path, run_id: str) -> str:
    """'done', 'failed', 'started' or 'new', from what the run directory holds."""
    d = out / run_id
    if (d / "result.json").exists():
        return "done"
    if (d / ERROR_NAME).exists():
        return "failed"
    return "started" if (d / "config.yaml").exists() else "new"


@dataclass
class StudyOutcome:
    counts: dict[str, int]
    failed: dict[str, str] = field(default_factory=dict)  # run id -> error (failed and blocked runs)
    interrupted: bool = False


class _Lock:
    """One ``mixkd study run`` per study folder at a time."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME

    def __enter__(self) -> _Lock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                    os.kill(pid, 0)
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    self.path.unlink(missing_ok=True)  # left by a process that is gone
                    continue
                except PermissionError:
                    pass
                raise MixkdError(f"another 'mixkd study run' (pid {pid}) is using {self.path.parent}; "
                                 f"wait for it, or delete {self.path} if it is gone") from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise MixkdError(f"cannot lock {self.path}")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


class _State:
    def __init__(self, study: Study, out: Path):
        self.study, self.out = study, out
        self.status: dict[str, str] = {}
        self.error: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def set(self, run_id: str, status: str, error: str | None = None) -> None:
        self.status[run_id] = status
        if error:
            self.error[run_id] = error
        else:
            self.error.pop(run_id, None)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("done", "running", "pending", "failed", "blocked"), 0)
        for s in self.status.values():
            counts[s] += 1
        return counts

    def save(self, interrupted: bool = False) -> None:
        runs = {}
        for run in self.study.runs:
            entry: dict[str, Any] = {"status": self.status[run.id]}
            if run.id in self.error:
                entry["error"] = self.error[run.id]
            if run.id in self.seconds:
                entry["seconds"] = round(self.seconds[run.id], 1)
            runs[run.id] = entry
        state = {"study": self.study.name, "source": str(self.study.source),
                 "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "interrupted": interrupted, "counts": self.counts(), "runs": runs}
        atomic_write(self.out / STATE_NAME, json.dumps(state, indent=1) + "\n")


def check_run(run: PlannedRun, out: Path) -> tuple[str, str | None]:
    """(status, problem): ``run_status``, or 'mismatch' where the run directory holds a run made
    with other settings than the study file now says (a recipe edited since, another file)."""
    saved = out / run.id / "config.yaml"
    if saved.exists():
        mismatch = saved_config_mismatch(run, yaml.safe_load(saved.read_text()) or {}, out)
        if mismatch:
            return "mismatch", (f"{out / run.id} holds a run made with other settings ({mismatch}); "
                                "delete that folder to run it again, or use another --out")
    return run_status(out, run.id), None


def _initial_status(run: PlannedRun, out: Path) -> tuple[str, str | None]:
    status, problem = check_run(run, out)
    if status == "mismatch":
        return "failed", problem
    return ("done" if status == "done" else "pending"), None


def _progress(total: int, done: int, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="run", dynamic_ncols=True, desc="study")


def run_study(study: Study, out: str | Path, executor, device: str | None = None, progress: bool = True,
              echo=print) -> StudyOutcome:
    """Execute every unfinished run of ``study`` in folder ``out`` on ``executor``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        atomic_write(out / STUDY_COPY, study.text)
        state = _State(study, out)
        for run in study.runs:
            state.set(run.id, *_initial_status(run, out))
        counts = state.counts()
        echo(f"study {study.name}: {len(study.runs)} runs, {counts['done']} already finished; "
             f"{executor.description}; folder {out}")
        for run_id, error in state.error.items():
            echo(f"FAILED  {run_id}: {error}")
        state.save()
        bar = _progress(len(study.runs), counts["done"] + counts["failed"], progress)
        started: dict[str, float] = {}
        try:
            _loop(study, out, executor, device, state, bar, started, echo)
        except KeyboardInterrupt:
            executor.shutdown(terminate=True)
            for run_id in started:
                state.set(run_id, "pending")
            state.save(interrupted=True)
            return StudyOutcome(state.counts(), dict(state.error), interrupted=True)
        except BaseException:
            executor.shutdown(terminate=True)
            raise
        finally:
            if bar is not None:
                bar.close()
        executor.shutdown()
        state.save()
        return StudyOutcome(state.counts(), dict(state.error))


def _loop(study: Study, out: Path, executor, device, state: _State, bar, started: dict[str, float], echo) -> None:
    def note(text: str) -> None:
        (bar.write if bar is not None else echo)(text)

    def show() -> None:
        if bar is not None:
            c = state.counts()
            bar.set_postfix_str(f"running {c['running']}, failed {c['failed']}, blocked {c['blocked']}", refresh=True)

    changed = True
    while True:
        for run in study.runs:  # students of a failed teacher cannot run
            dep = run.teacher_run
            if state.status[run.id] == "pending" and dep and state.status[dep] in ("failed", "blocked"):
                state.set(run.id, "blocked", f"its teacher {dep} did not finish")
                note(f"blocked {run.id}: its teacher {dep} did not finish")
                if bar is not None:
                    bar.update(1)
        for run in study.runs:  # teachers first: they come first in the plan
            if executor.capacity() <= 0:
                break
            if state.status[run.id] == "pending" and (not run.teacher_run or state.status[run.teacher_run] == "done"):
                executor.submit(run.id, run.config_for(out, device), str(out / run.id))
                state.set(run.id, "running")
                started[run.id] = time.perf_counter()
                changed = True
        if changed:
            state.save()
            changed = False
        show()  # also moves the clock and the ETA on
        if not started:
            return
        for run_id, outcome in executor.wait(timeout=1.0):
            changed = True
            state.seconds[run_id] = time.perf_counter() - started.pop(run_id)
            if outcome["ok"] and not (out / run_id / "result.json").exists():
                outcome = {"ok": False, "message": f"the run reported success but {out / run_id / 'result.json'} is not "
                                                   "visible here: the study folder must be on storage every worker shares"}
            if outcome["ok"]:
                state.set(run_id, "done")
                note(f"done    {run_id}: top-1 {outcome['top1']:.2f}% ({state.seconds[run_id]:.0f} s)")
            else:
                state.set(run_id, "failed", outcome["message"])
                if not (out / run_id / ERROR_NAME).exists():
                    (out / run_id).mkdir(parents=True, exist_ok=True)
                    (out / run_id / ERROR_NAME).write_text(outcome["message"] + "\n")
                note(f"FAILED  {run_id}: {outcome['message']}")
            if bar is not None:
                bar.update(1)
