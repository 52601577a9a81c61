"""``mixkd study report`` on a study folder fabricated here: results.csv, the table, the figures."""

import csv
import json

import pytest
import yaml

from mixkd.cli import main
from mixkd.study import write_report
from mixkd.study.report import collect

PNG = b"\x89PNG\r\n\x1a\n"
TEACHERS = {"resnet56_plain": ("resnet56", "none", 72.0), "resnet56_mixup": ("resnet56", "mixup", 73.0),
            "resnet110_mixup": ("resnet110", "mixup", 74.0)}


def _run(out, run_id, cfg, result=None, error=None):
    d = out / run_id
    d.mkdir(parents=True)
    base = {"task": "train", "dataset": "cifar100", "epochs": 240, "batch_size": 64, "seed": 0,
            "optim": {"lr": None}, "mix": {"method": "none", "alpha": 1.0, "fraction": 1.0, "sampling": "exact"},
            "kd": {"teacher": None, "teacher_model": None, "method": "kd", "temperature": 4.0}}
    tree = {**base, **cfg, "mix": {**base["mix"], **cfg.get("mix", {})}, "kd": {**base["kd"], **cfg.get("kd", {})}}
    (d / "config.yaml").write_text(yaml.safe_dump(tree))
    if result is not None:
        (d / "result.json").write_text(json.dumps({"top5": 90.0, "nll": 1.2, "best_epoch": 200, "wall_seconds": 3600.0,
                                                   "images_per_s": 1000.0, "device": "NVIDIA H100", **result}))
    if error is not None:
        (d / "error.txt").write_text(error + "\n\nTraceback ...\n")


def _student(out, student, teacher, method, top1, seed, temperature=4.0, mix=None):
    model, _, teacher_top1 = TEACHERS[teacher]
    kd_method = method.split("_")[0]
    _run(out, f"students/{student}-from-{teacher}-{method}-T{temperature:g}-s{seed}",
         {"task": "distill", "model": student, "seed": seed, "mix": mix or {},
          "kd": {"teacher": f"/elsewhere/study/teachers/{teacher}-s0", "method": kd_method, "temperature": temperature}},
         {"top1": top1, "best_top1": top1 + 1, "teacher_top1": teacher_top1, "teacher_model": model})


@pytest.fixture
def study_folder(tmp_path):
    out = tmp_path / "study"
    for name, (model, mix, top1) in TEACHERS.items():
        _run(out, f"teachers/{name}-s0", {"model": model, "mix": {"method": mix}}, {"top1": top1, "best_top1": top1})
    for seed, top1 in enumerate([69.0, 70.0]):
        _run(out, f"students/resnet20-alone-s{seed}", {"model": "resnet20", "seed": seed},
             {"top1": top1, "best_top1": top1})
    for seed in (0, 1):
        for teacher in TEACHERS:
            for student, base in (("resnet20", 70.0), ("resnet32", 71.0)):
                bonus = 0.5 if "mixup" in teacher else 0.0
                _student(out, student, teacher, "kd", base + bonus + seed, seed, temperature=1.0)
                _student(out, student, teacher, "kd", base + 2 * seed, seed, temperature=4.0)
            _student(out, "resnet20", teacher, "kd_pmu", 71.5 + seed, seed, mix={"method": "mixup", "fraction": 0.1})
            _student(out, "resnet20", teacher, "kd_fmu", 68.0, seed, mix={"method": "mixup", "fraction": 1.0})
            _student(out, "resnet20", teacher, "std_pmu", 72.0 + seed, seed, mix={"method": "mixup", "fraction": 0.1})
    _run(out, "students/resnet20-from-resnet56_plain-std-s0",
         {"task": "distill", "model": "resnet20", "kd": {"teacher": "/x/teachers/resnet56_plain-s0", "method": "std"}},
         error="checkpoint not found: /x/teachers/resnet56_plain-s0")
    (out / "study-state.json").write_text(json.dumps({"runs": {
        "students/resnet8-from-resnet8_huge-kd-T4-s0": {"status": "blocked", "error": "its teacher did not finish"}}}))
    (out / "study.yaml").write_text("name: fabricated\ndescription: A folder made by a test.\n")
    return out


def test_results_csv_has_one_row_per_run_with_every_swept_value(study_folder):
    write_report(study_folder)
    with open(study_folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    n_dirs = len(list(study_folder.glob("**/config.yaml")))
    assert len(rows) == n_dirs + 1  # and the blocked run, which has no directory
    by_id = {r["id"]: r for r in rows}
    pmu = by_id["students/resnet20-from-resnet56_mixup-kd_pmu-T4-s1"]
    assert pmu["method"] == "kd_pmu" and pmu["teacher"] == "teachers/resnet56_mixup-s0"
    assert pmu["teacher_model"] == "resnet56" and pmu["teacher_mix"] == "mixup" and pmu["temperature"] == "4.0"
    assert pmu["mix_fraction"] == "0.1" and pmu["seed"] == "1" and float(pmu["top1"]) == 72.5
    assert {"best_top1", "top5", "nll", "wall_seconds", "images_per_s"} <= set(pmu)
    assert by_id["teachers/resnet110_mixup-s0"]["method"] == "teacher"
    assert by_id["students/resnet20-alone-s1"]["method"] == "alone"
    failed = by_id["students/resnet20-from-resnet56_plain-std-s0"]
    assert failed["status"] == "failed" and failed["error"].startswith("checkpoint not found")
    assert by_id["students/resnet8-from-resnet8_huge-kd-T4-s0"]["status"] == "blocked"


def test_report_has_the_paper_table_with_mean_std_and_best_in_bold(study_folder):
    text = write_report(study_folder).read_text()
    assert text.startswith("# Study fabricated\n\nA folder made by a test.")
    header = next(line for line in text.splitlines() if line.startswith("| teacher → student"))
    assert header == ("| teacher → student | teacher | student alone | KD T=1 | KD T=4 | KD+FMU T=4 | "
                      "KD+PMU T=4 f=0.1 | STD+PMU f=0.1 |")
    row = next(line for line in text.splitlines() if line.startswith("| resnet56 (mixup) → resnet20 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # teacher, alone (69, 70), KD T=1 (70.5, 71.5), KD T=4 (70, 72), FMU (68, 68), PMU (71.5, 72.5), STD+PMU (72, 73)
    assert cells[1:] == ["73.00", "69.50 ± 0.71", "71.00 ± 0.71", "71.00 ± 1.41", "68.00 ± 0.00", "72.00 ± 0.71",
                         "**72.50 ± 0.71**"]
    rows = [line for line in text.splitlines() if line.startswith("| resnet")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "resnet56 (plain) → resnet20", "resnet56 (plain) → resnet32", "resnet56 (mixup) → resnet20",
        "resnet56 (mixup) → resnet32", "resnet110 (mixup) → resnet20", "resnet110 (mixup) → resnet32"]
    r32 = next(r for r in rows if r.startswith("| resnet56 (plain) → resnet32"))
    assert "| – |" in r32 and "**72.00 ± 1.41**" in r32  # no resnet32 alone; KD T=4 (71, 73) best
    assert "`students/resnet20-from-resnet56_plain-std-s0`: failed: checkpoint not found" in text


def test_report_draws_the_heatmap_and_both_curves(study_folder):
    text = write_report(study_folder).read_text()
    for name in ("heatmap.png", "top1-vs-temperature.png", "top1-vs-fraction.png"):
        assert f"]({name})" in text
        assert (study_folder / name).read_bytes()[:8] == PNG


def test_best_epoch_metric_and_figures_left_out_when_nothing_is_swept(tmp_path, study_folder):
    text = write_report(study_folder, metric="best_top1").read_text()
    assert "best top-1 over epochs" in text
    row = next(line for line in text.splitlines() if line.startswith("| resnet56 (mixup) → resnet20 |"))
    assert [c.strip() for c in row.strip("|").split("|")][1:] == [
        "73.00", "69.50 ± 0.71", "72.00 ± 0.71", "72.00 ± 1.41", "69.00 ± 0.00", "73.00 ± 0.71", "**73.50 ± 0.71**"]
    out = tmp_path / "small"
    _run(out, "teachers/resnet56_plain-s0", {"model": "resnet56"}, {"top1": 72.0, "best_top1": 72.0})
    _student(out, "resnet20", "resnet56_plain", "kd", 70.0, 0)
    text = write_report(out).read_text()
    assert "| resnet56 (plain) → resnet20 | 72.00 | – | 70.00 |" in text
    assert "![" not in text and not list(out.glob("*.png"))
    assert len(collect(out)) == 2


def test_cli_report_and_its_errors(study_folder, tmp_path, capsys):
    assert main(["study", "report", str(study_folder)]) == 0
    assert str(study_folder / "report.md") in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["study", "report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mixkd: error: no runs found in") and "\n" not in err
