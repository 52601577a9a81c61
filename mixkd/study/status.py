"""``mixkd study status DIR``: where a study folder stands, read from the folder alone.

One line per run (done with its top-1; running; stopped on time at epoch e step s; interrupted
(killed) at its last checkpoint; failed with its one-line reason; blocked by a failed teacher;
waiting for its teacher; pending), then the totals and the compute left, estimated from the
throughput measured by the folder's finished runs (:func:`mixkd.study.plan.estimate_seconds`).
The plan comes from the folder's own ``study.yaml`` and the ``--set`` overrides that
``study-state.json`` recorded; a run's position comes from its checkpoint's metadata (the
safetensors header only, not the weights).

:func:`check_folder` says whether this mixkd can continue a study folder (its ``study-state.json``
format) before anything in it is changed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixkd import __version__
from mixkd.checkpoint import CHECKPOINT_NAME
from mixkd.config import RunConfig
from mixkd.errors import MixkdError
from mixkd.study.plan import H100_SOURCE, TRAIN_IMAGES, compute_line, estimate_seconds, h100_rates, measurements
from mixkd.study.runner import LOCK_NAME, STATE_NAME, STUDY_COPY, analysis_status, check_run, run_status
from mixkd.study.spec import FOLDER_FORMAT, PlannedRun, Study, load_study
from mixkd.study.worker import ERROR_NAME

STOP_REASONS = {"time": "stopped on time", "signal": "stopped by a signal", "interrupt": "stopped by Ctrl-C"}
TOTALS = ("done", "running", "stopped", "failed", "blocked", "waiting", "pending")


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
    fmt = state.get("format", FOLDER_FORMAT)  # folders written before the format was recorded: this layout
    if fmt != FOLDER_FORMAT:
        raise MixkdError(f"{out} is a study folder of another mixkd version ({state.get('mixkd_version', 'unknown')}, "
                         f"format {fmt!r}); this mixkd ({__version__}) reads {FOLDER_FORMAT!r}: continue it with the "
                         "mixkd that wrote it, or use another --out")
    return state


def checkpoint_position(run_dir: Path) -> dict[str, Any] | None:
    """The ``mixkd`` metadata of a run's checkpoint (epoch, step, stopped, ...), read from the file's
    header without loading the weights; None where there is no readable checkpoint."""
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("mixkd", "{}"))
    except Exception:  # noqa: BLE001 - a damaged file is reported as no position; the run finds out when it loads
        return None
    return meta if isinstance(meta, dict) else None


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


def _study_pid(out: Path) -> int | None:
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


@dataclass
class RunState:
    run: PlannedRun
    kind: str  # one of TOTALS
    text: str  # what the line says
    done_fraction: float = 0.0  # share of its training done (from its checkpoint)


def _position(meta: dict[str, Any], epochs: int) -> str:
    epoch, step = int(meta.get("epoch", 0)), int(meta.get("step", 0))
    return f"at epoch {epoch + 1}/{epochs} step {step}" if step else f"after epoch {epoch}/{epochs}"


def _fraction(meta: dict[str, Any] | None, epochs: int, steps_per_epoch: float | None) -> float:
    if not meta or not epochs:
        return 0.0
    step = int(meta.get("step", 0)) / steps_per_epoch if steps_per_epoch else 0.0
    return min(1.0, (int(meta.get("epoch", 0)) + min(step, 1.0)) / epochs)


def _first_line(path: Path) -> str:
    try:
        return (path.read_text().splitlines() or [""])[0]
    except OSError:
        return ""


def _result_top1(run_dir: Path) -> str:
    try:
        return f"top-1 {float(json.loads((run_dir / 'result.json').read_text())['top1']):.2f}%"
    except (OSError, ValueError, KeyError, TypeError):
        return "result.json unreadable"


def run_states(study: Study, out: Path, state: dict[str, Any] | None, live: bool,
               check_settings: bool = True) -> list[RunState]:
    """Each planned run's state in folder ``out`` (teachers first, as planned)."""
    measured_images = measurements(out)[1]  # training images per epoch, per dataset
    recorded = (state or {}).get("runs", {})
    kinds: dict[str, str] = {}
    states = []
    for run in study.runs:
        d = out / run.id
        entry = recorded.get(run.id, {})
        epochs = int(run.config.get("epochs") or RunConfig.model_fields["epochs"].default)
        status, problem = check_run(run, out) if check_settings else (run_status(out, run.id), None)
        meta = checkpoint_position(d) if status == "started" else None
        dataset = run.config.get("dataset", RunConfig.model_fields["dataset"].default)
        images = measured_images.get(dataset, TRAIN_IMAGES.get(dataset))
        steps = int(images) // int(run.config.get("batch_size") or RunConfig.model_fields["batch_size"].default) if images else None
        teacher = kinds.get(run.teacher_run) if run.teacher_run else None
        if status == "done":
            rs = RunState(run, "done", f"done: {_result_top1(d)}", 1.0)
            if run.analysis is not None:
                a = analysis_status(out, run.id)
                rs.text += {"done": ", analyzed", "new": ", analysis to do"}.get(
                    a, f", analysis failed: {_first_line(d / 'analysis-error.txt')}")
        elif status == "mismatch":
            rs = RunState(run, "failed", f"failed: {problem}")
        elif status == "failed":
            rs = RunState(run, "failed", f"failed: {_first_line(d / ERROR_NAME)}")
        elif status == "started" and live and entry.get("status") == "running":
            rs = RunState(run, "running", "running" + (f", {_position(meta, epochs)}" if meta else ", no checkpoint yet"),
                          _fraction(meta, epochs, steps))
        elif status == "started" and meta:
            reason = meta.get("stopped") or ("time" if entry.get("status") == "stopped" else None)
            what = STOP_REASONS.get(reason, f"stopped ({reason})") if reason else "interrupted"
            rs = RunState(run, "stopped", f"{what} {_position(meta, epochs)}; resumes there",
                          _fraction(meta, epochs, steps))
        elif status == "started":
            rs = RunState(run, "stopped", "interrupted before its first checkpoint; starts again")
        elif teacher in ("failed", "blocked") or entry.get("status") == "blocked":
            rs = RunState(run, "blocked", f"blocked: its teacher {run.teacher_run} did not finish")
        elif run.teacher_run and teacher != "done":
            rs = RunState(run, "waiting", f"waiting for its teacher {run.teacher_run}")
        else:
            rs = RunState(run, "pending", "pending")
        kinds[run.id] = rs.kind
        states.append(rs)
    return states


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
    study = load_study(out / STUDY_COPY, (state or {}).get("overrides"), check_files=False)
    return study, state


def format_status(out: str | Path) -> str:
    """The text of ``mixkd study status``."""
    out = Path(out)
    study, state = load_folder(out)
    pid = _study_pid(out)
    # without recorded overrides (folders of older versions) the plan may differ from the runs on
    # purpose (--set epochs=...): then a run's settings are not compared with the plan
    states = run_states(study, out, state, pid is not None, check_settings=state is None or "overrides" in state)
    width = max(len(s.run.id) for s in states)
    now = f"being run by 'mixkd study run' (pid {pid})" if pid else "not being run now"
    lines = [f"study {study.name} in {out}: {len(states)} runs, {now}", ""]
    lines += [f"  {s.run.id:<{width}}  {s.text}" for s in states]
    counts = {k: sum(s.kind == k for s in states) for k in TOTALS}
    lines += ["", f"{len(states)} runs: " + ", ".join(f"{n} {k}" for k, n in counts.items())]
    todo = [s for s in states if s.kind != "done"]
    if not todo:
        lines.append("every run is finished; write the report with: mixkd study report " + str(out))
        return "\n".join(lines)
    estimates, devices = estimate_seconds([s.run for s in todo], out)
    known = [estimates[s.run.id] * (1 - s.done_fraction) for s in todo if estimates.get(s.run.id) is not None]
    h100 = _h100_left([s for s in todo if estimates.get(s.run.id) is None], out)
    lines.append(compute_line("estimated compute left for", len(todo), known, devices, out))
    if h100:
        lines.append(f"H100 estimate from measured figures for {len(h100)} of the runs not measured here, one run "
                     f"at a time: {sum(h100) / 3600:.2f} GPU-hours ({H100_SOURCE}; training only)")
    return "\n".join(lines)


def _h100_left(states: list[RunState], out: Path) -> list[float]:
    """Seconds left on one H100 of the runs whose recipe was measured there (plan.H100_MEASURED)."""
    left = []
    for s in states:
        cfg = RunConfig.model_validate(s.run.config_for(out)).model_dump()
        rates = h100_rates(cfg, s.run.teacher_model)
        if rates:
            left.append(cfg["epochs"] * TRAIN_IMAGES["cifar100"] / rates[1] * (1 - s.done_fraction))
    return left
