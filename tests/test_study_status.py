"""``mixkd study status DIR``: one line per run from the folder alone, the totals, the compute left."""

import fcntl
import json
import os
import re

import yaml

from mixkd.checkpoint import save_checkpoint
from mixkd.cli import main
from mixkd.models import create_model
from mixkd.study import load_study
from mixkd.study.folder import FOLDER_FORMAT
from mixkd.study.status import checkpoint_position, format_status

STUDY = {"name": "st", "defaults": {"dataset": "cifar10", "epochs": 4, "batch_size": 50, "device": "cpu"},
         "teachers": [{"name": "plain", "models": ["resnet8", "resnet14", "resnet20"]}],
         "students": [{"teachers": "plain", "models": "resnet8", "methods": ["alone", "kd"]}]}


def _folder(tmp_path):
    """A study folder as 'mixkd study run --set epochs=4' leaves it: a teacher done, one stopped on time,
    one failed; a student interrupted (or running), the others waiting, blocked or pending."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.yaml").write_text(yaml.safe_dump({**STUDY, "defaults": {**STUDY["defaults"], "epochs": 240}}))
    study = load_study(out / "study.yaml", overrides=["epochs=4"])

    def started(run_id, epoch=None, **meta):
        d = out / run_id
        d.mkdir(parents=True)
        cfg = study.run(run_id).config_for(out).model_dump(mode="json")
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        if epoch is not None:
            save_checkpoint(d / "checkpoint.safetensors", create_model("resnet8", 10), model_name="resnet8",
                            num_classes=10, epoch=epoch, extra=meta)
        return d

    done = started("teachers/resnet8_plain-s0")
    (done / "result.json").write_text(json.dumps({"top1": 61.234, "images_per_s": 10.0, "device": "cpu (x86_64, 1 threads)"}))
    (done / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "images_per_s": 10.0, "epoch_seconds": 100.0}) + "\n")
    started("teachers/resnet14_plain-s0", epoch=2, step=3, stopped="time")
    failed = started("teachers/resnet20_plain-s0")
    (failed / "error.txt").write_text("batch size 1000 is larger than the dataset\n\nTraceback ...\n")
    started("students/resnet8-alone-s0", epoch=1, step=0)
    runs = {r.id: {"status": "pending"} for r in study.runs}
    runs["students/resnet8-alone-s0"] = {"status": "running"}
    runs["students/resnet8-from-resnet20_plain-kd-T4-s0"] = {"status": "blocked", "error": "its teacher did not finish"}
    (out / "study-state.json").write_text(json.dumps({"format": FOLDER_FORMAT, "overrides": ["epochs=4"], "runs": runs}))
    return out


def _line(text, run_id):
    return next(line.split(run_id, 1)[1].strip() for line in text.splitlines() if f" {run_id} " in line)


def test_status_says_where_each_run_stands_and_the_compute_left(tmp_path, capsys):
    out = _folder(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["study", "status", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == f"study st in {out}: 7 runs, not being run now"
    assert _line(text, "teachers/resnet8_plain-s0") == "done: top-1 61.23%"
    assert _line(text, "teachers/resnet14_plain-s0") == "stopped on time at epoch 3/4 step 3; resumes there"
    assert _line(text, "teachers/resnet20_plain-s0") == "failed: batch size 1000 is larger than the dataset"
    assert _line(text, "students/resnet8-alone-s0") == "interrupted after epoch 1/4; resumes there"  # no live study
    assert _line(text, "students/resnet8-from-resnet8_plain-kd-T4-s0") == "pending"
    assert _line(text, "students/resnet8-from-resnet14_plain-kd-T4-s0") == "waiting for its teacher teachers/resnet14_plain-s0"
    assert _line(text, "students/resnet8-from-resnet20_plain-kd-T4-s0") == "blocked: its teacher teachers/resnet20_plain-s0 did not finish"
    assert "7 runs: 1 done, 0 running, 2 stopped, 1 failed, 1 blocked, 1 waiting, 1 pending" in text
    # resnet8 alone measured 10 images/s over 1,000-image epochs: 4 epochs, 1 done -> 300 s left; others unknown
    last = text.strip().splitlines()[-1]
    assert last.startswith("estimated compute left for the 6 unfinished runs: 0.08 CPU-hours (training only, "
                           "from throughput measured on cpu (x86_64, 1 threads)); unknown for 5 runs"), last
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # status changes nothing

    (out / ".study.lock").write_text("99999999")  # left by a 'mixkd study run' that was killed: not running
    assert format_status(out).splitlines()[0].endswith("not being run now")
    with open(out / ".study.lock", "w") as lock:  # a live 'mixkd study run' holds the folder (a flock)
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(str(os.getpid()))
        lock.flush()
        text = format_status(out)
    assert text.splitlines()[0].endswith(f"being run by 'mixkd study run' (pid {os.getpid()})")
    assert _line(text, "students/resnet8-alone-s0") == "running, after epoch 1/4"
    assert re.search(r"1 done, 1 running, 1 stopped", text)


def test_status_reads_the_checkpoint_header_only(tmp_path):
    model = create_model("resnet8", 10)
    save_checkpoint(tmp_path / "checkpoint.safetensors", model, model_name="resnet8", num_classes=10, epoch=5,
                    extra={"step": 7, "stopped": "signal"})
    meta = checkpoint_position(tmp_path)
    assert (meta["epoch"], meta["step"], meta["stopped"]) == (5, 7, "signal")
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x00" * 10)  # cut short: no position, no crash
    assert checkpoint_position(tmp_path) is None and checkpoint_position(tmp_path / "none") is None


def test_status_of_what_is_not_a_study_folder_is_one_error_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "file").write_text("x")
    for target, message in [(tmp_path / "nowhere", f"study folder not found: {tmp_path / 'nowhere'}"),
                            (tmp_path / "file", f"{tmp_path / 'file'} is a file, not a study folder"),
                            (tmp_path / "run", f"{tmp_path / 'run'} is not a study folder (it has no study.yaml)")]:
        assert main(["study", "status", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith(f"mixkd: error: {message}"), err
    out = _folder(tmp_path)
    (out / "study-state.json").write_text(json.dumps({"format": "mixkd-study-99", "mixkd_version": "9.0"}))
    assert main(["study", "status", str(out)]) == 2
    assert "is a study folder of another mixkd version (9.0" in capsys.readouterr().err
