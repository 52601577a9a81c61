"""Any timm / torchvision classifier by name (``timm:<name>``, ``tv:<name>``): built with the dataset's
class count and the library's own keys, features through the libraries' own mechanisms, teachers from
timm / torchvision / Hugging Face hub-cache weights with their own preprocessing, and runs that train,
distill (KD, DKD, FitNet; mixup, PMU) and resume step-exactly. CPU, tiny random models, nothing
downloaded."""

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from test_imagenet import write_jpeg_folder

from mixkd.checkpoint import load_checkpoint
from mixkd.cli import main
from mixkd.config import build_config
from mixkd.data import DIGITS_MEAN, DIGITS_STD
from mixkd.engine import Run, run_job
from mixkd.errors import MixkdError
from mixkd.loading import load_model, load_teacher
from mixkd.models import create_model, feature_names, model_problem
from mixkd.models.preprocess import Preprocessed, Preprocessing

DIGITS = Preprocessing(32, DIGITS_MEAN, DIGITS_STD)


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Running statistics away from (0, 1), so that a wrong buffer shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


# ---- names, keys and features ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "stages"), [
    ("timm:resnet10t", ["act1", "layer1", "layer2", "layer3", "layer4"]),
    ("timm:mobilenetv3_small_050", ["bn1", "blocks.0", "blocks.1", "blocks.3", "blocks.5"]),
    ("timm:vit_tiny_patch16_224", [f"blocks.{i}" for i in range(12)]),
    ("tv:mobilenet_v3_small", ["features.0", "features.1", "features.3", "features.8", "features.12"]),
    ("tv:resnet18", ["relu", "layer1", "layer2", "layer3", "layer4"]),  # the registry's tv_resnet18
])
def test_a_library_name_builds_its_model_with_the_class_count_its_keys_and_features(name, stages):
    source, arch = name.split(":")
    torch.manual_seed(0)
    model = create_model(name, 7, image_size=32).eval()
    if source == "timm":
        own = timm.create_model(arch, num_classes=7, **({"img_size": 32} if "vit" in arch else {}))
    else:
        own = torchvision.models.get_model(arch, num_classes=7)
    assert list(model.state_dict()) == list(own.state_dict())  # the library's own keys: its files load strictly
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats, feat_logits = model(x, is_feat=True)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(feat_logits, logits)  # the features' pass computes the same logits
    assert feature_names(model) == [*stages, "pre_logits"] and len(feats) == len(stages) + 1
    assert all(f.dim() == 4 for f in feats[:-1])  # stage maps (a ViT's tokens as NCHW maps)
    classifier = model.get_classifier() if source == "timm" else [m for m in model.modules()
                                                                  if isinstance(m, torch.nn.Linear)][-1]
    assert feats[-1].shape == (2, classifier.in_features)  # the penultimate vector fed to the classifier
    torch.testing.assert_close(classifier(feats[-1]), logits)


def test_the_tv_names_of_the_registry_models_are_aliases_loading_each_others_checkpoints(tmp_path):
    from mixkd.checkpoint import save_checkpoint

    old = create_model("tv_resnet18", 5)
    assert type(create_model("tv:resnet18", 5)) is type(old)
    save_checkpoint(tmp_path / "ckpt.safetensors", _randomize_bn(old), model_name="tv_resnet18", num_classes=5, epoch=1)
    new, arch = load_model(str(tmp_path / "ckpt.safetensors"), "tv:resnet18", 5)
    assert arch == "tv:resnet18"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(new.eval()(x), old.eval()(x))


def test_unknown_names_and_a_missing_timm_are_one_line(monkeypatch, capsys):
    assert model_problem("timm:resnet18") is None and model_problem("tv:mobilenet_v3_small") is None
    msg = model_problem("timm:resnet18x")
    assert msg.startswith("unknown model 'timm:resnet18x': timm has no classifier 'resnet18x'; similar: timm:resnet18")
    assert "tv:mobilenet_v3_small" in model_problem("tv:mobilenetv3_small")
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # as if timm were not installed
    assert main(["train", "--model", "timm:resnet18", "--dataset", "digits", "--device", "cpu", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mixkd: error: model 'timm:resnet18': timm models need timm, which is not installed: "
                   "pip install 'mixkd[timm]'")


def test_mixkd_models_lists_the_libraries_own_names(capsys):
    assert main(["models", "--source", "timm", "resnet1*"]) == 0
    assert capsys.readouterr().out.split() == [f"timm:{n}" for n in timm.list_models("resnet1*")]
    assert main(["models", "--source", "tv", "mobilenet"]) == 0
    assert capsys.readouterr().out.split() == ["tv:mobilenet_v2", "tv:mobilenet_v3_large", "tv:mobilenet_v3_small"]
    assert main(["models", "--source", "tv", "nothing_like_it"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ---- teachers from library weights -------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_teacher(tmp_path_factory):
    """A timm resnet10t (10 classes) and its state dict written by safetensors' save_file, as timm saves."""
    torch.manual_seed(1)
    model = _randomize_bn(timm.create_model("resnet10t", num_classes=10)).eval()
    path = tmp_path_factory.mktemp("timm") / "resnet10t.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_a_timm_safetensors_file_is_a_teacher_giving_timms_logits(timm_teacher):
    reference, path = timm_teacher
    x = torch.randn(3, 3, 32, 32)
    same = Preprocessing(176, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # its pretrained config's input
    teacher, arch = load_teacher(str(path), "timm:resnet10t", 10, "cpu", data=same)
    assert arch == "timm:resnet10t" and not isinstance(teacher, Preprocessed) and not teacher.training
    with torch.no_grad():
        assert torch.equal(teacher(x), reference(x))
        assert torch.equal(teacher(x, is_feat=True)[1], reference(x))
    # batches normalised for digits at 32 x 32: renormalised to its mean/std and resized to 176, bicubic
    teacher, _ = load_teacher(str(path), "timm:resnet10t", 10, "cpu", data=DIGITS)
    assert isinstance(teacher, Preprocessed) and "its own preprocessing from its pretrained config (176x176 bicubic" \
        in teacher.preprocess_note
    pixels = x * torch.tensor(DIGITS_STD).view(1, 3, 1, 1) + torch.tensor(DIGITS_MEAN).view(1, 3, 1, 1)
    own = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference(F.interpolate(own, size=(176, 176), mode="bicubic", align_corners=False))
        torch.testing.assert_close(teacher(x), expected, rtol=1e-4, atol=1e-4)
    teacher, _ = load_teacher(str(path), "timm:resnet10t", 10, "cpu", data=DIGITS, teacher_input="dataset")
    assert not isinstance(teacher, Preprocessed) and "the dataset's preprocessing" in teacher.preprocess_note


def test_a_weights_file_of_another_architecture_is_one_line_naming_the_file_and_keys(timm_teacher):
    _, path = timm_teacher
    with pytest.raises(MixkdError) as info:
        load_teacher(str(path), "timm:resnet18", 10, "cpu")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"checkpoint {path} does not fit timm:resnet18: missing keys: conv1.weight, "
                          "layer1.1.conv1.weight, layer1.1.bn1.weight (+61 more); unexpected keys: ")
    assert "shape mismatches (checkpoint vs model): layer2.0.downsample.1.weight (128, 64, 1, 1) vs (128,)" in msg


def _hub_folder(root: Path, model: torch.nn.Module, arch: str, pretrained_cfg: dict) -> Path:
    """``root/models--timm--<arch>.tiny`` laid out as the Hugging Face hub cache lays it out."""
    repo = root / f"models--timm--{arch}.tiny"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file(model.state_dict(), str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 10,
                                                  "pretrained_cfg": pretrained_cfg}))
    return repo


def test_a_hub_cache_folder_and_an_hf_hub_name_load_offline_with_their_config(timm_teacher, tmp_path, monkeypatch):
    import huggingface_hub.constants

    reference, _ = timm_teacher
    cfg = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
           "crop_pct": 1.0}
    repo = _hub_folder(tmp_path / "hub", reference, "resnet10t", cfg)
    x = torch.randn(2, 3, 32, 32)
    own = (x * torch.tensor(DIGITS_STD).view(1, 3, 1, 1) + torch.tensor(DIGITS_MEAN).view(1, 3, 1, 1) - 0.5) / 0.25
    with torch.no_grad():
        expected = reference(own)  # its config's mean/std, its size (32): no resize
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for source in (str(repo), str(repo / "snapshots" / "0123abcd"), "hf-hub:timm/resnet10t.tiny"):
        teacher, arch = load_teacher(source, None, 10, "cpu", data=DIGITS)  # the architecture from config.json
        assert arch == "timm:resnet10t", source
        assert "from its hub config.json (32x32 bilinear, mean (0.5, 0.5, 0.5)" in teacher.preprocess_note
        with torch.no_grad():
            torch.testing.assert_close(teacher(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(MixkdError, match=r"^hf-hub:timm/absent is not in the local Hugging Face cache .*hf download"):
        load_teacher("hf-hub:timm/absent", None, 10, "cpu")


# ---- runs: train, distill, resume ----------------------------------------------------------------


def _cfg(out, **extra):
    flags = {"task": "distill", "dataset": "digits", "eval_batch_size": 512, "epochs": 2, "batch_size": 256, "device": "cpu",
             "progress": False, "out": str(out), "compile": "off", "optim.milestones": [1], **extra}
    return build_config(flags=flags)


def _same_run(a: Path, b: Path) -> None:
    drop = ("images_per_s", "epoch_seconds")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in drop} for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (a, b)]
    assert rows[0] == rows[1]
    wa, wb = load_checkpoint(a).state_dict, load_checkpoint(b).state_dict
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_timm_teacher_distills_into_a_torchvision_student_with_dkd_and_pmu_and_resumes_step_exact(
        timm_teacher, tmp_path, one_thread):
    reference, _ = timm_teacher
    hub = _hub_folder(tmp_path / "hub", reference, "resnet10t", {"input_size": [3, 32, 32], "mean": [0.5] * 3,
                                                                   "std": [0.25] * 3, "interpolation": "bilinear"})
    cfg = dict(model="tv:mobilenet_v3_small", **{"kd.teacher": str(hub), "kd.method": "dkd", "mix.method": "mixup",
                                                "mix.fraction": 0.1})
    cfg["epochs"] = 1
    whole = tmp_path / "whole"
    run_job(_cfg(whole, **cfg))
    log = (whole / "log.txt").read_text()
    assert "note: teacher timm:resnet10t: its own preprocessing from its hub config.json" in log
    stopped = tmp_path / "stopped"
    job = Run(_cfg(stopped, **cfg))
    job.start()
    while job.step_in_epoch < 2:  # mid-epoch
        job.advance()
    job.stop("time")
    assert not (stopped / "result.json").exists()
    run_job(_cfg(stopped, **cfg), resume=True)
    _same_run(whole, stopped)
    saved = build_config(stopped / "config.yaml")
    assert (saved.model, saved.kd.teacher_model, saved.kd.method) == ("tv:mobilenet_v3_small", None, "dkd")


@pytest.mark.parametrize(("student", "teacher_arch", "hint", "shapes"), [
    ("resnet8", "resnet10t", "2,layer1", ((32, 16, 16), (64, 8, 8))),  # a RepDistiller student, stages named
    ("timm:vit_tiny_patch16_224", "resnet10t", "-2,layer3", ((192, 2, 2), (256, 2, 2))),  # a ViT at 32 x 32
])
def test_fitnet_between_a_timm_teacher_and_any_student(timm_teacher, tmp_path, student, teacher_arch, hint, shapes,
                                                       one_thread):
    _, path = timm_teacher
    out = tmp_path / "run"
    run_job(_cfg(out, model=student, epochs=1, **{"kd.teacher": str(path), "kd.teacher_model": f"timm:{teacher_arch}",
                                                  "kd.method": "fitnet", "kd.hint_layer": hint,
                                                  "kd.teacher_input": "dataset", "mix.method": "mixup"}))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train_hint"] > 0 and torch.isfinite(torch.tensor(row["train_loss"]))
    job = Run(_cfg(tmp_path / "again", model=student, epochs=1, **{
        "kd.teacher": str(path), "kd.teacher_model": f"timm:{teacher_arch}", "kd.method": "fitnet",
        "kd.hint_layer": hint, "kd.teacher_input": "dataset"}))
    job.start()
    x = torch.zeros(2, 3, 32, 32)
    s_layer, t_layer = job.distiller.layers
    with torch.no_grad():
        assert tuple(job.model(x, is_feat=True)[0][s_layer].shape[1:]) == shapes[0]
        assert tuple(job.teacher(x, is_feat=True)[0][t_layer].shape[1:]) == shapes[1]
    job.close()


def test_a_stage_name_a_model_lacks_is_one_line_listing_its_stages(timm_teacher, tmp_path, capsys):
    _, path = timm_teacher
    assert main(["distill", "--student", "tv:mobilenet_v3_small", "--teacher", str(path), "--teacher-model",
                 "timm:resnet10t", "--kd", "fitnet", "--hint-layer", "layer9", "--dataset", "digits", "--device",
                 "cpu", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mixkd: error: tv:mobilenet_v3_small has no feature stage 'layer9'; its stages: features.0, "
                   "features.1, features.3, features.8, features.12, pre_logits")
    assert not (tmp_path / "run").exists()


def test_a_tv_teacher_distills_into_a_timm_student_on_a_jpeg_folder_with_kd(tmp_path, capsys):
    data = write_jpeg_folder(tmp_path / "data", n_train=4, n_val=2, size=40)
    torch.manual_seed(2)
    reference = _randomize_bn(torchvision.models.mobilenet_v3_small(num_classes=4)).eval()
    torch.save(reference.state_dict(), tmp_path / "mnv3.pth")  # a torchvision .pth
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(tmp_path / "mnv3.pth"), "--teacher-model", "tv:mobilenet_v3_small",
                 "--student", "timm:mobilenetv3_small_050", "--kd", "kd", "--dataset", "imagefolder", "--data-dir",
                 str(data), "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                 "--teacher-input", "dataset", "--workers", "0", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "result.json").read_text())
    from mixkd.data import load_dataset

    val = load_dataset("imagefolder", data, image_size=32, splits=("test",)).test
    with torch.no_grad():
        x = torch.stack([val[i][0] for i in range(len(val))])
        expected = 100.0 * (reference(x).argmax(1) == torch.as_tensor(val.targets)).float().mean().item()
    assert result["teacher_top1"] == pytest.approx(expected)  # the file's weights, on the dataset's input
    assert result["teacher_model"] == "tv:mobilenet_v3_small"


def test_a_model_that_cannot_be_compiled_falls_back_to_the_eager_step_with_one_log_line(tmp_path, monkeypatch, one_thread,
                                                                                         cifar10_dir):
    import mixkd.step

    class Untraceable(torch.nn.Module):
        """What torch.compile gives for a model dynamo cannot trace: its first call fails."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            raise RuntimeError("dynamo: cannot trace\nthis model")

    eager = tmp_path / "eager"
    cfg = {"task": "train", "model": "resnet8", "epochs": 1, "batch_size": 32, "mix.method": "mixup",
           "dataset": "cifar10", "data_dir": str(cifar10_dir)}
    run_job(_cfg(eager, **cfg, compile="off"))
    monkeypatch.setattr(mixkd.step.torch, "compile", lambda model, **options: Untraceable(model))
    fallback = tmp_path / "fallback"
    run_job(_cfg(fallback, **cfg, compile="on"))
    notes = [line.split(" ", 1)[1] for line in (fallback / "log.txt").read_text().splitlines() if "could not be" in line]
    assert notes == ["note: the step of resnet8 could not be compiled (RuntimeError: dynamo: cannot trace this "
                     "model); it runs eagerly"]
    _same_run(eager, fallback)  # from the state before the failed attempt: what the eager run computed


def test_a_study_names_library_models_and_gives_their_runs_portable_ids():
    from mixkd.study.spec import expand, parse_study

    data = {"name": "s", "defaults": {"dataset": "digits", "epochs": 1},
            "teachers": [{"name": "plain", "models": ["timm:resnet10t"]}],
            "students": [{"teachers": ["plain"], "models": ["tv:mobilenet_v3_small", "resnet8"],
                          "methods": ["alone", "kd_pmu"], "temperatures": [4], "fractions": [0.1]}]}
    runs = expand(parse_study(data, "s.yaml"), "s.yaml")
    assert [r.id for r in runs] == [
        "teachers/timm_resnet10t_plain-s0", "students/tv_mobilenet_v3_small-alone-s0",
        "students/resnet8-alone-s0", "students/tv_mobilenet_v3_small-from-timm_resnet10t_plain-kd_pmu-T4-f0.1-s0",
        "students/resnet8-from-timm_resnet10t_plain-kd_pmu-T4-f0.1-s0"]
    assert [r.config.model for r in runs][:2] == ["timm:resnet10t", "tv:mobilenet_v3_small"]
    assert runs[-1].config_for("/study").kd.teacher == "../../teachers/timm_resnet10t_plain-s0"
    data["students"][0]["models"] = ["timm:resnet18x"]
    with pytest.raises(MixkdError, match=r"students\[0\]\.models\[0\].*unknown model 'timm:resnet18x'"):
        expand(parse_study(data, "s.yaml"), "s.yaml")


def test_the_timm_teacher_recipes_are_mdistillers_and_dists_settings():
    root = Path(__file__).resolve().parents[1] / "configs" / "imagenet"
    recipes = {p.stem: build_config(p) for p in sorted(root.glob("timm_*.yaml"))}
    assert set(recipes) == {"timm_r50_r18_kd", "timm_r50_r18_dist", "timm_r50_mbv1_dkd"}
    for name, cfg in recipes.items():
        assert (cfg.task, cfg.dataset, cfg.image_size, cfg.epochs, cfg.batch_size) == ("distill", "imagefolder", 224, 100, 512)
        o = cfg.optim
        assert (o.lr, o.momentum, o.weight_decay, cfg.milestones(), o.lr_decay) == (0.2, 0.9, 1e-4, [30, 60, 90], 0.1)
        assert (cfg.kd.teacher, cfg.kd.teacher_model, cfg.mix.method) == ("hf-hub:timm/resnet50.tv_in1k", None, "none")
        assert model_problem(cfg.model) is None, name
    kd, dist, dkd = recipes["timm_r50_r18_kd"].kd, recipes["timm_r50_r18_dist"].kd, recipes["timm_r50_mbv1_dkd"].kd
    assert (kd.method, kd.temperature, kd.ce_weight, kd.kd_weight) == ("kd", 4.0, 1.0, 1.0)  # DIST_KD's KD (T=4)
    assert (dist.method, dist.temperature, dist.beta, dist.gamma, dist.ce_weight, dist.kd_weight) == ("dist", 1, 1, 1, 1, 1)
    # mdistiller configs/imagenet/r50_mv1/dkd.yaml
    assert (dkd.method, dkd.ce_weight, dkd.alpha, dkd.beta, dkd.temperature, dkd.warmup_epochs) == ("dkd", 1, 1, 2, 1, 1)
    assert recipes["timm_r50_mbv1_dkd"].model == "timm:mobilenetv1_100"


@pytest.mark.parametrize("name", ["timm:mobilenetv3_small_050", "tv:mobilenet_v3_small"])
def test_the_analysis_t_sne_reads_the_penultimate_features_of_a_library_model(name):
    from mixkd.analysis.inputs import PixelImages
    from mixkd.analysis.metrics import penultimate_features

    torch.manual_seed(0)
    model = create_model(name, 10, 32).eval()
    images = PixelImages(torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8), torch.arange(5), torch.arange(5))
    feats = penultimate_features(model, images, 2, torch.device("cpu"))
    with torch.no_grad():
        x = images.images.float() / 255
        pre = model.forward_head(model.forward_features(x), pre_logits=True) if name.startswith("timm") else \
            model.classifier[:-1](torch.flatten(model.avgpool(model.features(x)), 1))  # the last Linear's input
    assert feats.shape == (5, 1024)
    torch.testing.assert_close(feats, pre)
