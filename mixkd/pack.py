"""A pack: up to K runs in one process, stepped in turn, each on its own CUDA stream.

One batch-64 run leaves most of a large GPU idle, and separate processes only time-slice it. In one
process, each run's step (a CUDA graph replay) is queued on the run's own stream, so the small
kernels of different runs overlap. On the CPU the same code runs without streams, one step of each
run in turn: that is how the tests show that a packed run computes exactly what it computes alone.
Each run draws from torch's global generators (CPU, and the device's on CUDA: dropout, a model's
stochastic depth, what its checkpoint saves) as if it ran alone: the pack keeps each run's generator
states and puts them in place around every call into the run (:meth:`Pack._own_rng`).

A job is anything with the :class:`mixkd.engine.Run` protocol: ``start()``, ``advance() -> bool``,
``stop(reason)``, ``fail()``, ``next_cost()``, ``checkpoint_cost()``, ``phase``, ``device``, ``created``,
``result``, ``epoch``, ``step_in_epoch`` and ``batch_size``.
A job that raises stops alone; its slot is free for the next job at once.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from mixkd.control import STOP_WORDS
from mixkd.errors import MixkdError


def failure_message(e: BaseException) -> str:
    """One line for a failed run."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"out of memory on the GPU ({first[:160]}); use a smaller --pack or batch size"
    lines = str(e).strip().splitlines() or [""]
    return lines[0] if isinstance(e, MixkdError) else f"{type(e).__name__}: {lines[0]}"


class Pack:
    """Up to ``slots`` jobs on ``device``; :meth:`round` advances each live job by one action."""

    def __init__(self, device: torch.device | str, slots: int):
        if slots < 1:
            raise MixkdError(f"a pack needs at least one slot, got {slots}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.jobs: list[Any] = [None] * slots
        self.streams = [torch.cuda.Stream(self.device) if self.cuda else None for _ in range(slots)]
        self.images: list[int] = [0] * slots  # training images of the current timing window, per slot
        self.rng: list[tuple | None] = [None] * slots  # each run's global generator states between its calls
        self._window = time.perf_counter()

    @property
    def slots(self) -> int:
        return len(self.jobs)

    @property
    def live(self) -> list[Any]:
        return [j for j in self.jobs if j is not None]

    def free(self) -> int:
        return sum(j is None for j in self.jobs)

    def _stream(self, i: int):
        s = self.streams[i]
        return torch.cuda.stream(s) if s is not None else contextlib.nullcontext()

    def _rng_state(self) -> tuple:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.cuda else None

    def _set_rng_state(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    @contextlib.contextmanager
    def _own_rng(self, i: int):
        """Slot ``i``'s run with its own global generator states (a new run: the process's, as alone),
        on its stream; afterwards the run's states are kept and the process's put back."""
        outside = self._rng_state()
        if self.rng[i] is not None:
            self._set_rng_state(self.rng[i])
        try:
            with self._stream(i):
                yield
        finally:
            self.rng[i] = self._rng_state()
            self._set_rng_state(outside)

    def admit(self, job) -> dict[str, Any] | None:
        """Start ``job`` in a free slot. Returns None, or the outcome of a job that ended at once
        (finished already, or failed to start; ``error`` holds the exception)."""
        i = self.jobs.index(None)
        self.rng[i] = None
        try:
            with self._own_rng(i):
                job.start()
            if self.cuda:
                torch.cuda.synchronize(self.device)  # its tensors (and shared data) are ready for every stream
        except Exception as e:  # noqa: BLE001 - reported as this job's outcome
            job.fail()
            return {"ok": False, "message": failure_message(e), "error": e}
        if job.phase != "training":
            return self._outcome(job)
        self.jobs[i] = job
        return None

    def measure(self, job) -> dict[str, Any] | None:
        """Time one step of the live ``job`` (its ``measure_step()``, for a deadline's budget), leaving it
        exactly as it was. The step and the restore of its state are queued on the job's own stream, and
        the device is synchronized before the pack goes on, so no other stream sees a half-restored run.
        Returns None, or the outcome of a job that failed doing so (it stops alone; its slot is free)."""
        i = self.jobs.index(job)
        try:
            with self._own_rng(i):
                job.measure_step()
            if self.cuda:
                torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 - reported as this job's outcome
            job.fail()
            self._release(i)
            return {"ok": False, "message": failure_message(e), "error": e}
        return None

    def next_cost(self) -> float:
        """Estimated seconds of the next round (an upper bound: streams overlap)."""
        return sum(j.next_cost() for j in self.live)

    def checkpoint_cost(self) -> float:
        return sum(j.checkpoint_cost() for j in self.live)

    def round(self) -> list[tuple[Any, dict[str, Any]]]:
        """Advance every live job once, each on its stream; returns (job, outcome) of jobs that ended."""
        ended = []
        for i, job in enumerate(self.jobs):
            if job is None:
                continue
            before = job.step_in_epoch
            try:
                with self._own_rng(i):
                    alive = job.advance()
            except Exception as e:  # noqa: BLE001 - one failed run stops alone
                job.fail()
                ended.append((job, {"ok": False, "message": failure_message(e), "error": e}))
                self._release(i)
                continue
            if job.step_in_epoch > before:
                self.images[i] += job.batch_size
            if not alive:
                ended.append((job, self._outcome(job)))
                self._release(i)
        return ended

    def _release(self, i: int) -> None:
        self.jobs[i] = None
        self.images[i] = 0
        self.rng[i] = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    @staticmethod
    def _outcome(job) -> dict[str, Any]:
        if job.phase == "finished":
            return {"ok": True, "top1": job.result["top1"]}
        return {"ok": False, "stopped": job.phase == "stopped", "message": f"ended as {job.phase}"}

    def stop_all(self, reason: str) -> list[tuple[Any, dict[str, Any]]]:
        """Every live job writes a step-exact checkpoint and leaves its slot."""
        stopped = []
        for i, job in enumerate(self.jobs):
            if job is None:
                continue
            begun = job.created
            try:
                with self._own_rng(i):
                    job.stop(reason)
            except Exception as e:  # noqa: BLE001 - its checkpoint failed (a full disk): it ends alone
                job.fail()
                stopped.append((job, {"ok": False, "message": failure_message(e), "error": e}))
                self.jobs[i] = None
                continue
            stopped.append((job, {"ok": False, "stopped": True, "reason": reason, "not_started": not begun,
                                  "message": f"{STOP_WORDS.get(reason, reason)} at epoch {job.epoch + 1} "
                                             f"step {job.step_in_epoch}"}))
            self.jobs[i] = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return stopped

    def throughput(self) -> tuple[list[float], float]:
        """(images/s of each slot, summed images/s) since the last call."""
        now = time.perf_counter()
        dt = max(now - self._window, 1e-9)
        per_slot = [n / dt for n in self.images]
        self.images = [0] * len(self.images)
        self._window = now
        return per_slot, sum(per_slot)
