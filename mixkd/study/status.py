"""``mixkd study status DIR``: where a study folder stands, read from the folder alone.

One line per run (done with its top-1; running; stopped on time at epoch e step s; interrupted
(killed) at its last checkpoint; failed with its one-line reason; blocked by a failed teacher;
waiting for its teacher; pending), then the totals and the compute left, estimated from the
throughput measured by the folder's finished runs (:func:`mixkd.study.plan.estimate_seconds`).
The plan comes from the folder's own ``study.yaml`` and the ``--set`` overrides that
``study-state.json`` recorded; a run's position comes from its checkpoint's metadata (the
safetensors header only, not the weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixkd.control import STOP_WORDS
from mixkd.errors import MixkdError
from mixkd.run_folder import RunFolder
from mixkd.study.folder import (
    RunState,
    analysis_status,
    check_run,
    load_folder,
    run_status,
    study_pid,
)
from mixkd.study.plan import (
    H100_SOURCE,
    TRAIN_IMAGES,
    compute_line,
    estimate_seconds,
    finished_line,
    h100_rates,
    measurements,
)
from mixkd.study.spec import PlannedRun, Study

STOP_REASONS = STOP_WORDS
# The totals line of ``mixkd study status``, in this order.
TOTALS = (RunState.DONE, RunState.RUNNING, RunState.STOPPED, RunState.FAILED, RunState.BLOCKED, RunState.WAITING,
          RunState.PENDING)


def checkpoint_position(run_dir: Path) -> dict[str, Any] | None:
    """The ``mixkd`` metadata of a run's checkpoint (epoch, step, stopped, ...), read from the file's
    header without loading the weights; None where there is no readable checkpoint."""
    return RunFolder(run_dir).checkpoint_meta()


@dataclass
class RunLine:
    run: PlannedRun
    kind: RunState
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


def _result_top1(run_dir: Path) -> str:
    folder = RunFolder(run_dir)
    try:
        return f"top-1 {float((folder.read_result() or {})['top1']):.2f}%"
    except (MixkdError, OSError, ValueError, KeyError, TypeError):
        return f"{folder.result.name} unreadable"


def run_states(study: Study, out: Path, state: dict[str, Any] | None, live: bool,
               check_settings: bool = True) -> list[RunLine]:
    """Each planned run's state in folder ``out`` (teachers first, as planned)."""
    measured_images = measurements(out)[1]  # training images per epoch, per dataset
    recorded = (state or {}).get("runs", {})
    kinds: dict[str, RunState] = {}
    states = []
    for run in study.runs:
        d = out / run.id
        folder = RunFolder(d)
        entry = recorded.get(run.id, {})
        epochs = run.config.epochs
        status, problem = check_run(run, out) if check_settings else (run_status(out, run.id), None)
        meta = checkpoint_position(d) if status == "started" and not problem else None
        images = measured_images.get(run.config.dataset, TRAIN_IMAGES.get(run.config.dataset))
        steps = int(images) // run.config.batch_size if images else None
        teacher = kinds.get(run.teacher_run) if run.teacher_run else None
        if problem:
            rs = RunLine(run, RunState.FAILED, f"failed: {problem}")
        elif status == "done":
            rs = RunLine(run, RunState.DONE, f"done: {_result_top1(d)}", 1.0)
            if run.analysis is not None:
                a = analysis_status(out, run.id)
                rs.text += {"done": ", analyzed", "new": ", analysis to do"}.get(
                    a, f", analysis failed: {folder.first_line(folder.analysis_error)}")
        elif status == "failed":
            rs = RunLine(run, RunState.FAILED, f"failed: {folder.first_line(folder.error)}")
        elif status == "started" and live and entry.get("status") == RunState.RUNNING:
            rs = RunLine(run, RunState.RUNNING, "running" + (f", {_position(meta, epochs)}" if meta
                                                             else ", no checkpoint yet"),
                         _fraction(meta, epochs, steps))
        elif status == "started" and meta:
            reason = meta.get("stopped") or ("time" if entry.get("status") == RunState.STOPPED else None)
            what = STOP_REASONS.get(reason, f"stopped ({reason})") if reason else "interrupted"
            rs = RunLine(run, RunState.STOPPED, f"{what} {_position(meta, epochs)}; resumes there",
                         _fraction(meta, epochs, steps))
        elif status == "started":
            rs = RunLine(run, RunState.STOPPED, "interrupted before its first checkpoint; starts again")
        elif teacher in (RunState.FAILED, RunState.BLOCKED) or entry.get("status") == RunState.BLOCKED:
            rs = RunLine(run, RunState.BLOCKED, f"blocked: its teacher {run.teacher_run} did not finish")
        elif run.teacher_run and teacher != RunState.DONE:
            rs = RunLine(run, RunState.WAITING, f"waiting for its teacher {run.teacher_run}")
        else:
            rs = RunLine(run, RunState.PENDING, "pending")
        kinds[run.id] = rs.kind
        states.append(rs)
    return states


def format_status(out: str | Path) -> str:
    """The text of ``mixkd study status``."""
    out = Path(out)
    study, state = load_folder(out)
    pid = study_pid(out)
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
        lines.append(finished_line(out))
        return "\n".join(lines)
    estimates, devices = estimate_seconds([s.run for s in todo], out)
    known = [estimates[s.run.id] * (1 - s.done_fraction) for s in todo if estimates.get(s.run.id) is not None]
    h100 = _h100_left([s for s in todo if estimates.get(s.run.id) is None], out)
    lines.append(compute_line("estimated compute left for", len(todo), known, devices, out))
    if h100:
        lines.append(f"H100 estimate from measured figures for {len(h100)} of the runs not measured here, one run "
                     f"at a time: {sum(h100) / 3600:.2f} GPU-hours ({H100_SOURCE}; training only)")
    return "\n".join(lines)


def _h100_left(states: list[RunLine], out: Path) -> list[float]:
    """Seconds left on one H100 of the runs whose recipe was measured there (plan.H100_MEASURED)."""
    left = []
    for s in states:
        cfg = s.run.config.model_dump()
        rates = h100_rates(cfg, s.run.teacher_model)
        if rates:
            left.append(cfg["epochs"] * TRAIN_IMAGES["cifar100"] / rates[1] * (1 - s.done_fraction))
    return left
