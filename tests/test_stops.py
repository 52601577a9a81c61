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
    assert outcome["stopped"] and not outcome["ok"] and "died" not in outcome["message"], outcome
    assert not (tmp_path / "teachers" / "t" / "error.txt").exists()
