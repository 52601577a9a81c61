"""Step-exact checkpoints, --time-limit and signals: a run stopped anywhere and resumed computes
exactly what the uninterrupted run computes (CPU, one thread)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mixkd.checkpoint import load_checkpoint
from mixkd.config import build_config
from mixkd.control import EXIT_STOPPED, StopControl, parse_duration
from mixkd.engine import Run, StoppedRun, run_job
from mixkd.errors import MixkdError

TIMING = ("images_per_s", "epoch_seconds")


_TINY = {}  # the tiny fake CIFAR-10's folder (conftest's cifar10_dir), for cfg_for


@pytest.fixture(scope="module", autouse=True)
def _tiny_cifar(cifar10_dir):
    _TINY["data_dir"] = str(cifar10_dir)


def cfg_for(out, **extra):
    """Two epochs of 10 steps each (160 fake CIFAR-10 images, batch 16); on CUDA, digits (11 steps of 128)."""
    data = ({"dataset": "digits", "batch_size": 128} if extra.get("device") == "cuda"
            else {"dataset": "cifar10", "data_dir": _TINY["data_dir"], "batch_size": 16})
    flags = {"task": "train", "model": "resnet8", **data, "epochs": 2, "device": "cpu", "progress": False,
             "out": str(out), "optim.milestones": [1], "compile": "off", **extra}
    return build_config(flags=flags)


def metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def weights(run_dir):
    return load_checkpoint(run_dir).state_dict


def assert_same_run(a, b):
    assert metrics(a) == metrics(b)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref") / "run"
    try:
        run_job(cfg_for(out))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("stops", [[5], [10, 15]])  # mid-epoch 1; the last step of epoch 1 then mid-epoch 2
def test_stop_mid_epoch_and_resume_is_bit_exact(tmp_path, reference, one_thread, stops):
    out = tmp_path / "run"
    done = 0
    for i, at in enumerate(stops):
        job = Run(cfg_for(out), resume=i > 0)
        job.start()
        assert job.steps_per_epoch == 10
        while job.epoch * job.steps_per_epoch + job.step_in_epoch < at:
            job.advance()
        job.stop("time")
        ckpt = load_checkpoint(out)
        assert ckpt.meta["stopped"] == "time"
        assert ckpt.epoch * job.steps_per_epoch + ckpt.step == at
        done = at
    assert done and not (out / "result.json").exists()
    run_job(cfg_for(out), resume=True)
    assert_same_run(out, reference)
    assert "optim.0.momentum_buffer" not in load_checkpoint(out).state_dict  # a finished run keeps weights only
    assert load_checkpoint(out).optimizer_state is None


def test_save_every_minutes_writes_mid_epoch_checkpoints(tmp_path, one_thread):
    out = tmp_path / "run"
    job = Run(cfg_for(out, save_every_minutes=1e-9), resume=False)
    job.start()
    for _ in range(4):
        job.advance()
    ckpt = load_checkpoint(out)
    assert (ckpt.epoch, ckpt.step) == (0, 4)  # saved after every step
    assert "stopped" not in ckpt.meta


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_at_a_random_step_stops_with_a_checkpoint_and_resumes_exactly(tmp_path, reference, one_thread, sig,
                                                                              monkeypatch):
    at = random.Random(sig).randint(1, 20)  # any of the 2 x 10 steps
    out = tmp_path / "run"
    real = Run.advance
    calls = {"n": 0}

    def advance(self):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), sig)
        return real(self)

    monkeypatch.setattr(Run, "advance", advance)
    control = StopControl()
    control.install_signals()
    try:
        with pytest.raises(StoppedRun) as stopped:
            run_job(cfg_for(out), control=control)
    finally:
        control.restore_signals()
    assert stopped.value.reason == ("interrupt" if sig == signal.SIGINT else "signal")
    assert control.exit_status == (130 if sig == signal.SIGINT else EXIT_STOPPED)
    monkeypatch.setattr(Run, "advance", real)
    run_job(cfg_for(out), resume=True)
    assert_same_run(out, reference)


def _cli(*args, cwd=None, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "mixkd", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def test_time_limit_stops_before_the_limit_with_status_75(tmp_path, reference):
    out = tmp_path / "run"
    # Long enough to start (a cold import of torch can take several seconds on a busy machine), far too
    # short for 40 epochs.
    limit = 20.0
    t0 = time.perf_counter()
    proc = _cli("train", "--model", "resnet8", "--dataset", "digits", "--epochs", "500", "--batch-size", "64",
                "--device", "cpu", "--out", str(out), "--time-limit", f"{limit:g}s")
    wall = time.perf_counter() - t0
    assert proc.returncode == EXIT_STOPPED, proc.stderr
    assert wall < limit, wall
    assert "continue with" in proc.stderr and "--resume" in proc.stderr
    ckpt = load_checkpoint(out)
    assert ckpt.meta["stopped"] == "time" and not (out / "result.json").exists()


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("25m", 1500), ("1:30:00", 5400), ("2:05", 125),
                                          ("1h30m", 5400), ("1.5h", 5400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5x", "1:75", "-5m", "0", "0s", "0:00:00"])
def test_parse_duration_rejects(text):
    with pytest.raises(MixkdError, match="--time-limit"):
        parse_duration(text)


@pytest.mark.parametrize("limit,expect", [("soon", "not a duration"), ("0", "must be positive"),
                                          ("-3m", "must be positive"), ("0.001s", "too short to take even one step")])
def test_bad_time_limits_are_one_line_and_change_nothing(tmp_path, limit, expect, capsys, one_thread):
    from mixkd.cli import main

    out = tmp_path / "run"
    code = main(["train", "--model", "resnet8", "--dataset", "digits", "--epochs", "1", "--device", "cpu",
                 "--out", str(out), f"--time-limit={limit}"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixkd: error:") and expect in lines[0], err
    if "too short" in expect:
        assert "one step takes about" in lines[0]
    assert not out.exists()

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stop_mid_epoch_and_resume_on_cuda_matches_within_tolerance(tmp_path, precision):
    """On CUDA (graphed step) a resumed run follows the uninterrupted one within the graphed-vs-eager tolerance."""
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    run_job(cfg_for(whole, device="cuda", precision=precision))
    job = Run(cfg_for(sliced, device="cuda", precision=precision))
    job.start()
    for _ in range(15):
        job.advance()
    job.stop("time")
    run_job(cfg_for(sliced, device="cuda", precision=precision), resume=True)
    for a, b in zip(metrics(whole), metrics(sliced), strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 2e-2 * max(1.0, abs(a["train_loss"]))
        assert abs(a["test_top1"] - b["test_top1"]) <= 3.0


def test_a_signal_during_the_final_evaluation_stops_at_the_next_batch_and_resuming_evaluates_again(
        tmp_path, one_thread, monkeypatch):
    import mixkd.engine as engine

    real, batches = engine.evaluate, []

    def evaluate(model, loader, precision="fp32", stop=None):  # SIGUSR1 arrives as batch 2 of 5 is fetched
        def signalled():
            for i, batch in enumerate(loader):
                batches.append(i)
                if i == 1:
                    os.kill(os.getpid(), signal.SIGUSR1)
                yield batch
        return real(model, signalled(), precision, stop)

    out, whole = tmp_path / "run", tmp_path / "whole"
    run_job(cfg_for(whole, epochs=1, eval_batch_size=16))  # 80 test images: 5 batches
    monkeypatch.setattr(engine, "evaluate", evaluate)
    control = StopControl()
    control.install_signals()
    try:
        with pytest.raises(StoppedRun) as stopped:
            run_job(cfg_for(out, epochs=1, eval_batch_size=16), control=control)
    finally:
        control.restore_signals()
    assert stopped.value.reason == "signal" and batches == [0, 1]  # the batch fetched as it came is not evaluated
    ckpt = load_checkpoint(out)
    assert (ckpt.epoch, ckpt.step, ckpt.meta["train_images"], ckpt.meta["stopped"]) == (0, 10, 0, "signal")
    assert not (out / "metrics.jsonl").exists() and not (out / "result.json").exists()
    assert "stopped by a signal at epoch 1 step 10/10, before its evaluation" in (out / "log.txt").read_text()
    monkeypatch.setattr(engine, "evaluate", real)
    result = run_job(cfg_for(out, epochs=1, eval_batch_size=16), resume=True).result
    assert_same_run(out, whole)  # the evaluation done again, the epoch's images counted once
    assert result["images_per_s"] == pytest.approx(160 / json.loads((out / "metrics.jsonl").read_text())["epoch_seconds"])


def test_resuming_with_another_thread_count_warns_and_the_result_records_each_part(tmp_path, one_thread, capsys):
    from mixkd.cli import main

    out = tmp_path / "run"
    job = Run(cfg_for(out, epochs=1))
    job.start()
    while job.step_in_epoch < 5:
        job.advance()
    job.stop("signal")  # 5 of 10 steps with 1 thread
    torch.set_num_threads(2)
    result = run_job(cfg_for(out, epochs=1), resume=True).result
    assert result["threads"] == [1, 2]  # not one number as if for the whole run
    assert result["segments"] == [{"epoch": 0, "step": 0, "threads": 1}, {"epoch": 0, "step": 5, "threads": 2}]
    assert ("warning: the run so far used 1 CPU thread and continues with 2: sums are taken in another order, so it "
            "will not match an uninterrupted run bit for bit (result.json records the threads of each part); "
            "--threads 1 continues as it began") in (out / "log.txt").read_text()
    # --threads sets the count (a machine key: a resume may give it), and a run at one count records one number
    fresh = tmp_path / "fresh"
    args = ["train", "--model", "resnet8", "--dataset", "cifar10", "--data-dir", _TINY["data_dir"], "--batch-size", "16",
            "--epochs", "1", "--device", "cpu", "--no-progress", "--out", str(fresh)]
    assert main([*args, "--threads", "1"]) == 0 and torch.get_num_threads() == 1
    assert json.loads((fresh / "result.json").read_text())["threads"] == 1
    assert "warning" not in (fresh / "log.txt").read_text()
    assert main(["train", "--out", str(fresh), "--resume", "--threads", "3"]) == 0  # accepted on resume
    capsys.readouterr()
