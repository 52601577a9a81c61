"""Where the runs of a study execute: packs of runs in local worker processes, in Ray actors, or
in the study's own process.

An :class:`Executor` takes jobs (``submit``: a :class:`mixkd.study.worker.Job`, a run or the
analysis of a finished run) while it has ``capacity()``, reports ended ones (``wait``) as
``(run id, outcome)`` pairs, passes a stop on to its workers (``stop``: each live run writes a
step-exact checkpoint), shows what runs where (``progress``), and ends (``shutdown``), killing what
still runs when told to.

Each worker holds a pack (:class:`mixkd.study.packworker.PackWorker`): up to K runs in one
process, stepped in turn, each on its own CUDA stream, with a slot refilled as soon as a run ends.

* ``LocalExecutor``: one worker process per GPU (worker i sees GPU i mod G alone through
  ``CUDA_VISIBLE_DEVICES``), each with K slots (``--pack``, default 8 on a GPU); on the CPU, N
  workers of K slots (default 1) and a fixed number of threads each (``--threads``, default 1,
  recorded in each ``result.json``: on the CPU a run's numbers depend on its thread count). Workers
  die with the study's main process (a parent-death signal, and a watch of the parent's pid) after
  checkpointing their runs.
* ``InProcessExecutor``: one pack in the study's own process, stepped while the study waits (tests,
  debugging).
* ``RayExecutor``: one actor per GPU of the cluster (per CPU on a CPU-only cluster, or ``--workers``),
  spread over its nodes, each holding a pack. Actors write to the study folder by its absolute path,
  so the folder must be on storage every node mounts at the same path (each actor checks that it
  sees the study's folder before its first job), and mixkd must be installed on every node. Runs of
  a node that goes away continue from their checkpoints on the nodes left.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import multiprocessing as mp
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
import traceback
from typing import Any, Protocol

import torch

from mixkd.control import StopControl, wall_to_monotonic
from mixkd.data.loaders import available_cores
from mixkd.errors import MixkdError
from mixkd.files import locks_unsupported, make_dir, open_nofollow
from mixkd.run_folder import RunFolder
from mixkd.study.folder import WORKERS_LOCK, folder_problem
from mixkd.study.packworker import PackWorker
from mixkd.study.worker import Job, Outcome, not_started

Completion = tuple[str, Outcome]
DEFAULT_GPU_PACK = 8  # the best K measured on an H100 (docs/study-claims-reference.md: 8 runs per process on streams)


class Executor(Protocol):
    """What the study runner asks of an executor."""

    kind: str
    description: str  # what runs where, for the study's first line

    def attach(self, out: str | os.PathLike, study_id: str) -> None:
        """The study folder its jobs write to, and the study's id (workers on other machines check
        that they see that folder, before the first job)."""

    def capacity(self) -> int:
        """How many more jobs it takes now (0 once a stop has come)."""

    def submit(self, job: Job) -> None: ...

    def wait(self, timeout: float) -> list[Completion]:
        """The jobs that ended, waiting up to about ``timeout`` seconds for one."""

    def stop(self, reason: str) -> None:
        """Every live run writes a step-exact checkpoint and ends (reported as stopped); jobs not begun
        are reported as stopped and not started."""

    def progress(self) -> list[dict[str, Any]]:
        """Each pack's slots (run, epoch, images/s) and summed images/s."""

    def shutdown(self, terminate: bool = False) -> None: ...


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    return [str(i) for i in range(torch.cuda.device_count())]


# Signals a worker takes as a stop: blocked while it starts, heard once its handlers are in place.
_STOPS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}
# A worker ended by these (exit code -N) was stopped by the user or a scheduler, not failed; one that
# left on its own (0) with runs still assigned heard a stop (a SIGTERM sent to every process) first.
_STOPPED_BY = {-signal.SIGINT: "interrupt", -signal.SIGTERM: "signal", -signal.SIGHUP: "signal", 0: "signal"}


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM (a graceful stop) when the parent process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_log(lock_path: str, index: int) -> str:
    """``logs/worker-<index>.log`` of the study folder holding ``lock_path`` (its ``logs/`` made: never a link)."""
    return os.path.join(make_dir(os.path.join(os.path.dirname(lock_path), "logs")), f"worker-{index}.log")


def _local_worker(parent: int, index: int, env: dict[str, str], threads: int, slots: int, limit: float | None,
                  deadline: float | None, lock_path: str | None, tasks, results) -> None:
    """A worker process of ``parent`` (the study's main process, its PID passed in: a process started
    while its parent died has been adopted before it runs a line, so its own parent PID says nothing).
    It dies with its parent from its first instant: PR_SET_PDEATHSIG first, then the parent checked
    (a parent gone before the signal was armed sends none), then checked before every task."""
    _die_with_parent()
    if os.getppid() != parent:
        return  # orphaned while starting: nothing taken, nothing to checkpoint
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tells the workers
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked while it started (see _start)
    results.cancel_join_thread()  # never hang at exit on a pipe nobody reads
    os.environ.update(env)  # before CUDA starts: CUDA_VISIBLE_DEVICES is read then
    torch.set_num_threads(threads)
    lock = None
    if lock_path:  # held (shared) while this worker lives: a new study run waits for it
        lock = open_nofollow(lock_path, "a")  # held for the process's life
        try:
            fcntl.flock(lock, fcntl.LOCK_SH)
        except OSError as e:  # a file system without locks: a new study run cannot wait for this worker
            if not locks_unsupported(e):
                raise
        # Runs log to their own log.txt; anything else (library warnings) goes to the worker's log, not
        # to the study's terminal.
        with open_nofollow(worker_log(lock_path, index), "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
    control = StopControl(time_limit=limit, deadline=deadline)
    control.install_signals(interrupt=False)
    signal.signal(signal.SIGUSR2, lambda *_: control.request("time"))  # the study's time is up (see stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # a stop sent while it started is heard now
    worker = PackWorker(slots, control)
    closing, shown = False, time.monotonic()
    while True:
        orphan = os.getppid() != parent
        if orphan:
            control.request("signal")  # the study's main process is gone: checkpoint and leave
        try:
            while not orphan:  # an orphan takes no new task (nobody would hear of it)
                idle = not worker.busy and not closing and control.reason is None
                item = tasks.get(timeout=0.5) if idle else tasks.get_nowait()
                if item is None:
                    closing = True
                    break
                worker.submit(item)
        except queue.Empty:
            pass
        for run_id, outcome in worker.work():
            results.put(("done", index, run_id, outcome))
        if time.monotonic() - shown > 2.0 and worker.live_runs():
            results.put(("progress", index, worker.progress()))
            shown = time.monotonic()
        if not worker.busy and (closing or control.reason is not None):
            break


class LocalExecutor:
    kind = "local"

    def __init__(self, workers: int | None = None, runs_per_gpu: int | None = None, use_gpu: bool = True,
                 threads: int | None = None, pack: int | None = None, time_limit: float | None = None,
                 deadline: float | None = None, lock_dir: str | None = None):
        pack = pack or runs_per_gpu
        if (pack is not None and pack < 1) or (workers is not None and workers < 1) or (threads is not None and threads < 1):
            raise MixkdError("--workers, --pack (--runs-per-gpu) and --threads must be at least 1")
        self.gpus = gpus = visible_gpus() if use_gpu else []
        cores = available_cores()
        if gpus:
            n = workers or len(gpus)
            self.slots = pack or DEFAULT_GPU_PACK
            envs = [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(n)]
            self.threads = threads or max(1, cores // n)
            self.description = (f"{n} local worker(s) on {len(gpus)} GPU(s), a pack of up to {self.slots} run(s) "
                                f"in each")
        else:
            self.threads = threads or 1
            n = workers or max(1, min(cores // self.threads, 4))
            self.slots = pack or 1
            envs = [{"CUDA_VISIBLE_DEVICES": ""} if use_gpu else {} for _ in range(n)]
            self.description = (f"{n} local worker(s) on the CPU, {self.threads} thread(s) each"
                                + (f", a pack of up to {self.slots} runs in each" if self.slots > 1 else ""))
        for env in envs:
            env["OMP_NUM_THREADS"] = str(self.threads)
        self.limit, self.deadline = time_limit, deadline
        self.lock_path = os.path.join(lock_dir, WORKERS_LOCK) if lock_dir else None
        self._ctx = mp.get_context("spawn")
        self._results = self._ctx.Queue()
        self._envs = envs
        self._procs: list[Any] = [None] * n
        self._tasks: list[Any] = [None] * n
        self._assigned: list[list[str]] = [[] for _ in range(n)]
        self._progress: dict[int, dict[str, Any]] = {}
        self.stopping: str | None = None

    def _start(self, i: int) -> None:
        if self.lock_path:  # its log refused here (a planted link: one line), not as the worker's traceback
            open_nofollow(worker_log(self.lock_path, i), "a").close()
        self._tasks[i] = self._ctx.Queue()
        self._procs[i] = self._ctx.Process(
            target=_local_worker, daemon=True, name=f"mixkd-study-worker-{i}",
            args=(os.getpid(), i, self._envs[i], self.threads, self.slots, self.limit, self.deadline, self.lock_path,
                  self._tasks[i], self._results))
        # Started with SIGINT blocked (the mask survives the exec): a Ctrl-C while the worker starts up
        # reaches the main process, which stops the workers in order, instead of killing the worker.
        # SIGTERM, SIGUSR1 and SIGUSR2 (a scheduler's stop sent to every process, the study's own stop)
        # wait, blocked, until the worker's handlers are in place: a stop, never a death.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, *_STOPS})
        try:
            self._procs[i].start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def attach(self, out: str | os.PathLike, study_id: str) -> None:
        pass  # its workers run on this machine: they see the folder the study sees

    def capacity(self) -> int:
        if self.stopping:
            return 0
        return sum(self.slots - len(a) for a in self._assigned)

    def submit(self, job: Job) -> None:
        if self.gpus and job.config.device.startswith("cuda:"):  # each worker sees its one GPU as cuda:0
            job = job._replace(config=job.config.model_copy(update={"device": "cuda"}))
        i = min(range(len(self._assigned)), key=lambda k: len(self._assigned[k]))  # spread runs over workers
        if self._procs[i] is None or not self._procs[i].is_alive():
            self._start(i)
        self._assigned[i].append(job.run_id)
        self._tasks[i].put(job)

    def wait(self, timeout: float) -> list[Completion]:
        done: list[Completion] = []
        messages = []
        try:
            messages.append(self._results.get(timeout=timeout))
            while True:
                messages.append(self._results.get_nowait())
        except queue.Empty:
            pass
        for message in messages:
            if message[0] == "progress":
                self._progress[message[1]] = message[2]
                continue
            _, i, run_id, outcome = message
            if run_id in self._assigned[i]:
                self._assigned[i].remove(run_id)
            done.append((run_id, outcome))
        for i, proc in enumerate(self._procs):  # a worker that died (killed, out of memory, crashed)
            if proc is not None and not proc.is_alive() and self._assigned[i]:
                for run_id in self._assigned[i]:
                    if self.stopping:
                        outcome = not_started()
                    elif proc.exitcode in _STOPPED_BY:  # the user's Ctrl-C or a scheduler's SIGTERM: stopped
                        outcome = {"ok": False, "stopped": True, "killed": True, "seconds": None,
                                   "reason": _STOPPED_BY[proc.exitcode],
                                   "message": f"its worker was ended by {signal.Signals(-proc.exitcode).name}"
                                   if proc.exitcode else "its worker stopped before it took the run"}
                    else:
                        outcome = {"ok": False, "seconds": None,
                                   "message": f"the worker process running it died (exit code {proc.exitcode})"}
                    done.append((run_id, outcome))
                self._assigned[i] = []
                self._progress.pop(i, None)
        return done

    def in_flight(self) -> int:
        return sum(len(a) for a in self._assigned)

    def stop(self, reason: str) -> None:
        """Every worker checkpoints its runs and leaves (at its next step): SIGUSR2 says the time is
        up, SIGUSR1 any other stop."""
        self.stopping = reason
        for proc in self._procs:
            if proc is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGUSR2 if reason == "time" else signal.SIGUSR1)

    def progress(self) -> list[dict[str, Any]]:
        return [self._progress[i] for i in sorted(self._progress)]

    def shutdown(self, terminate: bool = False) -> None:
        for i, proc in enumerate(self._procs):
            if proc is None:
                continue
            if terminate:
                proc.terminate()
            elif proc.is_alive():
                self._tasks[i].put(None)
        for proc in self._procs:
            if proc is not None:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        self._procs = [None] * len(self._procs)
        self._assigned = [[] for _ in self._assigned]
        # Release the queues' named semaphores now: a study that stops leaves through os._exit, which
        # skips the finalizers that would, and the resource tracker then warns of "leaked semaphore objects".
        for q in [*self._tasks, self._results]:
            if q is not None:
                q.close()
                q.join_thread()
        self._tasks = [None] * len(self._tasks)
        self._results = None

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]


class _PackActor:
    """A Ray actor holding one pack; its loop runs in a thread, ``submit``/``poll`` talk to it. Before
    a job of a study folder it has not seen yet, it checks that its node sees that folder, the same
    study's (:func:`mixkd.study.folder.folder_problem`), and it notes its node in each run's log."""

    def __init__(self, slots: int, threads: int | None, limit: float | None, wall_deadline: float | None):
        import ray  # optional (mixkd[ray]): this class runs in Ray's worker processes only

        if threads:
            torch.set_num_threads(threads)
        deadline = None if wall_deadline is None else wall_to_monotonic(wall_deadline)  # another machine's clock
        self.worker = PackWorker(slots, StopControl(time_limit=limit, deadline=deadline))
        self.node = ray.get_runtime_context().get_node_id()
        self.name = f"Ray node {ray.util.get_node_ip_address()} ({self.node[:8]})"
        self.folders: set[tuple[str, str]] = set()  # (study folder, study id) seen from here
        self.lock = threading.Lock()
        self.done: list[Completion] = []
        self.crash: str | None = None
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        try:
            while True:
                with self.lock:
                    busy = self.worker.busy
                    if busy:
                        self.done += self.worker.work()
                if not busy:
                    time.sleep(0.05)
        except BaseException as e:  # noqa: BLE001 - reported by the next poll
            self.crash = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"

    def check(self, folder: str, study_id: str) -> tuple[str, str | None]:
        """(this node's id, why it cannot work in ``folder`` or None)."""
        problem = folder_problem(folder, study_id)
        if problem is None:
            self.folders.add((folder, study_id))
            return self.node, None
        return self.node, (f"{self.name} does not see the study folder: {problem}; the folder must be on storage "
                           "every node mounts at the same path")

    def submit(self, job: Job, folder: str, study_id: str) -> None:
        if (folder, study_id) not in self.folders:
            _, problem = self.check(folder, study_id)
            if problem is not None:
                with self.lock:
                    self.done.append((job.run_id, {"ok": False, "message": problem, "seconds": 0.0}))
                return
        if job.analysis is None:  # where each attempt of a run trained, in its log
            make_dir(job.run_dir)
            RunFolder(job.run_dir).append_log(f"placed on {self.name}, node id {self.node}, worker pid {os.getpid()}")
        with self.lock:
            self.worker.submit(job)

    def poll(self) -> tuple[list[Completion], dict[str, Any]]:
        if self.crash is not None:
            raise RuntimeError(f"the pack's loop stopped: {self.crash}")
        with self.lock:
            done, self.done = self.done, []
            return done, self.worker.progress() if self.worker.live_runs() else {}

    def stop(self, reason: str) -> None:
        self.worker.control.request(reason)


@contextlib.contextmanager
def _ray_local_only():
    """While a Ray instance starts here, make it listen on 127.0.0.1 only. Ray binds its control plane
    (GCS, raylet, workers, the driver) to every interface unless it runs as on a laptop, where its node
    address is the loopback one; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` asks for that mode. Ray reads
    the variable when imported (in the processes it starts, which inherit it, and here; where Ray was
    imported earlier, its constant is set too). Both are restored once the instance runs."""
    name, before = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ[name] = "0"
    import ray._private.ray_constants as constants  # optional (mixkd[ray]): only for --executor ray

    was = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = was
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _last_line(error: BaseException) -> str:
    """The last line of a Ray error (its cause, under Ray's own lines)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[-1].strip()


MAX_LOST = 3  # a run whose worker dies this many times (its node lost each time, or the run kills it) fails
ORPHAN_WAIT = 120.0  # seconds runs of a lost worker wait for a new one when no other is left
# A moved run refused because its folder is still locked (NFS keeps a dead client's lock until its lease
# expires, about 90 s on NFSv4) is tried again every LOCK_RETRY s for up to LOCK_WAIT s.
LOCK_RETRY, LOCK_WAIT = 5.0, 300.0


class RayExecutor:
    """One actor per GPU of the cluster (per CPU of a CPU-only cluster, or ``workers``), spread over its
    nodes (Ray's SPREAD strategy; each actor takes 1 CPU, and 1 GPU where runs use CUDA), each holding a
    pack. The study folder is the contract between nodes: every actor checks at ``attach`` (and before
    any job of a folder it has not seen) that its node sees the folder at the driver's path, the same
    study by the id of its state file; jobs carry absolute paths.

    A worker lost with its node (or killed) does not fail its runs: they go to the workers left, or to
    a new actor Ray places where it can, and resume there from their last checkpoint through the usual
    resume path (the runner hears "rescheduled"). A run lost :data:`MAX_LOST` times fails; runs left
    without any worker for :data:`ORPHAN_WAIT` s fail too (running the study again resumes them)."""

    kind = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, runs_per_gpu: int | None = None,
                 use_gpu: bool = True, threads: int | None = None, pack: int | None = None,
                 time_limit: float | None = None, deadline: float | None = None):
        try:
            import ray  # optional (mixkd[ray]), and slow to import: only for --executor ray
        except ImportError:
            raise MixkdError("--executor ray needs Ray: pip install 'mixkd[ray]'") from None
        pack = pack or runs_per_gpu
        if (pack is not None and pack < 1) or (workers is not None and workers < 1):
            raise MixkdError("--workers and --pack (--runs-per-gpu) must be at least 1")
        self._ray = ray
        self._temp_dir: str | None = None
        self._owns = not ray.is_initialized()
        self.address = address or "this machine"
        if self._owns:
            try:
                if address:
                    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
                else:  # on this machine only: loopback addresses, no dashboard, a session folder of this user's
                    # Ray makes its session folders world-writable: inside a folder of mode 0700, only
                    # this user reaches them
                    self._temp_dir = tempfile.mkdtemp(prefix="mixkd-ray-")
                    with _ray_local_only():
                        ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING",
                                 log_to_driver=False, _temp_dir=os.path.join(self._temp_dir, "ray"))
            except (ConnectionError, RuntimeError, ValueError) as e:
                if self._temp_dir is not None:
                    shutil.rmtree(self._temp_dir, ignore_errors=True)
                raise MixkdError(f"cannot start or reach the Ray cluster at {self.address}: "
                                 f"{str(e).splitlines()[0]}") from None
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if use_gpu else 0
        cpus = int(resources.get("CPU", 0))
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        n = workers or (gpus if gpus else max(1, cpus))
        self.gpus = gpus
        self.slots = pack or (DEFAULT_GPU_PACK if gpus else 1)
        self._actor = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_restarts=0, max_concurrency=4,
                                 scheduling_strategy="SPREAD")(_PackActor)
        wall = None if deadline is None else time.time() + (deadline - time.monotonic())
        self._args = (self.slots, None if gpus else (threads or 1), time_limit, wall)
        self._actors: list[Any] = []
        self._state: list[str] = []  # per actor: "starting" (until its check answers), "ready" or "dead"
        self._node: list[str | None] = []
        self._assigned: list[list[str]] = []
        for _ in range(n):
            self._add_actor()
        self._spares = n * MAX_LOST  # new actors for lost ones, at most
        self._checks: dict[Any, int] = {}
        self._polls: dict[Any, int] = {}
        self._progress: dict[int, dict[str, Any]] = {}
        self._jobs: dict[str, Job] = {}  # run id -> its job, while it runs (to place it again)
        self._lost: dict[str, int] = {}  # run id -> times its worker was lost
        self._homeless: list[Job] = []  # jobs of lost workers, waiting for a slot
        self._not_before: dict[str, float] = {}  # run id -> when a run refused for a held lock is tried again
        self._held_since: dict[str, float] = {}  # run id -> its first refusal for a held lock
        self._homeless_since: float | None = None
        self._folder: tuple[str, str] | None = None
        self._start_error = "?"
        self.stopping: str | None = None
        self.description = (f"Ray cluster at {self.address} ({nodes} node(s), {cpus} CPUs, {gpus:g} GPUs), {n} pack(s) "
                            f"of up to {self.slots} run(s)" + (", one per GPU" if gpus else "") + ", spread over the nodes")

    def _add_actor(self) -> int:
        self._actors.append(self._actor.remote(*self._args))
        self._state.append("starting")
        self._node.append(None)
        self._assigned.append([])
        return len(self._actors) - 1

    def _check(self, i: int) -> None:
        assert self._folder is not None
        self._checks[self._actors[i].check.remote(*self._folder)] = i

    def attach(self, out: str | os.PathLike, study_id: str, timeout: float = ORPHAN_WAIT) -> None:
        """Bind the study folder; wait until a first actor has checked that its node sees it (and the
        others a moment more). One line naming the node and the path where a node does not see it."""
        self._folder = (os.path.abspath(out), study_id)
        for i in range(len(self._actors)):
            self._check(i)
        deadline = time.monotonic() + timeout
        while not any(s == "ready" for s in self._state):
            if not self._checks:  # every actor failed to start (mixkd missing on the nodes, ...)
                raise MixkdError(f"no Ray worker could start on the cluster at {self.address}: {self._start_error}")
            if time.monotonic() > deadline:
                raise MixkdError(f"no Ray worker started on the cluster at {self.address} within {timeout:.0f} s "
                                 f"(each needs 1 CPU{' and 1 GPU' if self.gpus else ''}); see 'ray status'")
            self._answer_checks(1.0, strict=True)
        self._answer_checks(min(10.0, max(0.0, deadline - time.monotonic())), strict=True)

    def _answer_checks(self, timeout: float, strict: bool = False) -> None:
        """Actors whose check has answered become ready (or, on a node without the folder, are dropped:
        an error with ``strict``, before the study starts)."""
        if not self._checks:
            return
        ready, _ = self._ray.wait(list(self._checks), num_returns=len(self._checks), timeout=timeout)
        for ref in ready:
            i = self._checks.pop(ref)
            try:
                node, problem = self._ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the actor could not start, or died with its node
                self._start_error = _last_line(e)
                self._drop(i)
                continue
            if problem is not None:
                self._drop(i)
                if strict:
                    raise MixkdError(problem)
                continue
            self._state[i], self._node[i] = "ready", node

    def _drop(self, i: int) -> None:
        self._state[i] = "dead"
        self._ray.kill(self._actors[i])
        self._progress.pop(i, None)

    def capacity(self) -> int:
        if self.stopping:
            return 0
        free = sum(max(0, self.slots - len(a)) for a, s in zip(self._assigned, self._state) if s == "ready")
        return max(0, free - len(self._homeless))

    def _place(self, job: Job) -> bool:
        """Give ``job`` to the least loaded ready actor with a free slot; False where none has one."""
        ready = [i for i, s in enumerate(self._state) if s == "ready" and len(self._assigned[i]) < self.slots]
        if not ready:
            return False
        i = min(ready, key=lambda k: len(self._assigned[k]))
        self._assigned[i].append(job.run_id)
        self._jobs[job.run_id] = job
        self._actors[i].submit.remote(job, *self._folder)
        return True

    def submit(self, job: Job) -> None:
        # paths as this machine resolves them, the same on every node; each actor sees its one GPU as cuda:0
        run_dir = os.path.abspath(job.run_dir)
        update: dict[str, Any] = {"out": run_dir}
        if self.gpus and job.config.device.startswith("cuda:"):
            update["device"] = "cuda"
        job = job._replace(run_dir=run_dir, config=job.config.model_copy(update=update))
        if not self._place(job):
            self._homeless.append(job)

    def _lose(self, i: int, why: str) -> list[Completion]:
        """Actor ``i`` died (its node gone, killed): its runs go elsewhere, or fail after MAX_LOST losses."""
        done: list[Completion] = []
        node = (self._node[i] or "?")[:8]
        self._drop(i)
        for run_id in self._assigned[i]:
            job = self._jobs.pop(run_id)
            self._lost[run_id] = self._lost.get(run_id, 0) + 1
            if self._lost[run_id] >= MAX_LOST:
                done.append((run_id, {"ok": False, "seconds": None, "message": f"its Ray worker was lost "
                                      f"{self._lost[run_id]} times (last on node {node}: {why})"}))
            elif self.stopping:
                done.append((run_id, not_started("its Ray worker was lost during the stop")))
            else:
                self._homeless.append(job)
                done.append((run_id, {"rescheduled": True, "message": f"its Ray worker on node {node} was lost "
                                      f"({why}); it continues from its last checkpoint on another worker"}))
        self._assigned[i] = []
        if self._spares > 0 and not self.stopping:  # Ray places it where resources are (maybe nowhere yet)
            self._spares -= 1
            self._check(self._add_actor())
        return done

    def _rehome(self) -> list[Completion]:
        """Jobs of lost workers to free slots; failed when no worker has been there for ORPHAN_WAIT s."""
        now = time.monotonic()
        for job in list(self._homeless):
            if self._not_before.get(job.run_id, 0.0) <= now and self._place(job):
                self._homeless.remove(job)
        if not self._homeless or any(s == "ready" for s in self._state):
            self._homeless_since = None
            return []
        if self._homeless_since is None:
            self._homeless_since = time.monotonic()
        if self.stopping or time.monotonic() - self._homeless_since > ORPHAN_WAIT:
            jobs, self._homeless = self._homeless, []
            if self.stopping:
                return [(job.run_id, not_started()) for job in jobs]
            return [(job.run_id, {"ok": False, "seconds": None, "message": f"no Ray worker was left to continue it "
                                  f"for {ORPHAN_WAIT:.0f} s; run the study again once the cluster has room (it "
                                  "resumes from its checkpoint)"}) for job in jobs]
        return []

    def wait(self, timeout: float) -> list[Completion]:
        self._answer_checks(0)
        done = self._rehome()
        for i, state in enumerate(self._state):  # a poll not answered yet stays outstanding: its answer holds results
            if state == "ready" and self._assigned[i] and i not in self._polls.values():
                self._polls[self._actors[i].poll.remote()] = i
        if self._polls:
            ready, _ = self._ray.wait(list(self._polls), num_returns=len(self._polls), timeout=timeout)
        else:
            ready = []
        for ref in ready:
            i = self._polls.pop(ref)
            try:
                completions, progress = self._ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the actor's process died, or its node
                done += self._lose(i, _last_line(e))
                continue
            for run_id, outcome in completions:
                if run_id in self._assigned[i]:
                    self._assigned[i].remove(run_id)
                job = self._jobs.pop(run_id, None)
                if outcome.get("in_use") and run_id in self._lost and job is not None:
                    outcome = self._still_locked(job, outcome)
                    if outcome.get("rescheduled") is not None:
                        if outcome["rescheduled"]:
                            done.append((run_id, outcome))
                        continue
                done.append((run_id, outcome))
            if progress:
                self._progress[i] = progress
            else:
                self._progress.pop(i, None)
        if not done:
            time.sleep(min(timeout, 0.2))
        return done

    def _still_locked(self, job: Job, outcome: Outcome) -> Outcome:
        """A run moved off a lost worker and refused because its folder is locked: on one machine the
        lock died with the worker, but NFS keeps a dead client's lock until its lease expires. Tried
        again every LOCK_RETRY s (``rescheduled``: True the first time, to be said; False after),
        failed after LOCK_WAIT s (or on a stop)."""
        now = time.monotonic()
        first = self._held_since.setdefault(job.run_id, now)
        if self.stopping:
            return not_started()
        if now - first > LOCK_WAIT:
            return {**outcome, "message": f"{outcome['message']} (still {now - first:.0f} s after its worker was lost; "
                                          "on NFS the lock of a dead node is freed when its lease expires: run the "
                                          "study again then)"}
        self._homeless.append(job)
        self._not_before[job.run_id] = now + LOCK_RETRY
        return {"rescheduled": now == first, "message": "its run folder is still locked by the process of its lost "
                f"worker (NFS frees a dead node's lock when its lease expires); tried again every {LOCK_RETRY:.0f} s "
                f"for up to {LOCK_WAIT:.0f} s"}

    def in_flight(self) -> int:
        return sum(len(a) for a in self._assigned) + len(self._homeless)

    def stop(self, reason: str) -> None:
        self.stopping = reason
        for a, s in zip(self._actors, self._state):
            if s != "dead":
                a.stop.remote(reason)

    def progress(self) -> list[dict[str, Any]]:
        return [self._progress[i] for i in sorted(self._progress)]

    def shutdown(self, terminate: bool = False) -> None:
        for a in self._actors:
            self._ray.kill(a)
        # every handle and reference of this Ray session dropped while it runs: after its shutdown they
        # would be released into the next session of this process, whose ids repeat this one's
        self._actors, self._state, self._node, self._assigned = [], [], [], []
        self._polls, self._checks, self._jobs, self._homeless, self._progress = {}, {}, {}, [], {}
        self._actor = None
        if self._owns:
            self._ray.shutdown()
            if self._temp_dir is not None:
                shutil.rmtree(self._temp_dir, ignore_errors=True)


class InProcessExecutor:
    """One pack of up to ``slots`` runs in this process, stepped while the study waits for it: the
    same :class:`PackWorker` as every worker process, without the processes (tests, debugging)."""

    kind = "inline"

    def __init__(self, slots: int = 1, control: StopControl | None = None):
        self.worker = PackWorker(slots, control)
        self.slots = slots
        self._jobs = 0
        self.description = f"in this process, a pack of up to {slots} run(s)"

    def attach(self, out: str | os.PathLike, study_id: str) -> None:
        pass

    def capacity(self) -> int:
        return 0 if self.worker.control.reason is not None else self.slots - self._jobs

    def submit(self, job: Job) -> None:
        self.worker.submit(job)
        self._jobs += 1

    def wait(self, timeout: float) -> list[Completion]:
        done: list[Completion] = []
        while self.worker.busy and not done:
            done = self.worker.work()
        self._jobs -= len(done)
        return done

    def stop(self, reason: str) -> None:
        self.worker.control.request(reason)

    def progress(self) -> list[dict[str, Any]]:
        return [self.worker.progress()] if self.worker.live_runs() else []

    def shutdown(self, terminate: bool = False) -> None:
        pass  # nothing runs between calls: a run stopped mid-way resumes from its last checkpoint


def make_executor(kind: str = "local", workers: int | None = None, runs_per_gpu: int | None = None,
                  address: str | None = None, use_gpu: bool = True, threads: int | None = None,
                  pack: int | None = None, time_limit: float | None = None, deadline: float | None = None,
                  lock_dir: str | None = None):
    if kind == "local":
        if address:
            raise MixkdError("--address is for --executor ray")
        return LocalExecutor(workers, runs_per_gpu, use_gpu, threads, pack, time_limit, deadline, lock_dir)
    if kind == "ray":
        return RayExecutor(address, workers, runs_per_gpu, use_gpu, threads, pack, time_limit, deadline)
    raise MixkdError(f"unknown executor '{kind}'; use local or ray")
