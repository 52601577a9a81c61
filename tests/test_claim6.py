"""Claim 6 (Wang et al., NeurIPS 2022): the policies' T. stddev ranks them as their students' top-1 does.

Spearman's rho and its Fisher-z interval pinned by hand; verdicts, scope and outputs on small tables; the
results table's augment and t_stddev columns."""

from __future__ import annotations

import json
import math

import pytest

from mixkd.claims import RankInterval, check, claims_json, claims_markdown, format_claims, plan, spearman
from mixkd.errors import MixkdError
from mixkd.results import Cell, Context, Result, read_csv, results_from_rows, write_csv

POLICIES = ("none", "flip_crop", "cutout", "autoaugment", "mixup", "cutmix", "cutmix_pick")


def test_spearman_by_hand():
    # y's ranks with a tie: 1, 2, 3.5, 5, 3.5; centred x ranks -2..2, y ranks -2, -1, .5, 2, .5:
    # sum of products 8, squares 10 and 9.5: rho = 8 / sqrt(95)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0  # no ordering of x: nothing to compare


def test_rank_interval_by_hand():
    # rho -0.9 over 7 points: z = atanh(-0.9) = -1.47222, se = sqrt(1.06 / 4) = 0.514782,
    # 97.5% normal quantile 1.959964: tanh(-1.47222 -+ 1.008953) = tanh(-2.481173), tanh(-0.463266)
    iv = RankInterval(-0.9, 7)
    assert iv.se == pytest.approx(0.514782, abs=1e-6)
    assert (iv.low, iv.high) == (pytest.approx(-0.986104, abs=1e-5), pytest.approx(-0.432743, abs=1e-5))
    assert iv.p_negative() == pytest.approx(0.0021189, abs=1e-6)  # Phi(-1.47222 / 0.514782)
    assert iv.p_positive() == pytest.approx(1 - 0.0021189, abs=1e-6)
    assert RankInterval(-1.0, 5).high < 0 and RankInterval(0.0, 5).low == pytest.approx(-RankInterval(0.0, 5).high)


def _rows(slope_of: dict[str, float], policies=POLICIES, seeds=(0, 1, 2), stddev: dict | None = None,
          teacher_mix: str = "none") -> list[dict]:
    """A results table: per KD method, students of each policy whose top-1 is 70 + slope x rank(T. stddev) (+-0.1
    by seed); T. stddev 0.01 x (rank + 1)."""
    rows = []
    for method, slope in slope_of.items():
        for rank, policy in enumerate(policies):
            for seed in seeds:
                t = (stddev or {}).get(policy, 0.01 * (rank + 1))
                rows.append({"teacher": "resnet56", "teacher_mix": teacher_mix, "student": "resnet20", "kd": method,
                             "temperature": 4, "mix": "none", "mix_fraction": "", "sampling": "", "seed": seed,
                             "top1": 70 + slope * rank + 0.1 * (seed - 1), "augment": policy,
                             "t_stddev": "" if t is None else t})
    return rows


def claim6(rows, **kw):
    result = check(rows, **kw)
    assert [c.number for c in result] == [1, 2, 3, 4, 5, 6]
    return result[-1]


def test_claim6_verdicts():
    # lower T. stddev, better students under KD and DKD: holds; under DKD the reverse: does not hold
    good = claim6(_rows({"kd": -1.0, "dkd": -0.5}))
    assert good.verdict == "holds" and [p.name for p in good.parts] == ["KD: lower T. stddev, better top-1",
                                                                      "DKD: lower T. stddev, better top-1"]
    assert good.comparisons[0].interval.rho == pytest.approx(-1.0) and good.comparisons[0].interval.k == 7
    assert good.scope_text() == "tested on resnet56 (plain) → resnet20"
    bad = claim6(_rows({"kd": -1.0, "dkd": 0.5}))
    assert bad.verdict == "does not hold" and [p.verdict for p in bad.parts] == ["holds", "does not hold"]
    # no ranking (every policy's students alike but for seed noise): inconclusive
    flat = claim6(_rows({"kd": 0.0}))
    assert flat.verdict == "inconclusive" and flat.comparisons[0].interval.rho == pytest.approx(0.0)
    # one seed a policy is enough: the interval comes from the number of policies (noise plays no part)
    assert claim6(_rows({"kd": -1.0}, seeds=(0,))).verdict == "holds"


def test_claim6_test_loss_part():
    # Wang et al.'s measure: the students' test loss rises with T. stddev (rho > 0 holds); here top-1 and test loss
    # disagree under DKD: its loss part does not hold
    rows = _rows({"kd": -1.0, "dkd": -1.0})
    for r in rows:
        rank = POLICIES.index(r["augment"])
        r["test_loss"] = 1.0 + (0.1 if r["kd"] == "kd" else -0.1) * rank + 0.01 * r["seed"]
    six = claim6(rows)
    assert [(p.name, p.verdict) for p in six.parts] == [
        ("KD: lower T. stddev, better top-1", "holds"), ("KD: lower T. stddev, lower test loss", "holds"),
        ("DKD: lower T. stddev, better top-1", "holds"), ("DKD: lower T. stddev, lower test loss", "does not hold")]
    loss = six.parts[1].comparisons[0]
    assert loss.statement == "KD T=4: ρ(T. stddev, test loss) > 0 over 7 policies" and loss.interval.rho == 1.0
    none = next(p for p in loss.points if p.label == "none")
    assert none.side.values == pytest.approx([1.0, 1.01, 1.02])  # rank 0: its runs' losses
    assert six.verdict == "does not hold"
    # a policy's runs without a test loss: named in that part's scope only
    for r in rows:
        if r["augment"] == "cutout":
            r["test_loss"] = ""
    six = claim6(rows)
    assert "test loss of cutout" in six.scope_text() and six.parts[0].verdict == "holds"


def test_claim6_scope():
    # four policies: too few for an interval; the row is named with what it misses
    few = claim6(_rows({"kd": -1.0}, policies=POLICIES[:4]))
    assert few.verdict == "not tested" and not few.comparisons
    assert "1 more policy with T. stddev (has 4)" in few.scope_text()
    # a policy without its T. stddev: tested on the other six, named, and the verdict cannot hold
    lacking = claim6(_rows({"kd": -1.0}, stddev={"cutout": None}))
    assert lacking.comparisons[0].interval.k == 6 and lacking.verdict == "inconclusive"
    assert "T. stddev of cutout" in lacking.scope_text()
    # a table without policies: claim 6 not tested, the other claims as before
    plain = [{k: v for k, v in r.items() if k not in ("augment", "t_stddev")} for r in _rows({"kd": 0.0})[:3]]
    assert claim6(plain).verdict == "not tested"


def test_claim6_outputs():
    claims = check(_rows({"kd": -1.0}))
    text = format_claims(claims)
    assert "claim 6: holds" in text and "ρ = -1.00" in text and "none 0.01 → 69.90" not in text
    assert "none 0.01 → 70.00" in text  # the policy's mean over seeds
    md = "\n".join(claims_markdown(claims))
    assert "### Rank correlations (claim 6)" in md and "| resnet56 (plain) → resnet20 | KD T=4 | top-1 |" in md
    six = json.loads(json.dumps(claims_json(claims)))["claims"][-1]
    assert six["claim"] == 6 and six["comparisons"][0]["kind"] == "rank correlation"
    assert [p["policy"] for p in six["comparisons"][0]["points"]] == sorted(POLICIES)
    lines = plan(results_from_rows(_rows({"kd": -1.0})))
    assert lines[-1].startswith("  claim 6: decidable") and "ρ = -0.89" in lines[-1]
    assert "cannot decide" in plan(results_from_rows(_rows({"kd": -1.0}, policies=POLICIES[:3])))[-1]


def test_results_table_carries_augment_and_t_stddev(tmp_path):
    rows = _rows({"kd": -1.0}, policies=POLICIES[:3], seeds=(0,))
    results = results_from_rows(rows)
    assert [r.cell.augment for r in results] == ["none", None, "cutout"]  # None: the default, flip_crop
    assert results[2].t_stddev == pytest.approx(0.03)
    rows[0]["test_loss"] = 1.25
    results = results_from_rows(rows)
    assert results[0].test_loss == 1.25 and results[1].test_loss is None
    write_csv(results, tmp_path / "t.csv")
    back = read_csv(tmp_path / "t.csv")
    assert [(r.context, r.cell, r.t_stddev, r.test_loss) for r in back] == [
        (r.context, r.cell, r.t_stddev, r.test_loss) for r in results]
    with pytest.raises(MixkdError, match="row 1, column 't_stddev'"):
        results_from_rows([{**rows[0], "t_stddev": "2"}])


def test_claim6_labels_mixing_runs_apart():
    # the default policy alone, with full mixup (the spec flip_crop+mixup, as augment-score names it) and with PMU
    ctx = Context("resnet56", "none", "resnet20")
    runs = [Result(ctx, Cell("kd", 4.0), 0, 70.0, "a", t_stddev=0.01),
            Result(ctx, Cell("kd", 4.0, "mixup", 1.0), 0, 71.0, "b", t_stddev=0.02),
            Result(ctx, Cell("kd", 4.0, "mixup", 0.1, None, "exact", "cutout"), 0, 71.0, "c", t_stddev=0.03)]
    gaps = claim6(runs).untested
    assert gaps and "(has 3)" in gaps[0].missing[0]
    from mixkd.claims import _rank_groups

    (labels,) = [list(g) for g in _rank_groups(runs).values()]
    assert labels == ["flip_crop", "flip_crop+mixup", "cutout+mixup f=0.1"]
    # runs that name neither a policy nor a T. stddev: no claim 6
    assert not _rank_groups([Result(ctx, Cell("kd", 4.0), 0, 70.0, "a")])
