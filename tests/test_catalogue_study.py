"""configs/studies/cifar100-catalogue.yaml (issue 27, item 5): every registered KD method, both pairs, each
alone and with either mixup, 3 seeds, with its authors' per-pair settings; claims 2 and 4 per method."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_distiller import Fixed, S, T, Y

from mixkd.claims import check
from mixkd.distiller import make_distiller, method_names
from mixkd.losses import dkd_loss, logit_standardize, soft_cross_entropy
from mixkd.results import kd_label
from mixkd.study import load_study
from mixkd.study.report import claims_plan
from mixkd.study.rows import planned_results

STUDY = Path(__file__).parents[1] / "configs" / "studies" / "cifar100-catalogue.yaml"
PAIRS = {"resnet20": "resnet56", "resnet8x4": "resnet32x4"}
# every method but MLKD, whose authors' recipe is its own (480 epochs, two views: configs/cifar100/student_mlkd.yaml)
CATALOGUE = [m for m in method_names() if m != "mlkd"]


@pytest.fixture(scope="module")
def study():
    return load_study(STUDY)


def test_the_catalogue_study_runs_every_method_with_either_mixup_on_both_pairs(study):
    methods = CATALOGUE
    assert len(methods) == 18  # kd, std, dkd, lskd, lsdkd, dist, fitnet and mdistiller's 10 + CTKD
    # 2 teachers + 2 pairs x (the student alone + 18 methods x 3 mixings) x 3 seeds, as the file's header says
    assert len(study.runs) == 2 + 2 * (1 + 18 * 3) * 3 == 332
    students = [r for r in study.runs if r.role == "student"]
    planned = {(r.model, r.method.name, r.seed) for r in students}
    wanted = {(s, f"{m}{x}", seed) for s in PAIRS for m in methods for x in ("", "_fmu", "_pmu") for seed in (0, 1, 2)}
    assert planned == wanted | {(s, "alone", seed) for s in PAIRS for seed in (0, 1, 2)}
    assert {r.teacher_model for r in students if r.teacher_model} == {"resnet56", "resnet32x4"}
    assert all(r.teacher_model in (None, PAIRS[r.model]) for r in students)
    assert {r.fraction for r in students if r.method.mixing == "partial"} == {0.1}


def settings(study, student: str, method: str) -> set[tuple]:
    kd = [r.config.kd for r in study.runs if r.role == "student" and r.model == student and r.method.kd == method]
    return {(k.temperature, k.kd_weight, getattr(k, "beta", None), getattr(k, "standardize", None)) for k in kd}


def test_each_method_takes_its_authors_settings_for_the_pair(study):
    # DKD + LS: the LS-KD authors' logs dkd,resnet56,resnet20,3,18,2.0 and dkd,resnet32x4,resnet8x4,2,9 (beta 8)
    assert settings(study, "resnet20", "lsdkd") == {(3.0, 18.0, 2.0, True)}
    assert settings(study, "resnet8x4", "lsdkd") == {(2.0, 9.0, 8.0, True)}
    # DKD: mdistiller res56_res20.yaml's beta 2, cfg.py's 8 otherwise; no standardization
    assert settings(study, "resnet20", "dkd") == {(4.0, 1.0, 2.0, False)}
    assert settings(study, "resnet8x4", "dkd") == {(4.0, 1.0, 8.0, False)}
    # ReviewKD: mdistiller's reviewkd.yaml weight 5 for resnet32x4 -> resnet8x4, cfg.py's 1 otherwise
    weights = {r.model: r.config.kd.feat_weight for r in study.runs if r.role == "student" and r.method.kd == "reviewkd"}
    assert weights == {"resnet20": 1.0, "resnet8x4": 5.0}


def test_the_plan_and_the_claims_give_claims_2_and_4_per_method(study):
    plan = claims_plan(study).splitlines()
    claim = {line.split(":")[0].strip(): line for line in plan}
    # claim 2: one PMU > FMU comparison per method and pair (18 x 2); claim 4: each method's 3 mixings against the
    # student alone per pair (18 x 3 x 2)
    assert "decidable: 36 comparisons, seeds 3 vs 3" in claim["claim 2"]
    assert "decidable: 108 comparisons, seeds 3 vs 3" in claim["claim 4"]
    # the claims on made-up top-1s of exactly the planned runs: PMU 2 points over FMU, every method 5 over alone
    bonus = {"none": 6.0, "full": 5.0, "partial": 7.0}
    results = [dataclasses.replace(r, top1=(60.0 if r.cell.alone else 60.0 + bonus[r.cell.mixing]) + 0.1 * r.seed)
               for r in planned_results(study)]
    claims = {c.number: c for c in check(results)}
    labels = [kd_label(m) for m in CATALOGUE]
    assert "DKD+LS" in labels and len(set(labels)) == 18
    assert [(p.name, len(p.comparisons)) for p in claims[2].parts] == [(f"{k}: PMU > FMU", 2) for k in labels]
    assert [(p.name, len(p.comparisons)) for p in claims[4].parts] == [(f"{k} > student alone", 6) for k in labels]
    assert claims[2].verdict == claims[4].verdict == "holds"


def test_dkd_with_logit_standardization_is_dkd_with_standardize_at_the_ls_kd_settings():
    d = make_distiller("lsdkd", Fixed(S), Fixed(T))
    d.set_epoch(20, 240)  # past the 20-epoch warm-up: weight 9
    losses = d.forward_train(torch.zeros(2, 1), Y)
    # CE (weight 1) on the raw logits + 9 x DKD (alpha 1, beta 8, T 2) on the z-scored ones
    kd = dkd_loss(logit_standardize(S), logit_standardize(T), Y, alpha=1.0, beta=8.0, temperature=2.0).item()
    ce = soft_cross_entropy(S, Y).item()
    assert (losses["ce"].item(), losses["kd"].item()) == pytest.approx((ce, kd), rel=1e-6) and kd > 0
    assert losses["loss"].item() == pytest.approx(ce + 9 * kd, rel=1e-6)
    plain = make_distiller("dkd", Fixed(S), Fixed(T), {"standardize": True, "temperature": 2.0, "kd_weight": 9.0})
    plain.set_epoch(20, 240)
    assert {k: v.item() for k, v in plain.forward_train(torch.zeros(2, 1), Y).items()} == \
        {k: v.item() for k, v in losses.items()}


def test_a_run_planned_before_studies_named_the_teacher_architecture_still_matches_its_plan(study, tmp_path):
    from mixkd.study.spec import saved_config_mismatch

    run = next(r for r in study.runs if r.id == "students/resnet20-from-resnet56_plain-dkd-s0")
    assert run.config.kd.teacher_model == "resnet56"
    saved = run.config_for(tmp_path).model_dump(mode="json")
    saved["kd"]["teacher_model"] = None  # what such a study folder's config.yaml holds
    assert saved_config_mismatch(run, saved, tmp_path) is None
    saved["kd"]["beta"] = 8.0  # ... but a run made with other settings is still refused
    assert saved_config_mismatch(run, saved, tmp_path) == "kd.beta: 8.0 -> 2.0"
    saved["kd"]["beta"], saved["kd"]["teacher_model"] = 2.0, "resnet110"
    assert saved_config_mismatch(run, saved, tmp_path) == "kd.teacher_model: 'resnet110' -> 'resnet56'"
