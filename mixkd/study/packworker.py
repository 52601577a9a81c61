"""The worker side of a study: one pack of runs (one process per GPU, or per CPU worker).

A :class:`PackWorker` takes study jobs (a run, or the analysis of a finished run), admits runs into
free slots of its :class:`mixkd.pack.Pack` as soon as a slot frees (continuous admission), advances
every live run one step per round, and reports each job that ends: finished, failed (alone, with
its one-line reason in ``error.txt``) or stopped (deadline or signal, after a step-exact
checkpoint). Analyses run between rounds, in the worker's own process. An image-folder run, whose
data streams from disk through loader processes, runs in a pack of its own.

The same worker runs in a local process, in a Ray actor and in the study's own process
(:mod:`mixkd.study.executors`); :func:`execute_run` is a pack of one.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from mixkd.control import StopControl
from mixkd.engine import Run
from mixkd.errors import FolderInUse, MixkdError
from mixkd.files import storage_error
from mixkd.pack import Pack, failure_message
from mixkd.run_folder import RunFolder
from mixkd.study.worker import LOG_NAME, Job, LazyLog, Outcome, execute_analysis, not_started, record_failure


class PackWorker:
    def __init__(self, slots: int, control: StopControl | None = None):
        self.slots = slots
        self.control = control or StopControl()
        self.pending: deque[Job] = deque()
        self.pack = None
        self.ids: dict[int, str] = {}  # id(run) -> run id
        self.started: dict[str, float] = {}
        self.exclusive = False  # an image-folder run holds the pack alone

    # ---- intake ----------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self.pending.append(job)

    @property
    def busy(self) -> bool:
        return bool(self.pending) or (self.pack is not None and bool(self.pack.live))

    def live_runs(self) -> list[Any]:
        return self.pack.live if self.pack is not None else []

    def _admit(self) -> list[tuple[str, Outcome]]:
        done = []
        while self.pending:
            run_id, config, run_dir, analysis = self.pending[0]
            if analysis is not None:
                self.pending.popleft()
                done.append((run_id, execute_analysis(config, run_dir, analysis)))
                continue
            folder_data = config.dataset == "imagefolder"
            if self.pack is not None and (self.pack.free() == 0 or self.exclusive
                                          or (folder_data and self.pack.live)):
                break
            self.pending.popleft()
            out = Path(run_dir)
            start = time.perf_counter()
            try:
                # a folder holding only a config (a start that failed) is not a run yet: it starts afresh
                run = Run(config, resume=RunFolder(out).has_begun(), paths_relative_to_run=True)
            except Exception as e:  # noqa: BLE001 - recorded, the study goes on
                done.append(self._failed(run_id, out, {"ok": False, "message": failure_message(e), "error": e}, start))
                continue
            RunFolder(out).error.unlink(missing_ok=True)  # after Run checked that the folder is no link
            run.interrupted = lambda: self.control.reason is not None  # an evaluation stops at its next batch
            if self.pack is None or self.pack.device != run.device or (self.pack.slots != self.slots and not self.pack.live):
                self.pack = Pack(run.device, self.slots)
            ended = self.pack.admit(run)
            if ended is not None:
                done.append(self._failed(run_id, out, ended, start) if not ended["ok"]
                            else (run_id, self._outcome(run_id, out, ended, start)))
                continue
            self.ids[id(run)] = run_id
            self.started[run_id] = start
            self.exclusive = folder_data
            if self.control.deadline is not None:  # so that its first step is budgeted too (capture, compilation)
                failed = self.pack.measure(run)
                if failed is not None:
                    self.ids.pop(id(run))
                    self.exclusive = False  # its slot is free again, and the pack holds no folder run
                    done.append(self._failed(run_id, out, failed, self.started.pop(run_id)))
        return done

    def _failed(self, run_id: str, out: Path, outcome: dict[str, Any], start: float) -> tuple[str, Outcome]:
        """A run that failed: its error file written. A write the storage refused (a full disk, a
        quota, a read-only mount) fails nothing: the run stays as it was (resumable, its last
        checkpoint kept) and the outcome's ``storage`` says why, for the study to stop."""
        error = outcome.get("error")
        storage = storage_error(error) if error is not None else None
        if storage is None:
            try:
                record_failure(out, outcome["message"], error)
            except (OSError, MixkdError) as e:  # the error file itself could not be written
                storage = storage_error(e)
                if storage is None:
                    raise
        if storage is not None:
            outcome = {**outcome, "storage": str(storage), "message": str(storage)}
        return run_id, self._outcome(run_id, out, outcome, start)

    def _outcome(self, run_id: str, out: Path, outcome: dict[str, Any], start: float) -> dict[str, Any]:
        return ({k: v for k, v in outcome.items() if k != "error"} | {"seconds": time.perf_counter() - start}
                | _in_use(outcome.get("error")))

    # ---- work ------------------------------------------------------------------------------
    def work(self) -> list[tuple[str, Outcome]]:
        """Admit what fits, then one round (or, when a stop is due, checkpoint every live run).
        Returns (run id, outcome) of the jobs that ended."""
        done: list[tuple[str, Outcome]] = []
        if self.control.reason is None and not self.control.should_stop(0.0):
            done += self._admit()
        if self.pack is None or not self.pack.live:
            if self.control.reason is not None:
                done += self.drop_pending()
            return done
        if self.control.should_stop(lambda: self.pack.next_cost() + self.pack.checkpoint_cost()):
            for run, outcome in self.pack.stop_all(self.control.reason):
                done.append(self._ended(run, outcome))
            self.exclusive = False
            done += self.drop_pending()
            return done
        for run, outcome in self.pack.round():
            done.append(self._ended(run, outcome))
        if not self.pack.live:
            self.exclusive = False
        return done

    def _ended(self, run, outcome: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        run_id = self.ids.pop(id(run))
        start = self.started.pop(run_id)
        if not outcome["ok"] and not outcome.get("stopped"):
            return self._failed(run_id, run.dir, outcome, start)
        return run_id, self._outcome(run_id, run.dir, outcome, start)

    def drop_pending(self) -> list[tuple[str, Outcome]]:
        """Jobs not begun when a stop came: reported as stopped, untouched."""
        dropped = [(job[0], not_started()) for job in self.pending]
        self.pending.clear()
        return dropped

    def progress(self) -> dict[str, Any]:
        """Each slot's run, epoch and images/s, and the pack's sum, since the last call."""
        if self.pack is None:
            return {"slots": [], "images_per_s": 0.0}
        per_slot, total = self.pack.throughput()
        slots = [{"run": self.ids.get(id(run)), "epoch": run.epoch + 1, "epochs": run.epochs,
                  "images_per_s": rate,
                  "compiling": run.compiling}
                 for run, rate in zip(self.pack.jobs, per_slot) if run is not None]
        return {"slots": slots, "images_per_s": total}


def _in_use(error: BaseException | None) -> dict[str, bool]:
    """``{"in_use": True}`` in the outcome of a run refused because another process holds its folder
    (an executor may try it again: the process of a lost node, whose lock NFS keeps for a while)."""
    return {"in_use": True} if isinstance(error, FolderInUse) else {}


def execute_run(job: Job) -> Outcome:
    """Run (or resume, or find finished) ``job`` in this process, as a pack of one (the same path as
    every study worker); anything the run prints goes to its ``log.txt``. An analysis job is executed
    as it is."""
    worker = PackWorker(1)
    worker.submit(job)
    done: list = []
    with LazyLog(Path(job.run_dir) / LOG_NAME) as log, redirect_stdout(log), redirect_stderr(log):
        while not done:
            done = worker.work()
    return done[0][1]
