"""A pretrained config's crop (timm's ``crop_pct``, torchvision's ``resize_size``/``crop_size``), where a
model sees images: an image folder's test split read through the library's own eval transform (``mixkd
eval`` of library weights, a teacher's accuracy check); on the device a tighter crop than the dataset's
as a centre crop then the resize (evaluation views; training views under ``kd.teacher_input:
model_crop``), a wider one kept and said. CPU, tiny random timm models, nothing downloaded."""

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from mixkd.checkpoint import save_checkpoint
from mixkd.cli import main
from mixkd.data import DIGITS_MEAN, DIGITS_STD, load_dataset, make_test_loader
from mixkd.evaluation import evaluate_checkpoint
from mixkd.loading import load_teacher, teacher_accuracy_input
from mixkd.metrics import evaluate
from mixkd.models import create_model
from mixkd.models.preprocess import Preprocessed, Preprocessing

CLASSES = ("a", "b", "c", "d")
HALF = (0.5, 0.5, 0.5)
QUARTER = (0.25, 0.25, 0.25)
# a timm config at 32 x 32 whose crop (0.95, bicubic: resize 33, centre crop 32) is not the image folder's
# test view at 32 (bilinear resize 36, centre crop 32: crop 32 / 36)
CFG = {"input_size": [3, 32, 32], "mean": list(HALF), "std": list(QUARTER), "interpolation": "bicubic",
       "crop_pct": 0.95, "crop_mode": "center"}
DIGITS = Preprocessing(32, DIGITS_MEAN, DIGITS_STD, crop_pct=1.0)  # an in-memory dataset: the whole image


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """``val/<class>/*.jpg``: 2 noisy 48 x 40 images per class (not square: the resize keeps the aspect)."""
    root = tmp_path_factory.mktemp("crop_folder")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for ci, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for k in range(2):
                arr = np.clip(40 * ci + rng.normal(100, 60, size=(40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{k}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A random timm resnet10t (4 classes), in a hub cache folder whose config.json is ``CFG``."""
    torch.manual_seed(2)
    model = timm.create_model("resnet10t", num_classes=len(CLASSES)).eval()
    snap = tmp_path_factory.mktemp("hub") / "models--timm--resnet10t.crop" / "snapshots" / "0a1b"
    snap.mkdir(parents=True)
    save_file(model.state_dict(), str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"architecture": "resnet10t", "num_classes": 4, "pretrained_cfg": CFG}))
    return model, snap


def _images(folder: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for c in CLASSES for p in sorted((folder / "val" / c).glob("*.jpg"))]


def _metrics(logits: torch.Tensor) -> tuple[float, float]:
    y = torch.arange(len(CLASSES)).repeat_interleave(2)
    return (logits.argmax(1) == y).float().mean().item() * 100, F.cross_entropy(logits, y).item()


def test_mixkd_eval_reads_an_image_folder_through_timms_own_transform_and_says_so(folder, resnet, capsys):
    model, snap = resnet
    result = evaluate_checkpoint(str(snap), "imagefolder", str(folder), device="cpu", image_size=32, workers=0,
                                 batch_size=8)
    own = create_transform(**resolve_data_config(pretrained_cfg=CFG))  # timm's own: Resize(33, bicubic), CenterCrop(32)
    with torch.no_grad():
        logits = model(torch.stack([own(img) for img in _images(folder)]))
    top1, nll = _metrics(logits)
    assert result["top1"] == pytest.approx(top1) and result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["preprocessing"] == (
        "timm:resnet10t evaluated with its own eval transform (32x32 bicubic, mean (0.5, 0.5, 0.5), std (0.25, 0.25, "
        "0.25), crop 0.95 (resize 33, centre crop 32)), not the dataset's test transform (32x32 bilinear, mean (0.485, "
        "0.456, 0.406), std (0.229, 0.224, 0.225), crop 0.888889 (resize 36, centre crop 32))")
    assert main(["eval", str(snap), "--dataset", "imagefolder", "--data-dir", str(folder), "--image-size", "32",
                 "--device", "cpu", "--workers", "0"]) == 0
    out = capsys.readouterr()
    assert out.err.strip() == f"note: {result['preprocessing']}"
    assert out.out.startswith(f"timm:resnet10t on imagefolder: top-1 {top1:.2f}%")


def test_a_model_without_a_pretrained_config_keeps_the_datasets_test_transform(folder, resnet, tmp_path):
    spec = load_dataset("imagefolder", str(folder), image_size=32, splits=("test",))
    loader = make_test_loader(spec, "cpu", 8, workers=0)
    model, _ = resnet
    torch.manual_seed(3)
    resnet8 = create_model("resnet8", 4).eval()
    save_file(resnet8.state_dict(), str(tmp_path / "resnet8.safetensors"))  # a library-style file: no config
    # a timm model trained by mixkd (a student): its weights are for the dataset's view, not timm's config
    save_checkpoint(tmp_path / "student.safetensors", model, model_name="timm:resnet10t", num_classes=4, epoch=1)
    for path, arch, net in ((tmp_path / "resnet8.safetensors", "resnet8", resnet8),
                            (tmp_path / "student.safetensors", None, model)):
        result = evaluate_checkpoint(str(path), "imagefolder", str(folder), model=arch, device="cpu", image_size=32,
                                     workers=0, batch_size=8)
        expected = evaluate(net, loader)
        assert "preprocessing" not in result, path
        assert (result["top1"], result["nll"]) == (expected["top1"], expected["nll"]), path


def test_the_teacher_crop_on_the_device_is_a_centre_crop_then_the_resize():
    data = Preprocessing(8, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), crop_pct=1.0)
    own = Preprocessing(12, HALF, QUARTER, "bilinear", crop_pct=0.5)
    x = torch.randn(2, 3, 8, 8)
    renormalised = (x * torch.tensor(data.std).view(1, 3, 1, 1) + torch.tensor(data.mean).view(1, 3, 1, 1) - 0.5) / 0.25
    expected = F.interpolate(renormalised[..., 2:6, 2:6], size=(12, 12), mode="bilinear", align_corners=False)
    got = Preprocessed(torch.nn.Identity(), data, own, crop=0.5)(x)  # the identity: the teacher's input itself
    torch.testing.assert_close(got, expected)


def test_a_teachers_crop_applies_to_evaluation_views_and_under_model_crop_and_a_wider_one_is_kept(resnet):
    model, snap = resnet
    tight = {**CFG, "crop_pct": 0.5}
    hub = snap.parent.parent.parent / "tight" / "snapshots" / "0a1b"
    hub.mkdir(parents=True)
    save_file(model.state_dict(), str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({"architecture": "resnet10t", "pretrained_cfg": tight}))
    x = torch.randn(2, 3, 32, 32)
    own = (x * torch.tensor(DIGITS_STD).view(1, 3, 1, 1) + torch.tensor(DIGITS_MEAN).view(1, 3, 1, 1) - 0.5) / 0.25
    with torch.no_grad():
        cropped = model(F.interpolate(own[..., 8:24, 8:24], size=(32, 32), mode="bicubic", align_corners=False))
        whole = model(own)
    # the clean view (the dataset's evaluation view: the whole digit) gets its crop 0.5
    teacher, _ = load_teacher(str(hub), None, 4, "cpu", data=DIGITS, view="clean")
    assert ("its crop 0.5 applied: a centre crop of 0.5 of the clean view's side (the dataset's crop 1), then "
            "resized to 32") in teacher.preprocess_note
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), cropped, rtol=1e-4, atol=1e-4)
    # a training view keeps the student's field of view, unless kd.teacher_input is model_crop
    teacher, _ = load_teacher(str(hub), None, 4, "cpu", data=DIGITS, view="same")
    assert ("its crop 0.5 is an evaluation setting: the same training view is kept, as the student sees it "
            "(kd.teacher_input: model_crop applies it)") in teacher.preprocess_note
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), whole, rtol=1e-4, atol=1e-4)
    # ... but its accuracy check on the dataset's test batches crops them
    digits = load_dataset("digits", splits=("test",))
    _, check, notes = teacher_accuracy_input(teacher, digits, DIGITS)
    assert notes == ["teacher timm:resnet10t: its accuracy on the test batches with its crop 0.5 (a centre crop of "
                     "0.5 of their side, then resized to 32, on the device)"]
    with torch.no_grad():
        torch.testing.assert_close(check(x), cropped, rtol=1e-4, atol=1e-4)
    teacher, _ = load_teacher(str(hub), None, 4, "cpu", data=DIGITS, teacher_input="model_crop", view="same")
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), cropped, rtol=1e-4, atol=1e-4)
    # crop 0.95 on batches cropped to 0.875: the lost border cannot come back; the dataset's crop is kept
    folder_view = Preprocessing(32, DIGITS_MEAN, DIGITS_STD, crop_pct=0.875)
    teacher, _ = load_teacher(str(snap), None, 4, "cpu", data=folder_view, view="clean")
    assert isinstance(teacher, Preprocessed) and teacher.crop is None
    assert ("its crop 0.95 is wider than the dataset's 0.875, which cannot be recovered from the cropped images: "
            "the dataset's crop is kept") in teacher.preprocess_note
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), whole, rtol=1e-4, atol=1e-4)


def test_a_teachers_accuracy_check_on_an_image_folder_uses_its_own_transform(folder, resnet):
    model, snap = resnet
    spec = load_dataset("imagefolder", str(folder), image_size=32, splits=("test",))
    data = Preprocessing(32, spec.mean, spec.std, crop_pct=spec.crop_pct)
    teacher, _ = load_teacher(str(snap), None, 4, "cpu", data=data, view="same")
    view, _, notes = teacher_accuracy_input(teacher, spec, data)
    assert notes and notes[0].startswith("teacher timm:resnet10t: its accuracy evaluated with its own eval transform "
                                         "(32x32 bicubic, mean (0.5, 0.5, 0.5), std (0.25, 0.25, 0.25), crop 0.95")
    own = create_transform(**resolve_data_config(pretrained_cfg=CFG))
    for i, img in enumerate(_images(folder)):
        assert torch.equal(view[0].test[i][0], own(img))  # timm's own output for the same image


def test_torchvision_weights_give_their_own_transform_where_it_differs_from_the_folders(folder):
    from torchvision.models import get_model_weights

    from mixkd.loading import own_test_view
    from mixkd.models.preprocess import pretrained_preprocessing

    spec = load_dataset("imagefolder", str(folder), image_size=224, splits=("test",))
    # ResNet-18's weights (IMAGENET1K_V1): resize 256, centre crop 224, bilinear: the folder's test view, kept
    assert own_test_view(spec, pretrained_preprocessing("tv:resnet18"), "tv:resnet18") is None
    own = pretrained_preprocessing("tv:resnet50")  # IMAGENET1K_V2: resize 232, centre crop 224
    view, note = own_test_view(spec, own, "tv:resnet50")
    assert note.startswith("tv:resnet50 evaluated with its own eval transform (224x224 bilinear, mean (0.485, 0.456, "
                           "0.406), std (0.229, 0.224, 0.225), crop 0.9655 (resize 232, centre crop 224)), not the")
    img = _images(folder)[0]
    assert torch.equal(view.test[0][0], get_model_weights("resnet50").DEFAULT.transforms()(img))
    assert not torch.equal(view.test[0][0], spec.test[0][0])


def test_a_distillation_on_an_image_folder_checks_its_teacher_through_its_own_transform(folder, resnet, tmp_path,
                                                                                          monkeypatch):
    import mixkd.engine
    from mixkd.config import build_config
    from mixkd.engine import run_job

    model, snap = resnet
    seen = []

    def recording(net, loader, *args, **kwargs):
        seen.append((net, loader))
        return evaluate(net, loader, *args, **kwargs)

    monkeypatch.setattr(mixkd.engine, "evaluate", recording)
    cfg = build_config(flags={"task": "distill", "dataset": "imagefolder", "data_dir": str(folder), "image_size": 32,
                              "model": "resnet8", "kd.teacher": str(snap), "epochs": 1, "batch_size": 8,
                              "eval_batch_size": 8, "workers": 0, "device": "cpu", "progress": False, "compile": "off",
                              "optim.milestones": [1], "out": str(tmp_path / "run")})
    job = run_job(cfg)
    teacher_loaders = [loader for net, loader in seen  # the teacher itself, unwrapped: the transform gives its input
                       if getattr(net, "mixkd_name", None) == "timm:resnet10t" and not isinstance(net, Preprocessed)]
    assert teacher_loaders, "the teacher's check fed the teacher its own transform's images"
    own = create_transform(**resolve_data_config(pretrained_cfg=CFG))
    img = _images(folder)[0]
    assert torch.equal(next(iter(teacher_loaders[0]))[0][0], own(img))  # timm's own output for the first image
    with torch.no_grad():
        top1, _ = _metrics(model(torch.stack([own(i) for i in _images(folder)])))
    assert job.result["teacher_top1"] == pytest.approx(top1)
    log = (Path(job.dir) / "log.txt").read_text()
    assert "teacher timm:resnet10t: its accuracy evaluated with its own eval transform (32x32 bicubic" in log
