"""The command line end to end: train -> distill -> eval, resume, and every bad-input case."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mixkd.checkpoint import load_checkpoint
from mixkd.cli import main
from mixkd.models import create_model

TINY = ["--dataset", "cifar10", "--batch-size", "32", "--eval-batch-size", "64", "--device", "cpu", "--no-progress"]


def _mixkd(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("mixkd: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, cifar10_dir):
    out = tmp_path_factory.mktemp("runs") / "teacher"
    code = main(["train", "--model", "resnet8", "--data-dir", str(cifar10_dir), "--epochs", "3", "--out", str(out),
                 "--mix", "mixup", "--lr", "0.05", *TINY])
    assert code == 0
    return out


def test_train_writes_a_complete_run_directory(teacher_run):
    assert {p.name for p in teacher_run.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoint.safetensors",
                                                        "result.json"}
    rows = [json.loads(line) for line in (teacher_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {"test_top1", "test_top5", "test_nll", "train_loss", "lr", "images_per_s"} <= set(rows[0])
    result = json.loads((teacher_run / "result.json").read_text())
    assert result["top1"] == rows[-1]["test_top1"]
    assert result["best_top1"] == max(r["test_top1"] for r in rows)
    assert result["top1"] > 30  # 10 learnable classes: far above the 10% of chance
    assert {"torch", "torchvision", "mixkd"} <= set(result["versions"]) and result["device"].startswith("cpu")
    ckpt = load_checkpoint(teacher_run)
    assert ckpt.epoch == 3 and ckpt.model_name == "resnet8" and ckpt.optimizer_state is None  # finished: weights only


def test_eval_of_a_run_folder_takes_dataset_and_data_from_the_run(capsys, teacher_run, monkeypatch):
    import mixkd.data.catalog

    asked = []
    real = mixkd.data.catalog.load_cifar
    monkeypatch.setattr(mixkd.data.catalog, "load_cifar",
                        lambda *a, **kw: asked.append(a[3] if len(a) > 3 else kw.get("splits")) or real(*a, **kw))
    result = json.loads((teacher_run / "result.json").read_text())
    for target in (teacher_run, teacher_run / "checkpoint.safetensors"):  # a cifar10 run in its own data folder
        code, stdout, err = _mixkd(capsys, "eval", target, "--device", "cpu", "--json")
        assert code == 0, err
        metrics = json.loads(stdout)
        assert metrics["dataset"] == "cifar10" and metrics["top1"] == pytest.approx(result["top1"], abs=1e-6)
    assert asked == [("test",), ("test",)]  # only the test split is read
    code, stdout, err = _mixkd(capsys, "eval", teacher_run, "--dataset", "digits", "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(stdout)["dataset"] == "digits"  # flags still choose


def test_eval_uses_the_runs_precision_unless_told_and_says_which(capsys, teacher_run, tmp_path):
    """A CUDA run evaluates under bf16 autocast (precision auto); `mixkd eval` of its folder does the same by
    default, so that it reproduces the run's figures, and says so; --precision chooses; a checkpoint
    without its run is evaluated in fp32."""
    import shutil

    from mixkd.evaluation import eval_precision

    assert eval_precision(None, "bf16", "cuda") == ("bf16", "the run's precision")
    assert eval_precision(None, "auto", "cuda") == ("bf16", "the run's precision")  # config.yaml of an unfinished run
    assert eval_precision(None, "auto", "cpu") == ("fp32", "the run's precision")
    assert eval_precision(None, "bf16", "cpu") == ("bf16", "the run's precision")  # a CUDA run evaluated on a CPU
    assert eval_precision("fp32", "bf16", "cuda") == ("fp32", "asked")
    assert eval_precision("auto", None, "cuda") == ("bf16", "asked")
    assert eval_precision(None, None, "cuda") == ("fp32", "default")
    # a run whose result says bf16 (as a CUDA run's does): evaluated under bf16 autocast on the CPU too
    run = tmp_path / "bf16-run"
    shutil.copytree(teacher_run, run)
    result = json.loads((run / "result.json").read_text())
    (run / "result.json").write_text(json.dumps({**result, "precision": "bf16"}))
    outs = {}
    for flags in ([], ["--precision", "fp32"]):
        code, stdout, err = _mixkd(capsys, "eval", run, "--device", "cpu", *flags)
        assert code == 0, err
        outs[tuple(flags)] = stdout
    assert outs[()].rstrip().endswith("(bf16, the run's precision)"), outs
    assert outs[("--precision", "fp32")].rstrip().endswith("(fp32, asked)")
    code, stdout, err = _mixkd(capsys, "eval", teacher_run, "--device", "cpu", "--json")
    fp32 = json.loads(stdout)
    assert (fp32["precision"], fp32["precision_from"], fp32["nll"]) == ("fp32", "the run's precision", result["nll"])
    code, stdout, err = _mixkd(capsys, "eval", run, "--device", "cpu", "--json")
    bf16 = json.loads(stdout)
    assert bf16["precision"] == "bf16" and bf16["nll"] != fp32["nll"]  # bf16 logits: another NLL


def test_an_unreadable_image_is_one_line_naming_the_file(capsys, tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (32, 32), (40 * k, 90, 200)).save(tmp_path / "imgs" / split / cls / f"{k}.png")
    bad = tmp_path / "imgs" / "train" / "b" / "2.jpg"
    bad.write_bytes(b"\xff\xd8 truncated jpeg")
    for workers in ("0", "1"):
        code, _, err = _mixkd(capsys, "train", "--model", "resnet8", "--dataset", "imagefolder", "--data-dir",
                              tmp_path / "imgs", "--image-size", "32", "--epochs", "1", "--batch-size", "2",
                              "--workers", workers, "--device", "cpu", "--no-progress", "--out", tmp_path / f"r{workers}")
        errors = [line for line in err.splitlines() if line.startswith("mixkd: error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
        assert errors[0] == (f"mixkd: error: cannot read image {bad}: not an image file PIL can identify; delete or "
                             "replace the file (mixkd does not skip unreadable images, so that every epoch sees the "
                             "same samples)")


@pytest.mark.parametrize("method,extra", [("kd", ["-T", "4"]), ("std", ["--mix", "mixup", "--mix-fraction", "0.1"])])
def test_distill_then_eval_through_the_cli(capsys, tmp_path, teacher_run, cifar10_dir, method, extra):
    out = tmp_path / f"student-{method}"
    code, stdout, err = _mixkd(capsys, "distill", "--teacher", teacher_run, "--student", "resnet8", "--kd", method,
                               "--data-dir", cifar10_dir, "--epochs", "2", "--out", out, *extra, *TINY)
    assert code == 0, err
    assert "top-1" in stdout and str(out) in stdout
    result = json.loads((out / "result.json").read_text())
    assert result["teacher_model"] == "resnet8" and result["kd_method"] == method
    assert result["teacher_top1"] > 30
    code, stdout, err = _mixkd(capsys, "eval", out, "--dataset", "cifar10", "--data-dir", cifar10_dir,
                               "--device", "cpu", "--json")
    assert code == 0, err
    metrics = json.loads(stdout)
    assert metrics["top1"] == pytest.approx(result["top1"], abs=1e-6)


def test_eval_and_distill_accept_a_repdistiller_pth(capsys, tmp_path, teacher_run, cifar10_dir):
    weights = load_checkpoint(teacher_run).state_dict
    pth = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": weights, "epoch": 240, "best_acc": 70.0}, pth)
    code, stdout, err = _mixkd(capsys, "eval", pth, "--model", "resnet8", "--dataset", "cifar10",
                               "--data-dir", cifar10_dir, "--device", "cpu")
    assert code == 0, err
    assert "resnet8 on cifar10: top-1" in stdout
    code, _, err = _mixkd(capsys, "distill", "--teacher", pth, "--teacher-model", "resnet8", "--student", "resnet8",
                          "--data-dir", cifar10_dir, "--epochs", "1", "--out", tmp_path / "s", *TINY)
    assert code == 0, err


def test_config_file_and_overrides(capsys, tmp_path, cifar10_dir):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: resnet8\ndataset: cifar10\ndata_dir: {cifar10_dir}\nepochs: 5\nbatch_size: 32\n"
                   "device: cpu\nprogress: false\nmix: {method: mixup, fraction: 0.5}\n")
    out = tmp_path / "run"
    code, _, err = _mixkd(capsys, "train", "--config", cfg, "--epochs", "1", "--out", out, "mix.alpha=0.4",
                          "optim.lr=0.02")
    assert code == 0, err
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["mix"] == {"method": "mixup", "alpha": 0.4, "fraction": 0.5, "sampling": "exact"}
    assert saved["optim"]["lr"] == 0.02 and saved["out"] == str(out)


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    for flag in ("--teacher", "--teacher-model", "--student", "--dataset", "--data-dir", "--epochs", "--out",
                 "--seed", "--resume", "--download", "--temperature", "--mix-fraction"):
        assert flag in text
    flat = " ".join(text.split())
    assert "(default: 240)" in text
    # every registered method, with its settings and their defaults (its own, not Hinton's)
    assert "--kd lskd: LS-KD: KD with logit standardization" in flat
    assert "Defaults: temperature 2.0, ce_weight 0.1, kd_weight 9.0." in flat
    assert "Except dataset=imagefolder: temperature 1.0, ce_weight 1.0, beta 0.5, warmup_epochs 1; pair=resnet56->resnet20: beta 2.0;" in flat
    assert "--hint-layer HINT_LAYER" in flat
    with pytest.raises(SystemExit) as top:  # the command list too (a bare % in a help line broke it)
        main(["--help"])
    assert top.value.code == 0 and "verdicts with 95% intervals" in " ".join(capsys.readouterr().out.split())


def test_models_lists_the_zoo(capsys):
    code, out, _ = _mixkd(capsys, "models")
    assert code == 0 and {"resnet32x4", "tv_resnet50", "tv_mobilenet_v2"} <= set(out.split()) and len(out.split()) == 26


# ---- resume -------------------------------------------------------------------------------
def _metrics_without_timing(run: Path):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_seconds")} for r in rows]


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_metrics(tmp_path, cifar10_dir):
    args = ["train", "--model", "resnet8", "--data-dir", str(cifar10_dir), "--epochs", "4", "--save-every", "1",
            "--mix", "mixup", "--mix-fraction", "0.5", "--seed", "3", *TINY]
    reference = tmp_path / "uninterrupted"
    assert main([*args, "--out", str(reference)]) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same float reduction order as this process
    proc = subprocess.Popen([sys.executable, "-m", "mixkd", *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "result.json").exists()
    assert load_checkpoint(killed).epoch >= 1

    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert _metrics_without_timing(killed) == _metrics_without_timing(reference)
    a, b = load_checkpoint(killed).state_dict, load_checkpoint(reference).state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_needs_resume(capsys, teacher_run, cifar10_dir):
    code, _, err = _mixkd(capsys, "train", "--model", "resnet8", "--data-dir", cifar10_dir, "--out", teacher_run, *TINY)
    assert code == 2 and "--resume" in _one_line_error(err)


def test_resuming_a_finished_run_reports_its_result(capsys, teacher_run):
    code, out, err = _mixkd(capsys, "train", "--out", teacher_run, "--resume", "--no-progress")
    assert code == 0, err
    assert "top-1" in out


# ---- bad input ----------------------------------------------------------------------------
def test_missing_dataset_names_path_and_layout(capsys, tmp_path):
    code, _, err = _mixkd(capsys, "train", "--model", "resnet8", "--dataset", "cifar100", "--data-dir",
                          tmp_path / "nowhere", "--out", tmp_path / "r", "--device", "cpu")
    line = _one_line_error(err)
    assert code == 2 and "nowhere" in line and "cifar-100-python" in line


def test_malformed_dataset_is_reported(capsys, tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"not a pickle")
    code, _, err = _mixkd(capsys, "train", "--data-dir", tmp_path, "--out", tmp_path / "r", "--device", "cpu")
    line = _one_line_error(err)
    assert code == 2 and str(folder) in line


def test_unknown_model_lists_the_names(capsys, tmp_path, cifar10_dir):
    code, _, err = _mixkd(capsys, "train", "--model", "resnet9", "--data-dir", cifar10_dir, "--out", tmp_path / "r",
                          *TINY)
    line = _one_line_error(err)
    assert code == 2 and "resnet9" in line and "resnet32x4" in line and "wrn_40_2" in line


def test_teacher_that_does_not_fit_names_the_keys(capsys, tmp_path, teacher_run, cifar10_dir):
    code, _, err = _mixkd(capsys, "distill", "--teacher", teacher_run, "--teacher-model", "wrn_16_1",
                          "--student", "resnet8", "--data-dir", cifar10_dir, "--out", tmp_path / "s", *TINY)
    line = _one_line_error(err)
    assert code == 2 and "missing keys" in line and "unexpected keys" in line and "block1." in line and "layer1." in line


def test_checkpoint_with_wrong_class_count_is_reported(capsys, tmp_path, cifar10_dir):
    pth = tmp_path / "c100.pth"
    torch.save({"model": create_model("resnet8", 100).state_dict()}, pth)
    code, _, err = _mixkd(capsys, "eval", pth, "--model", "resnet8", "--dataset", "cifar10", "--data-dir",
                          cifar10_dir, "--device", "cpu")
    line = _one_line_error(err)
    assert code == 2 and "fc.weight" in line and "shape" in line


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_truncated_or_corrupt_checkpoints_are_detected_on_load(capsys, tmp_path, teacher_run, cifar10_dir, damage):
    data = bytearray((teacher_run / "checkpoint.safetensors").read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-100] ^= 0xFF  # one byte inside the tensor data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    code, _, err = _mixkd(capsys, "eval", bad, "--dataset", "cifar10", "--data-dir", cifar10_dir, "--device", "cpu")
    line = _one_line_error(err)
    assert code == 2 and "corrupt" in line and str(bad) in line


def test_truncated_pth_is_detected(capsys, tmp_path, cifar10_dir):
    pth = tmp_path / "t.pth"
    torch.save({"model": create_model("resnet8", 10).state_dict()}, pth)
    pth.write_bytes(pth.read_bytes()[:5000])
    code, _, err = _mixkd(capsys, "eval", pth, "--model", "resnet8", "--dataset", "cifar10", "--data-dir",
                          cifar10_dir, "--device", "cpu")
    assert code == 2 and "corrupt" in _one_line_error(err)


@pytest.mark.parametrize("args,key", [
    (["-T", "0"], "kd.temperature"),
    (["-T", "-1"], "kd.temperature"),
    (["--mix", "mixup", "--mix-alpha", "0"], "mix.alpha"),
    (["--mix-fraction", "1.5"], "mix.fraction"),
    (["--mix-fraction", "-0.1"], "mix.fraction"),
    (["--ce-weight", "-0.1"], "kd.ce_weight"),
    (["--kd-weight", "-1"], "kd.kd_weight"),
    (["--epochs", "0"], "epochs"),
    (["--lr", "-0.1"], "optim.lr"),
    (["mix.fractoin=0.1"], "mix.fractoin"),
])
def test_invalid_values_are_rejected_before_training(capsys, tmp_path, teacher_run, cifar10_dir, args, key):
    out = tmp_path / "never"
    code, _, err = _mixkd(capsys, "distill", "--teacher", teacher_run, "--student", "resnet8", "--data-dir",
                          cifar10_dir, "--out", out, "--device", "cpu", *args)
    line = _one_line_error(err)
    assert code == 2 and key in line
    assert not out.exists()


def test_distill_without_teacher_is_rejected(capsys, tmp_path, cifar10_dir):
    code, _, err = _mixkd(capsys, "distill", "--student", "resnet8", "--data-dir", cifar10_dir,
                          "--out", tmp_path / "x", "--device", "cpu")
    assert code == 2 and "--teacher" in _one_line_error(err)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(capsys, monkeypatch, tmp_path, cifar10_dir):
    from mixkd.distiller import Distiller

    real = Distiller.losses
    calls = {"n": 0}

    def poisoned(self, x, target):
        calls["n"] += 1
        losses = real(self, x, target)
        if calls["n"] > 5:  # epoch 2 (5 steps per epoch) goes wrong
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(Distiller, "losses", poisoned)
    out = tmp_path / "nan"
    code, _, err = _mixkd(capsys, "train", "--model", "resnet8", "--data-dir", cifar10_dir, "--epochs", "3",
                          "--save-every", "1", "--out", out, *TINY)
    assert all(line.startswith(("epoch 1/3", "start:", "note: with 3 epochs")) for line in err.splitlines()[:-1])
    line = _one_line_error(err.splitlines()[-1])  # after the epochs that went well
    assert code == 2 and "nan" in line.lower() and "epoch 2" in line and "epoch 1" in line
    ckpt = load_checkpoint(out)
    assert ckpt.epoch == 1 and all(torch.isfinite(v.float()).all() for v in ckpt.state_dict.values())
    assert not (out / "result.json").exists()


def test_tensorboard_scalars_are_written_when_asked_for(capsys, tmp_path, cifar10_dir):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    code, _, err = _mixkd(capsys, "train", "--model", "resnet8", "--data-dir", cifar10_dir, "--epochs", "1",
                          "--out", out, "--tensorboard", *TINY)
    assert code == 0, err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"test_top1", "train_loss", "lr"} <= set(events.Tags()["scalars"])
