"""The study folder: its files, its lock, its state file, and the one vocabulary of a run's state.

A study folder ``DIR`` holds one run directory per run id, ``study.yaml`` (the study file as last
run), ``study-state.json`` (each run's state and error, rewritten atomically after every change),
``.study.lock`` (held by the ``mixkd study run`` using the folder) and ``.study.workers.lock``
(held shared by its worker processes). The state file carries the study's ``id`` (made at its first
run, kept by every later one): a worker on another machine checks, with :func:`folder_problem`, that
the folder it sees at the same path is this study's (a shared filesystem is the contract). The planner, ``mixkd study status`` and the runner all read
the folder through this module; only the runner writes the state file and takes the lock.

A run's state in a study is a :class:`RunState`. What a run directory itself holds (new, started,
failed, done) is the run folder's own status; :func:`check_run` adds the study's one judgement on
it: a run directory made with other settings than the study file now says (a mismatch).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
import uuid
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

from mixkd import __version__
from mixkd.config import load_yaml
from mixkd.errors import MixkdError
from mixkd.files import atomic_write_text, flock_holders, hold_lock, locks_unsupported, open_nofollow, read_text
from mixkd.run_folder import RunFolder, RunStatus
from mixkd.study.spec import PlannedRun, Study, load_study, saved_config_mismatch

STATE_NAME = "study-state.json"
LOCK_NAME = ".study.lock"
WORKERS_LOCK = ".study.workers.lock"
STUDY_COPY = "study.yaml"
# What a study writes into its folder (study-state.json's "format"); another value is another layout.
FOLDER_FORMAT = "mixkd-study-1"
# What to do about a damaged state file.
STATE_HINT = ("delete it and run the same 'mixkd study run' command again (--set values included): it writes the "
              "file anew from the run folders")


class RunState(StrEnum):
    """Where a run of a study stands. The state file, the runner's counts and ``mixkd study status``
    all use these words (``study-state.json`` stores the values)."""

    PENDING = "pending"  # to run (waiting for a free slot)
    WAITING = "waiting"  # to run once its teacher is done (status only: the runner keeps it pending)
    RUNNING = "running"
    STOPPED = "stopped"  # a step-exact checkpoint written on a stop (time, signal); resumes there
    DONE = "done"
    FAILED = "failed"
    BLOCKED = "blocked"  # its teacher failed


class AnalysisState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


def run_status(out: Path, run_id: str) -> RunStatus:
    """The run folder's :class:`~mixkd.run_folder.RunStatus` as a study counts it: ``done`` (analysed
    or not), ``failed``, ``started`` (begun, with or without a checkpoint) or ``new``."""
    status = RunFolder(out / run_id).status()
    return {RunStatus.ANALYSED: RunStatus.DONE, RunStatus.STOPPED: RunStatus.STARTED}.get(status, status)


def analysis_status(out: Path, run_id: str) -> RunStatus:
    """``done``, ``failed`` or ``new``: the analysis of a run, from what its run folder holds."""
    return RunFolder(out / run_id).analysis_status()


def check_run(run: PlannedRun, out: Path) -> tuple[RunStatus, str | None]:
    """(run directory status, problem): :func:`run_status`, and where the run directory holds a run
    made with other settings than the study file now says (a recipe edited since, another file), why
    (a mismatch: the runner reports it as failed)."""
    folder = RunFolder(out / run.id)
    if folder.config.exists():
        saved = load_yaml(read_text(folder.config, f"run config {folder.config}"), f"run config {folder.config}") or {}
        mismatch = saved_config_mismatch(run, saved, out)
        if mismatch:
            return run_status(out, run.id), (f"{folder.path} holds a run made with other settings ({mismatch}); "
                                             "delete that folder to run it again, or use another --out")
    return run_status(out, run.id), None


# ---- the state file -------------------------------------------------------------------------

def check_folder(out: str | Path) -> dict[str, Any] | None:
    """The study folder's ``study-state.json`` (None where there is none yet). Raises MixkdError
    where it is unreadable or in a format this mixkd does not read (a folder of another version)."""
    path = Path(out) / STATE_NAME
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MixkdError(f"cannot read {path} ({e}); is {out} a study folder written by mixkd?") from None
    if not isinstance(state, dict):
        raise MixkdError(f"{path} is not a mixkd study state; is {out} a study folder written by mixkd?")
    problem = state_problem(state)
    if problem:
        raise MixkdError(f"{path} is damaged ({problem}); {STATE_HINT}")
    fmt = state.get("format", FOLDER_FORMAT)  # folders written before the format was recorded: this layout
    if fmt != FOLDER_FORMAT:
        raise MixkdError(f"{out} is a study folder of another mixkd version ({state.get('mixkd_version', 'unknown')}, "
                         f"format {fmt!r}); this mixkd ({__version__}) reads {FOLDER_FORMAT!r}: continue it with the "
                         "mixkd that wrote it, or use another --out")
    return state


def state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with the layout of a study state read from JSON (a value of another type), or None."""
    runs = state.get("runs", {})
    if not isinstance(runs, dict):
        return f'"runs" is {json.dumps(runs)[:40]}, not a mapping of run ids'
    bad = next((k for k, v in runs.items() if not isinstance(v, dict)), None)
    if bad is not None:
        return f'"runs" gives {bad!r} as {json.dumps(runs[bad])[:40]}, not a mapping'
    overrides = state.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        return '"overrides" is not a list of key=value texts'
    if not isinstance(state.get("id", ""), (str, type(None))):
        return '"id" is not a text'
    return None


def load_folder(out: str | Path) -> tuple[Study, dict[str, Any] | None]:
    """The study of a study folder (its ``study.yaml`` with the recorded ``--set`` overrides) and its state."""
    out = Path(out)
    if not out.exists():
        raise MixkdError(f"study folder not found: {out}")
    if not out.is_dir():
        raise MixkdError(f"{out} is a file, not a study folder")
    if not (out / STUDY_COPY).is_file():
        raise MixkdError(f"{out} is not a study folder (it has no {STUDY_COPY}); give the folder that "
                         "'mixkd study run --out' wrote")
    state = check_folder(out)
    found = {p["spec"]: p["path"] for p in (state or {}).get("plugins") or [] if isinstance(p, dict) and "spec" in p}
    study = load_study(out / STUDY_COPY, (state or {}).get("overrides"), check_files=False, plugin_paths=found)
    return study, state


def folder_problem(out: str | Path, study_id: str) -> str | None:
    """Why the study folder ``out``, as this machine sees it, is not the one of study ``study_id``
    (absent, unreadable, another study's), or None: what a worker on another machine checks before
    it writes there."""
    path = Path(out) / STATE_NAME
    if not path.is_file():
        return f"{out} is not there or holds no {STATE_NAME}"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"cannot read {path} ({e})"
    found = state.get("id") if isinstance(state, dict) else None
    if found != study_id:
        return f"{out} holds another study (id {found}, not {study_id})"
    return None


class StudyState:
    """Each run's state (and error, seconds, analysis) during ``mixkd study run``, saved to the state
    file, and the study's ``id`` (kept from the folder's state file, else new)."""

    def __init__(self, study: Study, out: Path):
        self.study, self.out = study, out
        self.id = str((check_folder(out) or {}).get("id") or uuid.uuid4().hex)
        self.status: dict[str, RunState] = {}
        self.error: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.analysis: dict[str, AnalysisState] = {}  # runs to analyze only
        self.analysis_error: dict[str, str] = {}

    def set(self, run_id: str, status: RunState, error: str | None = None) -> None:
        self.status[run_id] = status
        if error:
            self.error[run_id] = error
        else:
            self.error.pop(run_id, None)

    def set_analysis(self, run_id: str, status: AnalysisState, error: str | None = None) -> None:
        self.analysis[run_id] = status
        if error:
            self.analysis_error[run_id] = error
        else:
            self.analysis_error.pop(run_id, None)

    def counts(self) -> dict[str, int]:
        """Runs per state (every state but WAITING, which only ``mixkd study status`` tells apart)."""
        counts = {s.value: 0 for s in RunState if s is not RunState.WAITING}
        for s in self.status.values():
            counts[s] += 1
        return counts

    def analysis_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in (AnalysisState.DONE, AnalysisState.RUNNING, AnalysisState.PENDING,
                                       AnalysisState.FAILED)}
        for s in self.analysis.values():
            counts[s] += 1
        return counts

    def save(self, interrupted: bool = False) -> None:
        runs = {}
        for run in self.study.runs:
            entry: dict[str, Any] = {"status": self.status[run.id].value}
            if run.id in self.error:
                entry["error"] = self.error[run.id]
            if run.id in self.seconds:
                entry["seconds"] = round(self.seconds[run.id], 1)
            if run.id in self.analysis:
                entry["analysis"] = self.analysis[run.id].value
            if run.id in self.analysis_error:
                entry["analysis_error"] = self.analysis_error[run.id]
            if self.study.plugins:  # what it runs with (check_plugins)
                entry["plugins"] = self.study.plugins
            runs[run.id] = entry
        state = {"format": FOLDER_FORMAT, "id": self.id, "mixkd_version": __version__, "overrides": self.study.overrides,
                 "study": self.study.name, "source": str(self.study.source),
                 "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "interrupted": interrupted, "counts": self.counts(),
                 **({"plugins": self.study.plugins} if self.study.plugins else {}),
                 **({"analyses": self.analysis_counts()} if self.analysis else {}), "runs": runs}
        atomic_write_text(self.out / STATE_NAME, json.dumps(state, indent=1) + "\n")


def check_plugins(study: Study, out: str | Path) -> None:
    """Refuse, in one line, to continue a study whose runs were made with another plugin file than the one
    the study file now loads (same ``plugins:`` entry, another SHA-256): a study moved to another machine
    must bring its plugin files as they were."""
    state = check_folder(out) or {}
    now = {p["spec"]: p for p in study.plugins}
    for run_id, entry in (state.get("runs") or {}).items():
        for used in entry.get("plugins") or [] if isinstance(entry, dict) else []:
            current = now.get(used.get("spec"))
            if current is not None and current["sha256"] != used.get("sha256"):
                raise MixkdError(f"{out}: run {run_id} was made with plugin {used.get('spec')} of SHA-256 "
                                 f"{str(used.get('sha256'))[:12]}… ({used.get('path')}), but {current['path']} has "
                                 f"{current['sha256'][:12]}…: put the plugin file it ran with there, or use another --out")


# ---- the lock ----------------------------------------------------------------------------------

class FolderLock:
    """One ``mixkd study run`` per study folder at a time: an exclusive ``flock`` on ``.study.lock``,
    which the kernel releases when its holder dies (so a lock is honoured only while its holder
    lives), and no live worker of an earlier run (they hold ``.study.workers.lock`` shared)."""

    def __init__(self, out: Path, wait_for_workers: float = 30.0):
        self.path = out / LOCK_NAME
        self.workers = out / WORKERS_LOCK
        self.wait = wait_for_workers
        self._file = None

    def __enter__(self) -> FolderLock:
        f, holder = hold_lock(self.path)
        if f is None:
            raise MixkdError(f"another 'mixkd study run' (pid {holder}) is using {self.path.parent}; wait for it "
                             "to finish or stop it (it checkpoints on SIGTERM)")
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
                except OSError as e:
                    if locks_unsupported(e):  # no locks on this file system: workers cannot be told
                        return
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


def _flock_holder(path: Path) -> int | None:
    """The pid holding a lock on ``path`` as /proc/locks lists it (Linux), 0 where no one holds one,
    None where that cannot be told."""
    try:
        st = path.stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->":  # '->': a process waiting for the lock, not holding it
            continue
        try:
            major, minor, inode = parts[5].split(":")
            if (int(inode), int(major, 16), int(minor, 16)) == (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)):
                return int(parts[4])
        except ValueError:
            continue
    return 0


def study_pid(out: Path) -> int | None:
    """The pid of the live ``mixkd study run`` holding the folder's lock, or None. The lock is a
    ``flock`` that dies with its holder: a lock file left by a killed process names a dead pid."""
    path = out / LOCK_NAME
    try:
        found = re.search(r"\d+", path.read_text())
    except OSError:
        return None
    pid = int(found.group()) if found else None
    holder = _flock_holder(path)
    if holder is not None:
        return (pid or holder) if holder else None
    if pid is None:
        return None
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return None
    except PermissionError:  # alive, owned by another user
        pass
    return pid
