"""When to stop: a wall-clock limit and the signals of schedulers and users.

``--time-limit`` (``90s``, ``25m``, ``1:30:00``) counts from the start of the process, on the monotonic
clock (a wall clock set back or forward, by NTP or by hand, changes nothing). Before every
step the driver asks :meth:`StopControl.should_stop` whether the next action, a step-exact checkpoint
of every live run and the process's exit still fit before the limit; when they do not, every run
writes its checkpoint and the process exits with :data:`EXIT_STOPPED` ("stopped on time, resumable").
SIGTERM and SIGUSR1 (what SLURM's ``--signal`` and spot-instance reclaims send) do the same at the
next step; SIGINT (Ctrl-C) stops the same way but exits with 130; a second Ctrl-C stops at once. A
run that has finished exits 0 whatever arrives after (:meth:`StopControl.settle`).

Those signals are heard from the program's first line: the entry point (:mod:`mixkd.__main__`)
calls :func:`catch_early_stops` before anything heavy is imported, and a :class:`StopControl` adopts
a stop that came before it existed (:meth:`StopControl.install_signals`). A command that never stops
gracefully (eval, models, ...) gets the signals' defaults back (:func:`release_early_stops`), and a
stop heard meanwhile then acts as it would have.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable

from mixkd.errors import MixkdError

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on time or by SIGTERM/SIGUSR1; run the same command again to continue
EXIT_INTERRUPTED = 130
# How a stop reads in logs, per-run lines and status, by its reason.
STOP_WORDS = {"time": "stopped on time", "signal": "stopped by a signal", "interrupt": "stopped by Ctrl-C",
              "storage": "stopped: a write failed (full disk or read-only)"}
# Stop reasons as numbers, for the ranks of a data-parallel run to agree on (their maximum wins: Ctrl-C over a signal over time).
STOP_CODES = {None: 0, "time": 1, "signal": 2, "interrupt": 3}
STOP_REASONS = {code: reason for reason, code in STOP_CODES.items()}

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_early: dict[str, object] = {"installed": False, "pending": []}  # signals heard before a StopControl existed


def _record_early(signum, frame) -> None:
    pending = _early["pending"]
    if signum == signal.SIGINT and signal.SIGINT in pending:  # a second Ctrl-C: at once
        raise KeyboardInterrupt
    pending.append(signum)


def catch_early_stops() -> None:
    """Record SIGTERM, SIGUSR1 and SIGINT from now on, until a :class:`StopControl` adopts them (or
    :func:`release_early_stops`). Stdlib only: the entry point calls it before importing torch."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _record_early)
    _early["installed"] = True


def release_early_stops() -> None:
    """The signals' defaults back (for commands that never stop gracefully); a stop heard meanwhile
    acts now: Ctrl-C raises KeyboardInterrupt, SIGTERM/SIGUSR1 end the process as they would have."""
    if not _early["installed"]:
        return
    _early["installed"] = False
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    pending, _early["pending"] = _early["pending"], []
    if signal.SIGINT in pending:
        raise KeyboardInterrupt
    for sig in pending:
        os.kill(os.getpid(), sig)


def parse_duration(text: str, flag: str = "--time-limit") -> float:
    """Seconds in ``90``, ``90s``, ``25m``, ``1.5h``, ``1h30m``, ``1:30:00`` or ``30:00``; must be positive."""
    raw = str(text).strip().lower()
    seconds: float | None = None
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        seconds = float(raw)
    elif re.fullmatch(r"(\d+(\.\d+)?[smhd])+", raw):
        seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd])", raw))
    elif re.fullmatch(r"\d+(:\d{1,2}){1,2}(\.\d+)?", raw):
        parts = [float(p) for p in raw.split(":")]
        if any(p >= 60 for p in parts[1:]):
            raise MixkdError(f"{flag} {text!r}: minutes and seconds must be below 60")
        seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    elif re.fullmatch(r"-\s*\d.*", raw):
        raise MixkdError(f"{flag} {text!r}: the limit must be positive")
    if seconds is None:
        raise MixkdError(f"{flag} {text!r} is not a duration: write e.g. 90s, 25m, 2h, 1h30m or 1:30:00")
    if seconds <= 0:
        raise MixkdError(f"{flag} {text!r}: the limit must be positive")
    return seconds


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def wall_to_monotonic(wall: float) -> float:
    """A ``time.time()`` instant (sent to another machine, whose monotonic clock differs) as an
    instant of this machine's ``time.monotonic()``."""
    return time.monotonic() + (wall - time.time())


class StopControl:
    """The deadline (a ``time.monotonic()`` instant, or None) and stop requests from signals.

    ``deadline`` is shared as it is with processes of the same machine (one monotonic clock); a
    process on another machine gets :meth:`wall_deadline` and converts it with :func:`wall_to_monotonic`."""

    def __init__(self, time_limit: float | None = None, deadline: float | None = None):
        self.limit = time_limit
        if deadline is None and time_limit is not None:
            deadline = time.monotonic() - process_age() + time_limit
        self.deadline = deadline
        # Reserved for leaving the process (closing files, the interpreter's exit) after the last checkpoint.
        self.exit_margin = 0.0 if deadline is None else min(5.0, 0.5 + 0.02 * (time_limit or 60.0))
        self.reason: str | None = None  # "time", "signal" or "interrupt" once a stop is due
        self._interrupts = 0
        self._installed: dict[int, object] = {}

    # ---- deadline --------------------------------------------------------------------------
    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def wall_deadline(self) -> float | None:
        """The deadline as a ``time.time()`` instant, for a process on another machine."""
        return None if self.deadline is None else time.time() + self.remaining()

    def inner_deadline(self) -> float | None:
        """The deadline of the processes this one waits for (a study's workers): earlier by what this
        process needs after they stop (collecting their outcomes, saving the state, its own exit)."""
        if self.deadline is None:
            return None
        return self.deadline - min(10.0, 1.0 + 0.02 * (self.limit or 60.0))

    def fits(self, seconds: float) -> bool:
        """Whether ``seconds`` of work, then leaving the process, end before the deadline."""
        return seconds + self.exit_margin < self.remaining()

    def should_stop(self, next_cost: float | Callable[[], float] = 0.0) -> bool:
        """True once a stop was requested, or when ``next_cost`` seconds (a function, called only when
        there is a deadline: costs are measured lazily) no longer fit before the deadline."""
        if self.reason is None and self.deadline is not None:
            if not self.fits(next_cost() if callable(next_cost) else next_cost):
                self.reason = "time"
        return self.reason is not None

    def request(self, reason: str) -> None:
        if self.reason is None or reason == "interrupt":
            self.reason = reason

    @property
    def exit_status(self) -> int:
        return EXIT_INTERRUPTED if self.reason == "interrupt" else EXIT_STOPPED

    # ---- signals ---------------------------------------------------------------------------
    def install_signals(self, interrupt: bool = True, same_interrupt_within: float = 0.0) -> None:
        """SIGTERM/SIGUSR1 request a stop at the next step; with ``interrupt`` the first SIGINT too
        (the second raises KeyboardInterrupt at once, unless it comes within ``same_interrupt_within``
        seconds of the first: torchrun passes the terminal's Ctrl-C on to workers that got it already).
        Main thread only."""
        first_interrupt: list[float] = []

        def on_term(signum, frame):
            self.request("signal")

        def on_int(signum, frame):
            now = time.monotonic()
            if first_interrupt and now - first_interrupt[0] < same_interrupt_within:
                return
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
            first_interrupt.append(now)
            self.request("interrupt")

        handlers = {signal.SIGTERM: on_term, signal.SIGUSR1: on_term}
        if interrupt:
            handlers[signal.SIGINT] = on_int
        for sig, handler in handlers.items():
            self._installed[sig] = signal.signal(sig, handler)
        # A stop that came before this control existed (see catch_early_stops) is this control's now.
        adopted = [sig for sig in _early["pending"] if sig in handlers]
        _early["pending"] = [sig for sig in _early["pending"] if sig not in handlers]
        for sig in adopted:  # as if it came now (one Ctrl-C at most: a second one raised already)
            handlers[sig](sig, None)

    def restore_signals(self) -> None:
        for sig, previous in self._installed.items():
            signal.signal(sig, previous)
        self._installed.clear()

    @staticmethod
    def settle() -> None:
        """The work is done (a finished run): from now on SIGTERM, SIGUSR1 and Ctrl-C are ignored, so
        that the process exits 0 whatever arrives while it leaves. Ignoring (SIG_IGN) outlives the
        interpreter's teardown, which puts the default action back for the signals it handled."""
        _early["installed"], _early["pending"] = False, []
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def check_first_step(job, control: StopControl) -> None:
    """Refuse a time limit that cannot fit one step of ``job`` (a :class:`mixkd.engine.Run`) and its
    checkpoint, before anything is written."""
    step = job.measure_step()
    need = step + job.checkpoint_cost()
    if not control.fits(need):
        limit = format_seconds(control.limit) if control.limit else "the time limit"
        raise MixkdError(
            f"--time-limit {limit} is too short to take even one step: starting took "
            f"{format_seconds(control.limit - control.remaining()) if control.limit else '?'}, one step takes about "
            f"{format_seconds(step)} and its checkpoint {format_seconds(job.checkpoint_cost())}; "
            f"give at least {format_seconds((control.limit or 0) - control.remaining() + need + control.exit_margin + 1)}")
