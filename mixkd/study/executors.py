"""Where the runs of a study execute: local worker processes, or tasks on a Ray cluster.

An executor takes runs (``submit``) while it has ``capacity()``, reports finished ones (``wait``)
as ``(run id, outcome)`` pairs, outcome as returned by :func:`mixkd.study.worker.execute_run`,
and stops (``shutdown``), killing what still runs when told to. ``submit(..., analysis=options)``
is the analysis of a finished run (a job of its own, so that students need not wait for their
teacher's analysis).

* ``LocalExecutor``: N long-lived worker processes (spawned, so each imports torch once). With
  GPUs, worker i sees GPU i mod G alone through ``CUDA_VISIBLE_DEVICES``, and the default N is
  G x runs-per-GPU; on the CPU the cores are split evenly between the workers.
* ``RayExecutor``: each run is a Ray task asking for ``1 / runs-per-GPU`` of a GPU (none on a
  CPU-only cluster). Tasks write to the study folder by its path, so the folder must be on storage
  every node mounts at the same path (NFS, a shared volume, ...), and mixkd must be installed on
  every node.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
from typing import Any

from mixkd.errors import MixkdError

Completion = tuple[str, dict[str, Any]]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _local_worker(env: dict[str, str], threads: int, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    os.environ.update(env)
    import torch

    torch.set_num_threads(threads)
    from mixkd.study.worker import execute_run

    while (item := tasks.get()) is not None:
        run_id, config, run_dir, analysis = item
        results.put((run_id, execute_run(config, run_dir, analysis)))


class LocalExecutor:
    kind = "local"

    def __init__(self, workers: int | None = None, runs_per_gpu: int = 1, use_gpu: bool = True):
        if runs_per_gpu < 1 or (workers is not None and workers < 1):
            raise MixkdError("--workers and --runs-per-gpu must be at least 1")
        self.gpus = gpus = visible_gpus() if use_gpu else []
        cores = os.cpu_count() or 1
        if gpus:
            n = workers or len(gpus) * runs_per_gpu
            envs = [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(n)]
            self.description = f"{n} local workers on {len(gpus)} GPU(s), up to {runs_per_gpu} run(s) per GPU"
        else:
            n = workers or min(cores, 4)
            envs = [{"CUDA_VISIBLE_DEVICES": ""} if use_gpu else {} for _ in range(n)]
            self.description = f"{n} local worker(s) on the CPU, {max(1, cores // n)} thread(s) each"
        self.threads = max(1, cores // n)
        for env in envs:
            env["OMP_NUM_THREADS"] = str(self.threads)
        self._ctx = mp.get_context("spawn")
        self._results = self._ctx.Queue()
        self._envs = envs
        self._procs: list[Any] = [None] * n
        self._tasks: list[Any] = [None] * n
        self._current: list[str | None] = [None] * n

    def _start(self, i: int) -> None:
        self._tasks[i] = self._ctx.Queue()
        self._procs[i] = self._ctx.Process(target=_local_worker, daemon=True, name=f"mixkd-study-worker-{i}",
                                           args=(self._envs[i], self.threads, self._tasks[i], self._results))
        self._procs[i].start()

    def capacity(self) -> int:
        return sum(1 for c in self._current if c is None)

    def submit(self, run_id: str, config: dict[str, Any], run_dir: str, analysis: dict[str, Any] | None = None) -> None:
        if self.gpus and str(config.get("device", "")).startswith("cuda:"):
            config = {**config, "device": "cuda"}  # each worker sees its one GPU as cuda:0
        i = self._current.index(None)
        if self._procs[i] is None or not self._procs[i].is_alive():
            self._start(i)
        self._current[i] = run_id
        self._tasks[i].put((run_id, config, run_dir, analysis))

    def wait(self, timeout: float) -> list[Completion]:
        done: list[Completion] = []
        try:
            done.append(self._results.get(timeout=timeout))
            while True:
                done.append(self._results.get_nowait())
        except queue.Empty:
            pass
        for run_id, _ in done:
            self._current[self._current.index(run_id)] = None
        for i, run_id in enumerate(self._current):  # a worker that died (killed, out of memory, crashed)
            if run_id is not None and not self._procs[i].is_alive():
                code = self._procs[i].exitcode
                done.append((run_id, {"ok": False, "seconds": None,
                                      "message": f"the worker process running it died (exit code {code})"}))
                self._current[i] = None
        return done

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
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        self._procs = [None] * len(self._procs)
        self._current = [None] * len(self._current)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]


def _ray_task(config: dict[str, Any], run_dir: str, analysis: dict[str, Any] | None = None) -> dict[str, Any]:
    from mixkd.study.worker import execute_run

    return execute_run(config, run_dir, analysis)


class RayExecutor:
    kind = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, runs_per_gpu: int = 1,
                 use_gpu: bool = True):
        try:
            import ray
        except ImportError:
            raise MixkdError("--executor ray needs Ray: pip install 'mixkd[ray]'") from None
        if runs_per_gpu < 1 or (workers is not None and workers < 1):
            raise MixkdError("--workers and --runs-per-gpu must be at least 1")
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            try:
                if address:
                    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
                else:
                    ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise MixkdError(f"cannot start or reach the Ray cluster at {address or 'this machine'}: "
                                 f"{str(e).splitlines()[0]}") from None
        gpus = ray.cluster_resources().get("GPU", 0) if use_gpu else 0
        share = 1 / runs_per_gpu if gpus else 0
        self._task = ray.remote(num_cpus=1, num_gpus=share, max_retries=0)(_ray_task)
        self._limit = workers or 1_000_000
        self._refs: dict[Any, str] = {}
        cpus = int(ray.cluster_resources().get("CPU", 0))
        self.description = (f"Ray cluster at {address or 'this machine'} ({cpus} CPUs, {gpus:g} GPUs), "
                            f"{f'{share:g} GPU' if share else 'no GPU'} per run")

    def capacity(self) -> int:
        return self._limit - len(self._refs)

    def submit(self, run_id: str, config: dict[str, Any], run_dir: str, analysis: dict[str, Any] | None = None) -> None:
        self._refs[self._task.remote(config, run_dir, analysis)] = run_id

    def wait(self, timeout: float) -> list[Completion]:
        if not self._refs:
            return []
        ready, _ = self._ray.wait(list(self._refs), num_returns=len(self._refs), timeout=timeout)
        done = []
        for ref in ready:
            run_id = self._refs.pop(ref)
            try:
                done.append((run_id, self._ray.get(ref)))
            except Exception as e:  # noqa: BLE001 - the task's process died, or Ray lost it
                line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                done.append((run_id, {"ok": False, "seconds": None, "message": f"Ray task failed: {line}"}))
        return done

    def shutdown(self, terminate: bool = False) -> None:
        if terminate:
            for ref in self._refs:
                self._ray.cancel(ref, force=True)
        self._refs.clear()
        if self._owns:
            self._ray.shutdown()


def make_executor(kind: str = "local", workers: int | None = None, runs_per_gpu: int = 1,
                  address: str | None = None, use_gpu: bool = True):
    if kind == "local":
        if address:
            raise MixkdError("--address is for --executor ray")
        return LocalExecutor(workers, runs_per_gpu, use_gpu)
    if kind == "ray":
        return RayExecutor(address, workers, runs_per_gpu, use_gpu)
    raise MixkdError(f"unknown executor '{kind}'; use local or ray")
