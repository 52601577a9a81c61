"""Stops from the program's first line, the requeue command (--resume auto) and the run folder's lock.

The early-stop tests run the real entry point (``python -m mixkd``) in a subprocess that sends itself a
real signal at a chosen moment of its start: when a given module is first imported (an import hook),
so that no test depends on how long anything takes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs ``python -m mixkd ARGS...`` as it is, after arranging for SIGNAL to reach the process when MODULE
# is first imported: argv = [MODULE, SIGNAL, ARGS...].
AT_IMPORT = r"""
import os, runpy, signal, sys
module, signame = sys.argv[1], sys.argv[2]

class SignalAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), getattr(signal, signame))
        return None

sys.meta_path.insert(0, SignalAtImport())
sys.argv = ["mixkd", *sys.argv[3:]]
runpy.run_module("mixkd", run_name="__main__", alter_sys=True)
"""

TRAIN = ["train", "--model", "resnet8", "--dataset", "digits", "--epochs", "1", "--device", "cpu", "--no-progress"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _signalled_at(module: str, signame: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", AT_IMPORT, module, signame, *args], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=300)


@pytest.mark.parametrize("module, signame, status, why", [
    ("mixkd.cli", "SIGTERM", 75, "stopped by a signal"),  # the first line after the entry point's own
    ("torch", "SIGINT", 130, "interrupted"),  # while the parser imports the study commands (torch)
    ("sklearn.datasets", "SIGUSR1", 75, "stopped by a signal"),  # while the run loads digits (its StopControl exists)
])
def test_a_stop_in_the_first_seconds_of_train_says_nothing_was_written(tmp_path, module, signame, status, why):
    out = tmp_path / "e"
    proc = _signalled_at(module, signame, *TRAIN, "--out", str(out), cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == status, proc.stderr
    assert last == f"{why} before the run began: nothing was written to {out}; run the same command again to start it"
    assert not out.exists() and "checkpoint" not in proc.stderr


def test_a_command_without_a_graceful_stop_ends_on_sigterm_as_usual(tmp_path):
    proc = _signalled_at("mixkd.cli", "SIGTERM", "models", cwd=tmp_path)
    assert proc.returncode == -signal.SIGTERM and proc.stdout == ""


def test_a_study_stopped_while_it_starts_keeps_the_stop_status(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text("name: s\ndefaults: {dataset: digits, device: cpu, epochs: 1}\n"
                     "teachers: [{name: plain, models: resnet8}]\n")
    proc = _signalled_at("torch", "SIGTERM", "study", "run", str(study), "--out", str(tmp_path / "s"),
                         "--no-report", cwd=tmp_path)
    assert proc.returncode == 75, proc.stderr
    assert "stopped by a signal: 0 of 1 runs finished, 0 stopped with a checkpoint" in proc.stderr


def test_a_study_worker_sent_sigterm_while_it_starts_stops_its_run_instead_of_failing_it(tmp_path):
    from mixkd.config import build_config
    from mixkd.study.executors import LocalExecutor
    from mixkd.study.worker import Job

    cfg = build_config(overrides=["dataset=digits", "model=resnet8", "epochs=1", "device=cpu", "progress=false"])
    ex = LocalExecutor(workers=1, use_gpu=False, lock_dir=str(tmp_path))
    try:
        ex.submit(Job("teachers/t", cfg, str(tmp_path / "teachers" / "t")))
        os.kill(ex.pids()[0], signal.SIGTERM)  # at once: the worker is still importing torch
        done = []
        for _ in range(300):
            done += ex.wait(timeout=1.0)
            if done:
                break
    finally:
        ex.shutdown()
    assert len(done) == 1 and done[0][0] == "teachers/t"
    outcome = done[0][1]
    assert outcome.get("stopped") and not outcome["ok"] and "died" not in outcome["message"], outcome
    assert not (tmp_path / "teachers" / "t" / "error.txt").exists()


# ---- the run folder's lock ------------------------------------------------------------------------
TINY = ["--model", "resnet8", "--dataset", "cifar10", "--epochs", "1", "--batch-size", "32", "--eval-batch-size", "80",
        "--device", "cpu", "--no-progress"]


def test_a_run_folder_held_by_a_live_process_is_refused_and_a_killed_holder_blocks_nothing(tmp_path, capsys, cifar10_dir,
                                                                                          one_thread):
    from mixkd.cli import main
    from mixkd.run_folder import LOCK_NAME, RunFolder

    out = tmp_path / "d"
    out.mkdir()
    hold = "import sys, time; from mixkd.run_folder import RunFolder; held = RunFolder(sys.argv[1]).lock(); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["train", *TINY, "--data-dir", str(cifar10_dir), "--out", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"mixkd: error: {out} is in use by another mixkd process (PID {holder.pid}); wait for it to end "
                       "or stop it (it checkpoints on SIGTERM), or choose another --out"]
        assert not RunFolder(out).config.exists()  # refused before its first write
    finally:
        holder.kill()  # kill -9: the lock dies with it, its file stays
        holder.wait()
    assert (out / LOCK_NAME).exists()
    assert main(args) == 0
    assert RunFolder(out).status() == "done" and not (out / LOCK_NAME).exists()  # released at the end
    # resuming takes the folder at once: a finished run's folder, held, is refused too
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", "--out", str(out), "--resume"]) == 2
        assert f"(PID {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


# Runs ``python -m mixkd ARGS...`` as it is, with SIGNAL sent to the process at the C library's exit, after
# the interpreter's teardown (which puts back the default action of the signals Python handled): the last
# moment a signal can arrive. argv = [SIGNAL, ARGS...]; run it in a session of its own (kill(0, ...)).
AT_EXIT = r"""
import ctypes, runpy, signal, sys
libc = ctypes.CDLL(None)
libc.on_exit(ctypes.cast(libc.kill, ctypes.c_void_p), ctypes.c_void_p(int(getattr(signal, sys.argv[1]))))  # kill(0, SIG)
sys.argv = ["mixkd", *sys.argv[2:]]
runpy.run_module("mixkd", run_name="__main__", alter_sys=True)
"""


def test_a_finished_run_exits_0_whatever_signal_arrives_as_it_leaves(tmp_path, cifar10_dir):
    out = tmp_path / "done"
    for signame, args in (("SIGUSR1", []), ("SIGINT", ["--resume"])):  # a run that finishes; one found finished
        proc = subprocess.run([sys.executable, "-c", AT_EXIT, signame, "train", *TINY, "--data-dir", str(cifar10_dir),
                               "--out", str(out), *args],
                              capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300,
                              start_new_session=True)
        assert proc.returncode == 0, (signame, proc.returncode, proc.stderr)
        assert proc.stdout.startswith("train resnet8: top-1 ")


# ---- the requeue command: --resume auto -------------------------------------------------------------
def _stop_at_call(monkeypatch, n: int, reason: str = "signal") -> None:
    """The n-th StopControl.should_stop of this process hears a stop (as from SIGUSR1 at that step)."""
    from mixkd.control import StopControl

    real, calls = StopControl.should_stop, [0]

    def should_stop(self, next_cost=0.0):
        calls[0] += 1
        if calls[0] == n:
            self.request(reason)
        return real(self, next_cost)

    monkeypatch.setattr(StopControl, "should_stop", should_stop)


def _last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_resume_auto_starts_then_continues_the_run_and_its_stop_prints_a_command_that_works(tmp_path, capsys, cifar10_dir,
                                                                                          monkeypatch, one_thread):
    import shlex

    from mixkd.cli import main
    from mixkd.run_folder import RunFolder

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "requeued"
    requeue = ["train", *TINY, "--data-dir", str(cifar10_dir), "--epochs", "2", "--out", str(out), "--resume", "auto"]
    _stop_at_call(monkeypatch, 3)
    assert main(requeue) == 75  # the folder did not exist: it starts, then a stop at its third step
    line = _last_error(capsys)
    assert line == (f"stopped by a signal at epoch 1 step 2 of 5 (checkpoint written); continue with: mixkd train "
                    f"--out {out} --resume (or run the same command again)")
    assert RunFolder(out).checkpoint_meta()["step"] == 2
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    _stop_at_call(monkeypatch, 4)
    assert main(requeue) == 75  # the same command continues it (and is stopped again, at step 2 + 3)
    assert "stopped by a signal at epoch 1 step 5 of 5" in _last_error(capsys)
    assert "resume at epoch 1 step 2" in RunFolder(out).log.read_text()
    monkeypatch.undo()
    printed = shlex.split(line.split("continue with: ")[1].split(" (or")[0])
    assert printed[0] == "mixkd" and main(printed[1:]) == 0  # the printed command finishes it
    assert RunFolder(out).status() == "done"
    assert main(requeue) == 0  # and the requeue command, rerun, reports the finished run
    assert "train resnet8: top-1" in capsys.readouterr().out


def test_resume_auto_refuses_another_run_and_a_default_folder_and_plain_resume_never_starts_one(tmp_path, capsys,
                                                                                               cifar10_dir, one_thread):
    from mixkd.cli import main
    from mixkd.run_folder import RunFolder

    base = ["train", *TINY, "--data-dir", str(cifar10_dir)]
    assert main([*base, "--resume", "auto"]) == 2
    assert _last_error(capsys).startswith("mixkd: error: --resume auto needs --out")
    mistyped = tmp_path / "mistyped"
    assert main(["train", "--out", str(mistyped), "--resume"]) == 2
    assert _last_error(capsys).startswith(f"mixkd: error: cannot resume {mistyped}: it does not exist")
    assert not mistyped.exists()
    # a run that wrote its config but never reached a checkpoint: the same command starts it afresh
    started = tmp_path / "started"
    assert main([*base, "--seed", "4", "--out", str(started)]) == 0
    for name in ("checkpoint.safetensors", "metrics.jsonl", "result.json"):
        (started / name).unlink()
    assert main([*base, "--seed", "4", "--out", str(started), "--resume", "auto"]) == 0
    assert RunFolder(started).status() == "done" and "resume at" not in RunFolder(started).log.read_text()
    # the same folder asked for another run: one line, nothing changed
    before = RunFolder(started).config.read_text()
    assert main([*base, "--seed", "5", "--out", str(started), "--resume", "auto"]) == 2
    line = _last_error(capsys)
    assert line.startswith(f"mixkd: error: --resume auto: {started} holds another run") and "seed 5 (saved: 4)" in line
    assert RunFolder(started).config.read_text() == before


def test_a_torchrun_restart_with_an_explicit_out_resumes_like_resume_auto():
    from mixkd.run_folder import resume_mode

    assert resume_mode(False, True, {"TORCHELASTIC_RESTART_COUNT": "1"}) == "auto"
    assert resume_mode(False, False, {"TORCHELASTIC_RESTART_COUNT": "1"}) is None  # a default folder: a new run
    assert resume_mode(False, True, {"TORCHELASTIC_RESTART_COUNT": "0"}) is None
    assert resume_mode(True, True, {"TORCHELASTIC_RESTART_COUNT": "2"}) == "strict"
    assert resume_mode("auto", True, {}) == "auto"


# ---- a full disk under one run ----------------------------------------------------------------------
def test_a_full_disk_before_the_start_or_mid_run_is_one_line_whose_advice_works(tmp_path, capsys, cifar10_dir,
                                                                                monkeypatch, one_thread):
    import errno
    import shlex

    import mixkd.checkpoint
    import mixkd.files
    from mixkd.cli import main
    from mixkd.run_folder import LOCK_NAME, RunFolder

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_open = mixkd.files.open_nofollow

    def full_lock(path, mode="a"):  # the disk has an inode left for the lock file, no block for its PID
        f = real_open(path, mode)
        if str(path).endswith(LOCK_NAME):
            f.flush = no_space
        return f

    out = tmp_path / "run"
    command = ["train", *TINY, "--data-dir", str(cifar10_dir), "--epochs", "2", "--save-every", "1", "--out", str(out)]
    monkeypatch.setattr(mixkd.files, "open_nofollow", full_lock)
    assert main(command) == 2
    assert _last_error(capsys) == (f"mixkd: error: cannot write {out / LOCK_NAME}: No space left on device; free some "
                                   "space and run the same command again")
    assert not out.exists()  # no stray lock, no empty folder: the same command starts afresh
    monkeypatch.undo()
    real_save, saves = mixkd.checkpoint._save_file, []

    def full_after_the_first(tensors, path, metadata):
        saves.append(path)
        (no_space if len(saves) > 1 else real_save)(tensors, path, metadata)

    monkeypatch.setattr(mixkd.checkpoint, "_save_file", full_after_the_first)
    assert main(command) == 2  # epoch 1's checkpoint is written, epoch 2's is not
    line = _last_error(capsys)
    assert line == (f"mixkd: error: cannot write {out / 'checkpoint.safetensors'}: No space left on device; free some "
                    f"space (the last checkpoint is kept) and continue with: mixkd train --out {out} --resume")
    assert RunFolder(out).checkpoint_meta()["epoch"] == 1 and not (out / LOCK_NAME).exists()
    monkeypatch.undo()
    printed = shlex.split(line.split("continue with: ")[1])
    assert main(printed[1:]) == 0 and RunFolder(out).status() == "done"  # the advice is a command that works


# ---- a full disk in a study ------------------------------------------------------------------------
def test_a_full_disk_stops_the_study_with_one_line_and_leaves_every_run_resumable(tmp_path, capsys, cifar10_dir,
                                                                                 monkeypatch, one_thread):
    import errno
    import json

    import mixkd.checkpoint
    import mixkd.study.executors
    from mixkd.cli import main
    from mixkd.run_folder import ERROR_NAME, RunFolder
    from mixkd.study import InProcessExecutor

    monkeypatch.setattr(mixkd.study.executors, "make_executor", lambda *args, **kwargs: InProcessExecutor())
    study = tmp_path / "s.yaml"
    study.write_text(f"name: s\ndefaults: {{dataset: cifar10, data_dir: {cifar10_dir}, device: cpu, epochs: 2, "
                     "save_every: 1, batch_size: 32, eval_batch_size: 80}\n"
                     "teachers: [{name: a, models: resnet8}, {name: b, models: resnet8}]\n")
    out = tmp_path / "s"
    real, saves = mixkd.checkpoint._save_file, []

    def full_after_the_first(tensors, path, metadata):  # the disk fills up after the first checkpoint
        saves.append(path)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, path, metadata)

    monkeypatch.setattr(mixkd.checkpoint, "_save_file", full_after_the_first)
    command = ["study", "run", str(study), "--out", str(out), "--no-report", "--no-progress"]
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    first = out / "teachers" / "resnet8_a-s0"
    assert len(err) == 1 and err[0] == (
        f"mixkd: error: the study stopped, every run resumable ({out}): cannot write {first / 'checkpoint.safetensors'}: "
        "No space left on device; free some space (the last checkpoint is kept) and run the same command again"), err
    assert not list(out.glob(f"**/{ERROR_NAME}"))  # nothing failed
    assert RunFolder(first).status() == "stopped" and RunFolder(first).checkpoint_meta()["epoch"] == 1
    state = json.loads((out / "study-state.json").read_text())["runs"]
    assert {run_id: s["status"] for run_id, s in state.items()} == {"teachers/resnet8_a-s0": "stopped",
                                                                  "teachers/resnet8_b-s0": "pending"}
    monkeypatch.setattr(mixkd.checkpoint, "_save_file", real)  # space freed: the same command finishes the study
    assert main(command) == 0
    assert "resume at epoch 2" in RunFolder(first).log.read_text()
    assert RunFolder(out / "teachers" / "resnet8_b-s0").status() == "done"
