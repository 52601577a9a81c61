"""A run folder you can trust: saved paths independent of the working directory, nothing written by a
start that fails, --resume that refuses what it would ignore, one-line errors for unusable --out."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from mixkd.cli import main
from mixkd.config import build_config
from mixkd.engine import Run
from mixkd.errors import MixkdError

TRAIN = ["train", "--model", "resnet8", "--dataset", "digits", "--epochs", "1", "--batch-size", "128",
         "--device", "cpu"]


@pytest.fixture
def train_tiny(cifar10_dir):
    """TRAIN on the tiny fake CIFAR-10 (160 training images instead of digits' 1437): the same run, less work."""
    return ["train", "--model", "resnet8", "--dataset", "cifar10", "--data-dir", str(cifar10_dir), "--epochs", "1",
            "--batch-size", "32", "--device", "cpu"]


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixkd: error:"), err
    return lines[0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "t"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


def test_a_distillation_resumes_from_another_directory_and_a_moved_run_writes_where_it_is(
        tmp_path, teacher, capsys, monkeypatch, one_thread, cifar10_dir):
    work = tmp_path / "work"
    shutil.copytree(teacher, work / "runs" / "t")
    monkeypatch.chdir(work)
    cfg = build_config(flags={"task": "distill", "kd.teacher": "runs/t", "model": "resnet8", "dataset": "cifar10",
                              "data_dir": str(cifar10_dir), "epochs": 2, "batch_size": 16, "device": "cpu",
                              "progress": False, "out": "runs/dk"})
    job = Run(cfg)
    for _ in range(3):
        job.advance()
    job.stop("signal")  # stopped mid-epoch, as by SIGTERM
    saved = yaml.safe_load((work / "runs/dk/config.yaml").read_text())
    assert saved["kd"]["teacher"] == str(work / "runs" / "t")  # absolute: independent of the working directory
    moved = tmp_path / "elsewhere" / "dk"
    moved.parent.mkdir()
    shutil.move(str(work / "runs/dk"), moved)
    monkeypatch.chdir("/")
    code, out, err = cli(capsys, "distill", "--out", str(moved), "--resume")
    assert code == 0, err
    assert f"run in {moved}" in out  # the folder actually used
    assert (moved / "result.json").exists() and not (work / "runs/dk").exists() and not Path("/runs/dk").exists()
    assert len((moved / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("case", ["model", "device", "teacher", "data", "batch"])
def test_a_failed_start_leaves_nothing_and_the_corrected_command_runs(tmp_path, teacher, capsys, case, one_thread,
                                                                      cifar10_dir):
    out = tmp_path / "run"
    bad = {"model": ["--model", "nosuchnet"], "device": ["--device", "cuda"],
           "teacher": ["--teacher", str(tmp_path / "nope")], "data": ["--dataset", "cifar10", "--data-dir", str(tmp_path / "nodata")],
           "batch": ["--batch-size", "100000"]}[case]
    if case == "device" and __import__("torch").cuda.is_available():
        pytest.skip("CUDA is available here")
    command = "distill" if case == "teacher" else "train"
    base = ["--student" if command == "distill" else "--model", "resnet8", "--dataset", "cifar10", "--data-dir",
            str(cifar10_dir), "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--out", str(out)]
    if command == "distill" and case != "teacher":
        base += ["--teacher", str(teacher)]
    code, _, err = cli(capsys, command, *base, *bad)
    assert code == 2
    one_error(err)
    assert not out.exists()
    good = [*base, "--teacher", str(teacher)] if command == "distill" else base
    code, _, err = cli(capsys, command, *good)
    assert code == 0, err


def test_resume_needs_a_run_and_refuses_flags_it_would_ignore(tmp_path, teacher, capsys):
    code, _, err = cli(capsys, "train", "--out", str(tmp_path / "none"), "--resume")
    line = one_error(err)  # "cannot resume <folder>: it does not exist; drop --resume to start a new run there"
    assert code == 2 and f"cannot resume {tmp_path / 'none'}" in line and "drop --resume" in line
    assert not (tmp_path / "none").exists()
    run = tmp_path / "t"
    shutil.copytree(teacher, run)
    code, _, err = cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "10", "--lr", "0.2")
    line = one_error(err)
    assert code == 2 and "epochs 10 (saved: 1)" in line and "optim.lr" in line
    code, _, err = cli(capsys, "distill", "--out", str(run), "--resume")
    assert code == 2 and "mixkd train --out" in one_error(err)
    code, out, err = cli(capsys, "train", "--out", str(run), "--resume", "--device", "cpu", "--no-progress",
                         "--data-dir", str(tmp_path))
    assert code == 0 and "top-1" in out, err  # machine-local flags may change


def test_a_folder_with_only_a_config_is_not_a_run_yet(tmp_path, capsys, one_thread, train_tiny):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("task: train\nmodel: nosuchnet\n")
    code, _, err = cli(capsys, *train_tiny, "--out", str(out))
    assert code == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["model"] == "resnet8"


def test_unusable_out_folders_are_one_line_errors(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    cases = [(a_file, "is a file"), (a_file / "below", "which is a file")]
    if os.geteuid() != 0:  # root writes anywhere but on read-only mounts
        cases.append((readonly / "run", "cannot write"))
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "defaults": {"dataset": "digits", "device": "cpu"},
                                     "teachers": [{"name": "plain", "models": "resnet8"}]}))
    for out, expect in cases:
        code, _, err = cli(capsys, *TRAIN, "--out", str(out))
        assert code == 2 and expect in one_error(err) and str(out) in err
        code, _, err = cli(capsys, "study", "run", str(study), "--out", str(out), "--no-progress")
        assert code == 2 and expect in one_error(err)
    code, _, err = cli(capsys, *TRAIN, "--out", "/proc/mixkd-run")
    assert code == 2 and "/proc/mixkd-run" in one_error(err)


def test_result_records_threads_and_the_log_has_every_epoch(tmp_path, capsys, one_thread, train_tiny):
    out = tmp_path / "run"
    code, _, err = cli(capsys, *train_tiny, "--out", str(out))
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["threads"] == 1 and result["precision"] == "fp32"
    log = (out / "log.txt").read_text()
    assert "start: train resnet8" in log and "epoch 1/1" in log and "finished: top-1" in log
    assert "\r" not in err  # no progress bar when stderr is not a terminal: one line per epoch instead
    assert "epoch 1/1" in err


def test_a_moved_study_whose_teacher_run_is_missing_is_refused_untouched(tmp_path, capsys, one_thread,
                                                                          cifar10_dir):
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "name": "s", "defaults": {"dataset": "cifar10", "data_dir": str(cifar10_dir), "device": "cpu", "epochs": 1,
                                  "batch_size": 32},
        "teachers": [{"name": "plain", "models": "resnet8"}],
        "students": [{"teachers": "plain", "models": "resnet8", "methods": ["kd"]}]}))
    out = tmp_path / "out"
    assert main(["study", "run", str(study), "--out", str(out), "--workers", "1", "--no-progress", "--no-report"]) == 0
    student = next(out.glob("students/*"))
    (student / "result.json").unlink()  # as if stopped before its end
    shutil.rmtree(out / "teachers")  # moved without the teacher's run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    code, _, err = cli(capsys, "study", "run", str(study), "--out", str(out), "--no-progress")
    assert code == 2 and "teacher run that is not finished" in one_error(err)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


# ---- the run folder's API (mixkd.run_folder), without training ------------------------------------

def _saved_run(tmp_path, **flags):
    from mixkd.run_folder import RunFolder

    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    cfg = build_config(flags={"model": "resnet8", "dataset": "digits", "device": "cpu", "out": str(folder.path), **flags})
    folder.write_config(cfg)
    return folder, cfg


def test_status_is_read_from_the_files_the_folder_holds(tmp_path):
    from mixkd.run_folder import RunFolder, RunStatus, run_status

    folder = RunFolder(tmp_path / "run")
    seen = [run_status(folder.path)]
    folder.path.mkdir()
    for path in (folder.config, folder.checkpoint, folder.error, folder.result, folder.analysis):
        path.write_text("x")
        seen.append(folder.status())
    assert seen == ["new", "started", "stopped", "failed", "done", "analysed"]
    assert seen[-1] is RunStatus.ANALYSED and seen[-1].finished and not RunStatus.STOPPED.finished
    assert folder.analysis_status() == "done"


def test_a_saved_teacher_path_is_relative_to_the_run_folder_else_to_the_working_directory(tmp_path, monkeypatch):
    from mixkd.run_folder import resolve_teacher

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "study" / "students" / "s"
    (tmp_path / "study" / "teachers" / "t").mkdir(parents=True)
    (tmp_path / "old").mkdir()
    assert resolve_teacher("../../teachers/t", run) == str(tmp_path / "study" / "teachers" / "t")
    assert resolve_teacher("old", run) == "old"  # only there from the working directory: an older run
    assert resolve_teacher("gone", run) == str(run / "gone")  # neither: where a study would put it
    assert resolve_teacher("/abs/t", run) == "/abs/t"


def test_resume_keeps_the_saved_config_and_refuses_other_settings(tmp_path):
    from mixkd.run_folder import resume_config

    folder, cfg = _saved_run(tmp_path, epochs=3)
    with pytest.raises(MixkdError, match=r"cannot resume .*nothing: it does not exist; check --out, or drop --resume"):
        resume_config(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(MixkdError, match="it has no config.yaml; is it a mixkd run folder"):
        resume_config(tmp_path / "other")
    with pytest.raises(MixkdError, match="holds a 'train' run: continue it with mixkd train"):
        resume_config(folder.path, task="distill")
    with pytest.raises(MixkdError, match=r"these settings differ from it: epochs 5 \(saved: 3\)"):
        resume_config(folder.path, asked={"epochs": 5, "device": "cpu"})
    resumed = resume_config(folder.path, asked={"epochs": 3, "workers": 2})
    assert resumed.workers == 2 and resumed.epochs == 3 and resumed.out == str(folder.path)
    machine = cfg.model_copy(update={"epochs": 9, "save_every": 4})
    resumed = resume_config(folder.path, machine=machine)
    assert resumed.save_every == 4 and resumed.epochs == 3  # machine-local keys only


def test_a_new_run_is_refused_only_where_a_run_has_begun(tmp_path):
    from mixkd.run_folder import open_run

    folder, cfg = _saved_run(tmp_path)
    opened, where, fresh = open_run(cfg, resume=False)  # a config alone is not a run yet
    assert fresh and where.path == folder.path and opened.out == str(folder.path)
    folder.metrics.write_text("{}\n")
    with pytest.raises(MixkdError, match="already holds a run; pass --resume"):
        open_run(cfg, resume=False)


def _literals_naming_run_folder_files(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal in ``source`` (f-string parts included, docstrings not)
    that names a file of the run folder."""
    import ast
    import re

    from mixkd import run_folder as rf

    names = [rf.CONFIG_NAME, rf.METRICS_NAME, rf.LOG_NAME, rf.RESULT_NAME, rf.ERROR_NAME, rf.ANALYSIS_NAME,
             rf.ANALYSIS_ERROR_NAME, rf.CHECKPOINT_NAME]
    pattern = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(n) for n in names) + r")(?![\w-])")
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and pattern.search(node.value))


def test_no_run_folder_file_name_is_written_out_outside_the_run_folder_module():
    """mixkd.run_folder owns the names of a run folder's files: every other module asks it. (The
    checkpoint's name is defined once in mixkd.header, below the run folder, which re-exports it.)"""
    import mixkd

    package = Path(mixkd.__file__).parent
    assert _literals_naming_run_folder_files('X = "a/result.json"\nf"{d}/error.txt"\nY = "the log.txt."\n'
                                             'def f():\n    """config.yaml"""\n') == [
        (1, "a/result.json"), (2, "/error.txt"), (3, "the log.txt.")]  # the check itself can fail
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "run_folder.py" and path.parent == package:
            continue
        for line, text in _literals_naming_run_folder_files(path.read_text()):
            if not (path.name == "header.py" and text == "checkpoint.safetensors"):
                found.append(f"{path.relative_to(package.parent)}:{line}: {text!r}")
    assert found == []


def test_a_study_teacher_is_saved_relative_to_its_student_and_found_again_after_the_folder_moved(tmp_path):
    from mixkd.run_folder import RunFolder, names_run, relative_teacher, teacher_run

    assert relative_teacher("students/s0", "teachers/t") == "../../teachers/t"
    assert relative_teacher("a/b/s0", "teachers/t") == "../../../teachers/t"
    for saved in ("../../teachers/t", "/old/place/teachers/t", "runs/s/teachers/t"):
        assert names_run(saved, "teachers/t")
    assert not names_run("../../teachers/u", "teachers/t") and not names_run("/x/other/t", "teachers/t")
    assert teacher_run("/old/place/teachers/t", tmp_path, "teachers") is None  # no such run here
    (tmp_path / "teachers" / "t").mkdir(parents=True)
    RunFolder(tmp_path / "teachers" / "t").config.write_text("model: resnet8\n")
    assert teacher_run("/old/place/teachers/t", tmp_path, "teachers") == "teachers/t"
    assert teacher_run("/old/place/elsewhere/t", tmp_path, "teachers") is None


def test_every_reader_of_a_saved_config_refuses_a_repeated_key(tmp_path):
    from mixkd.run_folder import RunFolder
    from mixkd.study.plan import measurements
    from mixkd.study.rows import collect

    run = tmp_path / "students" / "r-s0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: resnet8\nmodel: resnet20\ndataset: digits\n")
    (run / "result.json").write_text(json.dumps({"top1": 50.0, "images_per_s": 100.0}))
    with pytest.raises(MixkdError, match="config.yaml"):
        RunFolder(run).read_config_tree()
    with pytest.raises(MixkdError, match="config.yaml"):
        collect(tmp_path)
    assert measurements(tmp_path)[0] == {}  # a damaged run measures nothing


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_file_system_without_flock_locks_by_an_owner_file_with_a_stale_rule(tmp_path, monkeypatch, code):
    """flock refused as NFS (ENOLCK), FUSE (EOPNOTSUPP) or Lustre (ENOSYS) refuse it is "locks unsupported
    here", not "held by PID ?": the lock is then <lock>.owner, created exclusively, naming host and PID.
    Held by a live process: refused naming it; left by a dead process of this host: taken over; naming
    another host: refused, saying which file to remove."""
    import socket
    import subprocess

    from mixkd.errors import FolderInUse
    from mixkd.files import fcntl as files_fcntl
    from mixkd.run_folder import RunFolder

    def no_flock(f, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files_fcntl, "flock", no_flock)
    folder = RunFolder(tmp_path)
    owner = tmp_path / (folder.lock_file.name + ".owner")
    host = socket.gethostname()
    held = folder.lock()
    assert owner.read_text() == f"{host} {os.getpid()}\n"
    with pytest.raises(FolderInUse, match=rf"\(PID {os.getpid()} on this host; file locks are unsupported on this "
                                          rf"file system, so \.run\.lock\.owner stands for the lock\)"):
        folder.lock()
    held.release()
    assert not owner.exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner.write_text(f"{host} {dead.pid}\n")  # a process of this host that died holding it: stale
    held = folder.lock()
    assert owner.read_text() == f"{host} {os.getpid()}\n" and not list(tmp_path.glob("*.stale.*"))
    held.release()
    owner.write_text("node77 4242\n")  # another host's: cannot be told alive from here
    with pytest.raises(FolderInUse, match=rf"\(PID 4242 on host node77; .* cannot be told from {host}: if it does "
                                          rf"not, remove {owner}\)"):
        folder.lock()
    assert owner.read_text() == "node77 4242\n"  # left as it was
