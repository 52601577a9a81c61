"""Packs: several runs stepped in turn in one process compute exactly what each computes alone
(bit-exact on the CPU; on CUDA, each on its own stream, within the graphed-vs-eager tolerance)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mixkd.checkpoint import load_checkpoint
from mixkd.config import build_config
from mixkd.engine import Run, run_job
from mixkd.pack import Pack
from mixkd.study.packworker import PackWorker
from mixkd.study.worker import Job

TIMING = ("images_per_s", "epoch_seconds")
CUDA = torch.cuda.is_available()


def metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def configs(root, device="cpu", data_dir=None):
    """A teacher and three different runs. With ``data_dir`` (the tiny fake CIFAR-10: 160 training images)
    small batches give each run as many steps as digits does; without it, digits."""
    # compile off: packing is under test here (tests/test_compile.py tests compilation)
    base = {"dataset": "digits", "device": device, "progress": False, "optim.milestones": [1], "compile": "off"}
    batch = {"teacher": 256, "a": 128, "b": 96, "c": 160}
    if data_dir is not None:
        base.update({"dataset": "cifar10", "data_dir": str(data_dir)})
        batch = {"teacher": 32, "a": 16, "b": 12, "c": 20}
    teacher = build_config(flags={**base, "task": "train", "model": "resnet8", "epochs": 1,
                                  "batch_size": batch["teacher"], "out": str(root / "teacher")})
    return teacher, [
        build_config(flags={**base, "task": "train", "model": "resnet8", "epochs": 2, "batch_size": batch["a"],
                            "mix.method": "mixup", "seed": 1, "out": str(root / "a")}),
        build_config(flags={**base, "task": "distill", "model": "resnet8", "epochs": 1, "batch_size": batch["b"],
                            "kd.teacher": str(root / "teacher"), "kd.method": "std", "mix.method": "mixup",
                            "mix.fraction": 0.1, "out": str(root / "b")}),
        build_config(flags={**base, "task": "train", "model": "resnet14", "epochs": 1, "batch_size": batch["c"],
                            "mix.method": "cutmix", "seed": 2, "out": str(root / "c")}),
    ]


def test_three_different_runs_packed_equal_the_same_runs_alone(tmp_path, one_thread, cifar10_dir):
    alone, packed = tmp_path / "alone", tmp_path / "packed"
    teacher, runs = configs(alone, data_dir=cifar10_dir)
    run_job(teacher)
    for cfg in runs:
        run_job(cfg)
    teacher_p, runs_p = configs(packed, data_dir=cifar10_dir)
    shutil.copytree(alone / "teacher", packed / "teacher")
    pack = Pack("cpu", 3)
    jobs = [Run(cfg) for cfg in runs_p]
    for job in jobs:
        assert pack.admit(job) is None
    assert jobs[0].train_loader.images.data_ptr() == jobs[2].train_loader.images.data_ptr()  # one copy of the data
    ended = []
    while pack.live:
        ended += pack.round()
    assert len(ended) == 3 and all(outcome["ok"] for _, outcome in ended)
    assert ended[-1][0] is jobs[0]  # the 2-epoch run ends last
    for name in "abc":
        assert metrics(alone / name) == metrics(packed / name), name
        a, b = load_checkpoint(alone / name).state_dict, load_checkpoint(packed / name).state_dict
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_pack_worker_admits_continuously_and_a_failing_run_stops_alone(tmp_path, one_thread, cifar10_dir):
    teacher, runs = configs(tmp_path, data_dir=cifar10_dir)
    run_job(teacher)
    bad = build_config(flags={"task": "train", "model": "resnet8", "dataset": "cifar10", "data_dir": str(cifar10_dir),
                              "device": "cpu", "progress": False, "epochs": 2, "batch_size": 32, "optim.lr": 1e12,
                              "out": str(tmp_path / "diverges")})
    worker = PackWorker(2)
    jobs = [runs[1], bad, runs[0], runs[2]]
    for cfg in jobs:
        worker.submit(Job(Path(cfg.out).name, cfg, cfg.out))
    ended, most_live, shown = [], 0, None
    while worker.busy:
        ended += worker.work()
        most_live = max(most_live, len(worker.live_runs()))
        if shown is None and len(worker.live_runs()) == 2:
            worker.work()
            shown = worker.progress()
    from mixkd.study.runner import _slots_line

    assert {s["run"] for s in shown["slots"]} <= {"a", "b", "c", "diverges"} and len(shown["slots"]) == 2
    assert shown["images_per_s"] > 0 and "images/s" in _slots_line(type("E", (), {"progress": lambda self: [shown]})())
    outcomes = dict(ended)
    assert most_live == 2
    assert outcomes["diverges"]["ok"] is False and "training loss became" in outcomes["diverges"]["message"]
    assert "training loss became" in (tmp_path / "diverges" / "error.txt").read_text()
    assert all(outcomes[n]["ok"] for n in "abc")
    order = [run_id for run_id, _ in ended]
    assert order.index("diverges") < order.index("c")  # its slot went to the next run at once


def _measured_pack(root, data_dir, device, measure_at):
    """Two different runs in one pack; ``Pack.measure`` on every run before rounds ``measure_at``. Returns
    how many measurements left a run's state (weights, buffers, optimizer, loss sums, step count, RNGs)
    other than it was."""
    base = {"dataset": "cifar10", "data_dir": str(data_dir), "device": device, "progress": False, "compile": "off",
            "task": "train", "epochs": 1, "mix.method": "mixup"}
    cfgs = [build_config(flags={**base, "model": "resnet8", "batch_size": 32, "seed": 1, "out": str(root / "a")}),
            build_config(flags={**base, "model": "resnet14", "batch_size": 40, "seed": 2, "mix.method": "cutmix",
                                "out": str(root / "c")})]
    pack = Pack(device, 2)
    for cfg in cfgs:
        assert pack.admit(Run(cfg)) is None

    def state(job):
        step = job.step
        return ([t.detach().clone() for t in step._state_tensors()], step.steps, step.generator.get_state(),
                torch.get_rng_state(), job.step_in_epoch)

    def same(a, b):
        return (all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True)) and a[1] == b[1]
                and all(torch.equal(x, y) for x, y in zip(a[2:4], b[2:4], strict=True)) and a[4] == b[4])

    changed, rounds = 0, 0
    while pack.live:
        if rounds in measure_at:
            for job in pack.live:
                job.step_seconds = None  # measured again (a run measures once, then keeps its figure)
                if device == "cuda":
                    torch.cuda.synchronize()  # the last round's steps on the runs' streams are done
                before = state(job)
                assert pack.measure(job) is None and job.step_seconds > 0
                changed += not same(before, state(job))
        pack.round()
        rounds += 1
    return changed


def test_pack_measure_leaves_every_run_as_it_was(tmp_path, cifar10_dir, one_thread):
    """Measured before the first step and mid-epoch, each run's state is unchanged, and the runs end
    bit-exactly as the same runs unmeasured."""
    assert _measured_pack(tmp_path / "measured", cifar10_dir, "cpu", (0, 3)) == 0
    assert _measured_pack(tmp_path / "plain", cifar10_dir, "cpu", ()) == 0
    for name in "ac":
        assert metrics(tmp_path / "measured" / name) == metrics(tmp_path / "plain" / name), name
        a = load_checkpoint(tmp_path / "measured" / name).state_dict
        b = load_checkpoint(tmp_path / "plain" / name).state_dict
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_pack_measure_on_streams_leaves_every_run_as_it_was_on_cuda(tmp_path, cifar10_dir):
    """On CUDA the measured step and its restore run on the run's own stream (graph capture included)."""
    assert _measured_pack(tmp_path / "measured", cifar10_dir, "cuda", (0, 3)) == 0
    assert _measured_pack(tmp_path / "plain", cifar10_dir, "cuda", ()) == 0
    for name in "ac":
        for ra, rb in zip(metrics(tmp_path / "measured" / name), metrics(tmp_path / "plain" / name), strict=True):
            assert abs(ra["train_loss"] - rb["train_loss"]) < 2e-3 * max(1.0, abs(ra["train_loss"])), name


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_packed_runs_on_streams_match_alone_on_cuda(tmp_path):
    alone, packed = tmp_path / "alone", tmp_path / "packed"
    teacher, runs = configs(alone, "cuda")
    run_job(teacher)
    for cfg in runs:
        run_job(cfg)
    teacher_p, runs_p = configs(packed, "cuda")
    run_job(teacher_p)
    pack = Pack("cuda", 3)
    for cfg in runs_p:
        assert pack.admit(Run(cfg)) is None
    while pack.live:
        pack.round()
    for name in "abc":
        for ra, rb in zip(metrics(alone / name), metrics(packed / name), strict=True):
            assert abs(ra["train_loss"] - rb["train_loss"]) < 2e-3 * max(1.0, abs(ra["train_loss"])), name
            assert abs(ra["test_top1"] - rb["test_top1"]) <= 3.0, name


def _study(path, epochs=1, methods=("alone", "kd", "std_pmu")):
    path.write_text(yaml.safe_dump({
        "name": "p", "defaults": {"dataset": "digits", "device": "cpu", "epochs": epochs, "batch_size": 128,
                                  "eval_batch_size": 512, "optim": {"lr": 0.1}},
        "teachers": [{"name": "plain", "models": "resnet8"}],
        "students": [{"teachers": "plain", "models": "resnet8", "methods": list(methods)}]}))
    return path


def _cli(*args, timeout=400):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "mixkd", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_killing_the_study_process_takes_its_workers_and_frees_the_folder(tmp_path):
    path, out = _study(tmp_path / "p.yaml", epochs=200), tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mixkd", "study", "run", str(path), "--out", str(out),
                             "--workers", "1", "--pack", "2", "--no-progress", "--no-report"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not list(out.glob("teachers/*/metrics.jsonl")) and not list(out.glob("teachers/*/log.txt")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.5)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    assert workers
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    for pid in workers:  # they checkpoint and leave on their own
        t0 = time.monotonic()
        while Path(f"/proc/{pid}").exists() and time.monotonic() - t0 < 60:
            time.sleep(0.2)
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    status = _cli("study", "status", str(out))
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0].endswith("not being run now"), status.stdout
    # a new 'study run' takes the folder (a held lock or a live worker would be exit 2 with one line)
    again = _cli("study", "run", str(path), "--out", str(out), "--workers", "1", "--pack", "2", "--no-progress",
                 "--no-report", "--time-limit", "1s")
    assert again.returncode == 75, again.stdout + again.stderr  # stopped on its time limit, resumable
    assert "stopped before the time limit" in again.stderr, again.stderr


def test_a_stopped_study_finishes_like_an_uninterrupted_study(tmp_path, monkeypatch, one_thread):
    """SIGTERM to the study (as SLURM sends before the wall time): its workers checkpoint, it exits with 75;
    run again, it finishes with exactly the numbers of a study run in one go (here in this process)."""
    from mixkd.study import InProcessExecutor, load_study, run_study

    path = _study(tmp_path / "p.yaml", epochs=2, methods=["alone", "std_pmu"])
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"

    run_study(load_study(path), whole, InProcessExecutor(3), progress=False, echo=lambda *_: None)
    common = ["study", "run", str(path), "--out", str(sliced), "--workers", "1", "--pack", "3", "--no-progress",
              "--no-report"]
    proc = subprocess.Popen([sys.executable, "-m", "mixkd", *common], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while "epoch 1/2" not in "".join(p.read_text() for p in sliced.glob("*/*/log.txt")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, output
    state = json.loads((sliced / "study-state.json").read_text())
    assert "stopped" in {r["status"] for r in state["runs"].values()}, state
    rest = _cli(*common)
    assert rest.returncode == 0, rest.stdout + rest.stderr
    for result in sorted(whole.glob("*/*/result.json")):
        rel = result.parent.relative_to(whole)
        assert metrics(whole / rel) == metrics(sliced / rel), rel
