"""The Ray executor end to end: a tiny study on a Ray instance started on this machine."""

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from mixkd.study import RayExecutor, load_study, run_study, write_report

ray = pytest.importorskip("ray")


def test_ray_executor_runs_a_tiny_study_into_the_study_folder(tmp_path, cifar10_dir):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "defaults": {"dataset": "cifar10", "data_dir": str(cifar10_dir), "epochs": 1,
                                     "batch_size": 32, "eval_batch_size": 80, "device": "cpu"},
        "teachers": [{"name": "mixup", "models": "resnet8", "mix": {"method": "mixup"}},
                     {"name": "gone", "checkpoint": str(tmp_path / "gone.pth"), "model": "resnet8"}],
        "students": [{"teachers": ["mixup", "gone"], "models": "resnet8", "methods": ["alone", "kd_pmu"]}]}))
    (tmp_path / "gone.pth").write_bytes(b"not a checkpoint")  # there (checked at plan time) but unreadable
    study, out = load_study(path), tmp_path / "out"
    ex = RayExecutor(workers=2, use_gpu=False, pack=2)  # starts Ray here: 2 CPUs, no dashboard; 2 packs of 2
    assert "2 CPUs" in ex.description and "2 pack(s) of up to 2 run(s)" in ex.description
    listening = _listening_addresses_of_descendants()
    assert listening and all(_loopback(a) for a in listening), listening  # Ray's control plane: this machine only
    private = Path(ex._temp_dir)  # Ray's session folders, in a folder only this user may enter
    assert list(private.glob("ray/session_*")) and stat.S_IMODE(private.stat().st_mode) == 0o700
    outcome = run_study(study, out, ex, progress=False, echo=lambda *_: None)
    assert not ray.is_initialized()  # the executor stops the Ray instance it started
    assert outcome.counts == {"done": 3, "running": 0, "pending": 0, "stopped": 0, "failed": 1, "blocked": 0}
    assert "gone.pth" in outcome.failed["students/resnet8-from-resnet8_gone-kd_pmu-T4-f0.1-s0"]
    result = json.loads((out / "students/resnet8-from-resnet8_mixup-kd_pmu-T4-f0.1-s0/result.json").read_text())
    assert result["mix"]["fraction"] == 0.1 and result["teacher_model"] == "resnet8"
    assert result["teacher"] == "../../teachers/resnet8_mixup-s0"  # relative to the run: the folder can move
    assert "| resnet8 (mixup) → resnet8 |" in write_report(out).read_text()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found | {pid}


def _listening_addresses_of_descendants() -> list[str]:
    """The local addresses (hex, as /proc/net writes them) of listening TCP sockets of this process
    and every process it started (Ray's GCS, raylet, workers)."""
    inodes = set()
    for pid in _descendants(os.getpid()):
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # LISTEN
                out.append(parts[1].split(":")[0])
    return out


def _loopback(hex_address: str) -> bool:
    return hex_address in ("0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000")
