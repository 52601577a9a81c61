"""The run folder: its layout and file names, its status, what its files say, whether and how a run
in it is resumed, and what a saved teacher path means. Every other module asks this one.

A run folder holds:

==========================  ===================================================================
``config.yaml``             the run's config, fully resolved (written when the run begins)
``metrics.jsonl``           one line per finished epoch
``checkpoint.safetensors``  the last checkpoint (step-exact mid-run; weights only once finished)
``log.txt``                 one line per epoch and event (and, in a study, the run's output)
``result.json``             the run's result, once finished
``error.txt``               why a study run failed (its first line), then the traceback
``analysis.json``           the analysis (``mixkd analyze``), with its PNGs beside it
``analysis-error.txt``      why the analysis of a study run failed
``tensorboard/``            TensorBoard scalars, when asked for
``.run.lock``               held (``flock``) by the process running the run; gone when it ends
==========================  ===================================================================

**One process per run folder** (:meth:`RunFolder.lock`): the process that runs a run (``mixkd train``,
``mixkd distill``, a study's worker) holds an exclusive ``flock`` on ``.run.lock`` from its first
write (from the start, resuming) to its end; another process finds it held and is refused with one
line naming the folder and the holder's PID. The kernel drops the lock with its holder (also after
``kill -9``), so a lock file left behind never blocks anyone.

Its status (:func:`run_status`) is read from which of those files exist: ``new`` (no config yet),
``started`` (a config but no checkpoint: running, or interrupted before its first checkpoint),
``stopped`` (a checkpoint to continue from: stopped, interrupted, or running now; the folder alone
cannot tell), ``failed`` (an error file), ``done`` (a result) and ``analysed`` (a result and an
analysis).

**A saved teacher path** (``kd.teacher`` in ``config.yaml``) is absolute as it is; a relative one is
relative to the run folder (how studies write it, so that a study folder can move), else, where only
that exists, relative to the working directory (runs made by older versions): :func:`resolve_teacher`.
A run started from the command line saves its teacher as an absolute path.

**Resuming** (:func:`open_run`, :func:`resume_config`): the saved config wins; only the machine-local
keys (:data:`mixkd.config.MACHINE_KEYS`: device, data folder, ...) may change, and a caller asking
for another value of any other key is refused with one line.

**Whether to resume** (:func:`resume_mode`, :func:`auto_resumes`): ``--resume`` is strict (the folder
must hold a run: a mistyped ``--out`` is one line, never a new run); ``--resume auto`` is the one
command a scheduler reruns as it is: it needs an explicit ``--out``, starts the run where that folder
does not exist, is empty or holds this same run (the same ``config.yaml``, machine-local keys aside)
that never reached a checkpoint, continues it where it has, and refuses a folder holding another
run. A torchrun restart (``TORCHELASTIC_RESTART_COUNT`` > 0) given an explicit ``--out`` and no
``--resume`` counts as ``--resume auto``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any

from mixkd.config import MACHINE_KEYS, RunConfig, load_run_config, load_yaml, machine_key
from mixkd.errors import FolderInUse, MixkdError
from mixkd.files import append_text, atomic_write_text, hold_lock, read_json, read_text
from mixkd.header import CHECKPOINT_NAME, checkpoint_header

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
LOG_NAME = "log.txt"
RESULT_NAME = "result.json"
ERROR_NAME = "error.txt"
ANALYSIS_NAME = "analysis.json"
ANALYSIS_ERROR_NAME = "analysis-error.txt"
TENSORBOARD_NAME = "tensorboard"
LOCK_NAME = ".run.lock"

__all__ = ["ANALYSIS_ERROR_NAME", "ANALYSIS_NAME", "CHECKPOINT_NAME", "CONFIG_NAME", "ERROR_NAME", "LOG_NAME",
           "LOCK_NAME", "METRICS_NAME", "RESULT_NAME", "TENSORBOARD_NAME", "RunFolder", "RunLock", "RunStatus", "config_to_save",
           "auto_resumes", "default_run_dir", "names_run", "open_run", "relative_teacher", "resolve_teacher", "resume_config",
           "resume_mode", "run_status", "teacher_path", "teacher_run", "writable_dir_problem"]


class RunStatus(str, Enum):
    """Where a run folder stands (see the module docstring); compares equal to its value."""

    NEW = "new"
    STARTED = "started"
    STOPPED = "stopped"
    FAILED = "failed"
    DONE = "done"
    ANALYSED = "analysed"

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        return self in (RunStatus.DONE, RunStatus.ANALYSED)


class RunFolder:
    """The files of one run folder (which need not exist yet)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---- the layout ---------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def log(self) -> Path:
        return self.path / LOG_NAME

    @property
    def result(self) -> Path:
        return self.path / RESULT_NAME

    @property
    def error(self) -> Path:
        return self.path / ERROR_NAME

    @property
    def analysis(self) -> Path:
        return self.path / ANALYSIS_NAME

    @property
    def analysis_error(self) -> Path:
        return self.path / ANALYSIS_ERROR_NAME

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_NAME

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_NAME

    # ---- one process at a time ------------------------------------------------------------------
    def lock(self) -> RunLock:
        """Hold the folder for this process (it must exist) until :meth:`RunLock.release` or the
        process's end; held by another live process: one FolderInUse error naming it and its PID."""
        f, holder = hold_lock(self.lock_file)
        if f is None:
            raise FolderInUse(f"{self.path} is in use by another mixkd process (PID {holder}); wait for it to "
                             "end or stop it (it checkpoints on SIGTERM), or choose another --out")
        return RunLock(self.lock_file, f)

    # ---- where it stands ------------------------------------------------------------------------
    def status(self) -> RunStatus:
        if self.result.exists():
            return RunStatus.ANALYSED if self.analysis.exists() else RunStatus.DONE
        if self.error.exists():
            return RunStatus.FAILED
        if self.checkpoint.exists():
            return RunStatus.STOPPED
        return RunStatus.STARTED if self.config.exists() else RunStatus.NEW

    def analysis_status(self) -> RunStatus:
        """The analysis of a run: ``done`` (written), ``failed`` (an analysis error file) or ``new``."""
        if self.analysis.exists():
            return RunStatus.DONE
        return RunStatus.FAILED if self.analysis_error.exists() else RunStatus.NEW

    def has_begun(self) -> bool:
        """Whether the folder holds a run that has begun (a checkpoint, logged epochs or a result), not
        only a config."""
        return self.checkpoint.exists() or self.metrics.exists() or self.result.exists()

    # ---- reading ---------------------------------------------------------------------------------
    def read_config(self) -> RunConfig:
        return load_run_config(self.config)

    def read_config_tree(self) -> dict[str, Any]:
        """``config.yaml`` as saved, without validating it (reports and folders of other versions); parsed
        by :func:`mixkd.config.load_yaml` (repeated keys and alias bombs are one MixkdError naming the file)."""
        return load_yaml(read_text(self.config, f"run config {self.config}"), f"run config {self.config}") or {}

    def read_result(self) -> dict[str, Any] | None:
        """``result.json``, or None where the run has not finished."""
        if not self.result.exists():
            return None
        return read_json(self.result, "delete it and run the same command again: the run's final checkpoint "
                                      "writes it anew")

    def checkpoint_meta(self) -> dict[str, Any] | None:
        """The ``mixkd`` metadata of the checkpoint (epoch, step, stopped, ...) from its header alone;
        None where there is no readable checkpoint."""
        if not self.checkpoint.is_file():
            return None
        try:
            meta = checkpoint_header(self.checkpoint)
        except (MixkdError, OSError):
            return None  # the run finds out what is wrong when it loads the file
        return meta or None

    def read_metrics(self) -> tuple[dict[int, dict[str, Any]], list[int]]:
        """(the epochs logged in ``metrics.jsonl`` by epoch, the numbers of its damaged lines): every
        line that reads as an epoch's row is kept, a damaged one skipped, never the lines after it."""
        if not self.metrics.exists():
            return {}, []
        rows, damaged = {}, []
        for i, line in enumerate(self.metrics.read_text(errors="replace").splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not (isinstance(row, dict) and type(row.get("epoch")) is int
                    and all(isinstance(row.get(k), (int, float)) for k in ("test_top1", "test_top5", "test_nll"))):
                damaged.append(i)
                continue
            rows[row["epoch"]] = row
        return rows, damaged

    def first_line(self, path: Path) -> str:
        """The first line of one of the folder's text files (an error file), '' where unreadable."""
        try:
            return (path.read_text().splitlines() or [""])[0]
        except OSError:
            return ""

    # ---- writing ---------------------------------------------------------------------------------
    def write_config(self, cfg: RunConfig) -> None:
        atomic_write_text(self.config, cfg.to_yaml())

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def write_result(self, result: dict[str, Any]) -> None:
        atomic_write_text(self.result, json.dumps(result, indent=2) + "\n")

    def append_log(self, line: str) -> None:
        append_text(self.log, f"{datetime.now().isoformat(timespec='seconds')} {line}\n")


class RunLock:
    """A held :meth:`RunFolder.lock`: :meth:`release` removes the lock file, then lets it go."""

    def __init__(self, path: Path, file):
        self.path, self._file = path, file

    def release(self) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None


def run_status(run_dir: str | os.PathLike) -> RunStatus:
    """The status of the run folder ``run_dir`` (see the module docstring)."""
    return RunFolder(run_dir).status()


# ---- the teacher -----------------------------------------------------------------------------------

HUB_PREFIX = "hf-hub:"  # a teacher from the local Hugging Face cache (mixkd.loading)


def resolve_teacher(teacher: str, run_dir: str | os.PathLike | None) -> str:
    """What a saved ``kd.teacher`` names: absolute as it is; relative to the run folder (how studies
    write it), else relative to the working directory (runs made by older versions). An
    ``hf-hub:org/name`` (weights in the local Hugging Face cache) is no path and stays as it is."""
    p = Path(teacher)
    if p.is_absolute() or run_dir is None or teacher.startswith(HUB_PREFIX):
        return str(p)
    beside = Path(os.path.normpath(Path(run_dir) / p))  # lexically: the run folder may not exist yet
    if beside.exists() or not p.exists():
        return str(beside)
    return str(p)


def teacher_path(cfg: RunConfig, run_dir: str | os.PathLike, relative_to_run: bool) -> str | None:
    """The teacher checkpoint ``cfg`` names for a run in ``run_dir``: a relative ``kd.teacher`` is
    relative to the run folder where ``relative_to_run`` (study runs, and every saved config), else to
    the working directory (a command line)."""
    t = cfg.kd.teacher
    if not t:
        return None
    if t.startswith(HUB_PREFIX):
        return t
    return resolve_teacher(t, run_dir) if relative_to_run else str(Path(t).resolve())


def relative_teacher(run_id: str, teacher_id: str) -> str:
    """How a study saves the teacher of its run ``run_id`` that is its run ``teacher_id``: relative to
    the run folder (``../../teachers/x``), so that the study folder can move."""
    return "/".join([".."] * len(PurePosixPath(run_id).parts) + [teacher_id])


def names_run(teacher: str, run_id: str) -> bool:
    """Whether a saved ``kd.teacher`` names the run ``run_id`` of a study folder. Compared by the id,
    so that ``/old/place/teachers/x``, ``runs/s/teachers/x`` (older versions) and ``../../teachers/x``
    all name ``teachers/x``: a folder that moved still matches."""
    parts = PurePosixPath(run_id).parts
    return Path(teacher).parts[-len(parts):] == parts


def teacher_run(teacher: str, root: str | os.PathLike, under: str) -> str | None:
    """The id (``under/<name>``) of the run folder in ``root/under`` that a saved ``kd.teacher`` names
    (by :func:`names_run`, so also after the folder moved), where that folder holds a run; else None."""
    run_id = f"{under}/{Path(teacher).name}"
    return run_id if names_run(teacher, run_id) and RunFolder(Path(root) / run_id).config.is_file() else None


def config_to_save(cfg: RunConfig, run_dir: str | os.PathLike, relative_to_run: bool) -> RunConfig:
    """``cfg`` as ``config.yaml`` holds it: its folder as ``out``; a command line's teacher absolute."""
    cfg = cfg.model_copy(update={"out": str(run_dir)})
    if cfg.task == "distill" and not relative_to_run:
        cfg = cfg.model_copy(update={"kd": cfg.kd.model_copy(update={"teacher": teacher_path(cfg, run_dir, False)})})
    return cfg


# ---- opening and resuming --------------------------------------------------------------------------

def default_run_dir(cfg: RunConfig) -> Path:
    """``runs/<task>-<model>-<dataset>-<time>-<pid>``: the process ID keeps the folders of commands
    started in the same second apart."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    from mixkd.models.registry import model_slug

    return Path("runs") / f"{cfg.task}-{model_slug(cfg.model)}-{cfg.dataset}-{stamp}-{os.getpid()}"


def writable_dir_problem(out: Path) -> str | None:
    """Why ``out`` cannot be (or become) a run folder, or None."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder; choose another --out"
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"--out {out} is below {probe}, which is a file; choose another --out"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"--out {out}: cannot write in {probe} (read-only or no permission); choose another --out"
    return None


def _shown(value: Any) -> str:
    """A config value in a message: a key left unset (None: the method's or model's default) said so."""
    return "unset (its default)" if value is None else repr(value)


def _dotted(cfg: RunConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def _updated(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """``cfg`` with dotted keys set (top-level and one section deep)."""
    top = {k: v for k, v in values.items() if "." not in k}
    sections: dict[str, dict[str, Any]] = {}
    for k, v in values.items():
        if "." in k:
            section, key = k.split(".", 1)
            sections.setdefault(section, {})[key] = v
    for section, keys in sections.items():
        top[section] = getattr(cfg, section).model_copy(update=keys)
    return cfg.model_copy(update=top)


def resume_config(out: str | os.PathLike, *, task: str | None = None, asked: dict[str, Any] | None = None,
                  machine: RunConfig | None = None) -> RunConfig:
    """The config to continue the run in ``out`` with: the saved one, with ``out`` set and the
    machine-local keys of ``machine`` (all of them) or of ``asked`` (the dotted keys a caller set).
    Refused with one line: a folder without a run, a run of another ``task``, or a key of ``asked``
    outside :data:`MACHINE_KEYS` whose value differs from the saved one."""
    folder = RunFolder(out)
    if not folder.config.is_file():
        if folder.path.is_dir() and any(folder.path.iterdir()):
            raise MixkdError(f"cannot resume {folder.path}: it has no {CONFIG_NAME}; is it a mixkd run folder? "
                             "(drop --resume to start a new run elsewhere)")
        what = "holds no run" if folder.path.is_dir() else "does not exist"
        raise MixkdError(f"cannot resume {folder.path}: it {what}; check --out, or drop --resume to start a new run "
                         "there (--resume auto starts it when there is none, and continues it when rerun)")
    saved = folder.read_config()
    if task is not None and saved.task != task:
        raise MixkdError(f"{folder.path} holds a '{saved.task}' run: continue it with "
                         f"mixkd {saved.task} --out {folder.path} --resume")
    asked = asked or {}
    conflicts = [f"{k} {_shown(v)} (saved: {_shown(_dotted(saved, k))})" for k, v in asked.items()
                 if not machine_key(k) and v != _dotted(saved, k)]
    if conflicts:
        raise MixkdError(f"--resume continues the run saved in {folder.config}, but these settings differ from it: "
                         + ", ".join(conflicts) + f"; only {', '.join(MACHINE_KEYS)} may change on resume "
                         "(start a new run with another --out to change the others)")
    local = {k: getattr(machine, k) for k in MACHINE_KEYS} if machine is not None else {
        k: v for k, v in asked.items() if machine_key(k)}
    return _updated(saved, {**local, "out": str(folder.path)})


def resume_mode(flag: bool | str, out_given: bool, environ: dict[str, str] | None = None) -> str | None:
    """How a command line treats its folder: None (start a run; a folder holding one is refused),
    ``"strict"`` (``--resume``) or ``"auto"`` (``--resume auto``; also a torchrun restart,
    ``TORCHELASTIC_RESTART_COUNT`` > 0, given an explicit ``--out``)."""
    if flag == "auto":
        return "auto"
    if flag:
        return "strict"
    restarts = (os.environ if environ is None else environ).get("TORCHELASTIC_RESTART_COUNT", "").strip()
    return "auto" if out_given and restarts.isdigit() and int(restarts) > 0 else None


def _differences(saved: RunConfig, mine: RunConfig) -> list[str]:
    """The dotted keys (machine-local ones and ``out`` aside) where two configs differ, with the saved value."""
    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    a, b = flat(saved.model_dump()), flat(mine.model_dump())
    return [f"{k} {_shown(b.get(k))} (saved: {_shown(a.get(k))})" for k in sorted(a.keys() | b.keys())
            if not machine_key(k) and k != "out" and a.get(k) != b.get(k)]


def auto_resumes(cfg: RunConfig) -> bool:
    """``--resume auto``: True to continue the run in ``cfg.out``, False to start it there (see the
    module docstring). Refused with one line: no ``--out``, a folder holding files but no run, a
    folder holding another run."""
    if not cfg.out:
        raise MixkdError("--resume auto needs --out: the folder the run starts in and every rerun of the same "
                         "command continues (a default folder is new each time)")
    folder = RunFolder(cfg.out)
    problem = writable_dir_problem(folder.path)
    if problem:
        raise MixkdError(problem)
    if not folder.config.is_file():
        if folder.path.is_dir() and any(p.name != LOCK_NAME for p in folder.path.iterdir()):
            raise MixkdError(f"--resume auto: {folder.path} holds files but no {CONFIG_NAME}; is it a mixkd run "
                             "folder? choose another --out")
        return False
    saved = folder.read_config()
    differ = _differences(saved, config_to_save(cfg, folder.path, relative_to_run=False))
    if differ:
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise MixkdError(f"--resume auto: {folder.path} holds another run, its {CONFIG_NAME} differs: "
                         f"{', '.join(differ[:3])}{more}; choose another --out, or continue that run with "
                         f"mixkd {saved.task} --out {folder.path} --resume")
    return folder.has_begun()


def open_run(cfg: RunConfig, resume: bool) -> tuple[RunConfig, RunFolder, bool]:
    """(config, run folder, fresh) for a run of ``cfg`` (its ``out``, else a new folder under
    ``runs/``), without writing anything: resuming, :func:`resume_config` with ``cfg``'s machine-local
    keys; else ``cfg``, refused where the folder holds a run that has begun."""
    out = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    folder = RunFolder(out)
    problem = writable_dir_problem(out)
    if problem and not (resume and folder.result.is_file()):  # a finished run is only read: print its result
        raise MixkdError(problem)
    if resume:
        return resume_config(out, machine=cfg), folder, False
    if folder.config.exists() and folder.has_begun():
        raise MixkdError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    return cfg.model_copy(update={"out": str(out)}), folder, True
