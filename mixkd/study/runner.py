"""Running a study: every planned run as a run directory of the engine, teachers before students.

The study folder holds one run directory per run id, ``study.yaml`` (the study file as last run)
and ``study-state.json`` (each run's status and error, rewritten atomically after every change).
Running again skips finished runs (``result.json`` present), resumes interrupted ones from their
checkpoints and retries failed ones. A student whose teacher failed is marked ``blocked``.
Ctrl-C stops the workers; the folder stays resumable.

Where the study file asks for analyses, each finished run is then analyzed (``analysis.json`` in
its directory) as a job of its own, after the runs that are ready to train. An analysis that fails
(``analysis-error.txt``) leaves its run done; running the study again retries it, and skips runs
analyzed already.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from mixkd import __version__
from mixkd.errors import MixkdError
from mixkd.files import atomic_write_text, flock_holders, open_nofollow
from mixkd.study.executors import WORKERS_LOCK
from mixkd.study.spec import FOLDER_FORMAT, PlannedRun, Study, saved_config_mismatch
from mixkd.study.worker import ANALYSIS_ERROR_NAME, ERROR_NAME

STATE_NAME = "study-state.json"
LOCK_NAME = ".study.lock"
STUDY_COPY = "study.yaml"


def run_status(out: Path, run_id: str) -> str:
    """'done', 'failed', 'started' or 'new', from what the run directory holds."""
    d = out / run_id
    if (d / "result.json").exists():
        return "done"
    if (d / ERROR_NAME).exists():
        return "failed"
    return "started" if (d / "config.yaml").exists() else "new"


def analysis_status(out: Path, run_id: str) -> str:
    """'done', 'failed' or 'new': the analysis of a run, from what its directory holds."""
    from mixkd.analysis import ANALYSIS_FILE

    d = out / run_id
    if (d / ANALYSIS_FILE).exists():
        return "done"
    return "failed" if (d / ANALYSIS_ERROR_NAME).exists() else "new"


@dataclass
class StudyOutcome:
    counts: dict[str, int]
    failed: dict[str, str] = field(default_factory=dict)  # run id -> error (failed and blocked runs)
    interrupted: bool = False
    analyses: dict[str, int] = field(default_factory=dict)  # analysis status -> runs (runs to analyze only)
    analysis_failed: dict[str, str] = field(default_factory=dict)  # run id -> error of its analysis
    stopped: str | None = None  # "time", "signal" or "interrupt": the study stopped early, resumable


class _Lock:
    """One ``mixkd study run`` per study folder at a time: an exclusive ``flock`` on ``.study.lock``,
    which the kernel releases when its holder dies (so a lock is honoured only while its holder
    lives), and no live worker of an earlier run (they hold ``.study.workers.lock`` shared)."""

    def __init__(self, out: Path, wait_for_workers: float = 30.0):
        self.path = out / LOCK_NAME
        self.workers = out / WORKERS_LOCK
        self.wait = wait_for_workers
        self._file = None

    def __enter__(self) -> _Lock:
        while True:
            f = open_nofollow(self.path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "?"
                f.close()
                raise MixkdError(f"another 'mixkd study run' (pid {holder}) is using {self.path.parent}; wait for it "
                                 "to finish or stop it (it checkpoints on SIGTERM)") from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino:
                break
            f.close()  # the file was replaced while we waited: lock the new one
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        self._await_old_workers()
        return self

    def _await_old_workers(self) -> None:
        """Workers of an earlier run whose main process died stop (and checkpoint) on their own; wait
        for them rather than train the same runs beside them."""
        with open_nofollow(self.workers, "a") as w:
            deadline = time.monotonic() + self.wait
            while True:
                try:
                    fcntl.flock(w, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(w, fcntl.LOCK_UN)
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        pids = " ".join(str(p) for p in flock_holders(self.workers))
                        self.__exit__()
                        raise MixkdError(f"worker processes of an earlier 'mixkd study run' still work in "
                                         f"{self.path.parent}" + (f" (PIDs {pids})" if pids else "") + "; wait for "
                                         "them to stop (they checkpoint and leave), or end them"
                                         + (f": kill {pids}" if pids else "")) from None
                    time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None


class _State:
    def __init__(self, study: Study, out: Path):
        self.study, self.out = study, out
        self.status: dict[str, str] = {}
        self.error: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.analysis: dict[str, str] = {}  # runs to analyze: pending, running, done or failed
        self.analysis_error: dict[str, str] = {}

    def set_analysis(self, run_id: str, status: str, error: str | None = None) -> None:
        self.analysis[run_id] = status
        if error:
            self.analysis_error[run_id] = error
        else:
            self.analysis_error.pop(run_id, None)

    def analysis_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("done", "running", "pending", "failed"), 0)
        for s in self.analysis.values():
            counts[s] += 1
        return counts

    def outcome(self, interrupted: bool = False, stopped: str | None = None) -> StudyOutcome:
        return StudyOutcome(self.counts(), dict(self.error), interrupted, self.analysis_counts() if self.analysis else {},
                            dict(self.analysis_error), stopped)

    def set(self, run_id: str, status: str, error: str | None = None) -> None:
        self.status[run_id] = status
        if error:
            self.error[run_id] = error
        else:
            self.error.pop(run_id, None)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("done", "running", "pending", "stopped", "failed", "blocked"), 0)
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
            if run.id in self.analysis:
                entry["analysis"] = self.analysis[run.id]
            if run.id in self.analysis_error:
                entry["analysis_error"] = self.analysis_error[run.id]
            runs[run.id] = entry
        state = {"format": FOLDER_FORMAT, "mixkd_version": __version__, "overrides": self.study.overrides,
                 "study": self.study.name, "source": str(self.study.source),
                 "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "interrupted": interrupted, "counts": self.counts(),
                 **({"analyses": self.analysis_counts()} if self.analysis else {}), "runs": runs}
        atomic_write_text(self.out / STATE_NAME, json.dumps(state, indent=1) + "\n")


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
              echo=print, control=None) -> StudyOutcome:
    """Execute every unfinished run of ``study`` in folder ``out`` on ``executor``.

    With ``control`` (:class:`mixkd.control.StopControl`: a deadline, signals), the study stops
    early: no run starts once a stop is due, every live run writes a step-exact checkpoint, and the
    outcome's ``stopped`` says why; running the study again continues each run where it stopped."""
    from mixkd.control import StopControl
    from mixkd.engine import writable_dir_problem
    from mixkd.step import set_compile_cache
    from mixkd.study.status import check_folder

    out = Path(out)
    problem = writable_dir_problem(out)
    if problem:
        raise MixkdError(problem)
    check_folder(out)  # a folder of another mixkd version: an error before anything in it changes
    _check_teacher_runs(study, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MixkdError(f"cannot create the study folder {out}: {e.strerror or e}; choose another --out") from None
    control = control or StopControl()
    set_compile_cache(out / ".compile-cache")  # compiled runs of every worker share inductor's cache
    with _Lock(out):
        atomic_write_text(out / STUDY_COPY, study.text)
        state = _State(study, out)
        for run in study.runs:
            state.set(run.id, *_initial_status(run, out))
            if run.analysis is not None:  # a failed analysis is retried
                state.set_analysis(run.id, "done" if analysis_status(out, run.id) == "done" else "pending")
        counts = state.counts()
        todo = sum(s != "done" for s in state.analysis.values())
        echo(f"study {study.name}: {len(study.runs)} runs, {counts['done']} already finished"
             + (f", {todo} of {len(state.analysis)} analyses to do" if state.analysis else "")
             + f"; {executor.description}; folder {out}")
        for run_id, error in state.error.items():
            echo(f"FAILED  {run_id}: {error}")
        state.save()
        bar = _progress(len(study.runs), counts["done"] + counts["failed"], progress)
        started: dict[str, float] = {}
        try:
            _loop(study, out, executor, device, state, bar, started, echo, control)
        except KeyboardInterrupt:
            executor.shutdown(terminate=True)
            for run_id in started:
                if state.analysis.get(run_id) == "running":
                    state.set_analysis(run_id, "pending")
                else:
                    state.set(run_id, "pending")
            state.save(interrupted=True)
            return state.outcome(interrupted=True)
        except BaseException:
            executor.shutdown(terminate=True)
            raise
        finally:
            if bar is not None:
                bar.close()
        executor.shutdown()
        state.save(interrupted=control.reason is not None)
        return state.outcome(interrupted=control.reason == "interrupt", stopped=control.reason)


def _check_teacher_runs(study: Study, out: Path) -> None:
    """A student that has begun (a checkpoint, logged epochs) needs its teacher run finished in the
    folder: a folder moved or copied without it would otherwise train a new teacher under the student."""
    from mixkd.engine import RESULT_NAME, is_run_started

    lost = [f"{run.id} (teacher {run.teacher_run})" for run in study.runs
            if run.teacher_run and is_run_started(out / run.id) and not (out / run.id / RESULT_NAME).exists()
            and not (out / run.teacher_run / RESULT_NAME).exists()]
    if lost:
        more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
        raise MixkdError(f"{out}: student {lost[0]}{more} began training from a teacher run that is not finished "
                         "in this folder (moved or copied without it?); bring the teacher's run directory along, or "
                         "delete the student's to start it again")


def _slots_line(executor) -> str:
    """Each pack slot's run, epoch and images/s, and the summed images/s."""
    packs = getattr(executor, "progress", lambda: [])()
    slots = [s for p in packs for s in p.get("slots", [])]
    if not slots:
        return ""
    total = sum(p.get("images_per_s", 0.0) for p in packs)
    shown = "; ".join(f"{(s['run'] or '?').rsplit('/', 1)[-1]} e{s['epoch']}/{s['epochs']} "
                      + ("compiling" if s.get("compiling") else f"{s['images_per_s']:.0f}/s") for s in slots[:4])
    more = f"; +{len(slots) - 4} more" if len(slots) > 4 else ""
    return f" | {shown}{more} | {total:.0f} images/s"


def _loop(study: Study, out: Path, executor, device, state: _State, bar, started: dict[str, float], echo,
          control) -> None:
    def note(text: str) -> None:
        (bar.write if bar is not None else echo)(text)

    def show() -> None:
        if bar is not None:
            c = state.counts()
            a = state.analysis_counts()
            analyses = f", analyzed {a['done']}/{len(state.analysis)}" if state.analysis else ""
            bar.set_postfix_str(f"running {c['running']}, failed {c['failed']}, blocked {c['blocked']}{analyses}"
                                + _slots_line(executor), refresh=True)

    changed = True
    told = False
    while True:
        if control.reason is None:
            control.should_stop(0.0)  # the deadline itself has come
        if control.reason is not None and not told:  # a signal or the deadline: every worker checkpoints
            told = True
            stop = getattr(executor, "stop", None)
            if stop is not None:
                stop(control.reason)
            note(f"stopping ({control.reason}): every running run writes a checkpoint; run the same command "
                 "again to continue")
        for run in study.runs:  # students of a failed teacher cannot run
            dep = run.teacher_run
            if state.status[run.id] == "pending" and dep and state.status[dep] in ("failed", "blocked"):
                state.set(run.id, "blocked", f"its teacher {dep} did not finish")
                note(f"blocked {run.id}: its teacher {dep} did not finish")
                if bar is not None:
                    bar.update(1)
        for run in study.runs:  # teachers first: they come first in the plan
            if control.reason is not None or executor.capacity() <= 0:
                break
            if state.status[run.id] == "pending" and (not run.teacher_run or state.status[run.teacher_run] == "done"):
                executor.submit(run.id, run.config_for(out, device), str(out / run.id))
                state.set(run.id, "running")
                started[run.id] = time.perf_counter()
                changed = True
        for run in study.runs:  # then the analyses of finished runs
            if control.reason is not None or executor.capacity() <= 0:
                break
            if state.status[run.id] == "done" and state.analysis.get(run.id) == "pending":
                executor.submit(run.id, run.config_for(out, device), str(out / run.id), analysis=run.analysis)
                state.set_analysis(run.id, "running")
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
            if state.analysis.get(run_id) == "running":
                if outcome.get("stopped"):
                    state.set_analysis(run_id, "pending")
                    started.pop(run_id)
                    continue
                _analyzed(out, state, run_id, outcome, time.perf_counter() - started.pop(run_id), note)
                continue
            state.seconds[run_id] = time.perf_counter() - started.pop(run_id)
            if outcome.get("stopped") and control.reason is None:
                control.request(outcome.get("reason", "time"))  # a worker met the deadline first
            if outcome.get("stopped"):
                if outcome.get("not_started"):
                    state.set(run_id, "pending")
                else:
                    state.set(run_id, "stopped")
                    note(f"stopped {run_id}: {outcome['message']} (checkpoint written)")
                continue
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
                    atomic_write_text(out / run_id / ERROR_NAME, outcome["message"] + "\n")
                note(f"FAILED  {run_id}: {outcome['message']}")
            if bar is not None:
                bar.update(1)


def _analyzed(out: Path, state: _State, run_id: str, outcome: dict[str, Any], seconds: float, note) -> None:
    from mixkd.analysis import ANALYSIS_FILE

    if outcome["ok"] and not (out / run_id / ANALYSIS_FILE).exists():
        outcome = {"ok": False, "message": f"the analysis reported success but {out / run_id / ANALYSIS_FILE} is not "
                                           "visible here: the study folder must be on storage every worker shares"}
    if outcome["ok"]:
        state.set_analysis(run_id, "done")
        note(f"analyzed {run_id} ({seconds:.0f} s)")
        return
    state.set_analysis(run_id, "failed", outcome["message"])
    if not (out / run_id / ANALYSIS_ERROR_NAME).exists():
        atomic_write_text(out / run_id / ANALYSIS_ERROR_NAME, outcome["message"] + "\n")
    note(f"ANALYSIS FAILED  {run_id}: {outcome['message']} (the run's result stands; running the study again "
         "retries the analysis)")
