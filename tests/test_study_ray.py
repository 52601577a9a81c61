"""The Ray executor end to end: a tiny study on a Ray instance started on this machine."""

import json

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
    outcome = run_study(study, out, ex, progress=False, echo=lambda *_: None)
    assert not ray.is_initialized()  # the executor stops the Ray instance it started
    assert outcome.counts == {"done": 3, "running": 0, "pending": 0, "stopped": 0, "failed": 1, "blocked": 0}
    assert "gone.pth" in outcome.failed["students/resnet8-from-resnet8_gone-kd_pmu-T4-f0.1-s0"]
    result = json.loads((out / "students/resnet8-from-resnet8_mixup-kd_pmu-T4-f0.1-s0/result.json").read_text())
    assert result["mix"]["fraction"] == 0.1 and result["teacher_model"] == "resnet8"
    assert result["teacher"] == "../../teachers/resnet8_mixup-s0"  # relative to the run: the folder can move
    assert "| resnet8 (mixup) → resnet8 |" in write_report(out).read_text()
