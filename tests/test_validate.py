"""validate_run_config: every problem of a run's config in one line, found before anything is written."""

from pathlib import Path

import pytest
import torch

from mixkd.checkpoint import save_checkpoint
from mixkd.cli import main
from mixkd.config import build_config
from mixkd.errors import MixkdError
from mixkd.models import create_model
from mixkd.validate import checkpoint_header, run_config_problems, validate_run_config

DIGITS = {"dataset": "digits", "model": "resnet8", "device": "cpu", "batch_size": 32}


def _cfg(**flags):
    return build_config(flags={**DIGITS, **flags})


def _listing(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A mixkd checkpoint of a 10-class resnet8 (the digits' class count)."""
    path = tmp_path_factory.mktemp("teacher") / "checkpoint.safetensors"
    save_checkpoint(path, create_model("resnet8", 10), model_name="resnet8", num_classes=10, epoch=1)
    return path


def test_a_sound_config_passes(tmp_path, teacher_file):
    validate_run_config(_cfg(out=str(tmp_path / "run")))
    validate_run_config(_cfg(task="distill", **{"kd.teacher": str(teacher_file.parent)}))
    assert not (tmp_path / "run").exists()


def test_every_problem_is_reported_in_one_line_and_nothing_is_created(tmp_path):
    before = _listing(tmp_path)
    cfg = build_config(flags={"model": "nosuchnet", "data_dir": str(tmp_path / "nonexistent"),
                              "out": str(tmp_path / "out" / "run"), "device": "cpu"})
    with pytest.raises(MixkdError) as ei:
        validate_run_config(cfg)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("2 problems: (1) unknown model 'nosuchnet'; available: MobileNetV2, resnet8,")
    assert f"(2) dataset 'cifar100' not found in {tmp_path / 'nonexistent'}" in msg
    assert _listing(tmp_path) == before


def test_unknown_models_get_the_closest_name():
    [problem] = run_config_problems(_cfg(model="resnt8x4"))
    assert problem.startswith("unknown model 'resnt8x4'; did you mean 'resnet8x4'?; available: MobileNetV2, resnet8,")
    with pytest.raises(MixkdError, match="did you mean 'resnet8x4'"):
        create_model("resnt8x4")  # the registry's own error says the same
    problems = run_config_problems(_cfg(task="distill", **{"kd.teacher": "resnet56", "kd.teacher_model": "wrn_40_3"}))
    assert problems[0].startswith("teacher: unknown model 'wrn_40_3'; did you mean 'wrn_40_2'?; available: ")
    assert "'resnet56' is an architecture name, not a checkpoint" in problems[1]


def test_values_changed_after_validation_are_checked_again():
    cfg = _cfg().model_copy(update={"epochs": 0, "batch_size": 1})
    problems = run_config_problems(cfg)
    assert any(p.startswith("epochs: Input should be greater than or equal to 1") for p in problems)
    assert any(p.startswith("batch_size: ") for p in problems)


def test_batch_size_against_the_dataset_size():
    [problem] = run_config_problems(_cfg(batch_size=5000))
    assert problem.startswith("batch size 5000 is larger than the 1437 training samples of 'digits'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda():
    assert run_config_problems(_cfg(device="cuda")) == [
        "device 'cuda' asked for, but CUDA is not available here; use --device cpu (or auto)"]


def test_out_that_is_a_file_or_below_one(tmp_path):
    (tmp_path / "f").write_text("x")
    assert run_config_problems(_cfg(out=str(tmp_path / "f"))) == [f"--out {tmp_path / 'f'} is a file, not a folder: choose another --out"]
    assert run_config_problems(_cfg(out=str(tmp_path / "f" / "a" / "b"))) == [
        f"--out {tmp_path / 'f' / 'a' / 'b'} cannot be created: {tmp_path / 'f'} is a file"]


def test_teacher_checkpoints_are_checked_from_their_header(tmp_path, teacher_file):
    def problems(teacher, **kw):
        return run_config_problems(_cfg(task="distill", **{"kd.teacher": str(teacher)}, **kw))

    assert checkpoint_header(teacher_file)["model"] == "resnet8"
    assert problems(tmp_path / "missing") == [f"teacher checkpoint not found: {tmp_path / 'missing'}"]
    (tmp_path / "empty_run").mkdir()
    assert "is a folder without checkpoint.safetensors" in problems(tmp_path / "empty_run")[0]
    # trained for 100 classes, used on a 10-class dataset
    wrong = tmp_path / "c100.safetensors"
    save_checkpoint(wrong, create_model("resnet8", 100), model_name="resnet8", num_classes=100, epoch=1)
    assert problems(wrong) == [f"teacher checkpoint {wrong} was trained for 100 classes but digits has 10: "
                               "use a teacher trained on digits"]
    # truncated
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(teacher_file.read_bytes()[:-100])
    assert problems(cut)[0].startswith(f"teacher checkpoint {cut} is truncated")
    # a RepDistiller .pth names no architecture; a truncated one is caught by its zip directory
    pth = tmp_path / "ckpt.pth"
    torch.save({"model": create_model("resnet8", 10).state_dict(), "epoch": 240}, pth)
    assert problems(pth) == [f"teacher checkpoint {pth} does not say its architecture: pass --teacher-model "
                             "(see 'mixkd models')"]
    assert problems(pth, **{"kd.teacher_model": "resnet8"}) == []
    bad = tmp_path / "bad.pth"
    bad.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    assert problems(bad, **{"kd.teacher_model": "resnet8"})[0].startswith(f"teacher checkpoint {bad} is corrupt or truncated")
    junk = tmp_path / "junk.bin"
    junk.write_text("hello")
    assert problems(junk, **{"kd.teacher_model": "resnet8"}) == [
        f"teacher checkpoint {junk} is not a checkpoint file (neither safetensors nor torch.save)"]


def test_the_cli_reports_model_and_data_together_before_creating_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "nosuchnet", "--data-dir", str(tmp_path / "nonexistent"), "--out", str(out),
                 "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mixkd: error: 2 problems: (1) unknown model 'nosuchnet'")
    assert "(2) dataset 'cifar100' not found" in lines[0]
    assert not out.exists()
    code = main(["train", "--model", "resnet8x5", "--dataset", "digits", "--out", str(out), "--device", "cpu"])
    assert code == 2 and "did you mean 'resnet8x4'?" in capsys.readouterr().err and not out.exists()
