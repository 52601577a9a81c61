"""Studies: grid expansion and validation, the shipped study files, plan, and running a study
(dependency order, skip, resume, failure isolation, Ctrl-C) with the local executor."""

import json
import re
from pathlib import Path

import pytest
import yaml

from mixkd.cli import main
from mixkd.errors import MixkdError
from mixkd.study import InProcessExecutor, LocalExecutor, format_plan, load_study, run_study
from mixkd.study.spec import expand, parse_study

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "configs" / "studies").glob("*.yaml"))

# The 13 pairs of RepDistiller's README (/work/shared/REFERENCE.md).
REPDISTILLER_PAIRS = {
    ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
    ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"),
}


def _expand(data):
    return expand(parse_study(data, "s.yaml"), "s.yaml")


def _study(**extra):
    data = {"name": "s", "defaults": {"dataset": "digits", "epochs": 1},
            "teachers": [{"name": "plain", "models": ["resnet20", "resnet32"]},
                         {"name": "mixup", "models": "resnet20", "mix": {"method": "mixup"}, "seeds": [0, 1]}],
            "students": [{"teachers": ["plain", "mixup"], "models": ["resnet8", "resnet14"],
                          "methods": ["alone", "kd", "kd_fmu", "kd_pmu", "std", "std_pmu"],
                          "temperatures": [1, 4], "fractions": [0.1, 0.5], "seeds": [0, 1, 2]}]}
    data.update(extra)
    return data


# ---- expansion --------------------------------------------------------------------------------

def test_grid_expands_to_the_cartesian_product_with_readable_stable_ids():
    runs = _expand(_study())
    by_id = {r.id: r for r in runs}
    assert len(by_id) == len(runs)
    teachers = [r for r in runs if r.role == "teacher"]
    assert [r.id for r in teachers] == ["teachers/resnet20_plain-s0", "teachers/resnet32_plain-s0",
                                        "teachers/resnet20_mixup-s0", "teachers/resnet20_mixup-s1"]
    # 4 teacher runs x 2 students x (kd: 2 T + kd_fmu: 2 T + kd_pmu: 2 T x 2 f + std + std_pmu: 2 f) x 3 seeds,
    # plus each student alone x 3 seeds (once, whatever the teacher)
    assert len(runs) == 4 + 4 * 2 * (2 + 2 + 4 + 1 + 2) * 3 + 2 * 3
    pmu = by_id["students/resnet8-from-resnet20_mixup-s1-kd_pmu-T4-f0.5-s2"]
    assert pmu.teacher_run == "teachers/resnet20_mixup-s1" and pmu.temperature == 4 and pmu.fraction == 0.5
    assert pmu.method.name == "kd_pmu" and pmu.method.mixing == "partial"
    assert pmu.config.task == "distill" and (pmu.config.kd.method, pmu.config.kd.temperature) == ("kd", 4)
    assert (pmu.config.mix.method, pmu.config.mix.fraction, pmu.config.mix.alpha, pmu.config.seed) == ("mixup", 0.5, 1.0, 2)
    std = by_id["students/resnet14-from-resnet32_plain-std-s0"]  # no temperature, no fraction
    assert std.config.kd.method == "std" and std.config.mix.method == "none" and std.method.name == "std"
    fmu = by_id["students/resnet8-from-resnet32_plain-kd_fmu-T1-s0"]
    assert fmu.config.mix.fraction == 1.0 and fmu.config.kd.temperature == 1
    alone = by_id["students/resnet14-alone-s1"]
    assert alone.config.task == "train" and alone.teacher_run is None and alone.config.mix.method == "none"
    assert alone.method.name == "alone" and runs[0].method is None  # a teacher has no method
    cfg = pmu.config_for("/study")
    assert cfg.kd.teacher == "../../teachers/resnet20_mixup-s1" and cfg.out == f"/study/{pmu.id}"
    assert cfg.dataset == "digits" and cfg.progress is False and pmu.config.out is None
    # stable: the same file expands to the same ids and configs
    assert [(r.id, r.config) for r in _expand(_study())] == [(r.id, r.config) for r in runs]


def test_teachers_come_before_every_student_that_depends_on_them():
    runs = _expand(_study())
    position = {r.id: i for i, r in enumerate(runs)}
    dependent = [r for r in runs if r.teacher_run]
    assert dependent and all(position[r.teacher_run] < position[r.id] for r in dependent)


def test_pairs_use_only_the_named_teachers_and_external_checkpoints(tmp_path):
    data = {"name": "p", "teachers": [{"name": "plain", "models": ["resnet56", "resnet110"]},
                                      {"name": "rd", "checkpoint": str(tmp_path / "ckpt.pth"), "model": "resnet32x4"}],
            "students": [{"teachers": ["plain", "rd"], "pairs": ["resnet110 -> resnet20", "resnet32x4 -> resnet8x4"],
                          "methods": ["alone", "kd"]}]}
    runs = _expand(data)
    students = {r.id: r for r in runs if r.role == "student"}
    assert set(students) == {"students/resnet20-alone-s0", "students/resnet8x4-alone-s0",
                             "students/resnet20-from-resnet110_plain-kd-T4-s0",
                             "students/resnet8x4-from-resnet32x4_rd-kd-T4-s0"}
    ext = students["students/resnet8x4-from-resnet32x4_rd-kd-T4-s0"]
    assert ext.teacher_run is None and ext.config.kd.teacher_model == "resnet32x4"
    assert ext.config_for("/x").kd.teacher == str(tmp_path / "ckpt.pth")
    assert [r.id for r in runs if r.role == "teacher"] == ["teachers/resnet56_plain-s0", "teachers/resnet110_plain-s0"]


BAD = [
    ({"students": [{"teachers": "plain", "models": "resnet8", "methods": ["kd"]},
                   {"teachers": "plain", "models": "resnet8", "methods": ["kd+mixupp"]}]},
     "students[1].methods[0]: unknown method 'kd+mixupp'; known: alone, kd, kd_fmu, kd_pmu, std, std_fmu, std_pmu"),
    ({"students": [{"teachers": "plain", "models": "resnet8", "methods": "kd", "temperature": 4}]},
     "students[0].temperature: unknown key"),
    ({"students": [{"teachers": ["plain", "mixupp"], "models": "resnet8", "methods": "kd"}]},
     "students[0].teachers[1]: unknown teacher group 'mixupp'; defined: plain"),
    ({"students": [{"teachers": "plain", "models": "resnet8", "methods": "kd", "recipe": {"kd": {"temperature": 2}}}]},
     "students[0].recipe.kd.temperature: set by the study grid (use temperatures:)"),
    ({"students": [{"teachers": "plain", "models": "resnet8", "methods": "kd", "recipe": {"optim": {"lr": -1}}}]},
     "students[0].recipe.optim.lr: Input should be greater than 0"),
    ({"defaults": {"epoch": 3}}, "defaults.epoch: unknown key"),
    ({"students": [{"teachers": "plain", "models": ["resnet8", "resnet9"], "methods": "kd"}]},
     "students[0].models[1]: unknown model 'resnet9'"),
    ({"students": [{"teachers": "plain", "pairs": ["resnet56 -> resnet20"], "methods": "kd"}]},
     "students[0].pairs[0]: no teacher resnet56 in teacher groups plain"),
    ({"students": [{"teachers": "plain", "pairs": ["resnet20"], "methods": "kd"}]},
     "students[0].pairs[0]: expected 'teacher -> student'"),
    ({"students": [{"models": "resnet8", "methods": ["alone", "kd"]}]},
     "students[0]: methods kd need teachers: (teacher group names)"),
    ({"students": [{"teachers": "plain", "models": "resnet8", "methods": "kd", "fractions": 1.5}]},
     "students[0].fractions[0]: Input should be less than 1"),
    ({"teachers": [{"name": "plain", "models": "resnet20"}, {"name": "plain", "models": "resnet32"}]},
     "teachers[1].name: teacher group 'plain' is defined twice"),
    ({"teachers": [{"name": "rd", "checkpoint": "x.pth"}]}, "teachers[0]: checkpoint: needs model:"),
    ({"teachers": [{"name": "my-teacher", "models": "resnet20"}]}, "teachers[0].name: 'my-teacher' is not a valid name"),
    ({"students": [{"teachers": "plain", "models": "resnet8", "methods": "alone"},
                   {"teachers": "plain", "models": "resnet8", "methods": "alone", "recipe": {"epochs": 5}}]},
     "students[1]: run students/resnet8-alone-s0 is also declared by students[0] with other settings (epochs: 1 vs 5)"),
    ({"analysis": {"subset": 0}}, "analysis.subset: Input should be greater than or equal to 1 (got 0)"),
    ({"analysis": {"enabled": True, "subsett": 100}}, "analysis.subsett: unknown key"),
    ({"analysis": "yes"}, "analysis: Input should be a valid dictionary or instance of StudyAnalysis"),
    ({"students": [{"teachers": "plain", "models": "resnet8", "methods": "kd",
                    "analysis": {"tsne_pair": {"teacher": "plain", "student": "resnet8"}}}]},
     "students[0].analysis.tsne_pair: unknown key"),
    ({"analysis": {"tsne_pair": {"teacher": "plain"}}}, "analysis.tsne_pair.student: Field required"),
    ({"analysis": {"tsne_pair": {"teacher": "mixupp", "student": "resnet8"}},
      "students": [{"teachers": "plain", "models": "resnet8", "methods": "kd"}]},
     "analysis.tsne_pair.teacher: unknown teacher 'mixupp'; teacher groups: plain"),
    ({"analysis": {"tsne_pair": {"teacher": "plain", "student": "resnet14"}},
      "students": [{"teachers": "plain", "models": "resnet8", "methods": "kd"}]},
     "analysis.tsne_pair.student: no student resnet14 is distilled from teacher 'plain'"),
    ({"analysis": {"tsne_pair": {"teacher": "plain", "student": "resnet8"}},
      "students": [{"teachers": "plain", "models": "resnet8", "methods": "kd", "analysis": False}]},
     "analysis.tsne_pair: no student resnet8 of teacher 'plain' is analyzed"),
    ({"teachers": [{"name": "rd", "checkpoint": "x.pth", "model": "resnet20", "analysis": True}]},
     "teachers[0]: an existing checkpoint is not trained; remove analysis"),
    ({"analysis": True, "students": [{"teachers": "plain", "models": "resnet8", "methods": "kd"},
                                     {"teachers": "plain", "models": "resnet8", "methods": "kd",
                                      "analysis": {"subset": 50}}]},
     "students[1].analysis.subset: run students/resnet8-from-resnet20_plain-kd-T4-s0 is also declared by students[0] "
     "with subset None"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_invalid_study_files_get_one_line_naming_the_key(change, message):
    data = {"name": "s", "defaults": {"dataset": "digits", "epochs": 1},
            "teachers": [{"name": "plain", "models": "resnet20"}], **change}
    with pytest.raises(MixkdError) as err:
        _expand(data)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("invalid study file s.yaml: " + message), text


def test_analysis_key_at_the_top_and_per_group():
    students = [{"name": "methods", "teachers": ["plain", "mixup"], "models": "resnet8", "methods": ["alone", "kd"]},
                {"name": "mixt", "teachers": ["plain", "mixup"], "models": ["resnet8", "resnet14"], "methods": "kd",
                 "temperatures": [1, 4], "analysis": False},
                {"name": "more", "teachers": "mixup", "models": "resnet20", "methods": "kd_pmu",
                 "analysis": {"subset": 50}}]
    data = _study(students=students, analysis={"subset": 200, "batch_size": 64,
                                               "tsne_pair": {"teacher": "mixup", "student": "resnet8"}})
    runs = {r.id: r for r in _expand(data)}
    top = {"subset": 200, "batch_size": 64, "seed": 0}
    assert runs["teachers/resnet20_plain-s0"].analysis == top
    assert runs["students/resnet8-alone-s0"].analysis == top
    assert runs["students/resnet8-from-resnet20_mixup-s1-kd-T4-s0"].analysis == top  # also declared by mixt
    assert runs["students/resnet8-from-resnet20_mixup-s1-kd-T1-s0"].analysis is None  # mixt only
    assert runs["students/resnet14-from-resnet32_plain-kd-T4-s0"].analysis is None
    assert runs["students/resnet20-from-resnet20_mixup-s0-kd_pmu-T4-f0.1-s0"].analysis == {**top, "subset": 50}
    # true / false are short for enabled; no top-level key: only the groups that ask
    data = _study(students=[{**students[0], "analysis": True},
                            {**students[1], "temperatures": 1, "analysis": {"seed": 3}}])
    runs = {r.id: r for r in _expand(data)}
    assert runs["teachers/resnet20_plain-s0"].analysis is None
    assert runs["students/resnet8-alone-s0"].analysis == {"subset": None, "batch_size": 1000, "seed": 0}
    assert runs["students/resnet14-from-resnet32_plain-kd-T1-s0"].analysis == {"subset": None, "batch_size": 1000,
                                                                                 "seed": 3}
    data = _study(analysis={"enabled": False, "subset": 10}, teachers=[{"name": "plain", "models": "resnet20",
                                                                        "analysis": {}}], students=[])
    assert [r.analysis for r in _expand(data)] == [{"subset": 10, "batch_size": 1000, "seed": 0}]
    assert all(r.analysis is None for r in _expand(_study()))


def test_overrides_apply_to_every_run_but_not_to_grid_keys(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_study()))
    study = load_study(path, overrides=["epochs=3", "optim.lr=0.2"])
    assert {(r.config.epochs, r.config.optim.lr) for r in study.runs} == {(3, 0.2)}
    with pytest.raises(MixkdError, match="--set kd.method: set by the study grid"):
        load_study(path, overrides=["kd.method=std"])


def test_local_executor_runs_one_pack_per_gpu_and_fixed_threads_on_the_cpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    ex = LocalExecutor(pack=2)  # worker processes start with their first run: none here
    assert [env["CUDA_VISIBLE_DEVICES"] for env in ex._envs] == ["3", "5"] and ex.capacity() == 4
    assert ex.description == "2 local worker(s) on 2 GPU(s), a pack of up to 2 run(s) in each"
    assert LocalExecutor().slots == 8  # the best K measured on an H100
    assert [env["CUDA_VISIBLE_DEVICES"] for env in LocalExecutor(workers=3)._envs] == ["3", "5", "3"]
    cpu = LocalExecutor(workers=2, use_gpu=False)
    assert cpu.capacity() == 2 and all("CUDA_VISIBLE_DEVICES" not in env for env in cpu._envs)
    assert cpu.threads == 1 and all(env["OMP_NUM_THREADS"] == "1" for env in cpu._envs)
    assert LocalExecutor(workers=1, use_gpu=False, pack=3, threads=2).capacity() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert LocalExecutor(workers=1).description.startswith("1 local worker(s) on the CPU")


def test_cli_reports_a_bad_study_file_on_one_line_with_status_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: s\nteachers: [{name: plain, models: resnet20}]\n"
                    "students: [{teachers: plain, models: resnet8, methods: [kd+mixupp]}]\n")
    assert main(["study", "plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"mixkd: error: invalid study file {path}: students[0].methods[0]: unknown method")
    path.write_text("name: [unclosed\n")
    assert main(["study", "run", str(path)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


# ---- shipped study files ----------------------------------------------------------------------

@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_shipped_study_file_expands(path):
    study = load_study(path, check_files=False)  # imagenet-scale.yaml's teachers are weight files the user brings
    assert study.runs and len({r.id for r in study.runs}) == len(study.runs)
    assert all(r.teacher_run is None or r.teacher_run in {t.id for t in study.runs} for r in study.runs)


def test_shipped_studies_cover_what_the_issue_asks():
    names = {p.stem for p in STUDIES}
    assert {"quickstart", "cifar100-table", "cifar100-mixt-surface"} <= names
    quick = load_study(ROOT / "configs/studies/quickstart.yaml").runs
    assert {r.config.dataset for r in quick} == {"digits"} and {r.config.device for r in quick} == {"auto"}
    assert {r.config.mix.method for r in quick if r.role == "teacher"} == {"none", "mixup"}
    assert {r.method.name for r in quick if r.role == "student"} == {"alone", "kd", "kd_fmu", "kd_pmu", "std", "std_pmu"}
    assert {r.temperature for r in quick if r.method and r.method.name == "kd"} == {1, 4}
    assert len({r.model for r in quick if r.role == "student"}) >= 2 and len(quick) <= 25

    table = load_study(ROOT / "configs/studies/cifar100-table.yaml").runs
    distill = [r for r in table if r.teacher_model]
    assert {(r.teacher_model, r.model) for r in distill} == REPDISTILLER_PAIRS
    assert {r.seed for r in table if r.role == "student"} == {0, 1, 2}
    assert {r.config.epochs for r in table} == {240}
    assert len(distill) == 13 * 5 * 3

    surface = load_study(ROOT / "configs/studies/cifar100-mixt-surface.yaml").runs
    sizes = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
    kd = [r for r in surface if r.method and r.method.name == "kd"]
    assert {(r.teacher_run.split("_")[-1].split("-")[0], r.teacher_model, r.model, r.temperature) for r in kd} == {
        (kind, t, s, temp) for kind in ("plain", "mixup") for t in sizes for s in sizes for temp in (1, 4)}


# ---- plan -------------------------------------------------------------------------------------

def test_plan_counts_runs_and_estimates_compute_from_measured_throughput(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "defaults": {"dataset": "cifar10", "epochs": 10, "batch_size": 32},
                                    "teachers": [{"name": "plain", "models": "resnet8"}],
                                    "students": [{"teachers": "plain", "models": "resnet8", "methods": ["alone", "kd"]}]}))
    study = load_study(path)
    out = tmp_path / "out"
    text = format_plan(study, out)
    assert text.splitlines()[0].endswith("3 runs: 1 teachers, 2 students")
    assert "unknown" in text.splitlines()[-1]
    # a finished alone run measured 500 images/s over 1,000-image epochs
    run = out / "students/resnet8-alone-s0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(study.run("students/resnet8-alone-s0").config_for(out).to_yaml())
    (run / "result.json").write_text(json.dumps({"images_per_s": 500.0, "device": "NVIDIA H100", "top1": 50.0}))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "images_per_s": 500.0, "epoch_seconds": 2.0}) + "\n")
    lines = format_plan(study, out).splitlines()
    teacher_line = next(line for line in lines if "teachers/resnet8_plain-s0" in line)
    assert re.search(r"\s20 s\s+new$", teacher_line)  # 10 epochs x 1,000 images / 500 images/s
    assert re.search(r"done$", next(line for line in lines if "alone" in line))
    assert "0.01 GPU-hours" in lines[-1] and "unknown for 1 runs" in lines[-1]  # kd: teacher forward not measured


# ---- running ----------------------------------------------------------------------------------

class InlineExecutor(InProcessExecutor):
    """The in-process executor, recording what it is given; with execute=False nothing runs (each job
    fails at once)."""

    def __init__(self, execute=True):
        super().__init__()
        self.execute, self.submitted, self.analyzed, self._refused = execute, [], [], []

    def submit(self, job):
        (self.submitted if job.analysis is None else self.analyzed).append(job.run_id)
        if self.execute:
            super().submit(job)
        else:
            self._refused.append((job.run_id, {"ok": False, "message": "not run in this test"}))

    def wait(self, timeout):
        done, self._refused = self._refused, []
        return done + super().wait(timeout)


def _write_study(path, data_dir, **changes):
    (path.parent / "missing.pth").write_bytes(b"not a checkpoint")  # there (checked at plan time) but unreadable
    data = {"name": "t", "defaults": {"dataset": "cifar10", "data_dir": str(data_dir), "epochs": 1,
                                      "batch_size": 32, "eval_batch_size": 80, "device": "cpu"},
            "teachers": [{"name": "plain", "models": "resnet8"},
                         {"name": "huge", "models": "resnet8", "recipe": {"batch_size": 1000}},  # fails: > dataset
                         {"name": "missing", "checkpoint": str(path.parent / "missing.pth"), "model": "resnet8"}],
            "students": [{"teachers": ["plain", "huge", "missing"], "models": "resnet8", "methods": ["alone", "kd"]}]}
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, cifar10_dir):
    """The study run once through the CLI with two local worker processes."""
    root = tmp_path_factory.mktemp("study")
    path = _write_study(root / "t.yaml", cifar10_dir)
    out = root / "out"
    code = main(["study", "run", str(path), "--out", str(out), "--workers", "2", "--no-progress"])
    return path, out, code


def test_failures_are_recorded_and_do_not_stop_the_others(finished_study, capsys):
    path, out, code = finished_study
    assert code == 1  # not every run finished
    state = json.loads((out / "study-state.json").read_text())
    status = {k: v["status"] for k, v in state["runs"].items()}
    assert status == {"teachers/resnet8_plain-s0": "done", "teachers/resnet8_huge-s0": "failed",
                      "students/resnet8-alone-s0": "done", "students/resnet8-from-resnet8_plain-kd-T4-s0": "done",
                      "students/resnet8-from-resnet8_huge-kd-T4-s0": "blocked",
                      "students/resnet8-from-resnet8_missing-kd-T4-s0": "failed"}
    assert "batch size 1000 is larger than" in state["runs"]["teachers/resnet8_huge-s0"]["error"]
    error = (out / "students/resnet8-from-resnet8_missing-kd-T4-s0/error.txt").read_text()
    assert "missing.pth" in error.splitlines()[0] and "Traceback" in error
    assert "teachers/resnet8_huge-s0 did not finish" in state["runs"]["students/resnet8-from-resnet8_huge-kd-T4-s0"]["error"]
    assert not (out / "students/resnet8-from-resnet8_huge-kd-T4-s0").exists()
    result = json.loads((out / "students/resnet8-from-resnet8_plain-kd-T4-s0/result.json").read_text())
    assert result["teacher_model"] == "resnet8" and result["kd_method"] == "kd" and result["temperature"] == 4
    assert (out / "study.yaml").read_text() == path.read_text()
    assert (out / "report.md").exists() and (out / "results.csv").exists()


def test_running_again_skips_finished_runs_and_retries_failed_ones(finished_study):
    path, out, _ = finished_study
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/result.json")}
    ex = InlineExecutor(execute=False)
    outcome = run_study(load_study(path), out, ex, progress=False, echo=lambda *_: None)
    assert ex.submitted == ["teachers/resnet8_huge-s0", "students/resnet8-from-resnet8_missing-kd-T4-s0"]
    assert outcome.counts["done"] == 3 and outcome.counts["blocked"] == 1
    assert {p: p.stat().st_mtime_ns for p in out.glob("**/result.json")} == stamps


def test_an_interrupted_run_is_resumed_and_a_changed_recipe_is_refused(finished_study, tmp_path):
    path, out, _ = finished_study
    run = out / "students/resnet8-alone-s0"
    before = json.loads((run / "result.json").read_text())
    metrics = (run / "metrics.jsonl").read_text()
    (run / "result.json").unlink()  # as if killed after its last checkpoint
    changed = _write_study(tmp_path / "changed.yaml", Path(yaml.safe_load(path.read_text())["defaults"]["data_dir"]),
                           students=[{"teachers": "plain", "models": "resnet8", "methods": "alone",
                                      "recipe": {"epochs": 2}}])
    ex = InlineExecutor(execute=False)
    outcome = run_study(load_study(changed), out, ex, progress=False, echo=lambda *_: None)
    assert "students/resnet8-alone-s0" not in ex.submitted
    assert "other settings (epochs: 1 -> 2)" in outcome.failed["students/resnet8-alone-s0"]

    ex = InlineExecutor()
    outcome = run_study(load_study(path), out, ex, progress=False, echo=lambda *_: None)
    assert "students/resnet8-alone-s0" in ex.submitted and outcome.counts["done"] == 3
    after = json.loads((run / "result.json").read_text())
    assert after["top1"] == before["top1"]  # resumed from the final checkpoint: nothing retrained
    assert (run / "metrics.jsonl").read_text() == metrics


def test_ctrl_c_stops_the_workers_and_leaves_a_resumable_folder(tmp_path, cifar10_dir):
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump({
        "name": "slow", "defaults": {"dataset": "cifar10", "data_dir": str(cifar10_dir), "epochs": 1,
                                     "batch_size": 32, "eval_batch_size": 80, "device": "cpu"},
        "teachers": [{"name": "plain", "models": "resnet8"}],
        "students": [{"teachers": "plain", "models": "resnet8", "methods": ["kd"]},
                     {"models": "resnet8", "methods": "alone", "recipe": {"epochs": 500}}]}))
    study, out = load_study(path), tmp_path / "out"
    ex = LocalExecutor(workers=2, use_gpu=False)

    workers = []

    def ctrl_c_after_the_teacher(line):
        if line.startswith("done") and "teachers/" in line:
            workers.extend(p for p in ex._procs if p is not None)
            raise KeyboardInterrupt

    outcome = run_study(study, out, ex, progress=False, echo=ctrl_c_after_the_teacher)
    assert outcome.interrupted
    assert len(workers) == 2 and not any(p.is_alive() for p in workers)  # the alone run was killed mid-training
    state = json.loads((out / "study-state.json").read_text())
    assert state["interrupted"] is True
    assert {k: v["status"] for k, v in state["runs"].items()} == {
        "teachers/resnet8_plain-s0": "done", "students/resnet8-from-resnet8_plain-kd-T4-s0": "pending",
        "students/resnet8-alone-s0": "pending"}
    assert not (out / "students/resnet8-alone-s0/result.json").exists()
    assert not (out / ".study.lock").exists()
    again = InlineExecutor(execute=False)
    run_study(study, out, again, progress=False, echo=lambda *_: None)
    assert sorted(again.submitted) == ["students/resnet8-alone-s0", "students/resnet8-from-resnet8_plain-kd-T4-s0"]


def test_demo_runs_the_quickstart_study_and_says_where_the_report_is(tmp_path, cifar10_dir, monkeypatch, capsys):
    import mixkd.demo

    assert mixkd.demo.QUICKSTART == ROOT / "configs/studies/quickstart.yaml"
    tiny = tmp_path / "quickstart.yaml"  # the same pipeline on a study small enough for a test
    tiny.write_text(yaml.safe_dump({
        "name": "quickstart", "defaults": {"dataset": "cifar10", "data_dir": str(cifar10_dir), "epochs": 3,
                                           "batch_size": 32, "eval_batch_size": 80, "device": "cpu"},
        "teachers": [{"name": "plain", "models": "resnet8"}],
        "students": [{"teachers": "plain", "models": "resnet8", "methods": ["alone", "kd"]}]}))
    monkeypatch.setattr(mixkd.demo, "QUICKSTART", tiny)
    out = tmp_path / "demo"
    rows = mixkd.demo.run_demo(out, epochs=1, workers=1)
    printed = capsys.readouterr().out
    assert f"report (table and figures): {out / 'report.md'}" in printed
    assert "| resnet8 (plain) → resnet8 |" in printed
    # the claims last, short: each part's verdict (the comparisons are in report.md), why one run a side is
    # inconclusive in words, with the difference, and the schedule's line
    claims = printed.split("claims (each comparison, with its interval: report.md, claims.json):\n")[1]
    assert "\n  KD > student alone: inconclusive (1 comparison)\n" in claims and "n = 1 vs 1" not in claims
    why = claims.rstrip().splitlines()[-2]
    assert why.startswith("why inconclusive: this comparison has a side that measures no spread (one run, or runs "
                          "all equal), so no interval can be drawn") and "(KD T=4 > student alone: " in why, why
    assert claims.rstrip().splitlines()[-1].startswith("schedule: 1 epoch, short of the study's 240")
    assert len(rows) == 3 and {r["status"] for r in rows} == {"done"} and {r["epochs"] for r in rows} == {1}


# ---- analyses after each run ------------------------------------------------------------------

def test_a_study_with_analyses_analyzes_each_run_once_and_reports_them(tmp_path, cifar10_dir):
    """Teacher and students analyzed after their runs (a failed analysis leaves the run done and is
    retried), then the report's analysis tables, robustness curves and t-SNE montage."""
    import torch

    from mixkd.study import write_report

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = tmp_path / "a.yaml"
        path.write_text(yaml.safe_dump({
            "name": "a", "defaults": {"dataset": "cifar10", "data_dir": str(cifar10_dir), "epochs": 1,
                                      "batch_size": 32, "eval_batch_size": 80, "device": "cpu"},
            "analysis": {"subset": 32, "batch_size": 40, "tsne_pair": {"teacher": "plain", "student": "resnet8"}},
            "teachers": [{"name": "plain", "models": "resnet8"}],
            "students": [{"teachers": "plain", "models": "resnet8", "methods": ["alone", "kd", "kd_pmu"]}]}))
        study, out = load_study(path), tmp_path / "out"
        assert "analyses (mixkd analyze after the run, test images: 32): 4 runs, 0 done" in format_plan(study, out)
        kd = out / "students/resnet8-from-resnet8_plain-kd-T4-s0"
        hidden = tmp_path / "teacher.safetensors"
        lines = []

        def hide_the_teacher(line):  # the kd student's analysis then cannot load its teacher
            lines.append(line)
            if line.startswith("analyzed teachers/resnet8_plain-s0"):  # one run at a time: every run trained
                (out / "teachers/resnet8_plain-s0/checkpoint.safetensors").rename(hidden)

        ex = InlineExecutor()
        outcome = run_study(study, out, ex, progress=False, echo=hide_the_teacher)
        assert outcome.counts["done"] == 4 and ex.analyzed  # every run done, whatever its analysis did
        failed = set(outcome.analysis_failed)  # the students analyzed after their teacher's checkpoint went
        assert failed == {"students/resnet8-from-resnet8_plain-kd-T4-s0", "students/resnet8-from-resnet8_plain-kd_pmu-T4-f0.1-s0"}
        assert "teacher" in outcome.analysis_failed["students/resnet8-from-resnet8_plain-kd-T4-s0"]
        for run_id in failed:
            assert (out / run_id / "result.json").exists() and (out / run_id / "analysis-error.txt").exists()
            assert not (out / run_id / "analysis.json").exists()
        state = json.loads((out / "study-state.json").read_text())
        assert state["analyses"]["failed"] == len(failed) and state["analyses"]["done"] == 4 - len(failed)
        assert {k for k, v in state["runs"].items() if v["status"] == "done"} == {r.id for r in study.runs}
        assert any(line.startswith("ANALYSIS FAILED") for line in lines)
        text = write_report(out).read_text()
        assert "### Analyses that failed" in text

        hidden.rename(out / "teachers/resnet8_plain-s0/checkpoint.safetensors")
        stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/analysis.json")}
        ex = InlineExecutor()
        outcome = run_study(study, out, ex, progress=False, echo=lambda *_: None)
        assert ex.submitted == [] and sorted(ex.analyzed) == sorted(failed)  # only the failed analyses again
        assert outcome.analyses == {"done": 4, "running": 0, "pending": 0, "failed": 0}
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
        for run in study.runs:
            a = json.loads((out / run.id / "analysis.json").read_text())
            assert a["num_images"] == 32 and (out / run.id / "tsne.npz").exists()
            assert (a["fidelity"] is not None) == (run.method is not None and run.method.name in ("kd", "kd_pmu"))
        assert (kd / "tsne_teacher.npz").exists()
        ex = InlineExecutor()
        run_study(study, out, ex, progress=False, echo=lambda *_: None)
        assert ex.submitted == [] and ex.analyzed == []  # nothing left to do

        text = write_report(out).read_text()
        assert "## Analyses" in text and "### Analyses that failed" not in text
        assert "| teacher (plain) | 1 |" in text and "| student alone | 1 |" in text
        for title in ("ECE (%), lower is better", "entropy", "agreement (%), higher is better",
                      "PGD 8/255 (%), higher is better"):
            assert f"### {title}" in text
        assert "| resnet8 (plain) → resnet8 |" in text.split("### agreement")[1]
        for png in ("analysis-robustness.png", "analysis-tsne.png"):
            assert f"]({png})" in text and (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert ("Panels: teacher resnet8 (plain) | resnet8: student alone | resnet8: KD (T=4) | "
                "resnet8: KD + partial mixup (T=4, f=0.1)") in text
        with open(out / "results.csv") as f:
            header = f.readline().strip().split(",")
        assert {"analysis", "ece", "entropy", "agreement", "pgd_8"} <= set(header)
    finally:
        torch.set_num_threads(threads)
