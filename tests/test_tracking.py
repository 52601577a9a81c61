"""Experiment tracking (``--track mlflow|wandb``, :mod:`mixkd.tracking`), read back offline: MLflow from
its SQLite store with ``mlflow.search_runs``, W&B from its offline run folder."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
import yaml
from optional import need_module

from mixkd.cli import main
from mixkd.config import build_config
from mixkd.engine import Run, run_job
from mixkd.study import InProcessExecutor, load_study, run_study, write_report
from mixkd.tracking import STATE_NAME, log_files, run_params

mlflow = need_module("mlflow", "pip install 'mixkd[mlflow]'")


def cfg_for(out, data_dir, uri, **extra):
    """Epochs of 5 steps (160 fake CIFAR-10 images, batch 32) of resnet8, tracked to MLflow at ``uri``."""
    flags = {"task": "train", "model": "resnet8", "dataset": "cifar10", "data_dir": str(data_dir), "batch_size": 32,
             "eval_batch_size": 80, "epochs": 3, "device": "cpu", "progress": False, "out": str(out),
             "compile": "off", "save_every": 1, "track.backend": "mlflow", "track.uri": uri, **extra}
    return build_config(flags=flags)


def search(uri, **kwargs):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["mixkd"], **kwargs)


def steps(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_parameters_are_the_config_keys_under_their_override_names():
    cfg = build_config(flags={"model": "resnet8", "track.backend": "mlflow"},
                       overrides=["mix.fraction=0.1", "optim.milestones=[2,3]", "kd.method=dkd"])
    params = run_params(cfg)
    assert params["mix.fraction"] == "0.1" and params["optim.milestones"] == "[2, 3]"
    assert params["kd.beta"] == "8.0" and "kd.gamma" not in params and params["model"] == "resnet8"  # DIST's, not DKD's
    assert not any(k.startswith("track.") for k in params) and "out" not in params
    # each parameter, given back as a key=value override, rebuilds the same run
    again = build_config(overrides=[f"{k}={v}" for k, v in params.items()])
    assert again.model_dump(exclude={"track"}) == cfg.model_dump(exclude={"track"})


@pytest.fixture(scope="module")
def stopped_crashed_resumed(tmp_path_factory, cifar10_dir):
    """A run stopped mid-epoch 1, resumed, killed after logging epoch 2 but before its checkpoint
    (the step after the tracker's), resumed again to the end."""
    root = tmp_path_factory.mktemp("tracked")
    uri, out = f"sqlite:///{root / 'mlflow.db'}", root / "run"
    job = Run(cfg_for(out, cifar10_dir, uri))
    job.start()
    for _ in range(3):
        job.advance()
    job.stop("time")
    job = Run(cfg_for(out, cifar10_dir, uri), resume=True)
    job.start()
    real_save = job._save

    def save(final=False, stopped=None):
        if job.epoch == 2 and stopped is None:
            raise RuntimeError("killed between the tracker and the checkpoint")
        real_save(final, stopped)

    job._save = save
    with pytest.raises(RuntimeError, match="killed"):
        while not job.done:
            job.advance()
    job.fail()
    assert json.loads((out / STATE_NAME).read_text())["step"] == 2  # epoch 2 was logged, not saved
    run_job(cfg_for(out, cifar10_dir, uri), resume=True)
    return uri, out


def test_a_stopped_and_resumed_run_is_one_tracked_run_with_each_epoch_once(stopped_crashed_resumed):
    uri, out = stopped_crashed_resumed
    runs = search(uri)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["run_id"] == json.loads((out / STATE_NAME).read_text())["id"]
    assert run["status"] == "FINISHED"
    assert run["params.mix.method"] == "none" and run["params.epochs"] == "3" and run["params.optim.lr"] == "null"
    assert (run["tags.task"], run["tags.model"], run["tags.seed"], run["tags.mix"]) == ("train", "resnet8", "0", "none")
    for key in ("test_top1", "train_loss", "lr", "images_per_s", "test_nll", "test_top5"):
        assert steps(uri, run["run_id"], key) == [1, 2, 3], key  # the replayed epoch 2 is not logged again
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert run["metrics.test_top1"] == pytest.approx(rows[-1]["test_top1"])
    assert run["metrics.result.top1"] == pytest.approx(json.loads((out / "result.json").read_text())["top1"])
    from mlflow.tracking import MlflowClient

    assert sorted(f.path for f in MlflowClient(uri).list_artifacts(run["run_id"])) == ["config.yaml", "result.json"]
    stored = out.parent / "mlruns"  # beside the store, not in the working directory
    assert sorted(p.name for p in stored.glob(f"{run['run_id']}/artifacts/*")) == ["config.yaml", "result.json"]

    # what mixkd analyze does for a tracked run: its outputs join the run's artifacts (the run is found by its folder)
    (out / "analysis.json").write_text("{}")
    log_files(out, [out / "analysis.json", out / "missing.png"])
    assert sorted(f.path for f in MlflowClient(uri).list_artifacts(run["run_id"])) == ["analysis.json", "config.yaml",
                                                                                      "result.json"]
    assert len(search(uri)) == 1 and search(uri).iloc[0]["status"] == "FINISHED"


def test_a_failing_tracker_costs_one_warning_line_never_the_run(tmp_path, cifar10_dir):
    (tmp_path / "a-file").write_text("")  # a database path under a file: every MLflow call fails
    out = tmp_path / "run"
    result = run_job(cfg_for(out, cifar10_dir, f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}", epochs=1)).result
    assert result["epochs"] == 1 and (out / "result.json").exists()
    warnings = [line for line in (out / "log.txt").read_text().splitlines() if "tracking" in line]
    assert len(warnings) == 1 and "warning: tracking to mlflow failed (open: " in warnings[0]
    assert "the run goes on without it" in warnings[0]
    assert not (out / STATE_NAME).exists()


def test_a_missing_tracker_package_is_one_line_before_the_run(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code = main(["train", "--model", "resnet8", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "r"),
                 "--track", "wandb"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--track wandb needs W&B, which is not installed: pip install 'mixkd[wandb]'" in err[0]
    assert not (tmp_path / "r").exists()


def test_a_tracked_study_is_a_parent_run_with_its_runs_as_children(tmp_path, cifar10_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study_file = tmp_path / "s.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "tracked", "defaults": {"dataset": "cifar10", "data_dir": str(cifar10_dir), "epochs": 1,
                                        "batch_size": 32, "eval_batch_size": 80, "device": "cpu", "compile": "off",
                                        "track": {"uri": uri}},
        "teachers": [{"name": "plain", "models": "resnet8"}],
        "students": [{"teachers": ["plain"], "models": "resnet8", "methods": ["kd"]}]}))
    out = tmp_path / "out"
    study = load_study(study_file, ["track.backend=mlflow"])  # what mixkd study run --track mlflow adds
    outcome = run_study(study, out, InProcessExecutor(), progress=False, echo=lambda line: None)
    assert outcome.counts["done"] == 2
    write_report(out)
    runs = search(uri)
    parent = json.loads((out / STATE_NAME).read_text())["id"]
    assert len(runs) == 3 and parent in set(runs["run_id"])
    children = runs[runs["run_id"] != parent]
    assert set(children["tags.mlflow.parentRunId"]) == {parent}
    assert sorted(children["tags.mlflow.runName"]) == sorted(r.id.rsplit("/", 1)[-1] for r in study.runs)
    student = children[children["tags.task"] == "distill"].iloc[0]
    assert (student["tags.method"], student["tags.teacher"], student["params.kd.temperature"]) == ("kd", "resnet8", "4.0")
    assert steps(uri, student["run_id"], "test_top1") == [1]
    top = runs[runs["run_id"] == parent].iloc[0]
    assert top["status"] == "FINISHED" and top["metrics.result.runs_done"] == 2
    from mlflow.tracking import MlflowClient

    names = {f.path for f in MlflowClient(uri).list_artifacts(parent)}
    assert {"report.md", "results.csv", "claims.json"} <= names


# ---- W&B, offline ----------------------------------------------------------------------------

def wandb_records(run_folder: Path) -> list:
    """The records of a W&B offline run folder's ``run-<id>.wandb`` (LevelDB's log format: blocks of
    32 KiB, each record a 7-byte header (CRC, length, kind: 1 full, 2 first, 3 middle, 4 last) and its
    bytes, after the file's own 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_folder.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    records, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # the rest of a block too small for a header: padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def test_wandb_offline_run_holds_the_parameters_epochs_result_and_files(tmp_path, cifar10_dir, monkeypatch):
    need_module("wandb", "pip install 'mixkd[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, folder = tmp_path / "run", tmp_path / "wandb-files"
    cfg = cfg_for(out, cifar10_dir, None, epochs=2, **{"track.backend": "wandb", "track.uri": str(folder),
                                                         "mix.method": "mixup", "mix.fraction": 0.5})
    run_job(cfg)
    run_id = json.loads((out / STATE_NAME).read_text())["id"]
    [offline] = (folder / "wandb").glob(f"offline-run-*-{run_id}")
    records = wandb_records(offline)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert (config["mix.fraction"], config["mix.method"], config["epochs"]) == ("0.5", "mixup", "2")
    assert {"task=train", "model=resnet8", "mix=mixup 0.5", "seed=0"} <= set(run.tags)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["_step"] for h in history] == [1, 2]
    assert [h["test_top1"] for h in history] == pytest.approx([r["test_top1"] for r in rows])
    summary = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for u in r.summary.update if u.key}
    assert summary["result.top1"] == pytest.approx(rows[-1]["test_top1"])
    assert json.loads((offline / "files" / "mixkd" / "result.json").read_text())["top1"] == summary["result.top1"]


def test_only_the_process_that_writes_the_run_folder_tracks(tmp_path, cifar10_dir, monkeypatch):
    from mixkd import distributed

    monkeypatch.setattr(distributed, "is_main", lambda: False)  # a rank other than 0 of a torchrun launch
    job = Run(cfg_for(tmp_path / "run", cifar10_dir, f"sqlite:///{tmp_path / 'mlflow.db'}", epochs=1))
    assert job.tracker.track.backend == "none"
    job.start()
    while job.advance():
        pass
    assert job.phase == "finished" and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "run").exists()
