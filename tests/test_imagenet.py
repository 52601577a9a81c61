"""The ImageNet recipe (configs/imagenet/, configs/studies/imagenet-scale.yaml) and, on a tiny
ImageNet-shaped folder of generated JPEGs, the recipe end to end on the CPU: mixkd train, then
mixkd distill from that teacher and from a torchvision weight file, alone and under torchrun with
2 gloo ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from mixkd.cli import main
from mixkd.config import build_config
from mixkd.errors import MixkdError

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = ROOT / "configs" / "imagenet"
CONFIGS = sorted(p for p in IMAGENET.glob("*.yaml") if not p.name.startswith("timm_"))  # timm_*: test_external_models
STUDY = ROOT / "configs" / "studies" / "imagenet-scale.yaml"
CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361")  # ImageNet-style class folder names


def write_jpeg_folder(root: Path, n_train: int = 8, n_val: int = 2, size: int = 64) -> Path:
    """``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``: noisy images whose mean colour
    depends on the class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("val", n_val)):
        for ci, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            colour = np.array([60 + 50 * ci, 200 - 40 * ci, 90 + 30 * (ci % 2)])
            for k in range(count):
                arr = np.clip(colour + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{cls}_{k}.JPEG", format="JPEG", quality=90)
    return root


# ---- the recipe ------------------------------------------------------------------------------------


def test_the_imagenet_configs_are_the_peers_recipe():
    assert {p.name for p in CONFIGS} == {"teacher.yaml", "student_kd.yaml", "student_kd_pmu.yaml", "student_kd_fmu.yaml",
                                        "student_std.yaml", "student_std_pmu.yaml", "student_std_fmu.yaml"}
    students = {}
    for path in CONFIGS:
        cfg = build_config(path, {"kd.teacher": "resnet34.pth"} if path.stem.startswith("student") else {})
        assert (cfg.dataset, cfg.image_size, cfg.epochs, cfg.batch_size) == ("imagefolder", 224, 100, 512), path.name
        o = cfg.optim
        assert (o.lr, o.momentum, o.weight_decay, cfg.milestones(), o.lr_decay) == (0.2, 0.9, 1e-4, [30, 60, 90], 0.1)
        if path.stem == "teacher":
            assert (cfg.task, cfg.model, cfg.mix.method) == ("train", "tv_resnet34", "none")
            continue
        assert (cfg.task, cfg.model, cfg.kd.teacher_model) == ("distill", "tv_resnet18", "tv_resnet34")
        assert (cfg.kd.ce_weight, cfg.kd.kd_weight) == (0.5, 0.5)  # mdistiller's ImageNet KD
        assert cfg.kd.method != "kd" or cfg.kd.temperature == 1.0
        students[path.stem] = (cfg.kd.method, cfg.mix.method, cfg.mix.fraction, cfg.mix.alpha)
    assert students == {
        "student_kd": ("kd", "none", 1.0, 1.0), "student_kd_pmu": ("kd", "mixup", 0.1, 1.0),
        "student_kd_fmu": ("kd", "mixup", 1.0, 1.0), "student_std": ("std", "none", 1.0, 1.0),
        "student_std_pmu": ("std", "mixup", 0.1, 1.0), "student_std_fmu": ("std", "mixup", 1.0, 1.0)}


def test_imagefolder_augments_and_evaluates_as_the_recipe_says(tmp_path):
    from torchvision import transforms as T

    from mixkd.data import load_dataset

    spec = load_dataset("imagefolder", write_jpeg_folder(tmp_path, n_train=1, n_val=1), image_size=224)
    train, test = spec.train.transform.transforms, spec.test.transform.transforms
    assert [type(t) for t in train] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert train[0].size == (224, 224) and train[0].scale == (0.08, 1.0) and train[1].p == 0.5
    assert [type(t) for t in test] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert test[0].size == 256 and test[1].size == (224, 224)
    assert spec.test[0][0].shape == (3, 224, 224) and spec.num_classes == 4


def test_the_imagenet_study_pairs_and_its_teacher_files():
    from mixkd.study import load_study

    runs = load_study(STUDY, check_files=False).runs
    assert len(runs) == 14 and all(r.role == "student" for r in runs)
    pairs = {(r.teacher_model, r.model) for r in runs if r.teacher_model}
    assert pairs == {("tv_resnet34", "tv_resnet18"), ("tv_resnet50", "tv_mobilenet_v2")}
    assert {r.method.name for r in runs} == {"alone", "kd", "kd_fmu", "kd_pmu", "std", "std_fmu", "std_pmu"}
    for r in runs:
        c = r.config
        assert (c.epochs, c.batch_size, c.optim.lr, c.optim.weight_decay, c.milestones()) == (100, 512, 0.2, 1e-4,
                                                                                               [30, 60, 90])
        if r.teacher_model:
            assert Path(c.kd.teacher).name in ("resnet34.pth", "resnet50.pth") and c.kd.ce_weight == 0.5
            assert c.kd.method == "std" or c.kd.temperature == 1.0
    with pytest.raises(MixkdError, match=r"teachers\[0\]\.checkpoint .*weights/resnet34\.pth does not exist"):
        load_study(STUDY)


# ---- end to end on a tiny ImageNet-shaped folder ---------------------------------------------------

# The recipe's files, made small: one epoch (its milestone at the end: the recipe's are past it, refused), 32x32
# crops, batches of 8 (4 steps of 32 images).
SMALL = ["--epochs", "1", "--milestones", "1", "--image-size", "32", "--batch-size", "8", "--eval-batch-size", "16", "--device", "cpu",
         "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    """(data folder, teacher run): configs/imagenet/teacher.yaml trained for one short epoch by mixkd train."""
    tmp = tmp_path_factory.mktemp("tiny-imagenet")
    data = write_jpeg_folder(tmp / "imagenet")
    teacher = tmp / "teacher"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", "--config", str(IMAGENET / "teacher.yaml"), "--data-dir", str(data), "--out",
                     str(teacher), *SMALL])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return data, teacher


def test_the_recipe_end_to_end_on_a_tiny_imagenet_folder(tiny_imagenet, tmp_path, capsys, one_thread):
    data, teacher = tiny_imagenet
    result = json.loads((teacher / "result.json").read_text())
    assert (result["model"], result["dataset"], result["epochs"]) == ("tv_resnet34", "imagefolder", 1)
    saved = build_config(teacher / "config.yaml")
    assert (saved.model, saved.dataset, saved.image_size, saved.optim.lr, saved.optim.weight_decay) == (
        "tv_resnet34", "imagefolder", 32, 0.2, 1e-4)

    student = tmp_path / "runs" / "kd_pmu"
    assert main(["distill", "--config", str(IMAGENET / "student_kd_pmu.yaml"), "--data-dir", str(data),
                 "--teacher", str(teacher), "--out", str(student), *SMALL]) == 0
    rows = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and np.isfinite(rows[0]["train_loss"])
    saved = build_config(student / "config.yaml")
    assert (saved.model, saved.kd.method, saved.kd.temperature, saved.mix.fraction) == ("tv_resnet18", "kd", 1.0, 0.1)

    # a teacher from a torchvision weight file: --teacher resnet34.pth --teacher-model tv_resnet34
    torch.manual_seed(4)  # weights whose predictions vary over the val images
    reference = torchvision.models.resnet34(weights=None, num_classes=len(CLASSES)).eval()
    weights = tmp_path / "resnet34.pth"
    torch.save(reference.state_dict(), weights)
    from_file = tmp_path / "runs" / "std"
    assert main(["distill", "--config", str(IMAGENET / "student_std.yaml"), "--data-dir", str(data),
                 "--teacher", str(weights), "--teacher-model", "tv_resnet34", "--out", str(from_file), *SMALL]) == 0
    result = json.loads((from_file / "result.json").read_text())
    assert (result["teacher"], result["teacher_model"], result["kd_method"]) == (str(weights), "tv_resnet34", "std")
    from mixkd.data import load_dataset

    val = load_dataset("imagefolder", data, image_size=32, splits=("test",)).test  # resize 36 + center crop 32
    with torch.no_grad():
        x = torch.stack([val[i][0] for i in range(len(val))])
        expected = 100.0 * (reference(x).argmax(1) == torch.as_tensor(val.targets)).float().mean().item()
    assert expected != 25.0  # not one class for all (4 classes x 2 images): top-1 tells these weights apart
    assert result["teacher_top1"] == pytest.approx(expected)  # the file's weights, as torchvision computes
    capsys.readouterr()

    # the wrong architecture for the file: one line naming the file and the first keys, exit 2, nothing written
    wrong = tmp_path / "runs" / "wrong"
    assert main(["distill", "--config", str(IMAGENET / "student_kd.yaml"), "--data-dir", str(data),
                 "--teacher", str(weights), "--teacher-model", "tv_resnet18", "--out", str(wrong), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"checkpoint {weights} does not fit tv_resnet18: unexpected keys: layer1.2.conv1.weight" in err


def test_the_kd_student_under_torchrun_with_two_gloo_ranks(tiny_imagenet, tmp_path):
    """The same student config under ``torch.distributed.run --nproc-per-node 2`` (gloo on the CPU): the
    global batch of 8 split 4 + 4. Each rank reads its part in its own process (``--workers 0``: the
    ranks' sharded loaders with worker processes are tests/test_data.py's)."""
    data, teacher = tiny_imagenet
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mixkd",
           "distill", "--config", str(IMAGENET / "student_kd_pmu.yaml"), "--data-dir", str(data),
           "--teacher", str(teacher), "--out", str(out), *SMALL, "--workers", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert (result["processes"], result["dist_backend"], result["model"], result["kd_method"]) == (
        2, "gloo", "tv_resnet18", "kd")
    assert result["teacher_model"] == "tv_resnet34" and result["mix"]["fraction"] == 0.1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and np.isfinite(rows[0]["train_loss"])
    assert "x 2 processes (gloo, batch 4 each)" in (out / "log.txt").read_text()
