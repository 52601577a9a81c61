"""Study files' ``samplings:`` axis (claim 5: partial mixup with mix.sampling exact and reference):
run ids, configs, validation, and claim 5 getting its comparisons from such a study. No training."""

import json

import pytest
import yaml

from mixkd.claims import check
from mixkd.errors import MixkdError
from mixkd.study import load_study
from mixkd.study.report import collect
from mixkd.study.rows import results_of
from mixkd.study.spec import expand, parse_study, saved_config_mismatch

STUDY = """\
name: sampling
defaults: {dataset: digits, epochs: 1}
teachers:
  - {name: plain, models: resnet14}
  - {name: mixup, models: resnet14, mix: {method: mixup}}
students:
  - name: methods
    teachers: [plain, mixup]
    models: resnet8
    methods: [alone, kd, kd_fmu, kd_pmu, std, std_pmu]
    fractions: 0.1
  - name: sampling
    teachers: [plain, mixup]
    models: resnet8
    methods: [kd, kd_fmu, kd_pmu, std_pmu]
    fractions: 0.1
    samplings: [exact, reference]
"""


def _expand(data, overrides=None):
    return {r.id: r for r in expand(parse_study(data, "s.yaml"), "s.yaml", overrides)}


def _sampling(run):
    return run.config_for("/study").mix.sampling


def test_a_study_file_with_both_samplings_expands_to_distinct_runs_and_claim_5_compares_them(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    study = load_study(path)
    runs = {r.id: r for r in study.runs}
    pmu = {f"students/resnet8-from-resnet14_{t}-{m}" for t in ("plain", "mixup")
           for m in ("kd_pmu-T4-f0.1", "std_pmu-f0.1")}
    # exact keeps the id it had before the axis; reference adds -ref; the axis multiplies PMU runs only, so
    # the second group's exact, KD and FMU runs are the first group's (declared twice, one run)
    assert {i for i in runs if i.endswith("-ref-s0")} == {f"{p}-ref-s0" for p in pmu}
    assert {f"{p}-s0" for p in pmu} <= set(runs)
    assert len(runs) == 2 + 1 + 2 * 5 + len(pmu)  # teachers, alone, 5 distillations per teacher, -ref
    for p in pmu:
        exact, ref = runs[f"{p}-s0"], runs[f"{p}-ref-s0"]
        assert (_sampling(exact), _sampling(ref)) == ("exact", "reference")
        assert (exact.sampling, ref.sampling) == ("exact", "reference")
        assert ref.config.mix.model_dump() == {"method": "mixup", "fraction": 0.1, "alpha": 1.0, "sampling": "reference"}
        assert exact.config.mix.model_dump() == {"method": "mixup", "fraction": 0.1, "alpha": 1.0, "sampling": "exact"}
        assert exact.group == "students[0]" and ref.group == "students[1]"
        assert exact.config.model_dump(exclude={"mix"}) == ref.config.model_dump(exclude={"mix"})
    fmu = runs["students/resnet8-from-resnet14_plain-kd_fmu-T4-s0"]
    assert fmu.sampling is None and _sampling(fmu) == "exact"
    # a saved config of an exact run made before the axis still matches its plan
    saved = runs[f"{min(pmu)}-s0"].config_for(tmp_path / "out").model_dump(mode="json")
    assert saved_config_mismatch(runs[f"{min(pmu)}-s0"], saved, tmp_path / "out") is None
    assert "mix.sampling: 'exact' -> 'reference'" in saved_config_mismatch(runs[f"{min(pmu)}-ref-s0"], saved,
                                                                            tmp_path / "out")

    # finished runs (fake results: reference sampling 1 point worse) give claim 5's reference part one
    # comparison with FMU per teacher (KD+PMU: the study has KD+FMU, not STD+FMU)
    out = tmp_path / "out"
    for i, run in enumerate(study.runs):
        d = out / run.id
        d.mkdir(parents=True)
        cfg = run.config_for(out).model_dump(mode="json")
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        top1 = 70.0 - (1.0 if run.sampling == "reference" else 0.0) + 0.01 * i
        (d / "result.json").write_text(json.dumps({"top1": top1, "teacher_model": run.teacher_model}))
    claim5 = next(c for c in check(results_of(collect(out))) if c.number == 5)
    ref = next(p for p in claim5.parts if p.name == "reference 10% > FMU")
    assert [c.statement for c in ref.comparisons] == ["KD+PMU T=4 f=0.1 (reference sampling) > KD+FMU T=4"] * 2
    assert sorted(run for c in ref.comparisons for run in c.a.runs) == sorted(f"{p}-ref-s0" for p in pmu
                                                                              if "kd_pmu" in p)
    assert claim5.verdict == "inconclusive"  # one run a side, no assumed sigma


def test_the_sampling_of_a_recipe_or_set_names_the_same_run_as_the_axis():
    group = {"teachers": "t", "models": "resnet8", "methods": "kd_pmu"}
    data = {"name": "s", "defaults": {"dataset": "digits"}, "teachers": [{"name": "t", "models": "resnet14"}],
            "students": [{**group, "recipe": {"mix": {"sampling": "reference"}}},
                         {**group, "samplings": ["reference", "exact"]}]}
    runs = _expand(data)
    assert list(runs)[1:] == ["students/resnet8-from-resnet14_t-kd_pmu-T4-f0.1-ref-s0",
                              "students/resnet8-from-resnet14_t-kd_pmu-T4-f0.1-s0"]
    # defaults reference, the axis exact: the axis wins, written into the config
    data = {**data, "defaults": {"dataset": "digits", "mix": {"sampling": "reference"}},
            "students": [{**group, "samplings": "exact"}]}
    run = _expand(data)["students/resnet8-from-resnet14_t-kd_pmu-T4-f0.1-s0"]
    assert run.config.mix.sampling == "exact"
    # --set mix.sampling without the axis: every PMU run takes it, and its id says so
    data = {**data, "defaults": {"dataset": "digits"}, "students": [group]}
    assert list(_expand(data, ["mix.sampling=reference"]))[1:] == [
        "students/resnet8-from-resnet14_t-kd_pmu-T4-f0.1-ref-s0"]


@pytest.mark.parametrize("group, overrides, message", [
    ({"samplings": ["exakt"]}, None, "students[0].samplings[0]: Input should be 'exact' or 'reference' (got 'exakt')"),
    ({"samplings": []}, None, "students[0].samplings: Value should have at least 1 item after validation, not 0"),
    ({"samplings": "reference", "recipe": {"mix": {"sampling": "exact"}}}, None,
     "students[0].recipe.mix.sampling: set by this group's samplings:; remove one of the two"),
    ({"samplings": ["exact", "reference"]}, ["mix.sampling=reference"],
     "--set mix.sampling: set by the study grid (students[0].samplings:)"),
])
def test_bad_samplings_give_one_clear_error(group, overrides, message):
    data = {"name": "s", "defaults": {"dataset": "digits"}, "teachers": [{"name": "t", "models": "resnet14"}],
            "students": [{"teachers": "t", "models": "resnet8", "methods": "kd_pmu", **group}]}
    with pytest.raises(MixkdError) as err:
        expand(parse_study(data, "s.yaml"), "s.yaml", overrides)
    assert str(err.value).endswith(message)


def test_the_report_gives_reference_sampling_its_own_columns_and_claims_2_and_3_leave_them_out(tmp_path):
    from mixkd.study import write_report

    path = tmp_path / "study.yaml"
    path.write_text(STUDY.replace("    fractions: 0.1\n", "    fractions: 0.1\n    seeds: [0, 1]\n"))
    out = tmp_path / "out"
    base = {"alone": 60.0, "kd": 66.0, "kd_fmu": 68.0, "kd_pmu": 70.0, "std": 67.0, "std_pmu": 72.0}
    for run in load_study(path).runs:  # fake results: reference sampling 5 points below exact, seeds +-1
        d = out / run.id
        d.mkdir(parents=True)
        cfg = run.config_for(out).model_dump(mode="json")
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        top1 = 90.0 if run.role == "teacher" else (base[run.method.name] - 5.0 * (run.sampling == "reference")
                                                   + 2 * run.seed - 1)
        (d / "result.json").write_text(json.dumps({"top1": top1, "teacher_model": run.teacher_model}))
    text = write_report(out).read_text()
    section = text.split("## Teacher → student")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")][3:]
    assert header == ["KD T=4", "KD+FMU T=4", "KD+PMU T=4 f=0.1", "KD+PMU T=4 f=0.1 (reference sampling)", "STD",
                      "STD+PMU f=0.1", "STD+PMU f=0.1 (reference sampling)"]
    for line in table[1:]:  # one row per teacher: the exact and reference runs' own means, never pooled
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")[3:]), strict=True))
        assert cells["KD+PMU T=4 f=0.1"] == "70.00 ± 1.41"
        assert cells["KD+PMU T=4 f=0.1 (reference sampling)"] == "65.00 ± 1.41"
        assert cells["STD+PMU f=0.1"] == "**72.00 ± 1.41**"
        assert cells["STD+PMU f=0.1 (reference sampling)"] == "67.00 ± 1.41"
    assert len(table) == 3 and "67.50" not in text
    claims = {c["claim"]: c for c in json.loads((out / "claims.json").read_text())["claims"]}
    # claim 2 and the A side of claim 3 use exact PMU only; claim 3 compares STD+PMU with every other column
    runs = [r for c in claims[2]["comparisons"] for side in ("a", "b") for r in c[side]["runs"]]
    assert runs and not [r for r in runs if "-ref-" in r]
    assert not [r for c in claims[3]["comparisons"] for r in c["a"]["runs"] if "-ref-" in r]
    assert "sampling exact" in claims[2]["text"]
    # claim 2 under KD (the study has no STD+FMU): KD+PMU 70 vs KD+FMU 68, 2 seeds a side (69, 71 vs 67, 69)
    assert len(claims[2]["comparisons"]) == 2 and claims[2]["verdict"] == "inconclusive"
    assert [p["verdict"] for p in claims[2]["parts"]] == ["inconclusive", "not tested"]
    # Welch: se = sqrt(2/2 + 2/2), df = 2, t(0.975, 2) = 4.3027
    assert claims[2]["comparisons"][0]["interval_95"] == pytest.approx([2 - 4.3027 * 2 ** 0.5, 2 + 4.3027 * 2 ** 0.5],
                                                                       abs=1e-3)
    assert len(claims[3]["comparisons"]) == 2 * (1 + 6)  # STD >= KD T=4; STD+PMU vs the 6 other distilled columns
    # claim 5: exact and reference PMU each against FMU, per teacher; no exact PMU at the reference's share
    # and the direct comparison of the two samplings (issue 25 item 11), which needs no FMU column: under KD
    # and STD, per teacher
    assert [(c["part"], c["a"]["runs"][0].endswith("-ref-s0")) for c in claims[5]["comparisons"]] == [
        ("exact 10% > FMU", False)] * 2 + [("reference 10% > FMU", True)] * 2 + [("reference 10% vs exact 10%", True)] * 4
    assert [p["verdict"] for p in claims[5]["parts"]][2] == "not tested"
