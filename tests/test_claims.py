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
from mixkd.results import Cell

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
                                                      "not tested", "not tested"]
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

def _run_dir(out, run_id, cfg, top1, best=None):
    d = out / run_id
    d.mkdir(parents=True)
    tree = {"task": "train", "dataset": "digits", "epochs": 2, "batch_size": 16, "seed": 0, "optim": {"lr": 0.1},
            "mix": {"method": "none", "alpha": 1.0, "fraction": 1.0, "sampling": "exact"},
            "kd": {"teacher": None, "method": "kd", "temperature": 4.0}, **cfg}
    (d / "config.yaml").write_text(yaml.safe_dump(tree))
    (d / "result.json").write_text(json.dumps({"top1": top1, "best_top1": top1 if best is None else best,
                                               "images_per_s": 500.0,
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
    assert data["noise"] == 0.5 and [c["claim"] for c in data["claims"]] == [1, 2, 3, 4, 5, 6]
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
        assert [line.split(":")[1].strip() for line in lines[1:6]] == ["decidable"] * 5
        assert all(f"smallest detectable difference {smallest} points per comparison" in line for line in lines[1:6])
        assert lines[6].startswith("  claim 6: cannot decide: no runs name an augmentation policy")  # no augment:
    # claim 4 of the full study: 22 comparisons, each to hold with 0.8 ** (1/22) = 0.98991: t(0.98991, 4) = 3.7365,
    # (2.7764 + 3.7365) x 0.4 x sqrt(2/3) = 2.13
    assert "22 comparisons, seeds 3 vs 3; smallest detectable difference 1.21 points per comparison, 2.13 for all 22" \
        in lines[4]
    quick = claims_plan(load_study(STUDIES / "quickstart.yaml"))  # no STD+FMU, one seed, no sigma
    assert "claim 2: cannot decide: no runs for 'STD: PMU > FMU'" in quick
    assert "claim 1: cannot decide: not tested on resnet14 (mixup) → resnet14 (missing: KD T=1)" in quick
    assert "without an assumed sigma: a single run measures no spread" in quick.splitlines()[1]


# ---- issue 25: tables that duplicates, gaps, units and schedules cannot fool -----------------------------

def _csv(path, rows):
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_a_table_concatenated_with_itself_is_refused_in_one_line_naming_the_rows(tmp_path, capsys):
    # the case: one run a side, the table given twice, "held" at +0.10 [+0.10, +0.10]
    rows = [row("kd", 70.1, **PMU), row("kd", 70.0, **FMU)]
    table = _csv(tmp_path / "twice.csv", rows + rows)
    assert main(["claims", str(table)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"mixkd: error: {table}, line 2 and {table}, line 4 are one run twice (resnet56 (mixup) → "
                   "resnet20, KD+PMU T=4 f=0.1, seed 0): give each run once (a repeated row would count as a second "
                   "seed); runs that differ in something the table does not show need distinct ids in an 'id' column")
    # distinct ids: distinct runs of one seed (e.g. from teachers of different seeds), kept
    ided = [dict(r, id=f"run{i}") for i, r in enumerate(rows + rows)]
    assert claim(ided, 2).comparisons[0].a.n == 2


def test_tied_values_measure_no_spread_and_the_assumed_sigma_is_their_floor():
    # seeds 0 and 1 with equal values: zero spread, which made se = 0 and "holds" at +0.10 [+0.10, +0.10]
    rows = runs("kd", [70.1, 70.1], **PMU) + runs("kd", [70.0, 70.0], **FMU)
    c = claim(rows, 2).comparisons[0]
    assert c.interval.se is None and c.verdict == "inconclusive"
    assert "no spread measured (KD+PMU T=4 f=0.1: 2 runs, all equal: zero spread" in format_claims(check(rows))
    # with --noise 0.4 each tied side counts as one run of sigma 0.4: 0.1 +- 1.959964 x 0.4 x sqrt(2)
    c = claim(rows, 2, noise=0.4).comparisons[0]
    assert (c.interval.low, c.interval.high) == pytest.approx((0.1 - 1.1087231, 0.1 + 1.1087231), abs=1e-6)
    assert c.qualifier == "assuming sigma = 0.4 for both sides (2 runs, all equal: zero spread each)"
    # a tied side against a measured one: 0.16 + 0.04/3, df = (0.173333)² / ((0.013333)² / 2) = 338,
    # t(0.975, 338) = 1.967007: 2 +- 0.818930
    rows = runs("kd", [72.0, 72.0], **PMU) + runs("kd", [70.0, 70.2, 69.8], **FMU)
    iv = claim(rows, 2, noise=0.4).comparisons[0].interval
    assert (iv.df, iv.low, iv.high) == pytest.approx((338.0, 1.181070, 2.818930), abs=1e-5)
    # without seeds a repeated value cannot be told from a row given twice: counted once, and said so
    seedless = [dict(r, seed=None) for r in runs("kd", [72.0, 72.1, 72.0], **PMU)]
    c = claim(seedless + runs("kd", [70.0, 70.2, 69.8], **FMU), 2)
    assert c.comparisons[0].a.values == [72.0, 72.1]
    assert any("give 72 without a seed: counted as one run" in n for n in c.notes)


def test_every_claim_names_the_contexts_it_could_not_test_and_never_holds_over_them(tmp_path, capsys):
    # the case: resnet110 -> resnet32 KD at 60% with no resnet32-alone runs; claim 4 "held" on the rest
    rows = runs("none", [69.0, 69.1, 68.9]) + runs("kd", [71.0, 71.1, 70.9], tmix="none")
    rows += runs("kd", [60.0, 60.1, 59.9], teacher="resnet110", tmix="none", student="resnet32")
    c = claim(rows, 4)
    assert [x.verdict for x in c.comparisons] == ["holds"] and c.verdict == "inconclusive"
    assert c.scope_text() == ("tested on resnet56 (plain) → resnet20; not tested on resnet110 (plain) → resnet32 "
                              "(missing: resnet32 alone)")
    out = tmp_path / "c.json"
    assert main(["claims", str(_csv(tmp_path / "t.csv", rows)), "--json", str(out)]) == 0
    assert "  scope: tested on resnet56 (plain) → resnet20; not tested on resnet110 (plain) → resnet32 (missing: " \
           "resnet32 alone)" in capsys.readouterr().out
    scope = json.loads(out.read_text())["claims"][3]["scope"]
    assert scope == {"tested": ["resnet56 (plain) → resnet20"], "untested": [
        {"part": "KD > student alone", "context": "resnet110 (plain) → resnet32", "missing": ["resnet32 alone"]}]}
    # claim 1: a Mix-T row holding and another Mix-T row with T = 4 only: inconclusive, the missing cell named
    rows = runs("kd", [72.0, 72.1, 71.9], T=1.0) + runs("kd", [70.0, 70.1, 69.9], T=4.0)
    rows += runs("kd", [70.0, 70.1], T=4.0, student="resnet8")
    c = claim(rows + runs("kd", [70.0, 70.1, 69.9], T=4.0, tmix="none") + runs("kd", [70.0, 70.1], T=1.0, tmix="none"), 1)
    assert [p.verdict for p in c.parts] == ["inconclusive", "holds"] and c.verdict == "inconclusive"
    assert "resnet56 (mixup) → resnet8 (missing: KD T=1)" in c.scope_text()


def test_top1_given_as_fractions_is_converted_and_said_and_a_stray_fraction_is_refused(tmp_path, capsys):
    # STD 10 points below KD T=4, given as fractions: read as 0.1 points it "held" STD >= KD within margin 0.5
    rows = runs("std", [0.600, 0.601, 0.599]) + runs("kd", [0.700, 0.701, 0.699])
    c = claim(rows, 3)
    assert c.comparisons[0].a.values == pytest.approx([60.0, 60.1, 59.9])
    assert c.parts[0].verdict == "does not hold"
    assert main(["claims", str(_csv(tmp_path / "f.csv", rows))]) == 0
    assert ("note: top1 given as fractions (every value at most 1): read as top1 × 100 %"
            in capsys.readouterr().out)
    stray = runs("kd", [70.0, 70.1], **PMU) + [row("kd", 0.7, seed=1, **FMU)] + runs("kd", [69.0], **FMU)
    assert main(["claims", str(_csv(tmp_path / "s.csv", stray))]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mixkd: error: {tmp_path / 's.csv'}, line 4, column 'top1': 0.7 looks like a fraction of 1 while "
        f"{tmp_path / 's.csv'}, line 2 gives 70 in %: give every top1 in % (or every one as a fraction)")


def test_schedules_are_said_without_epochs_and_refused_under_another_name(tmp_path, capsys):
    rows = runs("kd", [72.0, 72.1], **PMU) + runs("kd", [70.0, 70.1], **FMU)
    assert main(["claims", str(_csv(tmp_path / "t.csv", rows))]) == 0
    assert "schedule: the table does not give the runs' epochs, so runs of different schedules would be pooled" in \
        capsys.readouterr().out
    named = [dict(r, num_epochs=240 if i % 2 else 30) for i, r in enumerate(rows)]
    assert main(["claims", str(_csv(tmp_path / "n.csv", named))]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "gives the schedule as 'num_epochs': name that column 'epochs', so that runs of different schedules are never "
        "pooled as seeds of one experiment")


def test_dataset_and_mixup_alpha_survive_a_round_trip_through_the_results_table(tmp_path):
    from mixkd.results import Context, Result, read_csv, write_csv

    results = []
    for dataset in ("cifar100", "cifar10"):
        ctx = Context("resnet56", "none", "resnet20", (("dataset", dataset), ("epochs", "240")))
        for alpha in (None, 0.2):
            results += [Result(ctx, Cell("kd", 4.0, "mixup", 1.0, alpha), s, 70.0 + s, f"{dataset}-{alpha}-{s}")
                        for s in (0, 1)]
    write_csv(results, tmp_path / "t.csv")
    back = read_csv(tmp_path / "t.csv")
    assert len({(r.context, r.cell) for r in back}) == 4  # merged into 1 before
    assert [(r.context, r.cell) for r in back] == [(r.context, r.cell) for r in results]


def test_claim_5_compares_the_samplings_directly_and_says_where_the_gain_comes_from():
    fmu = runs("kd", [70.0, 70.1, 69.9], **FMU)
    exact = runs("kd", [70.5, 70.6, 70.4], **PMU)
    ref = runs("kd", [71.5, 71.6, 71.4], mix="mixup", f=0.1, sampling="reference")
    share = runs("kd", [71.4, 71.6, 71.5], mix="mixup", f=0.41, sampling="exact")
    c = claim(fmu + exact + ref + share, 5)
    names = [p.name for p in c.parts]
    assert names[3:] == ["reference 10% vs exact 10%", "reference 10% vs exact at the reference's share"]
    direct = c.parts[3].comparisons[0]
    # reference 71.5 vs exact 70.5: +1.00, Welch se = sqrt(0.01/3 + 0.01/3) = 0.081650, df = 4, t = 2.776445:
    # [+0.773307, +1.226693]
    assert (direct.interval.low, direct.interval.high) == pytest.approx((0.773307, 1.226693), abs=1e-5)
    assert direct.outcome == "KD+PMU T=4 f=0.1 (reference sampling) better"
    assert c.parts[4].outcome == "no difference decided"
    assert c.answer.startswith("the released sampling (reference 10%, about 41% mixed) beats exact 10% in every row "
                               "tested: the gain comes from the released code's sampling, not from the paper's 10%; "
                               "exact at the reference's share is not told apart from it")
    # the direct parts say which is better; the verdict stays PMU against FMU (exact 10% 0.5 above: holds too)
    assert [p.verdict for p in c.parts[:3]] == ["holds", "holds", "holds"] and c.verdict == "holds"
    text = format_claims([c])
    assert "  reference 10% vs exact 10% (direct: not part of the verdict): KD+PMU T=4 f=0.1 (reference sampling) " \
           "better (1 comparison)" in text
    # exact 10% better than the released sampling: said the other way
    c = claim(fmu + runs("kd", [72.0, 72.1, 71.9], **PMU) + ref, 5)
    assert c.answer.startswith("exact 10% (the paper's text) beats the released sampling in every row tested")


def test_claims_on_the_best_epoch_with_metric_and_side_by_side_in_the_report(tmp_path, capsys):
    # last epoch: PMU 0.5 above FMU; best epoch: 2 below (FMU peaked earlier)
    rows = [dict(r, best_top1=b) for r, b in zip(runs("kd", [72.0, 72.1, 71.9], **PMU), [72.1, 72.2, 72.0], strict=True)]
    rows += [dict(r, best_top1=b) for r, b in zip(runs("kd", [71.5, 71.6, 71.4], **FMU), [74.1, 74.2, 74.0], strict=True)]
    table = _csv(tmp_path / "t.csv", rows)
    assert main(["claims", str(table), "--metric", "best_top1", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("metric: student best top-1 over epochs (%)\nclaim 1")
    assert "KD+PMU T=4 f=0.1 > KD+FMU T=4: -2.00 points" in out
    data = json.loads((tmp_path / "b.json").read_text())
    assert (data["metric"], data["claims"][1]["verdict"]) == ("best_top1", "does not hold")
    assert claim(rows, 2).verdict == "holds"  # the last epoch's
    no_best = _csv(tmp_path / "n.csv", runs("kd", [72.0], **PMU) + runs("kd", [70.0], **FMU))
    assert main(["claims", str(no_best), "--metric", "best_top1"]) == 2
    assert capsys.readouterr().err.strip() == (f"mixkd: error: {no_best}, line 2 has no best_top1 (best top-1 over "
                                               "epochs): give it for every run, or use the metric top1")


def test_report_gives_the_best_epoch_beside_the_last(tmp_path):
    from mixkd.study import write_report

    out = tmp_path / "s"
    for mix in ("plain", "mixup"):
        _run_dir(out, f"teachers/resnet14_{mix}-s0", {"model": "resnet14"}, 90.0)
    for seed in (0, 1, 2):
        _run_dir(out, f"students/resnet8-alone-s{seed}", {"model": "resnet8", "seed": seed}, 80.0 + seed / 10,
                 best=85.0 + seed / 10)
        cfg = {"task": "distill", "model": "resnet8", "seed": seed,
               "kd": {"teacher": "/x/teachers/resnet14_plain-s0", "method": "kd", "temperature": 4.0}}
        _run_dir(out, f"students/resnet8-from-resnet14_plain-kd-T4-s{seed}", cfg, 84.0 + seed / 10,
                 best=84.5 + seed / 10)
    text = write_report(out).read_text()
    assert "Beside it, the same runs' best top-1 over epochs (mdistiller's and most published KD figures are " \
           "best-epoch):" in text
    assert "| resnet14 (plain) → resnet8 | – | 85.10 ± 0.10 | 84.60 ± 0.10 |" in text  # the best-epoch table
    # claim 4: KD 4.0 above alone at the last epoch (holds), 0.5 below at the best (does not hold)
    assert "| # | claim | verdict, top-1 at the last epoch | verdict, best top-1 over epochs | parts |" in text
    assert "| 4 | Any KD beats the student trained alone: every distilled column, under every KD method present. | " \
           "**holds** | does not hold |" in text
    data = json.loads((out / "claims.json").read_text())
    assert data["beside"]["metric"] == "best_top1" and data["beside"]["claims"][3]["verdict"] == "does not hold"


def test_mixkd_claims_imports_no_torch(tmp_path):
    # issue 26: 6-8 s and 850 MB for a 2-row CSV, all of it torch's import
    import subprocess
    import sys

    table = _csv(tmp_path / "t.csv", [row("kd", 72.0, **PMU), row("kd", 70.0, **FMU)])
    code = ("import sys; from mixkd.cli import main; rc = main(['claims', sys.argv[1]]); "
            "print('torch' in sys.modules, [m for m in sys.modules if m.startswith('torch')][:3], rc)")
    done = subprocess.run([sys.executable, "-c", code, str(table)], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines()[-1] == "False [] 0", done.stderr
