"""The Ray executor across nodes, on one machine: a two-node Ray cluster (Ray's cluster utilities: a
head and a second node, 1 CPU each, every process on 127.0.0.1). The study's runs land on both
nodes; the second node removed mid-study (after one of its runs wrote a checkpoint) has its run
moved to the head, where it resumes from that checkpoint (once the folder's lock, held on as NFS
would hold a dead client's, is free); the study finishes equal to an uninterrupted one.

The test runs in a process of its own: a Ray session leaves state in its process (its authentication
mode, cached where the environment that pytest restores between tests cannot reach it) that a later
session in the same process, on a cluster started with another environment, trips over."""

import multiprocessing as mp
import os
import re
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from run_rows import epoch_rows

from mixkd.errors import FolderInUse
from mixkd.header import CHECKPOINT_NAME
from mixkd.run_folder import RunFolder
from mixkd.study import InProcessExecutor, RayExecutor, collect, load_study, run_study
from mixkd.study.executors import _ray_local_only

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.slow

STUDY = {"name": "nodes", "defaults": {"dataset": "digits", "epochs": 2, "batch_size": 128, "eval_batch_size": 512,
                                       "device": "cpu", "save_every": 1},
         "teachers": [{"name": "plain", "models": "resnet8", "seeds": [0, 1]}]}
ACCURACY = ("top1", "best_top1", "best_epoch", "top5", "nll")
PLACED = re.compile(r"placed on Ray node \S+ \(\w+\), node id (\w+), worker pid (\d+)")


def _placements(run_dir: Path) -> list[tuple[str, int]]:
    """(node id, worker pid) of each attempt of a run, from its log."""
    log = run_dir / "log.txt"
    return [(m[1], int(m[2])) for m in PLACED.finditer(log.read_text())] if log.exists() else []


def _lock_once_free(run_dir: Path):
    """The run folder's lock, taken as soon as the killed worker's process has let it go."""
    while True:
        try:
            return RunFolder(run_dir).lock()
        except FolderInUse:
            time.sleep(0.01)


def test_runs_spread_over_two_nodes_and_a_lost_node_s_run_resumes_from_its_checkpoint(tmp_path):
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as process:
        process.submit(_study_on_two_nodes, tmp_path).result()  # its assertion errors are raised here


def _study_on_two_nodes(tmp_path: Path) -> None:
    torch.set_num_threads(1)  # the uninterrupted study's runs, as the Ray workers' (--threads 1)
    path = tmp_path / "nodes.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    study, out, reference = load_study(path), tmp_path / "out", tmp_path / "reference"
    # the uninterrupted study, in this process, while the cluster starts (mostly waiting on its processes)
    uninterrupted = threading.Thread(target=run_study, args=(study, reference, InProcessExecutor()),
                                     kwargs={"progress": False, "echo": lambda *_: None})
    uninterrupted.start()
    lines: list[str] = []
    with _ray_local_only():  # both nodes and the driver on 127.0.0.1, as a local Ray instance is
        cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2}})
        try:
            second = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
            ex = RayExecutor(address=cluster.address, workers=2, use_gpu=False, pack=1)
            assert "2 node(s), 2 CPUs" in ex.description and "2 pack(s) of up to 1 run(s)" in ex.description, \
                ex.description
            head = ray.get_runtime_context().get_node_id()  # the driver's node
            other = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - {head}
            assert len(other) == 1, ray.nodes()
            other_id = other.pop()
            # a node that does not see the study folder at the driver's path says so in one line, naming itself
            node, problem = ray.get(ex._actors[1].check.remote(str(tmp_path / "elsewhere"), "some-id"))
            assert problem == (f"Ray node 127.0.0.1 ({node[:8]}) does not see the study folder: {tmp_path / 'elsewhere'} "
                               "is not there or holds no study-state.json; the folder must be on storage every node "
                               "mounts at the same path"), problem
            outcome: dict = {}
            study_thread = threading.Thread(target=lambda: outcome.setdefault(
                "value", run_study(study, out, ex, progress=False, echo=lines.append)))
            study_thread.start()
            lost = held = None
            give_up = time.monotonic() + 240  # a guard against a hang, not a timing assertion
            while lost is None and study_thread.is_alive() and time.monotonic() < give_up:
                for run in study.runs:
                    places = _placements(out / run.id)
                    if places and places[0][0] == other_id and (out / run.id / CHECKPOINT_NAME).exists():
                        lost = run.id
                        os.kill(places[0][1], signal.SIGSTOP)  # frozen after its first checkpoint...
                        assert not (out / run.id / "result.json").exists()  # ...with epochs still to train
                        cluster.remove_node(second, allow_graceful=False)  # ...and its node goes away
                        os.kill(places[0][1], signal.SIGKILL)  # (a frozen process cannot hear its raylet die)
                        held = _lock_once_free(out / run.id)  # as NFS would keep the dead node's lock a while
                        break
                time.sleep(0.02)
            while held is not None and study_thread.is_alive() and time.monotonic() < give_up:
                if any(line.startswith(f"moved   {lost}: its run folder is still locked") for line in lines):
                    held.release()  # the lease expired: the next try takes it
                    held = None
                time.sleep(0.02)
            study_thread.join(timeout=240)
            assert not study_thread.is_alive()
        finally:
            ray.shutdown()
            cluster.shutdown()
    assert lost is not None, lines  # a run of the second node wrote a checkpoint while the study ran
    result = outcome["value"]
    assert result.counts["done"] == 2 and result.counts["failed"] == 0, (result.counts, result.failed)

    # (a) the runs landed on both nodes
    first = {run.id: _placements(out / run.id)[0][0] for run in study.runs}
    assert set(first.values()) == {head, other_id}, (first, head, other_id)
    # (b) the lost run was placed again on the head and resumed there from its checkpoint (epoch 1 done)
    attempts = _placements(out / lost)
    # (refused once on the head while the lock was held, then taken)
    assert [node for node, _ in attempts] == [other_id, head, head], (attempts, head, other_id)
    log = (out / lost / "log.txt").read_text()
    assert "resume at epoch 2" in log.split("node id " + head)[-1], log  # after its first epoch's checkpoint
    assert any(line.startswith(f"moved   {lost}: its Ray worker on node {other_id[:8]} was lost") for line in lines), lines
    assert any(line.startswith(f"moved   {lost}: its run folder is still locked") for line in lines), lines

    # ... and the study equals the uninterrupted one
    uninterrupted.join()
    rows = [[{k: r[k] for k in ("id", *ACCURACY)} for r in collect(folder)] for folder in (out, reference)]
    assert rows[0] == rows[1], rows
    for run in study.runs:
        assert epoch_rows(out / run.id) == epoch_rows(reference / run.id), run.id
