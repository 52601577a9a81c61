"""The claims (mixkd.claims) on small in-memory tables: intervals pinned to hand computations, verdicts,
scope, the old failure cases of issue 18, `mixkd claims`, the report's section and the studies' plans."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from mixkd.claims import check, difference_interval, format_claims, holm
from mixkd.cli import main
from mixkd.errors import MixkdError

ROOT = Path(__file__).parent.parent
STUDIES = ROOT / "configs" / "studies"
EXAMPLE = ROOT / "examples" / "repdistiller-cifar100.csv"


def row(kd, top1, seed=0, T=4.0, mix="none", f=None, sampling=None, teacher="resnet56", tmix="mixup",
        student="resnet20", **extra):
    """One row of a results table (the columns of mixkd.results)."""
    alone = kd == "none"
    return {"teacher": "" if alone else teacher, "teacher_mix": "" if alone else tmix, "student": student, "kd": kd,
            "temperature": None if alone or kd == "std" else T, "mix": mix,
            "mix_fraction": f if f is not None else (1.0 if mix != "none" else None), "sampling": sampling,
            "seed": seed, "top1": top1, **extra}


def runs(kd, values, **kw):
    return [row(kd, v, seed=s, **kw) for s, v in enumerate(values)]


def claim(rows, number, **kw):
    return next(c for c in check(rows, **kw) if c.number == number)


PMU = {"mix": "mixup", "f": 0.1, "sampling": "exact"}
FMU = {"mix": "mixup", "f": 1.0}


# ---- the interval ----------------------------------------------------------------------------------

def test_welch_interval_matches_a_hand_computation():
    # [60, 70, 80] vs [75, 76, 77]: diff -6, se = sqrt(100/3 + 1/3) = 5.8023, Welch df = 2.0400,
    # t(0.975, 2.04) = 4.2013: [-30.502, +18.502]
    iv = difference_interval([60, 70, 80], [75, 76, 77])
    assert iv.basis == "Welch"
    assert (iv.difference, iv.se, iv.df) == pytest.approx((-6.0, 5.802298, 2.039996), abs=1e-5)
    assert (iv.low, iv.high) == pytest.approx((-30.502039, 18.502039), abs=1e-5)


def test_interval_on_skewed_data_is_welch_where_the_percentile_bootstrap_would_exclude_zero():
    # One outlying run: the percentile bootstrap (20,000 resamples) gives about [+0.01, +3.03] (excludes 0)
    # and the basic bootstrap about [-0.88, +2.14]; they differ, as they do on skewed data. Welch's interval:
    # diff 1.075, se 0.977561, df 3.0210, t(0.975, 3.021) = 3.1744: [-2.0238, +4.1738]: not decisive.
    a, b = [70.0, 70.2, 70.1, 74.0], [70.0, 70.1, 69.9]
    rng = np.random.default_rng(0)
    boot = (np.array(a)[rng.integers(0, 4, (20_000, 4))].mean(1) - np.array(b)[rng.integers(0, 3, (20_000, 3))].mean(1))
    percentile = np.percentile(boot, [2.5, 97.5])
    basic = 2 * (np.mean(a) - np.mean(b)) - percentile[::-1]
    assert percentile[0] > 0 > basic[0] and abs(percentile[1] - basic[1]) > 0.5  # the two bootstraps disagree
    iv = difference_interval(a, b)
    assert (iv.low, iv.high) == pytest.approx((-2.023846, 4.173846), abs=1e-5)
    assert iv.high - iv.difference == pytest.approx(iv.difference - iv.low)  # symmetric: no resampling noise
    rows = runs("kd", a, **PMU) + runs("kd", b, **FMU)
    assert claim(rows, 2).parts[0].verdict == "inconclusive"


def test_one_run_on_one_side_is_inconclusive_without_noise_and_takes_the_assumed_sigma_with_it():
    # issue 25, item 9: a single noisy run against three tight ones. The old rule gave the single run the tight
    # side's spread (s = 0.01, se = 0.01 sqrt(1 + 1/3), t(0.975, 2) = 4.3027: [+0.65, +0.75]: holds).
    rows = runs("kd", [70.7], **PMU) + runs("kd", [70.0, 70.01, 69.99], **FMU)
    c = claim(rows, 2).comparisons[0]
    assert c.interval.se is None and c.verdict == "inconclusive"
    assert "no spread measured (KD+PMU T=4 f=0.1: one run)" in format_claims(check(rows))
    # with --noise 0.4 the single run's side is sigma² = 0.16, the other's s²/3 = 0.0001/3: se = 0.4000417,
    # Welch-Satterthwaite df = (0.16 + 3.33e-5)² / ((3.33e-5)² / 2) = 4.61e7, t = 1.959964: 0.7 +- 0.784067
    c = claim(rows, 2, noise=0.4).comparisons[0]
    assert c.interval.basis == "Welch, sigma assumed on one side"
    assert (c.interval.se, c.interval.low, c.interval.high) == pytest.approx((0.4000417, -0.0840673, 1.4840673),
                                                                             abs=1e-6)
    assert c.verdict == "inconclusive" and c.qualifier == "assuming sigma = 0.4 for KD+PMU T=4 f=0.1 (one run)"
    # issue 18, case 3: [70.0, 70.1] vs [69.5], noise 0.4: se = sqrt(0.005/2 + 0.16) = 0.4031129, df = 4225,
    # t(0.975, 4225) = 1.960526: 0.55 +- 0.790314
    iv = difference_interval([70.0, 70.1], [69.5], noise=0.4)
    assert (iv.se, iv.df) == pytest.approx((0.4031129, 4225.0), abs=1e-6)
    assert (iv.low, iv.high) == pytest.approx((-0.2403131, 1.3403131), abs=1e-6)
    assert difference_interval([70.0, 70.1], [69.5]).basis == "unmeasured"


def test_one_run_a_side_is_inconclusive_unless_a_sigma_is_assumed_and_then_says_so():
    rows = [row("kd", 72.0, **PMU), row("kd", 70.0, **FMU)]
    c = claim(rows, 2).comparisons[0]
    assert c.interval.se is None and c.verdict == "inconclusive"
    c = claim(rows, 2, noise=0.4).comparisons[0]
    # 2 +- 1.959964 x 0.4 x sqrt(2) = 2 +- 1.108722
    assert (c.interval.low, c.interval.high) == pytest.approx((0.891278, 3.108722), abs=1e-5)
    assert c.verdict == "holds" and "assuming sigma = 0.4" in format_claims(check(rows, noise=0.4))
    with pytest.raises(MixkdError, match="noise"):
        check(rows, noise=-1)


def test_holm_adjustment_matches_a_hand_computation():
    # sorted 0.01, 0.03, 0.04 (m = 3): 3 x 0.01 = 0.03, max(0.03, 2 x 0.03) = 0.06, max(0.06, 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


# ---- the old failure cases (issue 18) --------------------------------------------------------------

def test_at_least_no_longer_holds_by_default():
    # case 1: STD 6 points worse with an interval straddling 0: not "holds"
    rows = runs("std", [60, 70, 80]) + runs("kd", [75, 76, 77])
    c = claim(rows, 3)
    assert c.parts[0].verdict == "inconclusive" and c.verdict == "inconclusive"
    # case 1: one seed a side, exact PMU 0.9 below what it is compared with: not "holds", with or without a sigma
    rows = [row("kd", 69.1, **PMU), row("kd", 70.0, **FMU)]
    for noise in (None, 0.4):
        assert claim(rows, 5, noise=noise).parts[0].verdict == "inconclusive"


def test_a_claim_with_an_untested_half_does_not_hold_and_lists_it():
    # case 2: only a plain teacher, T = 1 beating T = 4 by 0.9 (tight seeds): the plain half does not hold
    # (interval [-1.127, -0.673] below -0.5; one-sided p = 0.0040 < 0.025)
    rows = runs("kd", [69.9, 70.0, 70.1], T=4.0, tmix="none") + runs("kd", [70.8, 70.9, 71.0], T=1.0, tmix="none")
    c = claim(rows, 1)
    assert c.verdict == "does not hold"
    assert c.comparisons[0].p_against == pytest.approx(0.0040249, abs=1e-6)
    assert c.not_tested == ["Mix-T teacher: KD T=1 > KD T=4: needs KD students at T = 1 and T = 4 of a mixup teacher"]
    # the plain half holding is not enough: the Mix-T half is untested, so the claim is inconclusive
    rows = runs("kd", [70.9, 71.0, 71.1], T=4.0, tmix="none") + runs("kd", [70.8, 70.9, 71.0], T=1.0, tmix="none")
    c = claim(rows, 1)
    assert [p.verdict for p in c.parts] == ["not tested", "holds"] and c.verdict == "inconclusive"
    assert c.qualifier == "margin 0.5"


def test_margin_decides_non_inferiority():
    rows = runs("std", [69.7, 69.8, 69.9]) + runs("kd", [69.9, 70.0, 70.1])  # STD 0.2 below, se 0.0816
    assert claim(rows, 3).parts[0].verdict == "holds"  # [-0.427, +0.027] above -0.5
    assert claim(rows, 3, margin=0.0).parts[0].verdict == "inconclusive"  # straddles 0
    assert claim(rows, 3, margin=0.0).comparisons[0].margin == 0.0


def test_a_clear_loss_does_not_hold_after_holm_and_a_clear_win_holds():
    alone = runs("none", [65.0, 65.2, 64.8])
    rows = alone + runs("kd", [70.0, 70.2, 69.8]) + runs("kd", [60.0, 60.2, 59.8], **FMU)
    c = claim(rows, 4)
    assert [x.verdict for x in c.comparisons] == ["holds", "does not hold"] and c.verdict == "does not hold"
    assert c.comparisons[1].p_against_holm == pytest.approx(2 * c.comparisons[1].p_against)


# ---- scope --------------------------------------------------------------------------------------------

def test_claim_2_is_the_studys_fraction_per_kd_method_and_a_90_percent_partial_mixup_does_not_sink_it():
    rows = runs("kd", [72.0, 72.1, 71.9], **PMU) + runs("kd", [70.0, 70.1, 69.9], **FMU)
    rows += runs("kd", [60.0, 60.1, 59.9], mix="mixup", f=0.9, sampling="exact")
    rows += runs("dkd", [72.0, 72.1, 71.9], **PMU) + runs("dkd", [70.0, 70.1, 69.9], **FMU)
    c = claim(rows, 2)
    assert [(p.name, p.verdict) for p in c.parts] == [("KD: PMU > FMU", "holds"), ("DKD: PMU > FMU", "holds")]
    assert c.verdict == "holds"
    c4 = claim(rows + runs("none", [65.0, 65.1, 64.9]), 4)  # every method present gets its part
    assert [p.name for p in c4.parts] == ["KD > student alone", "DKD > student alone"]


def test_claim_3_compares_std_pmu_with_every_other_column_t1_included():
    rows = runs("std", [70.0, 70.1, 69.9]) + runs("kd", [70.0, 70.1, 69.9])
    rows += runs("std", [72.0, 72.1, 71.9], **PMU) + runs("kd", [75.0, 75.1, 74.9], T=1.0)
    c = claim(rows, 3)
    statements = [x.statement for x in c.parts[1].comparisons]
    assert "STD+PMU f=0.1 ≥ KD T=1" in statements and len(statements) == 3
    assert c.verdict == "does not hold"


def test_reference_only_pmu_is_said_not_dropped_silently():
    rows = runs("kd", [72.0, 72.1], mix="mixup", f=0.1, sampling="reference") + runs("kd", [70.0, 70.1], **FMU)
    c = claim(rows, 2)
    assert c.verdict == "not tested"
    assert any("has no sampling exact twin" in n for n in c.notes)
    assert claim(rows, 5).parts[1].comparisons  # claim 5 uses it


def test_runs_of_other_settings_are_never_pooled():
    rows = runs("kd", [70.0, 70.1], epochs=10, **PMU) + runs("kd", [75.0, 75.1], epochs=20, **PMU)
    rows += runs("kd", [69.0, 69.1], epochs=10, **FMU)
    c = claim(rows, 2)
    assert len(c.comparisons) == 1 and c.comparisons[0].a.values == [70.0, 70.1]
    assert any("differ in epochs" in n for n in c.notes)


def test_check_takes_a_dataframe_like_object_and_names_bad_input():
    class Frame:  # duck-typed pandas.DataFrame
        columns = ["teacher"]

        def to_dict(self, orient):
            assert orient == "records"
            return runs("kd", [72.0, 72.1], **PMU) + runs("kd", [70.0, 70.1], **FMU)

    assert claim(Frame(), 2).comparisons[0].a.n == 2
    with pytest.raises(MixkdError, match="lacks the column top1"):
        check([{k: v for k, v in row("kd", 70.0).items() if k != "top1"}])
    with pytest.raises(MixkdError, match="row 1, column 'mix': 'mixdown'"):
        check([row("kd", 70.0, mix="mixdown")])


# ---- mixkd claims ---------------------------------------------------------------------------------------

def test_claims_command_on_the_repdistiller_example(tmp_path, capsys):
    out = tmp_path / "claims.json"
    assert main(["claims", str(EXAMPLE), "--noise", "0.4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    # resnet56 -> resnet20: KD 70.66 vs alone 69.06: +1.60 +- 1.10872; resnet32x4 -> resnet8x4 +0.83: inconclusive
    assert "resnet56 (plain) → resnet20: KD T=4 > student alone: +1.60 points, 95% interval [+0.49, +2.71]" in text
    assert "resnet32x4 (plain) → resnet8x4: KD T=4 > student alone: +0.83 points" in text
    data = json.loads(out.read_text())
    assert [c["verdict"] for c in data["claims"]] == ["not tested", "not tested", "not tested", "inconclusive",
                                                      "not tested"]
    assert data["noise"] == 0.4 and data["verdicts"] == ["holds", "does not hold", "inconclusive", "not tested"]
    assert sum(c["verdict"] == "holds" for c in data["claims"][3]["comparisons"]) == 12


def test_claims_command_says_what_is_wrong_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row("kd", 70.0)))
        writer.writeheader()
        writer.writerow(row("kd", 70.0))
        writer.writerow(row("kd", "seventy"))
    assert main(["claims", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mixkd: error: {bad}, line 3, column 'top1': 'seventy' is not a number"
    missing = tmp_path / "missing.csv"
    missing.write_text("teacher,student\nresnet56,resnet20\n")
    assert main(["claims", str(missing)]) == 2
    assert "lacks the columns teacher_mix, kd, temperature" in capsys.readouterr().err


# ---- the report and the studies ------------------------------------------------------------------------

def _run_dir(out, run_id, cfg, top1):
    d = out / run_id
    d.mkdir(parents=True)
    tree = {"task": "train", "dataset": "digits", "epochs": 2, "batch_size": 16, "seed": 0, "optim": {"lr": 0.1},
            "mix": {"method": "none", "alpha": 1.0, "fraction": 1.0, "sampling": "exact"},
            "kd": {"teacher": None, "method": "kd", "temperature": 4.0}, **cfg}
    (d / "config.yaml").write_text(yaml.safe_dump(tree))
    (d / "result.json").write_text(json.dumps({"top1": top1, "best_top1": top1, "images_per_s": 500.0,
                                               "wall_seconds": 3.0, "device": "cpu", "teacher_model": "resnet14"}))


def test_report_has_the_claims_section_and_claims_json_with_the_study_files_sigma(tmp_path):
    from mixkd.study import write_report
    from mixkd.study.report import claims_text

    out = tmp_path / "quickstart"
    for mix in ("plain", "mixup"):
        _run_dir(out, f"teachers/resnet14_{mix}-s0", {"model": "resnet14", "mix": {"method": "none" if mix == "plain"
                                                                                    else "mixup"}}, 90.0)
    for seed in (0, 1):
        _run_dir(out, f"students/resnet8-alone-s{seed}", {"model": "resnet8", "seed": seed}, 80.0 + seed)
    for mix in ("plain", "mixup"):
        for temp in (1.0, 4.0):
            cfg = {"task": "distill", "model": "resnet8",
                   "kd": {"teacher": f"/old/place/teachers/resnet14_{mix}-s0", "method": "kd", "temperature": temp}}
            _run_dir(out, f"students/resnet8-from-resnet14_{mix}-kd-T{temp:g}-s0", cfg, 84.0 + temp / 10)
    (out / "study.yaml").write_text("name: quickstart\nclaims: {noise: 0.5}\n")
    text = write_report(out).read_text()
    section = text.split("## Claims")[1].split("\n## ")[0]
    assert "**inconclusive** (margin 0.5, assuming sigma = 0.5 where runs measure no spread)" in section
    assert "2 epochs, short of the study's 240" in section
    # KD T=1 84.1 vs T=4 84.4 from the mixup teacher, one run a side: -0.3 +- 1.959964 x 0.5 x sqrt(2)
    assert ("| 1 | resnet14 (mixup) → resnet8 | KD T=1 > KD T=4 | 84.10 (n=1) | 84.40 (n=1) | -0.30 | [-1.69, +1.09] "
            "| assumed sigma | inconclusive (assuming sigma = 0.5 for both sides (one run each)) |") in section
    # KD 84.4 (n=1) vs alone 80, 81 (n=2): the single run's side sigma² = 0.25, the alone side's s²/2 = 0.25;
    # se = sqrt(0.5), df = 0.5² / (0.25² / 1) = 4, t(0.975, 4) = 2.776445
    data = json.loads((out / "claims.json").read_text())
    c4 = next(c for c in data["claims"] if c["claim"] == 4)
    kd4 = next(c for c in c4["comparisons"] if c["a"]["label"] == "KD T=4" and "mixup" in c["teacher"])
    assert kd4["basis"] == "Welch, sigma assumed on one side" and kd4["b"]["values"] == [80.0, 81.0]
    assert kd4["interval_95"] == pytest.approx([3.9 - 2.776445 * math.sqrt(0.5), 3.9 + 2.776445 * math.sqrt(0.5)],
                                               abs=1e-5)
    assert kd4["no_spread"] == {"a": "one run"} and kd4["df"] == pytest.approx(4.0)
    assert data["noise"] == 0.5 and [c["claim"] for c in data["claims"]] == [1, 2, 3, 4, 5]
    # the finished students as a results table: mixkd claims reads it back to the same verdicts
    assert main(["claims", str(out / "claims-table.csv"), "--noise", "0.5", "--json", str(tmp_path / "c.json")]) == 0
    again = json.loads((tmp_path / "c.json").read_text())
    assert [c["verdict"] for c in again["claims"]] == [c["verdict"] for c in data["claims"]]
    assert [c["interval_95"] for c in again["claims"][3]["comparisons"]] == [
        c["interval_95"] for c in c4["comparisons"]]
    printed = claims_text(out)
    assert printed.startswith("claims (details: report.md, claims.json):\nmetric: student top-1 at the last epoch "
                              "(%)\nclaim 1: inconclusive")
    assert "handicaps standardized KD" in printed or "handicap standardized KD" in printed


def test_the_cifar100_studies_decide_every_claim(tmp_path, capsys):
    from mixkd.study import load_study
    from mixkd.study.report import claims_plan

    mini = load_study(STUDIES / "cifar100-mini.yaml")
    full = load_study(STUDIES / "cifar100-resnet56-resnet20.yaml")
    # 2 teachers + 1 alone + 2 x (7 + 2 -ref + 2 at 41%); 2 + 3 + 2 x 11 x 3
    assert (len(mini.runs), len(full.runs)) == (25, 71)
    ids = {r.id for r in mini.runs}
    for teacher in ("plain", "mixup"):
        assert {f"students/resnet20-from-resnet56_{teacher}-{m}-s0" for m in
                ("kd-T1", "kd-T4", "kd_fmu-T4", "kd_pmu-T4-f0.1", "std", "std_fmu", "std_pmu-f0.1",
                 "kd_pmu-T4-f0.1-ref", "std_pmu-f0.1-ref", "kd_pmu-T4-f0.41", "std_pmu-f0.41")} <= ids
    for path, smallest in (("cifar100-mini.yaml", "1.58"), ("cifar100-resnet56-resnet20.yaml", "1.21")):
        assert main(["study", "plan", str(STUDIES / path), "--out", str(tmp_path / path), "--pack", "8"]) == 0
        lines = capsys.readouterr().out.split("\nclaims (")[1].splitlines()
        # 1 vs 1 assuming sigma 0.4: (1.96 + 0.8416) x 0.4 x sqrt(2) = 1.585; 3 vs 3: (2.7764 + 0.9410) x 0.4 x
        # sqrt(2/3) = 1.214
        assert [line.split(":")[1].strip() for line in lines[1:]] == ["decidable"] * 5
        assert all(f"smallest detectable difference {smallest} points per comparison" in line for line in lines[1:])
    # claim 4 of the full study: 22 comparisons, each to hold with 0.8 ** (1/22) = 0.98991: t(0.98991, 4) = 3.7365,
    # (2.7764 + 3.7365) x 0.4 x sqrt(2/3) = 2.13
    assert "22 comparisons, seeds 3 vs 3; smallest detectable difference 1.21 points per comparison, 2.13 for all 22" \
        in lines[4]
    quick = claims_plan(load_study(STUDIES / "quickstart.yaml"))  # no STD+FMU, one seed, no sigma
    assert "claim 2: cannot decide: no runs for 'STD: PMU > FMU'" in quick
    assert "claim 1: cannot decide: not tested on resnet14 (mixup) → resnet14 (missing: KD T=1)" in quick
    assert "without an assumed sigma: a single run measures no spread" in quick.splitlines()[1]
