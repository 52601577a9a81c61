"""`mixkd analyze` end to end on tiny runs, the report helpers, and every bad-input case."""

import json
import shutil

import pytest
import torch
import yaml

from mixkd.analysis import load_analysis, load_embedding, robustness_curves, summarize, summary_row, tsne_montage
from mixkd.checkpoint import save_checkpoint
from mixkd.cli import main
from mixkd.models import create_model

TINY = ["--dataset", "cifar10", "--batch-size", "32", "--eval-batch-size", "80", "--device", "cpu", "--no-progress"]
PNGS = {"reliability.png", "logit_std.png", "tsne.png", "robustness.png"}
MODEL_KEYS = {"top1", "top5", "nll", "ece", "calibration", "confidence", "entropy", "logit_std"}
VICINAL_KEYS = {"accuracy", "entropy", "confidence", "linearity_gap"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster, and steady


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar10_dir):
    """A tiny teacher (train) and a student distilled from it, on the fake CIFAR-10 (80 test images)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("analysis_runs")
    common = ["--model", "resnet8", "--data-dir", str(cifar10_dir), *TINY]
    assert main(["train", *common, "--epochs", "3", "--out", str(root / "teacher")]) == 0
    assert main(["distill", "--teacher", str(root / "teacher"), *common, "--epochs", "1",
                 "--out", str(root / "student")]) == 0
    return root


def _one_line_error(capsys, argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("mixkd: error: ")
    return lines[0]


def test_analyze_a_distillation_run_writes_every_metric(runs, capsys):
    student = runs / "student"
    # the dataset, data dir and teacher come from the run's config.yaml
    assert main(["analyze", str(student), "--subset", "40", "--batch-size", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "agreement" in out and "analysis.json" in out
    assert PNGS | {"analysis.json", "tsne.npz", "tsne_teacher.npz"} <= {p.name for p in student.iterdir()}
    for png in PNGS:
        assert (student / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    a = json.loads((student / "analysis.json").read_text())
    assert {"student", "teacher", "fidelity", "vicinal", "tsne", "robustness", "plots", "timing", "dataset",
            "model", "num_images", "options"} <= set(a)
    assert a["num_images"] == 40 and a["num_test_images"] == 80 and a["dataset"] == "cifar10"
    assert a["teacher_model"] == "resnet8" and a["teacher_checkpoint"] == str(runs / "teacher")
    assert set(a["student"]) == MODEL_KEYS and set(a["teacher"]) == MODEL_KEYS
    s = a["student"]
    assert 0 <= s["top1"] <= s["top5"] <= 100 and s["nll"] > 0 and 0 <= s["ece"] <= 1
    assert len(s["calibration"]["bin_count"]) == 15 and sum(s["calibration"]["bin_count"]) == 40
    assert {"mean", "median", "p05", "p95", "hist_counts", "hist_edges"} <= set(s["logit_std"])
    assert {"agreement", "kl", "vicinal"} <= set(a["fidelity"]) and a["fidelity"]["kl"] >= 0
    for role in ("student", "teacher"):
        assert set(a["vicinal"][role]) == {"0.5", "0.7", "0.9"}
        assert all(set(v) == VICINAL_KEYS for v in a["vicinal"][role].values())
    assert set(a["fidelity"]["vicinal"]) == {"0.5", "0.7", "0.9"}
    rob = a["robustness"]
    assert rob["eps_255"] == [0, 1, 2, 4, 8] and rob["pgd_steps"] == 10
    assert rob["fgsm"][0] == rob["pgd"][0] == s["top1"]
    assert all(0 <= v <= 100 for v in rob["fgsm"] + rob["pgd"])
    # the t-SNE set is all 80 test images (8 per class) whatever --subset says
    emb = load_embedding(student)
    assert emb["embedding"].shape == (80, 2) and a["tsne"]["num_points"] == 80
    assert (emb["labels"][:-1] <= emb["labels"][1:]).all() and emb["class_names"][0] == "class_000"


def test_a_model_against_itself_agrees_fully(runs, tmp_path, capsys):
    teacher = runs / "teacher"
    assert main(["analyze", str(teacher), "--teacher", str(teacher), "--subset", "24", "--device", "cpu",
                 "--out", str(tmp_path), "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert a["fidelity"]["agreement"] == 100.0 and a["fidelity"]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert all(v["agreement"] == 100.0 for v in a["fidelity"]["vicinal"].values())
    assert a["student"]["top1"] == a["teacher"]["top1"]
    # same fixed t-SNE set, same features, same seed: the same picture
    assert (load_embedding(tmp_path)["embedding"] == load_embedding(tmp_path / "tsne_teacher.npz")["embedding"]).all()
    assert not any(p.name == "analysis.json" for p in teacher.iterdir())  # --out was honoured

    # report helpers on what was written
    row = summary_row(tmp_path)
    assert row["agreement"] == 100.0 and {"pgd_8", "fgsm_1", "vicinal_gap_0.5", "ece"} <= set(row)
    stats = summarize([tmp_path, load_analysis(tmp_path / "analysis.json")])
    assert stats["n"] == 2 and stats["mean"]["top1"] == row["top1"] and stats["std"]["top1"] == 0.0
    png = robustness_curves({"self": [tmp_path, tmp_path], "again": tmp_path}, tmp_path / "report" / "rob.png")
    montage = tsne_montage([tmp_path / "tsne_teacher.npz", tmp_path], ["teacher", "student"], tmp_path / "m.png")
    assert png.stat().st_size > 0 and montage.read_bytes()[:4] == b"\x89PNG"


def test_a_checkpoint_file_outside_a_run(runs, cifar10_dir, tmp_path, capsys):
    copy = tmp_path / "student.safetensors"
    shutil.copy(runs / "student" / "checkpoint.safetensors", copy)
    # outside a run the checkpoint still names its model and dataset, but not the data folder
    line = _one_line_error(capsys, ["analyze", copy, "--data-dir", tmp_path / "nowhere", "--device", "cpu"])
    assert "not found" in line
    assert main(["analyze", str(copy), "--data-dir", str(cifar10_dir), "--subset", "8", "--device", "cpu"]) == 0
    a = load_analysis(tmp_path / "student-analysis")  # the default output folder of a lone checkpoint
    assert a["model"] == "resnet8" and a["dataset"] == "cifar10" and a["num_images"] == 8
    assert a["teacher"] is None and a["fidelity"] is None and a["vicinal"]["teacher"] is None
    assert a["tsne"]["teacher_file"] is None and summary_row(a)["agreement"] is None


def test_class_count_mismatch_is_one_line(tmp_path, capsys):
    net = create_model("resnet8", 5)
    save_checkpoint(tmp_path / "five.safetensors", net, model_name="resnet8", num_classes=5, epoch=1)
    line = _one_line_error(capsys, ["analyze", tmp_path / "five.safetensors", "--dataset", "digits", "--device", "cpu"])
    assert "5 classes" in line and "10" in line
    # a RepDistiller .pth says nothing about its classes: load_weights catches the mismatch
    torch.save({"model": create_model("resnet8", 100).state_dict()}, tmp_path / "ckpt.pth")
    line = _one_line_error(capsys, ["analyze", tmp_path / "ckpt.pth", "--model", "resnet8", "--dataset", "digits"])
    assert "does not fit" in line and "class count" in line
    for flag, value in (("--device", "tpu"), ("--subset", "0"), ("--batch-size", "0")):
        line = _one_line_error(capsys, ["analyze", tmp_path / "five.safetensors", "--dataset", "digits", flag, value])
        assert flag in line


def test_unknown_teacher_is_one_line(runs, tmp_path, capsys):
    student = runs / "student"
    line = _one_line_error(capsys, ["analyze", student, "--teacher", tmp_path / "missing", "--out", tmp_path])
    assert "not found" in line
    line = _one_line_error(capsys, ["analyze", student, "--teacher", "resnet56", "--out", tmp_path])
    assert "architecture name" in line
    line = _one_line_error(capsys, ["analyze", student, "--teacher", runs / "teacher", "--teacher-model", "resnet9000",
                                    "--out", tmp_path])
    assert "unknown model 'resnet9000'" in line
    # a distillation run whose teacher has moved away
    moved = tmp_path / "moved"
    shutil.copytree(student, moved)
    (moved / "analysis.json").unlink(missing_ok=True)
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["kd"]["teacher"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    line = _one_line_error(capsys, ["analyze", moved])
    assert "kd.teacher" in line and "--no-teacher" in line
    assert not (moved / "analysis.json").exists() and not (tmp_path / "analysis.json").exists()
    # --no-teacher analyzes it without one
    assert main(["analyze", str(moved), "--no-teacher", "--subset", "8", "--device", "cpu"]) == 0
    assert load_analysis(moved)["fidelity"] is None
