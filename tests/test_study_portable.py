"""Portable study folders (a folder moved, or continued from another working directory, finishes as
if it never moved) and what a study checks before it writes anything: teacher checkpoints, an empty
study, a pair under models:, unknown --set keys, a folder of another mixkd version; file modes."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from mixkd.checkpoint import atomic_write_text
from mixkd.cli import main
from mixkd.errors import MixkdError
from mixkd.study import InProcessExecutor, load_study, run_study
from mixkd.study.folder import FOLDER_FORMAT, STATE_NAME, RunState, StudyState, folder_problem
from mixkd.study.report import collect
from mixkd.study.spec import saved_config_mismatch

KD = "students/resnet8-from-resnet8_plain-kd-T4-s0"
ALONE = "students/resnet8-alone-s0"
TEACHER = "teachers/resnet8_plain-s0"
# what differs between two runs of the same study on the same machine: timings and where the data was
VARYING = {"wall_seconds", "images_per_s"}


def _study(path, data_dir=None, methods=("alone", "kd"), **changes):
    defaults = {"dataset": "cifar10", "epochs": 1, "batch_size": 32, "eval_batch_size": 40, "device": "cpu"}
    if data_dir is not None:
        defaults["data_dir"] = str(data_dir)
    data = {"name": "mv", "defaults": defaults, "teachers": [{"name": "plain", "models": "resnet8"}],
            "students": [{"teachers": "plain", "models": "resnet8", "methods": list(methods)}], **changes}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def inline(monkeypatch, one_thread):
    """``mixkd study run`` with its runs executed in this process."""
    import mixkd.study.executors

    monkeypatch.setattr(mixkd.study.executors, "make_executor", lambda *args, **kwargs: InProcessExecutor())


def _rows(out):
    return {r["id"]: {k: v for k, v in r.items() if k not in VARYING} for r in collect(out)}


def test_a_moved_study_folder_finishes_from_another_directory_as_if_it_never_moved(tmp_path, monkeypatch, inline):
    """Part of a study runs from one working directory into a relative --out, with one student killed
    after logging its epoch but before its checkpoint (its config.yaml names its teacher); the folder
    and the data move; the study finishes from another directory with an absolute --out and the data
    folder given again. Every result equals an uninterrupted study's, bit for bit (same CPU and threads)."""
    from cifar_fixture import write_fake_cifar

    data = tmp_path / "data"
    write_fake_cifar(data, num_classes=10, n_train=96, n_test=40, seed=0)
    full = _study(tmp_path / "full.yaml", data)
    run = ["--no-progress", "--no-report"]
    assert main(["study", "run", str(full), "--out", str(tmp_path / "uninterrupted"), *run]) == 0

    first, second = tmp_path / "cwd-a", tmp_path / "cwd-b"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)  # part one: the teacher and the kd student only, into a relative folder
    part = _study(tmp_path / "part.yaml", data, methods=["kd"])
    assert main(["study", "run", str(part), "--out", "runs/mv", *run]) == 0
    kd = first / "runs/mv" / KD
    assert yaml.safe_load((kd / "config.yaml").read_text())["kd"]["teacher"] == "../../teachers/resnet8_plain-s0"
    (kd / "result.json").unlink()  # killed after its epoch was logged, before its checkpoint
    (kd / "checkpoint.safetensors").unlink()

    moved = tmp_path / "elsewhere" / "mv"
    shutil.move(str(first / "runs/mv"), str(moved))
    shutil.move(str(data), str(tmp_path / "data-here"))  # the data folder is not where it was
    monkeypatch.chdir(second)
    code = main(["study", "run", str(full), "--out", str(moved), *run, "--set", f"data_dir={tmp_path / 'data-here'}"])
    assert code == 0
    assert os.listdir(second) == []  # nothing written into the working directory

    before, after = _rows(tmp_path / "uninterrupted"), _rows(moved)
    assert set(after) == {TEACHER, ALONE, KD}
    assert after == before
    assert after[KD]["teacher"] == TEACHER and after[KD]["top1"] is not None
    log = (moved / KD / "log.txt").read_text()  # the run logs itself: start, each epoch, the result
    assert "start" in log and "epoch 1/1" in log and "finished: top-1" in log
    state = json.loads((moved / "study-state.json").read_text())
    assert state["format"] == FOLDER_FORMAT and state["overrides"] == [f"data_dir={tmp_path / 'data-here'}"]


def test_a_run_matches_its_plan_wherever_the_folder_is_and_whatever_the_data_folder(tmp_path):
    path = _study(tmp_path / "s.yaml")
    study = load_study(path, overrides=["data_dir=/new/machine/data"])
    kd = study.run(KD)
    cfg = kd.config_for(tmp_path / "out").model_dump(mode="json")
    assert cfg["kd"]["teacher"] == "../../teachers/resnet8_plain-s0" == kd.teacher_path()
    assert cfg["data_dir"] == "/new/machine/data"
    saved = {**cfg, "data_dir": "/old/machine/data", "device": "cuda", "workers": 8, "save_every_minutes": 3}
    for teacher in ("/old/place/mv/teachers/resnet8_plain-s0", "runs/mv/teachers/resnet8_plain-s0",
                    "../../teachers/resnet8_plain-s0"):  # absolute, cwd-relative (older versions), run-relative
        old = {**saved, "kd": {**cfg["kd"], "teacher": teacher}}
        assert saved_config_mismatch(kd, old, tmp_path / "moved") is None
    other = {**saved, "kd": {**cfg["kd"], "teacher": "../../teachers/resnet20_plain-s0"}}
    assert saved_config_mismatch(kd, other, tmp_path / "out").startswith("kd.teacher: ")
    assert saved_config_mismatch(kd, {**saved, "epochs": 3}, tmp_path / "out") == "epochs: 3 -> 1"
    newer = {**saved, "optim": {**cfg.get("optim", {}), "nesterov": True}}
    assert "keys this mixkd" in saved_config_mismatch(kd, newer, tmp_path / "out")
    assert "optim.nesterov" in saved_config_mismatch(kd, newer, tmp_path / "out")


def test_a_study_folder_of_another_mixkd_version_is_refused_before_anything_changes(tmp_path, capsys):
    path = _study(tmp_path / "s.yaml", tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    state = out / "study-state.json"
    state.write_text(json.dumps({"format": "mixkd-study-99", "mixkd_version": "9.0", "runs": {}}))
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["study", "run", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"mixkd: error: {out} is a study folder of another mixkd version")
    assert "9.0" in err and "mixkd-study-99" in err
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(MixkdError, match="another mixkd version"):
        run_study(load_study(path), out, executor=None, progress=False, echo=lambda *_: None)


# ---- problems found at plan time, before anything is written -----------------------------------

def test_a_missing_teacher_checkpoint_fails_at_plan_time_naming_the_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\n"
                    "defaults: {dataset: digits, epochs: 1}\n"
                    "teachers:\n"
                    "  - {name: plain, models: resnet8}\n"
                    "  - name: rd\n"
                    "    model: resnet8\n"
                    f"    checkpoint: {tmp_path / 'nowhere.pth'}\n"
                    "students: [{teachers: [plain, rd], models: resnet8, methods: kd}]\n")
    out = tmp_path / "out"
    for command in ("plan", "run"):
        assert main(["study", command, str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"mixkd: error: invalid study file {path}: teachers[1].checkpoint (line 7): teacher "
                       f"checkpoint not found: {tmp_path / 'nowhere.pth'} does not exist")
    assert not out.exists()
    assert len(load_study(path, check_files=False).runs) == 3  # mixkd study status reads a folder alone
    (tmp_path / "rd").mkdir()  # a folder without a checkpoint in it
    path.write_text(path.read_text().replace("nowhere.pth", "rd"))
    with pytest.raises(MixkdError, match=r"checkpoint \(line 7\): .* holds no checkpoint.safetensors"):
        load_study(path)
    (tmp_path / "rd" / "checkpoint.safetensors").write_bytes(b"")  # there: what is in it is the run's business
    assert len(load_study(path).runs) == 3


def test_an_empty_study_says_so_at_plan_time_and_leaves_nothing(tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text("name: empty\n")
    out = tmp_path / "out"
    for command in ("plan", "run"):
        assert main(["study", command, str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"mixkd: error: study file {path} defines no runs: add teachers: and students: groups "
                       "(see configs/studies/ for examples)")
    assert not out.exists()


def test_a_pair_under_models_points_to_pairs_and_an_unknown_set_key_to_the_closest(tmp_path):
    path = _study(tmp_path / "s.yaml", students=[{"teachers": "plain", "models": ["resnet8", "resnet14 -> resnet8"],
                                                  "methods": "kd"}])
    with pytest.raises(MixkdError) as err:
        load_study(path)
    assert str(err.value) == (f"invalid study file {path}: students[0].models[1]: 'resnet14 -> resnet8' is a teacher "
                              "-> student pair: pairs go under a student group's pairs: (with teachers:); models: "
                              "lists architectures")
    path = _study(tmp_path / "s.yaml")
    with pytest.raises(MixkdError) as err:
        load_study(path, overrides=["epochz=2"])
    assert str(err.value) == "--set epochz: unknown key (did you mean epochs?)"
    with pytest.raises(MixkdError) as err:
        load_study(path, overrides=["optim.lrr=0.1"])
    assert str(err.value) == "--set optim.lrr: unknown key (did you mean optim.lr?)"
    with pytest.raises(MixkdError) as err:
        load_study(path, overrides=["colour=red"])
    assert str(err.value) == "--set colour: unknown key"


def test_atomically_written_files_get_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o640
    atomic_write_text(tmp_path / "c.txt", "x")
    assert stat.S_IMODE((tmp_path / "c.txt").stat().st_mode) == 0o666 & ~old
    os.chmod(tmp_path / "c.txt", 0o600)  # as older versions wrote it: rewritten with the umask's mode
    atomic_write_text(tmp_path / "c.txt", "y")
    assert stat.S_IMODE((tmp_path / "c.txt").stat().st_mode) == 0o666 & ~old and (tmp_path / "c.txt").read_text() == "y"
    assert not [p for p in Path(tmp_path).iterdir() if p.name.startswith(".")]


def test_a_study_folder_keeps_its_id_and_a_worker_elsewhere_checks_it_sees_that_folder(tmp_path):
    study, out = load_study(_study(tmp_path / "s.yaml")), tmp_path / "out"
    assert folder_problem(out, "x") == f"{out} is not there or holds no {STATE_NAME}"  # not mounted there
    out.mkdir()
    first = StudyState(study, out)
    for run in study.runs:
        first.set(run.id, RunState.PENDING)
    first.save()
    assert len(first.id) == 32 and json.loads((out / STATE_NAME).read_text())["id"] == first.id
    assert StudyState(study, out).id == first.id  # kept by every later 'study run' of the folder
    assert StudyState(study, tmp_path).id != first.id  # a new folder, a new study
    assert folder_problem(out, first.id) is None
    assert folder_problem(out, "other") == f"{out} holds another study (id {first.id}, not other)"
    (out / STATE_NAME).write_text("{")
    assert folder_problem(out, first.id).startswith(f"cannot read {out / STATE_NAME} (")
