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


def fabricated_study(out):
    """A study folder of fabricated runs (teachers, students over methods, temperatures, mixing and seeds,
    a failed and a blocked run) in ``out``; also used by tests/test_report_html.py."""
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


@pytest.fixture
def study_folder(tmp_path):
    return fabricated_study(tmp_path / "study")


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
    first = text.split("## Teacher → student")[1].split("\n\n| teacher")[1].split("\n\n")[0]  # the last epoch's table
    rows = [line for line in first.splitlines() if line.startswith("| resnet")]
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


# ---- analyses (analysis.json in mixkd.analysis's layout, fabricated) -----------------------------

def _analysis(out, run_id, ece, entropy, pgd8, agreement=None):
    import numpy as np
    import torch

    from mixkd.analysis.tsne import save_embedding

    d = out / run_id
    model = {"top1": 70.0, "top5": 90.0, "nll": 1.2, "ece": ece, "confidence": 0.8, "entropy": entropy,
             "logit_std": {"mean": 3.0}}
    vicinal = {"lambdas": [0.5, 0.9], "student": {str(lam): {"accuracy": 60.0, "entropy": 1.0, "linearity_gap": 0.2}
                                                   for lam in (0.5, 0.9)}}
    a = {"format": "mixkd-analysis-1", "num_images": 200, "num_test_images": 10000, "student": model,
         "teacher": None, "fidelity": None if agreement is None else {"agreement": agreement, "kl": 0.3},
         "vicinal": vicinal, "robustness": {"eps_255": [0, 1, 2, 4, 8], "fgsm": [70.0, 50.0, 40.0, 30.0, pgd8 + 5],
                                            "pgd": [70.0, 45.0, 30.0, 20.0, pgd8], "pgd_steps": 10}}
    (d / "analysis.json").write_text(json.dumps(a))
    rng = np.random.default_rng(len(run_id))
    labels = torch.arange(30) % 3
    args = (labels, torch.arange(30), ["a", "b", "c"], run_id)
    save_embedding(d / "tsne.npz", rng.normal(size=(30, 2)).astype("float32"), *args)
    if agreement is not None:
        save_embedding(d / "tsne_teacher.npz", rng.normal(size=(30, 2)).astype("float32"), *args)


@pytest.fixture
def analyzed_folder(study_folder):
    """The fabricated study with the teachers, the students alone and the resnet20 students of the
    resnet56 mixup teacher analyzed; one analysis failed."""
    out = study_folder
    for teacher in TEACHERS:
        _analysis(out, f"teachers/{teacher}-s0", ece=0.05, entropy=0.5, pgd8=10.0)
    for seed in (0, 1):
        _analysis(out, f"students/resnet20-alone-s{seed}", ece=0.04, entropy=0.6, pgd8=5.0)
        for method, temp, ece in (("kd", 1, 0.03), ("kd", 4, 0.02 + 0.02 * seed), ("kd_fmu", 4, 0.06),
                                  ("kd_pmu", 4, 0.025), ("std_pmu", 4, 0.05)):
            _analysis(out, f"students/resnet20-from-resnet56_mixup-{method}-T{temp}-s{seed}", ece=ece,
                      entropy=0.7, pgd8=8.0 + seed, agreement=90.0 + seed)
    (out / "students/resnet32-from-resnet56_plain-kd-T4-s0/analysis-error.txt").write_text("CUDA out of memory\n\n...")
    (out / "study.yaml").write_text("name: fabricated\nanalysis: {tsne_pair: {teacher: mixup, student: resnet20}}\n")
    return out


def test_report_adds_the_analysis_tables_curves_and_tsne_montage(analyzed_folder):
    out = analyzed_folder
    text = write_report(out).read_text()
    assert "## Analyses" in text and "200 of the 10000 test images" in text
    summary = text.split("### Per method")[1].split("###")[0]
    assert ("| method | runs | top-1 (%) | ECE (%) | entropy | agreement (%) | KL(T\\|\\|S) | FGSM 8/255 (%) | "
            "PGD 2/255 (%) | PGD 8/255 (%) |") in summary
    methods = [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| ") and "---" not in line]
    assert methods == ["method", "teacher (plain)", "teacher (mixup)", "student alone", "KD T=1", "KD T=4",
                       "KD+FMU T=4", "KD+PMU T=4 f=0.1", "STD+PMU f=0.1"]
    assert "| KD T=4 | 2 | 70.00 | 3.00 | 0.70 | 90.50 | 0.30 | 13.50 | 30.00 | 8.50 |" in summary
    assert "| student alone | 2 | 70.00 | 4.00 | 0.60 | – |" in summary

    ece = text.split("### ECE (%), lower is better")[1].split("###")[0]
    rows = [line for line in ece.splitlines() if line.startswith("| resnet")]
    assert len(rows) == 1  # only the analyzed pair
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    # teacher 5.00; alone 4.00; KD T=1 3.00, KD T=4 (2, 4), FMU 6, PMU 2.5 (best: lowest), STD+PMU 5
    assert cells == ["resnet56 (mixup) → resnet20", "5.00", "4.00 ± 0.00", "3.00 ± 0.00", "3.00 ± 1.41",
                     "6.00 ± 0.00", "**2.50 ± 0.00**", "5.00 ± 0.00"]
    agreement = text.split("### agreement (%), higher is better")[1].split("###")[0]
    assert "| resnet56 (mixup) → resnet20 | – | – | **90.50 ± 0.71** |" in agreement
    assert "### entropy" in text and "### PGD 8/255 (%), higher is better" in text

    for png in ("analysis-robustness.png", "analysis-tsne.png"):
        assert f"]({png})" in text and (out / png).read_bytes()[:8] == PNG
    assert ("Panels: teacher resnet56 (mixup) | resnet20: student alone | resnet20: KD (T=1) | resnet20: KD (T=4) | "
            "resnet20: KD + full mixup (T=4) | resnet20: KD + partial mixup (T=4, f=0.1) | "
            "resnet20: standardized KD + partial mixup (f=0.1)") in text
    assert "`students/resnet32-from-resnet56_plain-kd-T4-s0`: CUDA out of memory" in text

    with open(out / "results.csv") as f:
        by_id = {r["id"]: r for r in csv.DictReader(f)}
    kd = by_id["students/resnet20-from-resnet56_mixup-kd-T4-s1"]
    assert kd["analysis"] == "done" and float(kd["ece"]) == 0.04 and float(kd["agreement"]) == 91.0
    assert float(kd["pgd_8"]) == 9.0 and float(kd["fgsm_8"]) == 14.0 and float(kd["pgd_2"]) == 30.0
    failed = by_id["students/resnet32-from-resnet56_plain-kd-T4-s0"]
    assert failed["analysis"] == "failed" and failed["analysis_error"] == "CUDA out of memory" and failed["ece"] == ""
    assert by_id["students/resnet20-from-resnet56_plain-kd-T4-s0"]["analysis"] == ""


def test_no_analysis_section_without_analyses_and_a_montage_from_the_students_view(analyzed_folder, study_folder):
    out = analyzed_folder
    for path in out.glob("teachers/*/analysis.json"):  # the teacher panel then comes from a student's analysis
        path.unlink()
    (out / "study.yaml").write_text("name: fabricated\n")  # no tsne_pair: the pair with the most methods
    text = write_report(out).read_text()
    assert "Panels: teacher resnet56 (mixup) | resnet20: student alone" in text
    assert "teacher (mixup)" not in text.split("### Per method")[1].split("###")[0]
    for path in out.glob("**/analysis.json"):
        path.unlink()
    (out / "students/resnet32-from-resnet56_plain-kd-T4-s0/analysis-error.txt").unlink()
    text = write_report(out).read_text()
    assert "Analys" not in text and not list(out.glob("analysis-*.png"))
