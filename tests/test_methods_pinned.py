"""The built-in methods moved into mixkd/methods/ (issue 27) compute what they computed before, bit for
bit, and a config written by the version before the move (every method's key, null where unused) still
loads and resumes.

The literals were printed by main at e801218 (before the move) with this very setup; the same 14 one-epoch
distillations on digits (7 methods x {no mixup, mixup 0.1}, resnet20 -> resnet8, seed 0) gave identical
result.json top-1/NLL and train losses before and after (docs/methods.md says how it was checked)."""

import torch
import torch.nn.functional as F
import yaml

from mixkd.config import KDConfig, build_config, load_run_config
from mixkd.distiller import make_distiller
from mixkd.models import create_model

BEFORE = {  # main at e801218: make_distiller(m, resnet8, resnet14, KDConfig(method=m)).losses(x, y) at epoch 3 of 10
    "alone": {"loss": 2.3583967685699463, "ce": 2.3583967685699463},
    "kd": {"loss": 0.5285449624061584, "ce": 2.3583967685699463, "kd": 0.32522812485694885},
    "std": {"loss": 1.4515215158462524, "ce": 2.8415491580963135, "kd": 1.2970740795135498},
    "dkd": {"loss": 2.749812602996826, "ce": 2.3583967685699463, "kd": 2.6094396114349365},
    "lskd": {"loss": 11.805935859680176, "ce": 2.3583967685699463, "kd": 1.2855662107467651},
    "dist": {"loss": 73.34999084472656, "ce": 2.3583967685699463, "kd": 35.49579620361328},
    "fitnet": {"loss": 117.5190658569336, "ce": 2.3583967685699463, "kd": 0.32522812485694885,
               "hint": 1.1516066789627075},
}


def test_every_builtin_method_gives_bit_for_bit_the_losses_of_the_version_before_the_move(one_thread):
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = 0.7 * F.one_hot(torch.arange(6) % 10, 10).float() + 0.3 * F.one_hot((torch.arange(6) + 4) % 10, 10).float()
    for method, expected in BEFORE.items():
        torch.manual_seed(0)
        student = create_model("resnet8", 10)
        teacher = None if method == "alone" else create_model("resnet14", 10).eval()
        settings = None if teacher is None else KDConfig(method=method).settings()
        d = make_distiller(method, student, teacher, settings)
        d.set_epoch(3, 10)
        d.train()
        got = {k: v.item() for k, v in d.losses(x, y).items()}
        assert got == expected, method


OLD_KD = {"teacher": "t.safetensors", "teacher_model": "resnet8", "method": "kd", "temperature": 4.0,
          "ce_weight": 0.1, "kd_weight": 0.9, "alpha": None, "beta": None, "gamma": None, "warmup_epochs": None,
          "hint_weight": None, "hint_layer": None}


def test_a_config_written_before_the_move_loads_with_its_settings(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"task": "distill", "model": "resnet8", "dataset": "digits", "kd": OLD_KD}))
    cfg = load_run_config(path)
    assert cfg.kd.method == "kd" and cfg.kd.params() == {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9,
                                                      "standardize": False}
    dkd = build_config(path, overrides=["kd.method=dkd", "kd.temperature=null", "kd.ce_weight=null",
                                        "kd.kd_weight=null", "kd.beta=3"])
    assert dkd.kd.params() == {"temperature": 4.0, "ce_weight": 1.0, "kd_weight": 1.0, "alpha": 1.0, "beta": 3.0,
                               "warmup_epochs": 20, "standardize": False}
    # written back resolved, the method's keys only
    assert yaml.safe_load(dkd.to_yaml())["kd"] == {"teacher": "t.safetensors", "teacher_model": "resnet8",
                                                    "teacher_input": "auto", "method": "dkd", **dkd.kd.params()}


def test_per_pair_defaults_follow_the_teacher_and_student(tmp_path):
    def kd(method, teacher, student, **given):
        flags = {"task": "distill", "model": student, "kd.method": method, "kd.teacher": "t.pth",
                 "kd.teacher_model": teacher, **{f"kd.{k}": v for k, v in given.items()}}
        return build_config(flags=flags).kd.params()

    assert kd("dkd", "resnet56", "resnet20")["beta"] == 2.0  # mdistiller configs/cifar100/dkd/res56_res20.yaml
    assert kd("dkd", "vgg13", "vgg8")["beta"] == 6.0  # vgg13_vgg8.yaml
    assert kd("dkd", "resnet32x4", "resnet8x4")["beta"] == 8.0  # res32x4_res8x4.yaml sets none: cfg.py's
    assert kd("dkd", "resnet56", "resnet20", beta=5.0)["beta"] == 5.0  # what the user sets wins
    assert kd("lskd", "ResNet50", "MobileNetV2") == {"temperature": 3.0, "ce_weight": 0.1, "kd_weight": 1.0}
    assert kd("lskd", "resnet32x4", "resnet8x4") == {"temperature": 2.0, "ce_weight": 0.1, "kd_weight": 9.0}


def test_a_run_saved_before_the_move_resumes(tmp_path, one_thread):
    from mixkd.checkpoint import save_checkpoint
    from mixkd.engine import Run

    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher, create_model("resnet8", 10), model_name="resnet8", num_classes=10, epoch=1)
    flags = {"task": "distill", "model": "resnet8", "dataset": "digits", "epochs": 1, "batch_size": 512,
             "device": "cpu", "progress": False, "compile": "off", "kd.teacher": str(teacher)}
    cut = Run(build_config(flags={**flags, "out": str(tmp_path / "cut")}))
    cut.advance()
    cut.stop("time")
    saved = tmp_path / "cut" / "config.yaml"
    tree = yaml.safe_load(saved.read_text())
    tree["kd"] = {**OLD_KD, "teacher": str(teacher), "teacher_model": None}  # as the version before wrote it
    saved.write_text(yaml.safe_dump(tree, sort_keys=False))
    resumed = Run(load_run_config(saved).model_copy(update={"out": str(tmp_path / "cut")}), resume=True)
    assert resumed.cfg.kd.params() == {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "standardize": False}
    while resumed.advance():
        pass
    assert resumed.result["kd_method"] == "kd" and resumed.result["epochs"] == 1


def test_what_the_method_files_declare_is_what_they_register():
    # mixkd claims labels methods from the files' source (no torch); the loaded registry must agree
    from mixkd.registry import KD_METHODS, Registry

    cold = Registry("KD method", builtins="mixkd.methods")  # never imported: read from the source
    assert [d["name"] for d in cold.declared()] == KD_METHODS.names()
    for declared in cold.declared():
        entry = KD_METHODS.get(declared["name"])
        assert (declared["label"], declared["title"]) == (entry.label, entry.title)
        assert declared["extra"].items() <= entry.extra.items()
