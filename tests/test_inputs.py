"""Hostile and newcomer inputs (issue 26, items 9-13): each is one line and a non-zero exit, never a
traceback; lax values are refused; what a run records and what mixkd advises is the same however it
got there; nothing is left behind."""

import json

import pytest
import torch
import yaml

from mixkd.cli import main

STUDY = {"name": "st", "defaults": {"dataset": "digits", "epochs": 1, "batch_size": 50, "device": "cpu"},
         "teachers": [{"name": "plain", "models": ["resnet8"]}],
         "students": [{"teachers": "plain", "models": "resnet8", "methods": ["alone", "kd"]}]}


def _error(capsys, *argv) -> str:
    """The one line of ``mixkd argv`` (which must exit with status 2 and no traceback)."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert lines[0].startswith("mixkd: error: "), err
    return lines[0].removeprefix("mixkd: error: ")


@pytest.fixture
def study_folder(tmp_path):
    out = tmp_path / "st"
    out.mkdir()
    (out / "study.yaml").write_text(yaml.safe_dump(STUDY))
    return out


# ---- 9: tracebacks become one line -----------------------------------------------------------------

def test_a_config_file_that_is_not_utf8_is_one_line(capsys, tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("model: résnet8\n".encode("latin-1"))  # é is byte 0xe9, at offset 8
    line = _error(capsys, "train", "--config", cfg, "--out", tmp_path / "run")
    assert line == f"config file {cfg} is not UTF-8 text (byte 0xe9 at offset 8): save it as UTF-8"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("state,what", [({"conv1.weight": "hello"}, "'conv1.weight': a str"),
                                        ({1: torch.zeros(1)}, "key 1")])
def test_a_state_dict_holding_something_else_than_named_tensors_is_one_line(capsys, tmp_path, state, what):
    path = tmp_path / "odd.pth"
    torch.save({"model": state}, path)
    line = _error(capsys, "eval", path, "--model", "resnet8", "--dataset", "digits", "--device", "cpu")
    assert line == (f"checkpoint {path} holds a state_dict with a value that is not a named tensor ({what}); a "
                    "state_dict maps parameter names to tensors: use another checkpoint")


@pytest.mark.parametrize("runs,problem", [(5, '"runs" is 5, not a mapping of run ids'),
                                          ({"teachers/resnet8_plain-s0": "done"},
                                           "\"runs\" gives 'teachers/resnet8_plain-s0' as \"done\", not a mapping")])
@pytest.mark.parametrize("command", ["status", "report"])
def test_a_study_state_of_another_shape_is_one_line(capsys, study_folder, runs, problem, command):
    state = study_folder / "study-state.json"
    state.write_text(json.dumps({"format": "mixkd-study-1", "runs": runs}))
    line = _error(capsys, "study", command, study_folder)
    assert line == (f"{state} is damaged ({problem}); delete it and run the same 'mixkd study run' command again "
                    "(--set values included): it writes the file anew from the run folders")


def test_a_negative_time_limit_is_one_line_and_so_is_any_bad_command_line(capsys, tmp_path):
    assert _error(capsys, "train", "--time-limit", "-5m", "--out", tmp_path / "r") == \
        "--time-limit '-5m': the limit must be positive"
    assert _error(capsys, "train", "--time-limit") == \
        "argument --time-limit: expected one argument (see mixkd train --help)"
    assert _error(capsys, "study", "report") == \
        "the following arguments are required: dir (see mixkd study report --help)"
    assert not (tmp_path / "r").exists()


# ---- 10: lax values are refused ----------------------------------------------------------------------

@pytest.mark.parametrize("tree,line", [
    ({"epochs": True}, "invalid config: epochs: expected a number, not true/false (got True)"),
    ({"optim": {"lr": True}}, "invalid config: optim.lr: expected a number, not true/false (got True)"),
    ({"optim": {"milestones": [1, False]}},
     "invalid config: optim.milestones: expected a number, not true/false (got [1, False])"),
    ({"epochs": 6, "optim": {"milestones": [5, 1]}},
     "invalid config: optim.milestones [5, 1]: give the epochs in increasing order ([1, 5])"),
    ({"epochs": 3, "optim": {"milestones": [1, 5]}},
     "invalid config: optim.milestones [1, 5]: epoch 5 is past the last epoch (3), where the lr never changes; "
     "drop it or choose the milestones of this run (--milestones, optim.milestones)"),
])
def test_a_bool_for_a_number_and_milestones_out_of_order_or_past_the_end_are_refused(tree, line):
    from mixkd.config import build_config
    from mixkd.errors import MixkdError

    with pytest.raises(MixkdError) as e:
        build_config(flags=tree)
    assert str(e.value) == line


def test_values_that_are_fine_stay_accepted():
    from mixkd.config import build_config

    cfg = build_config(flags={"epochs": 3, "compile": True, "download": True, "optim": {"milestones": [1, 1, 3]}})
    assert (cfg.epochs, cfg.compile, cfg.download, cfg.milestones()) == (3, "on", True, [1, 1, 3])


HEADER = "teacher,teacher_mix,student,kd,temperature,mix,mix_fraction,sampling,seed,top1\n"


def test_csv_rows_with_more_fields_than_the_header_are_refused(capsys, tmp_path):
    table = tmp_path / "t.csv"
    table.write_text(HEADER + ",,resnet8,none,,none,,,0,70.5\nresnet56,none,resnet8,kd,4,none,,,0,71.5,oops\n")
    assert _error(capsys, "claims", table) == (f"{table}, line 3 has 11 fields, the header 10: quote a value that "
                                               "holds a comma, or give the column a name")


def test_kd_alone_is_the_student_alone_and_a_study_method_name_is_refused():
    from mixkd.errors import MixkdError
    from mixkd.results import result_from_row

    row = dict(zip(HEADER.strip().split(","), ",,resnet8,alone,,none,,,0,70.5".split(","), strict=True))
    alone = result_from_row(row)
    assert (alone.cell.kd, alone.cell.alone, alone.cell.label) == ("none", True, "student alone")
    with pytest.raises(MixkdError) as e:
        result_from_row({**row, "teacher": "resnet56"}, "line 2")
    assert str(e.value) == ("line 2, column 'kd': 'alone' with teacher 'resnet56': a student trained alone has an "
                            "empty teacher and kd none; a distilled one names both")
    with pytest.raises(MixkdError) as e:
        result_from_row({**row, "teacher": "resnet56", "kd": "std_pmu"}, "line 2")
    assert str(e.value) == ("line 2, column 'kd': 'std_pmu' is a study method, not a KD method: write 'std' here "
                            "and the mixing in the mix and mix_fraction columns")


def test_a_study_grid_too_large_is_counted_and_refused_before_it_is_expanded(capsys, tmp_path, monkeypatch):
    import mixkd.study.spec as spec

    big = {**STUDY, "students": [{"teachers": "plain", "models": ["resnet8", "resnet14"], "seeds": list(range(10)),
                                  "methods": ["alone", "kd", "kd_pmu", "std_fmu"], "temperatures": [1, 2, 4, 8],
                                  "fractions": [0.1, 0.2], "samplings": ["exact", "reference"]}]}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(big))
    # per seed and student: alone 1 + kd 4 temperatures + kd_pmu 4 x 2 fractions x 2 samplings + std_fmu 1 = 22
    assert spec.count_runs(spec.parse_study(big))[0] == 1 + 2 * 10 * 22
    assert len(spec.load_study(path).runs) == 1 + 2 * 10 * 22  # no run declared twice here: the count is exact
    monkeypatch.setattr(spec, "MAX_RUNS", 400)
    monkeypatch.setattr(spec._Expander, "add", lambda *a, **k: pytest.fail("expanded a grid over the limit"))
    assert _error(capsys, "study", "plan", path) == (
        f"study file {path} declares 441 runs (students[0]: 440, teachers[0]: 1), more than the 400 one study "
        "may hold: split it into several study files, or shorten its lists (models, temperatures, fractions, seeds, "
        "...)")


# ---- 11: a resumed run records what an uninterrupted one does -------------------------------------

def test_result_names_the_teacher_the_same_way_whether_the_run_was_resumed_or_not(tmp_path, monkeypatch,
                                                                                  cifar10_dir, one_thread):
    from mixkd.checkpoint import save_checkpoint
    from mixkd.config import build_config
    from mixkd.engine import Run, run_job
    from mixkd.models import create_model

    monkeypatch.chdir(tmp_path)
    save_checkpoint("teacher.safetensors", create_model("resnet8", 10), model_name="resnet8", num_classes=10,
                    epoch=1)

    def cfg(out):
        return build_config(flags={"task": "distill", "model": "resnet8", "dataset": "cifar10",
                                   "data_dir": str(cifar10_dir), "batch_size": 32, "epochs": 1, "device": "cpu",
                                   "progress": False, "compile": "off", "kd.teacher": "teacher.safetensors",
                                   "out": out})

    whole = run_job(cfg("whole")).result
    job = Run(cfg("resumed"))
    job.start()
    for _ in range(2):
        job.advance()
    job.stop("time")
    resumed = run_job(cfg("resumed"), resume=True).result
    assert whole["teacher"] == resumed["teacher"] == str(tmp_path / "teacher.safetensors")
    assert yaml.safe_load((tmp_path / "resumed" / "config.yaml").read_text())["kd"]["teacher"] == whole["teacher"]


# ---- 12: advice that works -------------------------------------------------------------------------

@pytest.fixture
def read_only(monkeypatch):
    """Every write under the returned function's folder fails as on a read-only mount (EROFS): the test
    machine may not let a test mount one."""
    import errno
    import os
    import tempfile

    frozen = []
    real_open, real_mkstemp, real_access = os.open, tempfile.mkstemp, os.access

    def inside(path) -> bool:
        return any(os.path.abspath(path).startswith(str(f)) for f in frozen)

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    def os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and inside(dir):
            refuse(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if inside(p) and mode & os.W_OK
                        else real_access(p, mode, **k))
    return lambda folder: frozen.append(os.path.abspath(folder))


def test_report_on_a_read_only_folder_says_to_copy_it_not_to_pass_an_out_it_lacks(capsys, tmp_path, read_only):
    out = tmp_path / "st"
    run = out / "students" / "resnet8-alone-s0"
    run.mkdir(parents=True)
    (out / "study.yaml").write_text(yaml.safe_dump(STUDY))
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "train", "model": "resnet8", "dataset": "digits"}))
    (run / "result.json").write_text(json.dumps({"top1": 70.0, "best_top1": 71.0}))
    read_only(out)
    assert _error(capsys, "study", "report", out) == (
        f"cannot write {out / 'results.csv'}: Read-only file system; 'mixkd study report' writes into the study "
        f"folder, and {out} is on a read-only file system: copy the folder to writable storage and report the copy")


def test_report_of_a_study_stopped_before_any_run_began_says_so(capsys, study_folder):
    (study_folder / "study-state.json").write_text(json.dumps({"format": "mixkd-study-1", "runs": {
        "teachers/resnet8_plain-s0": {"status": "pending"}}}))
    assert _error(capsys, "study", "report", study_folder) == (
        f"no run of the study in {study_folder} has begun yet, so there is nothing to report: continue the study "
        f"(the same 'mixkd study run' command) and report once runs have finished (mixkd study status "
        f"{study_folder} says where it stands)")


def test_resume_of_a_finished_run_on_a_read_only_folder_prints_its_result(capsys, tmp_path, cifar10_dir, read_only,
                                                                          one_thread):
    out = tmp_path / "run"
    args = ["train", "--model", "resnet8", "--dataset", "cifar10", "--data-dir", cifar10_dir, "--epochs", "1",
            "--batch-size", "32", "--device", "cpu", "--no-progress", "--compile", "off", "--out", out]
    assert main([str(a) for a in args]) == 0
    first = capsys.readouterr().out
    start = (out / "log.txt").read_text().splitlines()[0].split(" ", 1)[1]  # newcomer wording: one epoch, one thread
    assert start.startswith("start: train resnet8 on cifar10, 1 epoch, device cpu (") and "1 thread)" in start, start
    read_only(out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main([str(a) for a in [*args, "--resume"]]) == 0
    assert capsys.readouterr().out == first  # the same line: the result, where the run is
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


# ---- 13: nothing left behind ----------------------------------------------------------------------

def test_a_failed_image_folder_run_with_workers_leaves_no_temporary_folders(tmp_path):
    import os
    import subprocess
    import sys

    from PIL import Image

    for cls in ("a", "b"):
        for split in ("train", "val"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (32, 32), (40 * k, 90, 200)).save(tmp_path / "imgs" / split / cls / f"{k}.png")
    (tmp_path / "imgs" / "train" / "b" / "2.jpg").write_bytes(b"\xff\xd8 truncated jpeg")  # the run fails on it
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    done = subprocess.run([sys.executable, "-m", "mixkd", "train", "--model", "resnet8", "--dataset", "imagefolder",
                           "--data-dir", str(tmp_path / "imgs"), "--image-size", "32", "--epochs", "1",
                           "--batch-size", "2", "--workers", "2", "--device", "cpu", "--no-progress", "--compile",
                           "off", "--out", str(tmp_path / "run")], env={**os.environ, "TMPDIR": str(tmp)},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 2 and "cannot read image" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("pymp-")) == []


def test_a_study_executor_releases_its_queues_semaphores_when_it_shuts_down():
    """A stopped study leaves through os._exit, which skips multiprocessing's finalizers: the executor's
    queues must free their named semaphores themselves, or the resource tracker warns of leaked ones."""
    import os

    from mixkd.study.executors import LocalExecutor

    ex = LocalExecutor(workers=2, use_gpu=False)
    ex._tasks[0] = ex._ctx.Queue()  # as a started worker's (without starting a process)
    names = [lock._semlock.name for q in (ex._results, ex._tasks[0]) for lock in (q._rlock, q._wlock, q._sem)]

    def present():
        return [os.path.exists(f"/dev/shm/sem.{n.lstrip('/')}") for n in names]

    assert present() == [True] * 6
    ex.shutdown()
    assert present() == [False] * 6


# ---- newcomer wording --------------------------------------------------------------------------------

def test_a_setting_that_differs_on_resume_says_what_an_unset_saved_value_means(tmp_path):
    from mixkd.config import build_config
    from mixkd.errors import MixkdError
    from mixkd.run_folder import resume_config

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(build_config(flags={"model": "resnet8", "out": str(out)}).to_yaml())
    with pytest.raises(MixkdError) as e:
        resume_config(out, asked={"optim.lr": 0.1, "epochs": 240})
    assert "these settings differ from it: optim.lr 0.1 (saved: unset (its default)); only" in str(e.value)


def test_what_users_are_pointed_to_ships_with_the_project():
    """The README, the package's messages and the shipped configs cite docs/study-claims-reference.md,
    never REFERENCE.md (a file of the developers', not shipped)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    shipped = [root / "README.md", *root.glob("mixkd/**/*.py"), *root.glob("configs/**/*.yaml")]
    cited = {p.relative_to(root).as_posix() for p in shipped if "REFERENCE.md" in p.read_text()
             or "REFERENCE claim" in p.read_text()}
    assert cited == set()
    docs = {m for p in shipped for m in re.findall(r"docs/[\w./-]+\.md", p.read_text())}
    assert "docs/study-claims-reference.md" in docs and all((root / d).is_file() for d in docs), docs
    from mixkd.claims import CLAIMS

    assert CLAIMS[4].text.startswith("(mixkd's own question, not the paper's: where the PMU gain comes from.)")


def test_the_demo_s_claims_are_short_and_say_in_words_why_a_large_difference_is_inconclusive(tmp_path):
    from mixkd.study.report import claims_text

    out = tmp_path / "st"
    (out).mkdir()
    (out / "study.yaml").write_text(yaml.safe_dump(STUDY))
    base = {"dataset": "digits", "epochs": 1, "batch_size": 50, "seed": 0}
    runs = {"teachers/resnet8_plain-s0": ({"task": "train", "model": "resnet8"}, 80.0),
            "students/resnet8-alone-s0": ({"task": "train", "model": "resnet8"}, 70.0),
            "students/resnet8-from-resnet8_plain-kd-T4-s0": (
                {"task": "distill", "model": "resnet8",
                 "kd": {"teacher": "../../teachers/resnet8_plain-s0", "method": "kd", "temperature": 4.0}}, 30.0)}
    for run_id, (cfg, top1) in runs.items():
        (out / run_id).mkdir(parents=True)
        (out / run_id / "config.yaml").write_text(yaml.safe_dump({**base, **cfg}))
        (out / run_id / "result.json").write_text(json.dumps({"top1": top1, "best_top1": top1, "teacher_top1": 80.0,
                                                              "teacher_model": "resnet8"}))
    short, full = claims_text(out, details=False), claims_text(out)
    assert len(short.splitlines()) < len(full.splitlines())
    assert "KD T=4 > student alone: -40.00 points" in full and "-40.00 points, n = 1" not in short
    assert "\n  KD > student alone: inconclusive (1 comparison)\n" in short
    assert short.splitlines()[-2] == (
        "why inconclusive: this comparison has a side that measures no spread (one run, or runs all equal), so no "
        "interval can be drawn, and no difference, however large (KD T=4 > student alone: -40.00 points), can be "
        "told from chance. A comparison is decided only when its 95% interval clears 0 (or -0.5 points, the margin "
        f"of an 'at least as well'): run 3 seeds or more, of longer runs, or assume a per-run spread (mixkd claims "
        f"{out / 'claims-table.csv'} --noise SIGMA).")
