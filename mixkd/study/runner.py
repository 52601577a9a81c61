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

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mixkd.config import RunConfig, TrackConfig
from mixkd.control import StopControl
from mixkd.errors import MixkdError, StorageError
from mixkd.files import atomic_write_text, make_dir
from mixkd.run_folder import (
    ANALYSIS_ERROR_NAME,
    ANALYSIS_NAME,
    ERROR_NAME,
    RESULT_NAME,
    RunFolder,
    RunStatus,
    writable_dir_problem,
)
from mixkd.step import set_compile_cache
from mixkd.study.executors import Executor
from mixkd.study.folder import (
    STUDY_COPY,
    AnalysisState,
    FolderLock,
    RunState,
    StudyState,
    analysis_status,
    check_folder,
    check_plugins,
    check_run,
)
from mixkd.study.spec import PlannedRun, Study, check_device
from mixkd.study.worker import Job
from mixkd.tracking import study_parent


@dataclass
class StudyOutcome:
    counts: dict[str, int]  # runs per RunState
    failed: dict[str, str] = field(default_factory=dict)  # run id -> error (failed and blocked runs)
    interrupted: bool = False
    analyses: dict[str, int] = field(default_factory=dict)  # analysis state -> runs (runs to analyze only)
    analysis_failed: dict[str, str] = field(default_factory=dict)  # run id -> error of its analysis
    stopped: str | None = None  # "time", "signal" or "interrupt": the study stopped early, resumable


def _outcome(state: StudyState, interrupted: bool = False, stopped: str | None = None) -> StudyOutcome:
    return StudyOutcome(state.counts(), dict(state.error), interrupted, state.analysis_counts() if state.analysis else {},
                        dict(state.analysis_error), stopped)


def _initial_status(run: PlannedRun, out: Path) -> tuple[RunState, str | None]:
    status, problem = check_run(run, out)
    if problem:
        return RunState.FAILED, problem
    return (RunState.DONE if status == "done" else RunState.PENDING), None


def _progress(total: int, done: int, show: bool):
    if not show:
        return None
    return tqdm(total=total, initial=done, unit="run", dynamic_ncols=True, desc="study")


def run_study(study: Study, out: str | Path, executor: Executor, device: str | None = None, progress: bool = True,
              echo=print, control: StopControl | None = None) -> StudyOutcome:
    """Execute every unfinished run of ``study`` in folder ``out`` on ``executor``.

    With ``control`` (:class:`mixkd.control.StopControl`: a deadline, signals), the study stops
    early: no run starts once a stop is due, every live run writes a step-exact checkpoint, and the
    outcome's ``stopped`` says why; running the study again continues each run where it stopped."""
    out = Path(out)
    if device:
        check_device(device)
    problem = writable_dir_problem(out)
    if problem:
        raise MixkdError(problem)
    check_folder(out)  # a folder of another mixkd version: an error before anything in it changes
    check_plugins(study, out)  # a plugin file that is not the one its runs were made with
    _check_teacher_runs(study, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MixkdError(f"cannot create the study folder {out}: {e.strerror or e}; choose another --out") from None
    control = control or StopControl()
    set_compile_cache(out / ".compile-cache")  # compiled runs of every worker share inductor's cache
    with FolderLock(out):
        atomic_write_text(out / STUDY_COPY, study.text)
        state = StudyState(study, out)
        for run in study.runs:
            state.set(run.id, *_initial_status(run, out))
            if run.analysis is not None:  # a failed analysis is retried
                state.set_analysis(run.id, AnalysisState.DONE if analysis_status(out, run.id) == "done"
                                   else AnalysisState.PENDING)
        counts = state.counts()
        todo = sum(s != AnalysisState.DONE for s in state.analysis.values())
        echo(f"study {study.name}: {len(study.runs)} runs, {counts['done']} already finished"
             + (f", {todo} of {len(state.analysis)} analyses to do" if state.analysis else "")
             + f"; {executor.description}; folder {out}")
        for run_id, error in state.error.items():
            echo(f"FAILED  {run_id}: {error}")
        state.save()
        track = _study_tracking(study, out, echo)
        bar = _progress(len(study.runs), counts["done"] + counts["failed"], progress)
        started: dict[str, float] = {}
        try:
            executor.attach(out, state.id)  # workers elsewhere (Ray nodes) check that they see this folder
            storage = _loop(study, out, executor, device, state, bar, started, echo, control, track)
        except KeyboardInterrupt:
            executor.shutdown(terminate=True)
            for run_id in started:
                if state.analysis.get(run_id) == AnalysisState.RUNNING:
                    state.set_analysis(run_id, AnalysisState.PENDING)
                else:
                    state.set(run_id, RunState.PENDING)
            state.save(interrupted=True)
            return _outcome(state, interrupted=True)
        except BaseException:
            executor.shutdown(terminate=True)
            raise
        finally:
            if bar is not None:
                bar.close()
        executor.shutdown()
        state.save(interrupted=control.reason is not None)
        if storage is not None:  # the machine's state: every run keeps its last checkpoint, none failed
            raise StorageError(f"the study stopped, every run resumable ({out}): {storage}")
        return _outcome(state, interrupted=control.reason == "interrupt", stopped=control.reason)


def _check_teacher_runs(study: Study, out: Path) -> None:
    """A student that has begun (a checkpoint, logged epochs) needs its teacher run finished in the
    folder: a folder moved or copied without it would otherwise train a new teacher under the student."""
    lost = [f"{run.id} (teacher {run.teacher_run})" for run in study.runs
            if run.teacher_run and RunFolder(out / run.id).has_begun() and not (out / run.id / RESULT_NAME).exists()
            and not (out / run.teacher_run / RESULT_NAME).exists()]
    if lost:
        more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
        raise MixkdError(f"{out}: student {lost[0]}{more} began training from a teacher run that is not finished "
                         "in this folder (moved or copied without it?); bring the teacher's run directory along, or "
                         "delete the student's to start it again")


def _slots_line(executor: Executor) -> str:
    """Each pack slot's run, epoch and images/s, and the summed images/s."""
    packs = executor.progress()
    slots = [s for p in packs for s in p.get("slots", [])]
    if not slots:
        return ""
    total = sum(p.get("images_per_s", 0.0) for p in packs)
    shown = "; ".join(f"{(s['run'] or '?').rsplit('/', 1)[-1]} e{s['epoch']}/{s['epochs']} "
                      + ("compiling" if s.get("compiling") else f"{s['images_per_s']:.0f}/s") for s in slots[:4])
    more = f"; +{len(slots) - 4} more" if len(slots) > 4 else ""
    return f" | {shown}{more} | {total:.0f} images/s"


def _study_tracking(study: Study, out: Path, echo) -> TrackConfig | None:
    """Where the study's runs set ``track`` (the study file's defaults, ``--set track=mlflow``): the
    study's parent tracked run, opened or created; the ``track`` settings its runs get (children of it)."""
    track = next((r.config.track for r in study.runs if r.config.track.backend != "none"), None)
    return study_parent(out, study.name, track, len(study.runs), warn=echo) if track is not None else None


def _loop(study: Study, out: Path, executor: Executor, device: str | None, state: StudyState, bar,
          started: dict[str, float], echo, control: StopControl, track: TrackConfig | None = None) -> str | None:
    """Submit, wait, record; returns why the storage refused a write (the study stopped), or None.
    ``track``: the tracking settings of the runs that track (children of the study's parent run)."""
    def config(run: PlannedRun) -> RunConfig:
        cfg = run.config_for(out, device)
        return cfg.model_copy(update={"track": track}) if track is not None and cfg.track.backend != "none" else cfg

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
    storage: str | None = None
    while True:
        if control.reason is None:
            control.should_stop(0.0)  # the deadline itself has come
        if control.reason is not None and not told:  # a signal or the deadline: every worker checkpoints
            told = True
            executor.stop(control.reason)
            note(f"stopping ({control.reason}): every running run writes a checkpoint; run the same command "
                 "again to continue")
        for run in study.runs:  # students of a failed teacher cannot run
            dep = run.teacher_run
            if state.status[run.id] == RunState.PENDING and dep and state.status[dep] in (RunState.FAILED,
                                                                                              RunState.BLOCKED):
                state.set(run.id, RunState.BLOCKED, f"its teacher {dep} did not finish")
                note(f"blocked {run.id}: its teacher {dep} did not finish")
                if bar is not None:
                    bar.update(1)
        for run in study.runs:  # teachers first: they come first in the plan
            if control.reason is not None or executor.capacity() <= 0:
                break
            if state.status[run.id] == RunState.PENDING and (not run.teacher_run
                                                             or state.status[run.teacher_run] == RunState.DONE):
                executor.submit(Job(run.id, config(run), str(out / run.id)))
                state.set(run.id, RunState.RUNNING)
                started[run.id] = time.perf_counter()
                changed = True
        for run in study.runs:  # then the analyses of finished runs
            if control.reason is not None or executor.capacity() <= 0:
                break
            if state.status[run.id] == RunState.DONE and state.analysis.get(run.id) == AnalysisState.PENDING:
                executor.submit(Job(run.id, config(run), str(out / run.id), run.analysis))
                state.set_analysis(run.id, AnalysisState.RUNNING)
                started[run.id] = time.perf_counter()
                changed = True
        if changed:
            state.save()
            changed = False
        show()  # also moves the clock and the ETA on
        if not started:
            return storage
        for run_id, outcome in executor.wait(timeout=1.0):
            if outcome.get("rescheduled"):  # its worker was lost (a Ray node gone): it resumes elsewhere
                note(f"moved   {run_id}: {outcome['message']}")
                continue
            if run_id not in started:  # told already (its worker's end was read before its last message)
                continue
            changed = True
            if state.analysis.get(run_id) == AnalysisState.RUNNING:
                if outcome.get("stopped"):
                    state.set_analysis(run_id, AnalysisState.PENDING)
                    started.pop(run_id)
                    continue
                _analyzed(out, state, run_id, outcome, time.perf_counter() - started.pop(run_id), note)
                continue
            state.seconds[run_id] = time.perf_counter() - started.pop(run_id)
            if outcome.get("stopped") and control.reason is None:
                control.request(outcome.get("reason", "time"))  # a worker met the deadline first
            if outcome.get("storage"):  # a write the storage refused: the study stops, the run stays resumable
                has_checkpoint = RunFolder(out / run_id).status() == RunStatus.STOPPED
                state.set(run_id, RunState.STOPPED if has_checkpoint else RunState.PENDING)
                if storage is None:
                    storage = outcome["storage"]
                    control.request("storage")
                note(f"stopped {run_id}: {outcome['storage']}")
                continue
            if outcome.get("killed"):  # its worker was ended by the user's Ctrl-C or a scheduler: not a failure
                has_checkpoint = RunFolder(out / run_id).status() == RunStatus.STOPPED
                state.set(run_id, RunState.STOPPED if has_checkpoint else RunState.PENDING)
                note(f"stopped {run_id}: {outcome['message']}"
                     + (" (its last checkpoint continues it)" if has_checkpoint else ""))
                continue
            if outcome.get("stopped"):
                if outcome.get("not_started"):
                    state.set(run_id, RunState.PENDING)
                else:
                    state.set(run_id, RunState.STOPPED)
                    note(f"stopped {run_id}: {outcome['message']} (checkpoint written)")
                continue
            if outcome["ok"] and not (out / run_id / RESULT_NAME).exists():
                outcome = {"ok": False, "message": f"the run reported success but {out / run_id / RESULT_NAME} is not "
                                                   "visible here: the study folder must be on storage every worker shares"}
            if outcome["ok"]:
                state.set(run_id, RunState.DONE)
                note(f"done    {run_id}: top-1 {outcome['top1']:.2f}% ({state.seconds[run_id]:.0f} s)")
            else:
                state.set(run_id, RunState.FAILED, outcome["message"])
                if not (out / run_id / ERROR_NAME).exists():
                    atomic_write_text(make_dir(out / run_id) / ERROR_NAME, outcome["message"] + "\n")
                note(f"FAILED  {run_id}: {outcome['message']}")
            if bar is not None:
                bar.update(1)


def _analyzed(out: Path, state: StudyState, run_id: str, outcome: dict[str, Any], seconds: float, note) -> None:
    if outcome["ok"] and not (out / run_id / ANALYSIS_NAME).exists():
        outcome = {"ok": False, "message": f"the analysis reported success but {out / run_id / ANALYSIS_NAME} is not "
                                           "visible here: the study folder must be on storage every worker shares"}
    if outcome["ok"]:
        state.set_analysis(run_id, AnalysisState.DONE)
        note(f"analyzed {run_id} ({seconds:.0f} s)")
        return
    state.set_analysis(run_id, AnalysisState.FAILED, outcome["message"])
    if not (out / run_id / ANALYSIS_ERROR_NAME).exists():
        atomic_write_text(make_dir(out / run_id) / ANALYSIS_ERROR_NAME, outcome["message"] + "\n")
    note(f"ANALYSIS FAILED  {run_id}: {outcome['message']} (the run's result stands; running the study again "
         "retries the analysis)")
