"""timm / torchvision models (``timm:<name>``, ``tv:<name>``) in data-parallel runs and packs: timm's
norm + activation layers under ``--sync-bn``; 2-rank gloo runs under torchrun (FitNet from a timm
teacher into a timm student with --sync-bn, resumed across world sizes; into a RepDistiller student
with mixup) whose ranks end with the same weights and whose figures are their checkpoint's; a pack of library
models computing what each run computes alone. CPU, tiny random models, nothing downloaded."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from cifar_fixture import write_fake_cifar
from safetensors.torch import save_file
from test_distributed import _assert_same_run, _env, _rows, one_rank_group  # noqa: F401 (a fixture)

from mixkd.checkpoint import load_checkpoint
from mixkd.config import build_config
from mixkd.engine import Run, run_job
from mixkd.errors import MixkdError
from mixkd.evaluation import evaluate_checkpoint
from mixkd.models import create_model
from mixkd.models.sync_bn import GlooSyncBatchNormAct, convert_sync_batchnorm
from mixkd.pack import Pack


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Affine parameters and running statistics away from (1, 0, 0, 1): a dropped or misplaced part shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


# ---- --sync-bn and timm's norm layers ------------------------------------------------------------


@pytest.mark.usefixtures("one_rank_group")
def test_sync_bn_keeps_the_activation_of_timms_norm_act_layers():
    """timm's EfficientNets hold BatchNormAct2d (BatchNorm, then an activation, in one layer). Synchronised
    over one rank, the model computes what it computed (train-mode output, gradients, running statistics;
    the gloo conversion), with its keys; torch's conversion (NCCL) keeps the activation too (timm's
    SyncBatchNormAct; CPU: compared in eval mode, where it is plain BatchNorm). Before: both replaced the
    layer by a plain synchronised BatchNorm, and the activations after each BatchNorm were gone."""
    torch.manual_seed(0)
    ref = _randomize_bn(create_model("timm:test_efficientnet", 10, 32)).train()
    norm_acts = sum(isinstance(m, timm.layers.BatchNormAct2d) for m in ref.modules())
    sync = convert_sync_batchnorm(copy.deepcopy(ref), use_torch=False)
    assert sum(isinstance(m, GlooSyncBatchNormAct) for m in sync.modules()) == norm_acts == 13
    assert list(sync.state_dict()) == list(ref.state_dict())
    x = torch.randn(8, 3, 32, 32)
    y, ys = ref(x), sync(x)
    torch.testing.assert_close(ys, y, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    ys.square().sum().backward()
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (ref, sync)]
    # as a whole (a bias feeding the next BatchNorm has a gradient of rounding noise only, ~1e-5)
    assert (grads[1] - grads[0]).norm() <= 1e-4 * grads[0].norm()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[key], value, msg=key)

    nccl = convert_sync_batchnorm(copy.deepcopy(ref), use_torch=True)
    assert sum(isinstance(m, timm.layers.norm_act.SyncBatchNormAct) for m in nccl.modules()) == norm_acts
    with torch.no_grad():
        torch.testing.assert_close(nccl.eval()(x), ref.eval()(x))


def test_sync_bn_refuses_a_batchnorm_with_a_forward_of_its_own_in_one_line():
    """timm's SplitBatchNorm2d (a BatchNorm per augmentation split) is not a BatchNorm a synchronised one
    can replace: one line naming the layer, the class and what to do; nothing converted."""
    from timm.layers.split_batchnorm import SplitBatchNorm2d

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Sequential(torch.nn.BatchNorm2d(4),
                                                                              SplitBatchNorm2d(4, num_splits=2)))
    with pytest.raises(MixkdError) as info:
        convert_sync_batchnorm(model, use_torch=False, owner="timm:x")
    assert str(info.value) == (
        "--sync-bn: layer '1.1' of timm:x is a timm.layers.split_batchnorm.SplitBatchNorm2d, a BatchNorm with a "
        "forward of its own that mixkd cannot synchronise over the ranks (a plain SyncBatchNorm would drop what it "
        "adds); run without --sync-bn")
    assert type(model[1][0]) is torch.nn.BatchNorm2d


# ---- 2-rank gloo runs under torchrun -------------------------------------------------------------

# `mixkd` as torchrun starts it, then each rank's final student and method state to $RANK_STATES/rank<r>.pt
RANK_STATES = """
import os, sys
import torch
import mixkd.engine
from mixkd.cli import main

run_job = mixkd.engine.run_job


def keep_states(*args, **kwargs):
    job = run_job(*args, **kwargs)
    state = {**job.model.state_dict(), **{f"method.{k}": v for k, v in job.distiller.modules.state_dict().items()}}
    torch.save(state, os.path.join(os.environ["RANK_STATES"], f"rank{os.environ['RANK']}.pt"))
    return job


mixkd.engine.run_job = keep_states
sys.exit(main(sys.argv[1:]))
"""


def _torchrun_keeping_states(tmp: Path, args: list[str]) -> tuple[subprocess.CompletedProcess, list[dict]]:
    script = tmp / "rank_states.py"
    script.write_text(RANK_STATES)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--max-restarts", "0", "--monitor-interval", "0.2", str(script), *args],
                          env={**_env(), "RANK_STATES": str(tmp)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc, [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


def _same_on_every_rank(states: list[dict]) -> None:
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key  # weights and BatchNorm statistics, bit for bit


def _figures_are_the_checkpoints(run: Path) -> None:
    """result.json and the last metrics row are exactly what ``mixkd eval`` computes from the checkpoint."""
    result = json.loads((run / "result.json").read_text())
    evaluated = evaluate_checkpoint(str(run), device="cpu")
    reported = {k: result[k] for k in ("top1", "top5", "nll")}
    assert reported == {k: evaluated[k] for k in ("top1", "top5", "nll")}
    assert {k: _rows(run)[-1][f"test_{k}"] for k in ("top1", "top5", "nll")} == reported


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar10-64")
    write_fake_cifar(root, num_classes=10, n_train=64, n_test=40, seed=0)  # 2 steps of 32 an epoch
    return root


@pytest.fixture(scope="module")
def timm_teacher(tmp_path_factory) -> Path:
    """timm's test_resnet (10 classes, random), saved as timm saves its weights."""
    torch.manual_seed(1)
    model = _randomize_bn(timm.create_model("test_resnet", num_classes=10)).eval()
    path = tmp_path_factory.mktemp("timm") / "test_resnet.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def _distill(data: Path, teacher: Path, out: Path, **extra) -> object:
    flags = {"task": "distill", "dataset": "cifar10", "data_dir": str(data), "kd.teacher": str(teacher),
             "kd.teacher_model": "timm:test_resnet", "kd.teacher_input": "dataset", "device": "cpu",
             "progress": False, "compile": "off", "out": str(out), **extra}
    return build_config(flags=flags)


def test_fitnet_into_a_timm_student_with_sync_bn_resumed_by_two_ranks_computes_the_one_process_run(
        tmp_path, data_dir, timm_teacher, one_thread):
    """FitNet from a timm teacher's layer1 into the blocks.1 of timm's test_efficientnet (BatchNormAct2d
    throughout; the regressor's BatchNorm too), --sync-bn, 2 epochs of 2 steps (64 images, global batch
    32): one process stops after its first step; torchrun's 2 ranks (gloo, 16 images each) resume it
    mid-epoch, student and regressor, and finish. Every step's losses, the test figures and the final
    weights are the uninterrupted one-process run's; both ranks end with the same student and regressor;
    the figures are the checkpoint's."""
    settings = {"model": "timm:test_efficientnet", "kd.method": "fitnet", "kd.hint_layer": "blocks.1,layer1",
                "epochs": 2, "batch_size": 32, "optim.lr": 0.05, "optim.milestones": [1], "sync_bn": True}
    whole, run = tmp_path / "whole", tmp_path / "run"
    run_job(_distill(data_dir, timm_teacher, whole, **settings))
    job = Run(_distill(data_dir, timm_teacher, run, **settings))
    job.start()
    job.advance()
    assert (job.epoch, job.step_in_epoch) == (0, 1)
    job.stop("time")
    job.close()
    _, states = _torchrun_keeping_states(tmp_path, ["distill", "--config", str(run / "config.yaml"), "--out", str(run),
                                                    "--resume"])
    log = (run / "log.txt").read_text()
    assert "resume at epoch 1 step 1" in log and "x 2 processes (gloo, batch 16 each)" in log, log
    assert json.loads((run / "result.json").read_text())["sync_bn"] is True
    _assert_same_run(run, whole, rtol=1e-4, weights_tol=1e-3)
    assert [r["train_hint"] for r in _rows(run)] == pytest.approx([r["train_hint"] for r in _rows(whole)], rel=1e-4)
    assert any(k.startswith("method.") for k in states[0])  # the regressor
    _same_on_every_rank(states)
    _figures_are_the_checkpoints(run)


def test_fitnet_from_a_timm_teacher_into_a_repdistiller_student_on_two_ranks(tmp_path, data_dir, timm_teacher):
    """FitNet (a hint from the timm teacher's layer1 into resnet8's stage 2, the regressor with its
    BatchNorm trained with the student) with mixup, 2 ranks without --sync-bn: both ranks end with the same
    student and regressor (parameters and BatchNorm statistics), and the run's figures are its checkpoint's."""
    run = tmp_path / "fitnet"
    _, states = _torchrun_keeping_states(tmp_path, [
        "distill", "--student", "resnet8", "--teacher", str(timm_teacher), "--teacher-model", "timm:test_resnet",
        "--teacher-input", "dataset", "--kd", "fitnet", "--hint-layer", "2,layer1", "--mix", "mixup",
        "--dataset", "cifar10", "--data-dir", str(data_dir), "--epochs", "1", "--batch-size", "32",
        "--milestones", "1", "--device", "cpu", "--compile", "off", "--no-progress", "--out", str(run)])
    assert any(k.startswith("method.") and k.endswith("running_var") for k in states[0])  # the regressor's BatchNorm
    _same_on_every_rank(states)
    _figures_are_the_checkpoints(run)
    row = _rows(run)[0]
    assert row["train_hint"] > 0 and json.loads((run / "result.json").read_text())["processes"] == 2


# ---- packs ---------------------------------------------------------------------------------------


def test_a_pack_of_library_models_computes_what_each_run_computes_alone(tmp_path, cifar10_dir, timm_teacher, one_thread):
    """torchvision's MobileNetV3 (its classifier's dropout draws from torch's global generator) trained with
    mixup, and a timm student distilled (DKD, CutMix) from a timm teacher, stepped in turn in one process:
    the timm run finishes in the pack, the torchvision run is stopped mid-epoch 2 (the pack's stop) and
    resumed alone. Each run's figures and weights are bit for bit its own alone. Before: the runs drew their
    dropout masks from one shared generator, and the stopped run's checkpoint held the pack's state of it."""
    def configs(root: Path) -> list:
        return [
            build_config(flags={"task": "train", "model": "tv:mobilenet_v3_small", "dataset": "cifar10",
                                "data_dir": str(cifar10_dir), "device": "cpu", "progress": False, "compile": "off",
                                "epochs": 2, "batch_size": 40, "mix.method": "mixup", "optim.milestones": [1],
                                "seed": 1, "out": str(root / "tv")}),
            _distill(cifar10_dir, timm_teacher, root / "timm", model="timm:test_efficientnet", epochs=1,
                     batch_size=32, **{"kd.method": "dkd", "mix.method": "cutmix", "mix.fraction": 0.5, "seed": 2}),
        ]

    for cfg in configs(tmp_path / "alone"):
        run_job(cfg)
    tv, timm_run = configs(tmp_path / "packed")
    pack = Pack("cpu", 2)
    jobs = [Run(tv), Run(timm_run)]
    for job in jobs:
        assert pack.admit(job) is None
    ended = []
    while (jobs[0].epoch, jobs[0].step_in_epoch) < (1, 2):
        ended += pack.round()
    assert [(job, outcome["ok"]) for job, outcome in ended] == [(jobs[1], True)]  # the timm run, 5 steps
    assert [outcome["stopped"] for _, outcome in pack.stop_all("time")] == [True]
    run_job(tv, resume=True)
    for name in ("tv", "timm"):
        timing = ("images_per_s", "epoch_seconds")
        rows = [[{k: v for k, v in r.items() if k not in timing} for r in _rows(tmp_path / d / name)]
                for d in ("alone", "packed")]
        assert rows[0] == rows[1], name
        a, b = (load_checkpoint(tmp_path / d / name).state_dict for d in ("alone", "packed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ---- a study's report ----------------------------------------------------------------------------


def test_a_study_report_labels_library_models_by_their_names(tmp_path):
    """A study folder of a timm teacher and torchvision students (the ids `mixkd study run` gives them):
    the report's row, results.csv and the claims' scope name the models as the study file does."""
    from test_study_report import _run

    from mixkd.study import write_report

    out = tmp_path / "study"
    teacher = "teachers/timm_test_resnet_plain-s0"
    _run(out, teacher, {"model": "timm:test_resnet"}, {"top1": 70.0, "best_top1": 70.0})
    for seed, top1 in enumerate([60.0, 62.0]):
        _run(out, f"students/tv_mobilenet_v3_small-alone-s{seed}", {"model": "tv:mobilenet_v3_small", "seed": seed},
             {"top1": top1, "best_top1": top1})
        _run(out, f"students/tv_mobilenet_v3_small-from-timm_test_resnet_plain-kd-T4-s{seed}",
             {"task": "distill", "model": "tv:mobilenet_v3_small", "seed": seed,
              "kd": {"teacher": f"../../{teacher}", "method": "kd"}},
             {"top1": top1 + 3, "best_top1": top1 + 3, "teacher_top1": 70.0, "teacher_model": "timm:test_resnet"})
    (out / "study.yaml").write_text("name: library\n")
    text = write_report(out).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| timm:")]
    assert rows[0] == "| timm:test_resnet (plain) → tv:mobilenet_v3_small | 70.00 | 61.00 ± 1.41 | 64.00 ± 1.41 |"
    assert "tested on timm:test_resnet (plain) → tv:mobilenet_v3_small" in text
    with open(out / "results.csv") as f:
        kd = {r["id"]: r for r in csv.DictReader(f)}["students/tv_mobilenet_v3_small-from-timm_test_resnet_plain-kd-T4-s1"]
    assert (kd["model"], kd["teacher_model"], kd["teacher"]) == ("tv:mobilenet_v3_small", "timm:test_resnet", teacher)
