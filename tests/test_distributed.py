"""One run over many processes (mixkd.distributed): the launch environment, the backend choice, the
gloo SyncBatchNorm, and 2-rank gloo runs under torchrun on the CPU: N ranks compute what one
process computes, stops are collective, a dead rank ends the launch and a restart resumes it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mixkd import distributed
from mixkd.checkpoint import load_checkpoint
from mixkd.cli import main
from mixkd.errors import MixkdError
from mixkd.models.sync_bn import GlooSyncBatchNorm, convert_sync_batchnorm

try:
    from cifar_fixture import make_fake_cifar_tar_gz, write_fake_cifar
except ImportError:  # run from the repository root
    from tests.cifar_fixture import make_fake_cifar_tar_gz, write_fake_cifar

ROOT = Path(__file__).resolve().parent.parent


# ---- the launch environment ---------------------------------------------------------------------
def test_first_host_of_slurm_node_lists():
    assert distributed.first_host("gpu[003-004,010],cpu1") == "gpu003"
    assert distributed.first_host("node7") == "node7"
    assert distributed.first_host("a1,b[1-2]") == "a1"
    assert distributed.first_host("rack[12,14]-gpu") == "rack12-gpu"


def test_launch_from_torchrun_and_slurm_environments():
    assert distributed.launch_from_env({}) is None
    assert distributed.launch_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process: nothing to join
    t = distributed.launch_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                     "MASTER_ADDR": "h0", "MASTER_PORT": "1234", "TORCHELASTIC_RESTART_COUNT": "2",
                                     "TORCHELASTIC_USE_AGENT_STORE": "True", "SLURM_PROCID": "0"})
    assert (t.rank, t.world, t.local_rank, t.local_world, t.addr, t.port, t.launcher, t.agent_store, t.attempt) == (
        3, 4, 1, 2, "h0", 1234, "torchrun", True, 2)  # torchrun's variables win under srun too
    slurm = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "123456", "SLURM_STEP_TASKS_PER_NODE": "2(x4)"}
    s = distributed.launch_from_env(slurm)
    assert (s.rank, s.world, s.local_rank, s.local_world, s.addr, s.port, s.launcher) == (
        5, 8, 1, 2, "gpu07", distributed.SLURM_PORT_BASE + 123456 % 20000, "slurm")
    # a second step running beside the first in one allocation: another port (15000 + (123456 + 7919) % 20000)
    assert distributed.launch_from_env({**slurm, "SLURM_STEP_ID": "1"}).port == 26375 != s.port
    s = distributed.launch_from_env({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "999"})
    assert (s.addr, s.port) == ("head", 999)
    batch_shell = {k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}  # sbatch's script outside srun
    assert distributed.launch_from_env(batch_shell) is None
    with pytest.raises(MixkdError, match="RANK='x' is not a number"):
        distributed.launch_from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_backend_nccl_only_for_one_gpu_per_rank():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert distributed.choose_backend("auto", cuda, ["h/GPU-a", "h/GPU-b"]) == "nccl"
    assert distributed.choose_backend("auto", cuda, ["h/GPU-a", "h/GPU-a"]) == "gloo"  # two ranks share a GPU
    assert distributed.choose_backend("auto", cpu, ["cpu0", "cpu1"]) == "gloo"
    assert distributed.choose_backend("nccl", cuda, ["h/GPU-a", "h/GPU-a"]) == "nccl"  # asked for: the user's call
    with pytest.raises(MixkdError, match="nccl needs a GPU"):
        distributed.choose_backend("nccl", cpu, ["cpu0"])


# ---- the gloo SyncBatchNorm ---------------------------------------------------------------------
@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_gloo_sync_batchnorm_of_one_rank_is_batchnorm(one_rank_group):
    """Forward, input and parameter gradients and running statistics, over a few steps, as BatchNorm2d's."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4, momentum=0.3))
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-1, 1)
    sync = convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4, momentum=0.3)), use_torch=False)
    sync.load_state_dict(ref.state_dict())  # BatchNorm's keys
    assert isinstance(sync[1], GlooSyncBatchNorm)
    for step in range(3):
        x = (torch.randn(6, 3, 7, 7) * (step + 1)).requires_grad_(True)
        xs = x.detach().clone().requires_grad_(True)
        y, ys = ref(x), sync(xs)
        torch.testing.assert_close(ys, y, rtol=1e-5, atol=1e-5)
        w = torch.randn_like(y)
        ref.zero_grad()
        sync.zero_grad()
        (y * w).sum().backward()
        (ys * w).sum().backward()
        torch.testing.assert_close(xs.grad, x.grad, rtol=1e-4, atol=1e-5)
        for p, q in zip(ref.parameters(), sync.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)
    for key, value in ref.state_dict().items():  # running mean, unbiased running variance, batches tracked
        torch.testing.assert_close(sync.state_dict()[key], value)
    sync.eval()
    ref.eval()
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(sync(x), ref(x))


def test_torchrun_passing_on_the_terminals_ctrl_c_is_one_interrupt():
    """A second SIGINT within the window is the same Ctrl-C (torchrun forwards what its workers got);
    without the window, a second Ctrl-C stops at once."""
    from mixkd.control import StopControl

    control = StopControl()
    control.install_signals(same_interrupt_within=60.0)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert control.reason == "interrupt" and control.exit_status == 130
    finally:
        control.restore_signals()
    control = StopControl()
    control.install_signals()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        control.restore_signals()


# ---- 2-rank gloo runs under torchrun ------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def _torchrun(args: list[str], *, restarts: int = 0, wait: bool = True, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "--monitor-interval", "0.2", "-m", "mixkd", *args]
    if wait:
        return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, **kw)
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _rank_pid(launcher: subprocess.Popen, rank: int, limit: float = 120.0) -> int:
    """The PID of the worker of ``rank`` (a child of torchrun's agent whose environment says so)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        for task in Path(f"/proc/{launcher.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in env:
                    return int(child)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} appeared")


def _wait_for_epochs(run: Path, epochs: int, launcher: subprocess.Popen, limit: float = 240.0) -> None:
    end = time.monotonic() + limit  # a bound against a hang, not a timing assertion
    while time.monotonic() < end:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= epochs:
            return
        assert launcher.poll() is None, launcher.stdout.read()
        time.sleep(0.05)
    raise AssertionError(f"{run} did not reach epoch {epochs}")


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run).state_dict


def _assert_same_run(a: Path, b: Path, rtol: float, weights_tol: float | None = None) -> None:
    """The same per-epoch losses and test metrics, and the same final weights (BatchNorm statistics too)."""
    weights_tol = rtol if weights_tol is None else weights_tol
    ra, rb = _rows(a), _rows(b)
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=rtol), (x["epoch"], x["train_loss"], y["train_loss"])
        assert x["test_nll"] == pytest.approx(y["test_nll"], rel=rtol)
        assert x["test_top1"] == y["test_top1"]
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=weights_tol, atol=weights_tol, msg=key)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar10-64")
    write_fake_cifar(root, num_classes=10, n_train=64, n_test=40, seed=0)  # one step of 64 per epoch
    return root


def _args(data_dir: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return ["train", "--dataset", "cifar10", "--data-dir", str(data_dir), "--model", "resnet8", "--epochs", str(epochs),
            "--batch-size", "64", "--lr", "0.02", "--milestones", str(min(5, epochs)), "--device", "cpu", "--no-progress",
            "--save-every", "1",
            "--sync-bn",
            "--out", str(out), *extra]


EPOCHS = 6  # one step each: the per-epoch losses are the per-step losses


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """(1 process x 64, torchrun 2 ranks x 32) runs of the same config."""
    root = tmp_path_factory.mktemp("uninterrupted")
    one, two = root / "one", root / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(data_dir, one, EPOCHS)) == 0
    finally:
        torch.set_num_threads(threads)
    proc = _torchrun(_args(data_dir, two, EPOCHS, "--compile", "on"))  # under DDP: eager, and the log says so
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two


def test_two_ranks_compute_what_one_process_computes_and_stop_together(tmp_path, data_dir, uninterrupted):
    """2 ranks x 32 (torchrun, gloo, --sync-bn) vs 1 process x 64: the same loss at every step, the same
    test metrics, the same weights. Then SIGTERM to rank 1 alone: both ranks stop at the same step with
    one checkpoint (exit 75 each), and the run resumed by one process equals the uninterrupted ones."""
    (one, two), stopped = uninterrupted, tmp_path / "stopped"
    log = (two / "log.txt").read_text()
    assert "x 2 processes (gloo, batch 32 each)" in log and "under DDP the step runs eagerly" in log
    assert len(list(two.iterdir())) == len(list(one.iterdir()))  # only rank 0 wrote, and what one process writes
    result = json.loads((two / "result.json").read_text())
    assert (result["processes"], result["dist_backend"], result["sync_bn"]) == (2, "gloo", True)
    _assert_same_run(one, two, rtol=1e-4, weights_tol=1e-3)  # measured: 8e-6 and 1.1e-4 at most

    launcher = _torchrun(_args(data_dir, stopped, EPOCHS), wait=False)
    rank1 = _rank_pid(launcher, 1)
    _wait_for_epochs(stopped, 2, launcher)
    os.kill(rank1, signal.SIGTERM)
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode != 0  # torchrun reports its workers' exit 75 as a failure
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", out)) == {"75"}, out[-3000:]
    where = re.search(r"stopped by a signal at epoch (\d+) step (\d+) of", out)
    assert where, out[-3000:]
    assert f"rank 1 of 2: stopped by a signal at epoch {where[1]} step {where[2]}" in out  # the same step
    assert int(where[1]) <= EPOCHS and not (stopped / "result.json").exists()
    # resumed by one process (the same global batch): what the uninterrupted runs compute
    assert main(_args(data_dir, stopped, EPOCHS, "--resume")) == 0
    _assert_same_run(stopped, two, rtol=1e-4, weights_tol=1e-3)
    _assert_same_run(stopped, one, rtol=1e-4, weights_tol=1e-3)


def test_a_time_limit_too_short_for_a_step_is_refused_by_every_rank(tmp_path, data_dir):
    run = tmp_path / "short"
    proc = _torchrun(_args(data_dir, run, EPOCHS, "--time-limit", "1s"))
    out = proc.stderr + proc.stdout
    # each rank refuses by itself (the one that exits second may be ended by torchrun's agent meanwhile)
    assert out.count("mixkd: error: --time-limit 1.0 s is too short to take even one step") == 2, out[-3000:]
    assert "2" in re.findall(r"exitcode\s*:\s*(-?\d+)", out) and proc.returncode != 0
    assert not run.exists()  # nothing written


def test_srun_tasks_run_one_run(tmp_path, data_dir, uninterrupted):
    """Two processes started as srun starts its tasks (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID,
    the node list; rank 0 serves the rendezvous): the run of the torchrun launch, bit for bit."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "srun"
    procs = [subprocess.Popen([sys.executable, "-m", "mixkd", *_args(data_dir, run, EPOCHS)], env={
        **_env(), "SLURM_PROCID": str(r), "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": str(r),
        "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": "77", "SLURM_STEP_TASKS_PER_NODE": "2",
        "MASTER_PORT": str(port)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "x 2 processes (gloo, batch 32 each)" in (run / "log.txt").read_text()
    _assert_same_run(run, uninterrupted[1], rtol=1e-6)


def test_a_dead_rank_ends_the_launch_and_a_restart_resumes_it(tmp_path, data_dir, uninterrupted):
    """kill -9 of rank 1: torchrun ends the other rank and exits non-zero (no hang on a collective);
    ``torchrun --max-restarts 1 ... --resume auto`` continues from the last checkpoint, and again after
    another kill -9, and finishes with what an uninterrupted 2-rank run computes."""
    run = tmp_path / "run"
    launcher = _torchrun(_args(data_dir, run, EPOCHS), wait=False)
    rank1 = _rank_pid(launcher, 1)
    _wait_for_epochs(run, 1, launcher)
    os.kill(rank1, signal.SIGKILL)
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode != 0 and "Signal 9 (SIGKILL)" in out, out[-3000:]
    done = len(_rows(run))
    assert 1 <= done < EPOCHS and not (run / "result.json").exists()

    launcher = _torchrun(_args(data_dir, run, EPOCHS, "--resume", "auto"), restarts=1, wait=False)
    first = _rank_pid(launcher, 1)
    _wait_for_epochs(run, done + 1, launcher)
    os.kill(first, signal.SIGKILL)  # the second attempt resumes from the checkpoint of this one
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out[-3000:]
    log = (run / "log.txt").read_text()
    assert log.count("resume at") == 2, log
    _assert_same_run(run, uninterrupted[1], rtol=1e-6)


def _stopped_at(out: str, rank0_words: str, rank1_words: str) -> tuple[int, int]:
    """The (epoch, step) at which rank 0 says it stopped; rank 1 must say the same step."""
    where = re.search(rf"{rank0_words} at epoch (\d+) step (\d+) of \d+ \(checkpoint written\)", out)
    assert where, out[-3000:]
    assert f"rank 1 of 2: {rank1_words} at epoch {where[1]} step {where[2]}" in out, out[-3000:]
    return int(where[1]), int(where[2])


def test_ctrl_c_at_the_terminal_stops_every_rank_at_one_step_with_one_checkpoint(tmp_path, data_dir, uninterrupted):
    """Ctrl-C as a terminal sends it (SIGINT to torchrun and its workers, one process group; torchrun
    then passes it on): both ranks stop at the same step, exit 130, and the checkpoint resumes to the
    uninterrupted run."""
    run = tmp_path / "ctrl-c"
    launcher = _torchrun(_args(data_dir, run, EPOCHS), wait=False, start_new_session=True)
    _rank_pid(launcher, 1)
    _wait_for_epochs(run, 2, launcher)
    os.killpg(launcher.pid, signal.SIGINT)
    out, _ = launcher.communicate(timeout=300)
    epoch, _ = _stopped_at(out, "interrupted", "stopped by Ctrl-C")
    # no worker's traceback (a second Ctrl-C would raise KeyboardInterrupt); torchrun's agent ends with its own
    assert "KeyboardInterrupt" not in out and "got signal: 2" in out, out[-3000:]
    assert epoch <= EPOCHS and not (run / "result.json").exists() and (run / "checkpoint.safetensors").exists()
    assert main(_args(data_dir, run, EPOCHS, "--resume")) == 0
    _assert_same_run(run, uninterrupted[0], rtol=1e-4, weights_tol=1e-3)


def test_a_time_limit_stops_every_rank_at_one_step_with_one_checkpoint(tmp_path, data_dir):
    """--time-limit reached in the middle of a 2-rank run whose ranks started 3 s apart (as srun's tasks
    may: each counts the limit from its own start, so rank 0's deadline comes first): every rank stops at
    the same step (the ranks agree), exit 75 each, one checkpoint, nothing finished."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "limit"
    args = [sys.executable, "-m", "mixkd", *_args(data_dir, run, 100_000, "--time-limit", "25s")]  # far more than fit
    procs = []
    for r in range(2):
        procs.append(subprocess.Popen(args, env={
            **_env(), "SLURM_PROCID": str(r), "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": str(r),
            "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": "78", "SLURM_STEP_TASKS_PER_NODE": "2",
            "MASTER_PORT": str(port)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        time.sleep(3.0 if r == 0 else 0.0)  # a later start, hence a later deadline, for rank 1
    try:  # without the agreement, rank 1 would wait on a collective for rank 0, which stopped alone
        outs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [75, 75], outs
    _stopped_at("\n".join(outs), "stopped before the time limit", "stopped on time")
    assert not (run / "result.json").exists() and (run / "checkpoint.safetensors").exists()
    # each rank's torch generator (dropout's masks) is its own, and saved: the ranks draw no same masks
    rng = load_checkpoint(run / "checkpoint.safetensors").rng
    assert {"torch_cpu", "torch_cpu.1"} <= set(rng) and not torch.equal(rng["torch_cpu"], rng["torch_cpu.1"])


def test_without_sync_bn_the_figures_are_the_saved_models_and_the_ranks_extract_the_archive_once(tmp_path):
    """2 ranks without --sync-bn, from a data folder holding only the CIFAR archive: the ranks prepare it
    once (one extracts under the lock, the other waits), and the run's reported figures (metrics.jsonl,
    result.json) are exactly what `mixkd eval` computes from its checkpoint (every rank evaluates rank 0's
    BatchNorm statistics, the ones saved; each rank's own would give other figures)."""
    from mixkd.evaluation import evaluate_checkpoint

    data, run = tmp_path / "data", tmp_path / "run"
    make_fake_cifar_tar_gz(data, num_classes=10, n_train=64, n_test=40, seed=0)
    args = [a for a in _args(data, run, 2) if a != "--sync-bn"]
    proc = _torchrun(args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    result = json.loads((run / "result.json").read_text())
    assert result["sync_bn"] is False and result["processes"] == 2
    evaluated = evaluate_checkpoint(str(run), device="cpu")
    assert evaluated["precision"] == "fp32" and evaluated["precision_from"] == "the run's precision"
    reported = {k: result[k] for k in ("top1", "top5", "nll")}
    assert reported == {k: evaluated[k] for k in ("top1", "top5", "nll")}  # exactly
    last = _rows(run)[-1]
    assert {k: last[f"test_{k}"] for k in ("top1", "top5", "nll")} == reported


def test_ranks_that_see_different_data_are_refused_at_start(tmp_path, data_dir):
    """Two srun tasks whose data folders hold as many images but not the same ones: both refuse at start in
    one line naming the ranks and what differs, and nothing is written (before: the run trained each rank
    on its own data without a word; with different counts, the ranks hung on a collective)."""
    import socket

    other = tmp_path / "other"
    write_fake_cifar(other, num_classes=10, n_train=64, n_test=40, seed=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "mixkd", *_args(data_dir if r == 0 else other, run, 1)], env={
        **_env(), "SLURM_PROCID": str(r), "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": str(r),
        "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": "79", "SLURM_STEP_TASKS_PER_NODE": "2",
        "MASTER_PORT": str(port)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], outs
    for out in outs:
        assert ("error: the ranks see different data: rank 1 differs from rank 0 (rank 0 vs rank 1: training samples "
                "differ with the same count (64; content hash") in out, out[-2000:]
        assert "Traceback" not in out
    assert not run.exists()


def test_the_slurm_example_requeues_a_stop_whatever_srun_reports_and_scales_the_lr(tmp_path):
    """examples/slurm-ddp.sbatch with srun and scontrol stood in for: a stop whose last tasks srun killed
    (--kill-on-bad-exit; reported 137, a new checkpoint written) is requeued, as a stop reported 75 is; a
    failure at the start (exit 2, no checkpoint) and a finished run are not. Its lr is the config's scaled
    linearly to its global batch."""
    import yaml

    bin_dir, run, log = tmp_path / "bin", tmp_path / "run", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\necho \"srun $*\" >> \"$CALLS\"\nmkdir -p \"$RUN\"\ncase \"$ACT\" in\n"
        "  stop|killed) echo x > \"$RUN/c.tmp\" && mv \"$RUN/c.tmp\" \"$RUN/checkpoint.safetensors\";;\n"
        "  finish) echo '{}' > \"$RUN/result.json\";;\nesac\n"
        "case \"$ACT\" in stop) exit 75;; killed) exit 137;; bad) exit 2;; *) exit 0;; esac\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho \"scontrol $*\" >> \"$CALLS\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    outcomes = {}
    for act in ("killed", "stop", "bad", "finish"):
        shutil.rmtree(run, ignore_errors=True)
        log.unlink(missing_ok=True)
        if act == "bad":  # a checkpoint of an earlier slice, untouched by this one
            run.mkdir()
            (run / "checkpoint.safetensors").write_text("old")
        proc = subprocess.run(["bash", str(ROOT / "examples" / "slurm-ddp.sbatch")], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                                                          "RUN": str(run), "ACT": act, "CALLS": str(log),
                                                          "SLURM_JOB_ID": "4242"})
        calls = log.read_text().splitlines()
        outcomes[act] = (proc.returncode, "scontrol requeue 4242" in calls)
    assert outcomes == {"killed": (137, True), "stop": (75, True), "bad": (2, False), "finish": (0, False)}
    args = calls[0].split()
    config = yaml.safe_load((ROOT / args[args.index("--config") + 1]).read_text())
    lr, batch = float(args[args.index("--lr") + 1]), int(args[args.index("--batch-size") + 1])
    assert (batch, lr / batch) == (1024, config["optim"]["lr"] / config["batch_size"])  # 0.4 at 1024 for 0.2 at 512
    assert "--kill-on-bad-exit=1" in args and "--resume" in args


def test_under_ddp_the_teacher_sees_its_own_view(tmp_path, data_dir, teacher_file):
    """``--teacher-view clean`` with 2 ranks x 32 (torchrun, gloo, --sync-bn; one step): what one process x 64
    computes, so the teacher under the data-parallel wrapper reads its clean images (before, the wrapper
    handed it the student's augmented batch: the KD term, hence the losses and weights, differed); the
    view matters here: the student seeing it with the teacher on its own batch (same) trains otherwise."""
    def args(out: Path, view: str) -> list[str]:
        a = _args(data_dir, out, 1, "--teacher", str(teacher_file), "--teacher-view", view)
        return ["distill", *[{"--model": "--student"}.get(w, w) for w in a[1:]]]

    one, same, two = tmp_path / "one", tmp_path / "same", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args(one, "clean")) == 0
        assert main(args(same, "same")) == 0
    finally:
        torch.set_num_threads(threads)
    proc = _torchrun(args(two, "clean"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((two / "result.json").read_text())
    assert (result["processes"], result["teacher_view"]) == (2, "clean")
    _assert_same_run(one, two, rtol=1e-4, weights_tol=1e-3)
    assert abs(_rows(same)[0]["train_loss"] - _rows(one)[0]["train_loss"]) > 1e-3 * _rows(one)[0]["train_loss"]
