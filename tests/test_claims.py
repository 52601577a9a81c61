"""The study's claims on synthetic result rows: verdicts, the bootstrap interval, and the report's section."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mixkd.study import write_report
from mixkd.study.claims import NOISE_FLOOR, SINGLE_SEED_FLOOR, bootstrap_interval, evaluate_claims

MIXT, PLAIN = ("resnet56", "mixup"), ("resnet56", "plain")
STUDIES = Path(__file__).parent.parent / "configs" / "studies"


def _student(method, top1, seed=0, teacher=MIXT, model="resnet20", temperature=4.0, fraction=0.1,
             sampling="exact"):
    """A result row as mixkd.study.report.collect makes it (only the columns the claims read)."""
    kd, _, mixing = method.partition("_")
    mix = {"": "none", "fmu": "mixup", "pmu": "mixup"}[mixing]
    return {"id": f"students/{model}-from-{teacher[0]}_{teacher[1]}-{method}-T{temperature:g}-s{seed}",
            "role": "student", "status": "done", "model": model, "method": method, "seed": seed,
            "teacher": f"teachers/{teacher[0]}_{teacher[1]}-s0", "teacher_model": teacher[0], "teacher_mix": teacher[1],
            "temperature": temperature if kd == "kd" else None, "mix_method": mix,
            "mix_fraction": {"": 0.0, "fmu": 1.0, "pmu": fraction}[mixing],
            "mix_alpha": None if mix == "none" else 1.0, "mix_sampling": None if mix == "none" else sampling,
            "top1": top1}


def _alone(top1, seed=0, model="resnet20"):
    return {"id": f"students/{model}-alone-s{seed}", "role": "student", "status": "done", "model": model,
            "method": "alone", "seed": seed, "teacher": None, "teacher_model": None, "teacher_mix": None,
            "temperature": None, "mix_method": "none", "mix_fraction": 0.0, "mix_alpha": None, "mix_sampling": None,
            "top1": top1}


def _claim(rows, number):
    return next(c for c in evaluate_claims(rows) if c.number == number)


def test_a_clear_win_holds_with_a_bootstrap_interval_above_zero():
    rows = [_student("kd_pmu", v, s) for s, v in enumerate([72.0, 72.6, 73.1])]
    rows += [_student("kd_fmu", v, s) for s, v in enumerate([68.2, 68.9, 69.4])]
    claim = _claim(rows, 2)
    assert claim.verdict == "holds" and len(claim.comparisons) == 1
    cmp = claim.comparisons[0]
    assert cmp.statement == "KD+PMU T=4 f=0.1 > KD+FMU T=4" and cmp.rule == "bootstrap"
    assert cmp.difference == pytest.approx(72.5666667 - 68.8333333)
    assert 0 < cmp.interval[0] < cmp.difference < cmp.interval[1]
    assert cmp.a.runs == [f"students/resnet20-from-resnet56_mixup-kd_pmu-T4-s{s}" for s in range(3)]


def test_a_clear_loss_does_not_hold_and_one_loss_sinks_the_claim():
    rows = [_alone(70.0, s) for s in range(2)]
    rows += [_student("kd", 72.0, s) for s in range(2)]  # KD beats alone by 2 points
    rows += [_student("kd_fmu", 67.0, s) for s in range(2)]  # FMU loses by 3
    claim = _claim(rows, 4)
    assert [c.verdict for c in claim.comparisons] == ["holds", "does not hold"]
    assert claim.verdict == "does not hold" and claim.counts() == {"holds": 1, "does not hold": 1, "inconclusive": 0}
    assert [c.rule for c in claim.comparisons] == ["noise", "noise"]  # two seeds: no bootstrap


def test_a_difference_inside_the_noise_is_inconclusive_and_at_least_holds():
    # one seed a side: no spread is measured, the single-seed floor decides (0.8 points is not enough)
    rows = [_student("kd", 70.8, temperature=1.0), _student("kd", 70.0, temperature=4.0)]
    claim = _claim(rows, 1)
    assert claim.verdict == "inconclusive" and claim.comparisons[0].noise == SINGLE_SEED_FLOOR
    assert claim.comparisons[0].rule == "single seed"
    rows = [_student("kd", 71.5, temperature=1.0), _student("kd", 70.0, temperature=4.0)]
    assert _claim(rows, 1).comparisons[0].verdict == "holds"
    # two seeds on one side: the pooled spread with the noise floor under it
    rows = [_student("kd", v, s, temperature=1.0) for s, v in enumerate([70.1, 70.3])]
    rows += [_student("kd", 70.0, temperature=4.0)]
    cmp = _claim(rows, 1).comparisons[0]
    assert cmp.rule == "noise" and cmp.noise == NOISE_FLOOR and cmp.verdict == "inconclusive"
    # a larger difference, still inside a wide seed spread (pooled std sqrt(8) = 2.83 > 1.0)
    rows = [_student("kd", v, s, temperature=1.0) for s, v in enumerate([69.0, 73.0])]
    rows += [_student("kd", v, s, temperature=4.0) for s, v in enumerate([68.0, 72.0])]
    cmp = _claim(rows, 1).comparisons[0]
    assert cmp.difference == pytest.approx(1.0) and cmp.noise == pytest.approx(8 ** 0.5)
    assert cmp.verdict == "inconclusive"
    # three seeds: the bootstrap interval straddles 0
    rows = [_student("kd_pmu", v, s) for s, v in enumerate([70.0, 71.5, 73.0])]
    rows += [_student("kd_fmu", v, s) for s, v in enumerate([70.5, 71.0, 72.0])]
    cmp = _claim(rows, 2).comparisons[0]
    assert cmp.rule == "bootstrap" and cmp.interval[0] < 0 < cmp.interval[1] and cmp.verdict == "inconclusive"
    # "at least as well": STD 0.8 below KD (one seed each) is not decisively worse -> holds; 2 points below -> not
    for std, verdict in ((69.2, "holds"), (68.0, "does not hold")):
        rows = [_student("std", std), _student("kd", 70.0)]
        part = [c for c in _claim(rows, 3).comparisons if c.part == "STD ≥ KD at T = 4"]
        assert [c.verdict for c in part] == [verdict]


def test_missing_comparisons_are_not_tested_with_what_they_need():
    rows = [_student("kd", 71.0, teacher=MIXT), _student("kd", 70.0, teacher=PLAIN),
            _student("kd", 68.0, teacher=MIXT, temperature=1.0), {**_student("kd", 99.0, teacher=PLAIN, temperature=1.0),
                                                                 "status": "started", "top1": None}]
    claims = {c.number: c for c in evaluate_claims(rows)}
    assert claims[1].verdict == "does not hold"  # Mix-T: T=1 (68) below T=4 (71)
    assert claims[1].not_tested == ["plain teacher: T = 4 ≥ T = 1: needs KD students at T = 1 and T = 4 of a plain "
                                    "teacher"]  # its T=1 run did not finish
    for number in (2, 3, 4, 5):
        assert claims[number].verdict == "not tested" and not claims[number].comparisons
        assert claims[number].not_tested and all(": needs " in m for m in claims[number].not_tested)


def test_sub_comparisons_pair_within_teacher_and_student():
    rows = []
    for teacher in (MIXT, PLAIN):
        for model, shift in (("resnet20", 0.0), ("resnet32", 5.0)):
            rows += [_student("std_pmu", 73.0 + shift, teacher=teacher, model=model),
                     _student("kd", 70.0 + shift, teacher=teacher, model=model),
                     _student("kd", 60.0, teacher=teacher, model=model, temperature=1.0),  # T=1: not in claim 3
                     _student("std", 71.0 + shift, teacher=teacher, model=model)]
    rows.append(_alone(65.0, model="resnet20"))
    claims = {c.number: c for c in evaluate_claims(rows)}
    best = [c for c in claims[3].comparisons if c.part == "STD+PMU best at T = 4"]
    assert len(best) == 8 and all(c.verdict == "holds" and c.difference in (3.0, 2.0) for c in best)
    assert [(c.teacher, c.student) for c in best[::2]] == [("resnet56 (plain)", "resnet20"), ("resnet56 (plain)", "resnet32"),
                                                           ("resnet56 (mixup)", "resnet20"), ("resnet56 (mixup)", "resnet32")]
    assert claims[3].verdict == "holds"
    # claim 4: the resnet20 rows only (no resnet32 alone), every distilled column of each teacher
    assert {(c.teacher, c.student) for c in claims[4].comparisons} == {("resnet56 (plain)", "resnet20"),
                                                                        ("resnet56 (mixup)", "resnet20")}
    assert len(claims[4].comparisons) == 8 and claims[4].verdict == "does not hold"  # KD T=1 (60) < alone (65)


def test_claim_5_compares_exact_with_reference_sampling():
    rows = [_student("kd_pmu", 72.0, sampling="exact"), _student("kd_pmu", 70.0, sampling="reference"),
            _student("kd_fmu", 69.0)]
    claims = {c.number: c for c in evaluate_claims(rows)}
    assert [c.statement for c in claims[5].comparisons] == ["KD+PMU T=4 f=0.1 ≥ KD+PMU T=4 f=0.1 (reference sampling)"]
    assert claims[5].verdict == "holds"
    # both samplings in the folder: claim 2 compares the exact (the paper's 10%) PMU with FMU only
    assert [c.statement for c in claims[2].comparisons] == ["KD+PMU T=4 f=0.1 > KD+FMU T=4"]


def test_claims_2_and_3_leave_reference_sampling_out_when_the_folder_has_both():
    rows = [_student(m, v + 2 * s - 1, s, teacher=t, sampling=sampling) for t in (MIXT, PLAIN) for s in (0, 1)
            for m, v, sampling in (("kd", 66.0, "exact"), ("kd_fmu", 68.0, "exact"), ("std", 67.0, "exact"),
                                   ("kd_pmu", 70.0, "exact"), ("kd_pmu", 65.0, "reference"),
                                   ("std_pmu", 72.0, "exact"), ("std_pmu", 60.0, "reference"))]
    claims = {c.number: c for c in evaluate_claims(rows)}
    for number in (2, 3):
        assert "only sampling: exact runs count here" in claims[number].text
        sides = [side for c in claims[number].comparisons for side in (c.a, c.b)]
        assert sides and not [s.label for s in sides if "reference" in s.label]
    assert [c.statement for c in claims[2].comparisons] == ["KD+PMU T=4 f=0.1 > KD+FMU T=4"] * 2
    assert claims[2].verdict == "holds"  # 70 vs 68; reference (65) would lose
    best = [c for c in claims[3].comparisons if c.part == "STD+PMU best at T = 4"]
    assert sorted(c.b.label for c in best) == sorted(["KD T=4", "KD+FMU T=4", "KD+PMU T=4 f=0.1", "STD"] * 2)
    assert len(claims[3].comparisons) == 10 and claims[3].verdict == "holds"  # STD+PMU ref (60) would lose
    assert len(claims[5].comparisons) == 4 and claims[5].verdict == "holds"  # the difference is claim 5's
    # a folder whose PMU runs all have reference sampling: claims 2 and 3 use them as they are
    rows = [r for r in rows if r["mix_sampling"] != "exact" or not r["method"].endswith("_pmu")]
    claims = {c.number: c for c in evaluate_claims(rows)}
    assert [c.statement for c in claims[2].comparisons] == ["KD+PMU T=4 f=0.1 (reference sampling) > KD+FMU T=4"] * 2
    assert claims[2].verdict == "does not hold" and claims[3].verdict == "does not hold"
    assert claims[5].verdict == "not tested"


def _exact_percentile_interval(a, b):
    """Every resample of each side enumerated (all equally likely): the 2.5% and 97.5% quantiles of the
    difference of means, as the smallest value whose cumulative share reaches the level."""
    means_a = [sum(t) / len(a) for t in itertools.product(a, repeat=len(a))]
    means_b = [sum(t) / len(b) for t in itertools.product(b, repeat=len(b))]
    diffs = sorted(round(x - y, 9) for x in means_a for y in means_b)
    n = len(diffs)
    return diffs[int(np.ceil(0.025 * n)) - 1], diffs[int(np.ceil(0.975 * n)) - 1]


def test_bootstrap_interval_matches_a_hand_computation():
    # By hand: a = 70..73 (4 seeds), b = 69 thrice. Resampling a: 4^4 = 256 equally likely tuples; their sum
    # minus 280 has counts 1, 4, 10, 20, ... (coefficients of (1+x+x^2+x^3)^4), so P(mean <= 70.25) = 5/256 =
    # 0.0195 < 0.025 < P(mean <= 70.5) = 15/256 = 0.0586: the 2.5% quantile is 70.5, and by symmetry the 97.5%
    # quantile 72.5. b's resampled mean is always 69: the interval is [1.5, 3.5].
    a, b = [70.0, 71.0, 72.0, 73.0], [69.0, 69.0, 69.0]
    assert _exact_percentile_interval(a, b) == (1.5, 3.5)
    assert bootstrap_interval(a, b) == pytest.approx((1.5, 3.5))
    assert bootstrap_interval(a, b) == bootstrap_interval(a, b)  # fixed seed: the same interval every time
    # both sides varying: the Monte Carlo interval is within one atom (1/12 point) of the exact one
    a, b = [70.0, 71.0, 72.0, 73.0], [68.0, 69.0, 70.0]
    lo, hi = _exact_percentile_interval(a, b)
    got = bootstrap_interval(a, b)
    assert got[0] == pytest.approx(lo, abs=1 / 12 + 1e-9) and got[1] == pytest.approx(hi, abs=1 / 12 + 1e-9)


# ---- the report's section, on a folder shaped like the quickstart's (digits, one seed) --------------

def _run_dir(out, run_id, cfg, top1):
    d = out / run_id
    d.mkdir(parents=True)
    tree = {"task": "train", "dataset": "digits", "epochs": 2, "batch_size": 16, "seed": 0, "optim": {"lr": 0.1},
            "mix": {"method": "none", "alpha": 1.0, "fraction": 1.0, "sampling": "exact"},
            "kd": {"teacher": None, "method": "kd", "temperature": 4.0}, **cfg}
    (d / "config.yaml").write_text(yaml.safe_dump(tree))
    (d / "result.json").write_text(json.dumps({"top1": top1, "best_top1": top1, "images_per_s": 500.0,
                                               "wall_seconds": 3.0, "device": "cpu", "teacher_model": "resnet14"}))


def test_quickstart_shaped_report_has_the_claims_section_and_claims_json(tmp_path):
    out = tmp_path / "quickstart"
    for mix in ("plain", "mixup"):
        _run_dir(out, f"teachers/resnet14_{mix}-s0", {"model": "resnet14", "mix": {"method": "none" if mix == "plain"
                                                                                    else "mixup"}}, 90.0)
    _run_dir(out, "students/resnet8-alone-s0", {"model": "resnet8"}, 80.0)
    methods = {"kd": ("kd", "none", 1.0), "kd_fmu": ("kd", "mixup", 1.0), "kd_pmu": ("kd", "mixup", 0.1),
               "std": ("std", "none", 1.0), "std_pmu": ("std", "mixup", 0.1)}
    for i, (mix, (name, (kd, mixing, fraction))) in enumerate(itertools.product(("plain", "mixup"), methods.items())):
        for temp in ((1.0, 4.0) if name == "kd" else (4.0,)):
            cfg = {"task": "distill", "model": "resnet8",
                   "mix": {"method": mixing, "alpha": 1.0, "fraction": fraction, "sampling": "exact"},
                   "kd": {"teacher": f"/old/place/teachers/resnet14_{mix}-s0", "method": kd, "temperature": temp}}
            _run_dir(out, f"students/resnet8-from-resnet14_{mix}-{name}-T{temp:g}-s0", cfg, 81.0 + 0.1 * i + temp / 10)
    (out / "study.yaml").write_text("name: quickstart\n")
    text = write_report(out).read_text()
    summary, comparisons = text.split("## Claims")[1].split("### Comparisons")
    lines = [line for line in summary.splitlines() if line.startswith("| ")][1:]  # under the header
    assert [line.split("|")[1].strip() for line in lines] == ["1", "2", "3", "4", "5"]
    assert "**not tested**" in lines[4] and "sampling: reference" in lines[4]
    # exactly the noise floor apart (81.6 vs 81.9): not decisive
    assert ("| 1 | resnet14 (mixup) → resnet8 | KD T=1 > KD T=4 | 81.60 (n=1) | 81.90 (n=1) | -0.30 | – | "
            "inconclusive |") in comparisons
    data = json.loads((out / "claims.json").read_text())
    assert data["metric"] == "top1" and [c["claim"] for c in data["claims"]] == [1, 2, 3, 4, 5]
    by_number = {c["claim"]: c for c in data["claims"]}
    assert by_number[5]["verdict"] == "not tested" and by_number[5]["comparisons"] == []
    cmp = by_number[4]["comparisons"][0]
    assert cmp["b"]["runs"] == ["students/resnet8-alone-s0"] and cmp["b"]["values"] == [80.0]
    assert cmp["verdict"] == "holds" and cmp["interval_95"] is None and cmp["rule"] == "single seed"
    assert all(c["verdict"] in ("holds", "does not hold", "inconclusive") for c in data["claims"][:4])


# ---- the CIFAR-100 claims studies and their H100 estimate ----------------------------------------------

def test_cifar100_claims_studies_expand_and_plan_shows_the_h100_estimate(tmp_path, capsys):
    from mixkd.cli import main
    from mixkd.study import format_plan, load_study

    mini = load_study(STUDIES / "cifar100-mini.yaml")
    full = load_study(STUDIES / "cifar100-resnet56-resnet20.yaml")
    assert (len(mini.runs), len(full.runs)) == (19, 53)  # 2 teachers + 1 alone + 2 x (6 + 2 -ref); 2 + 3 + 2 x 8 x 3
    assert {r.config["precision"] for r in mini.runs + full.runs} == {"bf16"}
    ids = {r.id for r in mini.runs}
    for teacher in ("plain", "mixup"):  # every claim's columns, from both teachers
        assert {f"students/resnet20-from-resnet56_{teacher}-{m}-s0" for m in
                ("kd-T1", "kd-T4", "kd_fmu-T4", "kd_pmu-T4-f0.1", "std", "std_pmu-f0.1", "kd_pmu-T4-f0.1-ref",
                 "std_pmu-f0.1-ref")} <= ids  # claim 5: PMU with reference sampling too
    text = format_plan(mini, tmp_path / "mini", pack=8)
    kd = next(line for line in text.splitlines() if "resnet56_plain-kd-T4-s0" in line)
    assert "~25 s" in kd  # 10 x 50,000 / 20,225 images/s, marked as an H100 estimate
    # packed: 2 x 8 x 10 x 50,000 / 58,105 = 138 s; teachers and alone: not measured
    packed = next(line for line in text.splitlines() if "--pack 8" in line)
    assert "2 min of training for 16 unfinished runs" in packed
    assert "unknown for 3 runs" in packed and "training resnet56" in packed and "training resnet20" in packed
    assert "one run at a time: 7 min" in text  # 16 x 24.7 s
    lines = format_plan(full, tmp_path / "full", pack=8).splitlines()
    assert "2.8 h of training for 48 unfinished runs" in lines[-1]  # 6 x 8 x 12M / 58,105 images/s
    assert main(["study", "plan", str(STUDIES / "cifar100-mini.yaml"), "--out", str(tmp_path / "m"),
                 "--pack", "0"]) == 2
    assert capsys.readouterr().err.strip() == "mixkd: error: --pack must be at least 1, got 0"
