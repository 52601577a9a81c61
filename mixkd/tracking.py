"""Experiment tracking: a run (and a study) also logged to MLflow or Weights & Biases (``--track``).

Per run: every config key as a parameter, under the names ``key=value`` overrides use (``mix.fraction``,
``optim.lr``; the ``track`` keys themselves left out), one step per epoch of the metrics row
(``lr``, ``train_loss``, ``test_top1``, ``test_top5``, ``test_nll``, ``images_per_s``, ...), the final
result as ``result.<key>``, ``config.yaml``, ``result.json`` and the analysis (``analysis.json`` and its
PNGs) as artifacts, and tags for the task, model, dataset, teacher, method, mix and seed. A study is a
parent run (its artifacts: the report, ``results.csv``, ``claims.json`` and the figures) whose children
are its runs (W&B has no nesting: the children are grouped under the parent's id).

**One tracked run per run folder.** Its id is kept in the folder (``tracking.json``, with the last
epoch logged): a resumed or requeued run continues its own tracked run and logs only the epochs after
that one, so a step is never logged twice (a run that died between logging an epoch and its
checkpoint replays that epoch, step-exact, and the replay is not logged again).

**A tracker never costs the run**: a failure (server down, disk full, a package missing at run time)
is one warning line in the run's log, and the run goes on untracked. Only the process that writes the
run folder (rank 0) tracks. A missing package is caught before the run starts
(:func:`tracker_problem`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mixkd.config import RunConfig, TrackConfig
from mixkd.files import atomic_write_text

STATE_NAME = "tracking.json"  # in a run folder, or a study folder (the parent run)
_PACKAGES = {"mlflow": ("mlflow", "MLflow", "mixkd[mlflow]"), "wandb": ("wandb", "W&B", "mixkd[wandb]")}

__all__ = ["STATE_NAME", "Tracker", "flat_params", "log_files", "study_parent", "tracker_problem"]


def tracker_problem(backend: str) -> str | None:
    """Why ``backend`` cannot track here (its package is not installed), or None."""
    if backend not in _PACKAGES:
        return None
    module, name, extra = _PACKAGES[backend]
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"--track {backend} needs {name}, which is not installed: pip install '{extra}' (or drop --track)"
    return None


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A config tree as ``{dotted key: value}``, the names and the YAML spelling of ``key=value``
    overrides (``mix.fraction: 0.1``, ``optim.milestones: [150, 180, 210]``, ``kd.alpha: null``)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:  # an empty section (augment_settings: {}) is one key
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def run_params(cfg: RunConfig) -> dict[str, str]:
    """The parameters a tracked run gets: every config key but the ``track`` ones and ``out``."""
    return flat_params(cfg.model_dump(mode="json", exclude={"track", "out"}))


def run_tags(cfg: RunConfig, teacher_model: str | None) -> dict[str, str]:
    mix = cfg.mix.method if cfg.mix.method == "none" or cfg.mix.fraction == 1 else f"{cfg.mix.method} {cfg.mix.fraction:g}"
    tags = {"task": cfg.task, "model": cfg.model, "dataset": cfg.dataset, "mix": mix, "seed": str(cfg.seed)}
    if cfg.task == "distill":
        tags.update(teacher=teacher_model or os.path.basename(str(cfg.kd.teacher)), method=cfg.kd.method)
    return tags


# ---- the backends: one small class each, the same five calls ------------------------------------

class _Mlflow:
    """MLflow through its client (no global active run: a pack trains several runs in one process)."""

    def __init__(self, uri: str | None, project: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(project)
        self.experiment = experiment.experiment_id if experiment else self.client.create_experiment(
            project, artifact_location=self._artifacts())

    def _artifacts(self) -> str | None:
        """Where a new experiment keeps its artifacts: beside a SQLite store, ``mlruns/`` (MLflow puts them
        in the working directory's, wherever the store is); elsewhere the server's choice."""
        if not self.uri.startswith("sqlite:///"):
            return None
        return (Path(self.uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()

    def create(self, name: str, params: dict[str, str], tags: dict[str, str], parent: str | None) -> str:
        from mlflow.entities import Param, RunTag

        tags = {**tags, **({"mlflow.parentRunId": parent} if parent else {})}
        run_id = self.client.create_run(self.experiment, run_name=name, tags=tags).info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(run_id, params=items[i:i + 100], tags=[RunTag("mixkd", "1")] if i == 0 else [])
        return run_id

    def resume(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def metrics(self, run_id: str, values: dict[str, float], step: int | None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in values.items()])

    def files(self, run_id: str, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(run_id, str(path))

    def end(self, run_id: str, status: str) -> None:
        if status != "running":  # a study's parent stays RUNNING until its report
            self.client.set_terminated(run_id, {"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))


class _Wandb:
    """W&B, one ``wandb.Run`` object a run (``reinit='create_new'``: a pack trains several in one process);
    ``WANDB_MODE=offline`` keeps everything in ``<uri>/wandb/offline-run-*``."""

    def __init__(self, uri: str | None, project: str):
        import wandb

        self.wandb, self.dir, self.project = wandb, uri or os.environ.get("WANDB_DIR") or os.getcwd(), project
        self.uri = self.dir
        self.runs: dict[str, Any] = {}

    def _init(self, run_id: str, **kwargs) -> Any:
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        run = self.wandb.init(project=self.project, id=run_id, dir=self.dir, resume="allow", reinit="create_new",
                              settings=self.wandb.Settings(console="off", silent=True, x_disable_stats=True),
                              **kwargs)
        self.runs[run_id] = run
        return run

    def create(self, name: str, params: dict[str, str], tags: dict[str, str], parent: str | None) -> str:
        run_id = uuid.uuid4().hex[:12]  # W&B's ids: lower-case letters and digits
        self._init(run_id, name=name, config=params, tags=[f"{k}={v}" for k, v in tags.items()],
                   group=parent, job_type="study" if "study" in tags else "run")  # study_parent tags it
        return run_id

    def resume(self, run_id: str) -> None:
        if run_id not in self.runs:
            self._init(run_id)

    def metrics(self, run_id: str, values: dict[str, float], step: int | None) -> None:
        run = self.runs[run_id]
        if step is None:
            run.summary.update(values)
        else:
            run.log(values, step=step)

    def files(self, run_id: str, paths: list[Path]) -> None:
        run = self.runs[run_id]
        folder = Path(run.dir) / "mixkd"  # beside W&B's own files (its config.yaml is the parameters)
        folder.mkdir(exist_ok=True)
        for path in paths:
            shutil.copyfile(path, folder / path.name)
            run.save(str(folder / path.name), base_path=run.dir, policy="now")

    def end(self, run_id: str, status: str) -> None:
        run = self.runs.pop(run_id, None)
        if run is not None:
            run.finish(exit_code=0 if status in ("finished", "stopped", "running") else 1)


_BACKENDS = {"mlflow": _Mlflow, "wandb": _Wandb}


class Tracker:
    """The tracked run of one run folder (or study folder) ``folder``: opened from its ``tracking.json``
    or created, then told each epoch, the result and files. Every call that fails disables the tracker
    with one warning line through ``warn``; a tracker with ``backend: none`` does nothing."""

    def __init__(self, folder: str | Path, track: TrackConfig, warn: Callable[[str], None] | None = None):
        self.folder, self.track = Path(folder), track
        self.warn = warn or (lambda line: None)
        self.backend: Any = None
        self.run_id: str | None = None
        self.step = 0  # the last epoch logged
        self.active = track.backend != "none"

    @property
    def state_file(self) -> Path:
        return self.folder / STATE_NAME

    def _call(self, what: str, fn, *args) -> Any:
        if not self.active:
            return None
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 (a tracker never stops the run)
            self.active = False
            text = " ".join(str(e).split())[:200] or type(e).__name__
            self.warn(f"warning: tracking to {self.track.backend} failed ({what}: {text}); the run goes on "
                      "without it")
            return None

    def open(self, name: str, params: dict[str, str], tags: dict[str, str]) -> None:
        """Continue the folder's tracked run, or create it (a child of ``track.parent``)."""
        self._call("open", self._open, name, params, tags)

    def _open(self, name: str, params: dict[str, str], tags: dict[str, str]) -> None:
        saved = json.loads(self.state_file.read_text()) if self.state_file.is_file() else None
        if saved and saved.get("backend") == self.track.backend:
            self.backend = _BACKENDS[self.track.backend](saved.get("uri"), saved.get("project", self.track.project))
            self.run_id, self.step = saved["id"], int(saved.get("step", 0))
            self.backend.resume(self.run_id)
            return
        self.backend = _BACKENDS[self.track.backend](self.track.uri, self.track.project)
        self.run_id = self.backend.create(name, params, tags, self.track.parent)
        self._save()

    def _save(self) -> None:
        atomic_write_text(self.state_file, json.dumps(
            {"backend": self.track.backend, "uri": self.backend.uri, "project": self.track.project,
             "id": self.run_id, "parent": self.track.parent, "step": self.step}, indent=1) + "\n")

    def epochs(self, rows: Iterable[dict[str, Any]]) -> None:
        """Log each metrics row (one step per epoch) not logged yet."""
        for row in rows:
            if self.active and self.run_id is not None and row["epoch"] > self.step:
                values = {k: v for k, v in row.items() if k != "epoch" and isinstance(v, int | float)}
                self._call("epoch metrics", self._epoch, values, row["epoch"])

    def _epoch(self, values: dict[str, float], epoch: int) -> None:
        self.backend.metrics(self.run_id, values, epoch)
        self.step = epoch
        self._save()

    def summary(self, values: dict[str, Any]) -> None:
        """Final numbers (not per epoch): ``result.<key>`` for each number of ``values``."""
        numbers = {f"result.{k}": v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self.run_id is not None:
            self._call("result", self.backend.metrics, self.run_id, numbers, None)

    def files(self, paths: Iterable[str | Path]) -> None:
        present = [Path(p) for p in paths if Path(p).is_file()]
        if self.run_id is not None and present:
            self._call("artifacts", self.backend.files, self.run_id, present)

    def close(self, status: str) -> None:
        """End the tracked run: ``finished``, ``stopped`` (resumable), ``failed``, or ``running`` (a study's
        parent while its runs train: this process lets go of it, MLflow shows it running)."""
        if self.run_id is not None:
            self._call("close", self.backend.end, self.run_id, status)
        self.active = False


def log_files(folder: str | Path, paths: Iterable[str | Path], warn: Callable[[str], None] | None = None,
              summary: dict[str, Any] | None = None) -> None:
    """Add files (and final numbers) to the tracked run of ``folder``, if it has one (an analysis done
    after the run, a study's report)."""
    state = Path(folder) / STATE_NAME
    try:
        saved = json.loads(state.read_text()) if state.is_file() else None
    except (OSError, ValueError):
        saved = None
    if not saved or saved.get("backend") not in _BACKENDS:
        return
    tracker = Tracker(folder, TrackConfig(backend=saved["backend"], uri=saved.get("uri"),
                                          project=saved.get("project", "mixkd")), warn)
    tracker.open("", {}, {})
    if summary:
        tracker.summary(summary)
    tracker.files(paths)
    tracker.close("finished")


def study_parent(out: str | Path, name: str, track: TrackConfig, runs: int,
                 warn: Callable[[str], None] | None = None) -> TrackConfig:
    """Open (or create) the parent tracked run of study folder ``out``; returns the ``track`` settings
    its runs get: the same, with ``parent`` set and the URI made absolute (workers may start elsewhere)."""
    tracker = Tracker(out, track, warn)
    tracker.open(f"study {name}", {"study": name, "runs": str(runs)}, {"study": name})
    if tracker.run_id is None:
        return track.model_copy(update={"backend": "none"})
    uri = tracker.backend.uri
    tracker.close("running")  # ended (finished) when the study's report is added to it
    return track.model_copy(update={"parent": tracker.run_id, "uri": uri})
