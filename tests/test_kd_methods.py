"""DKD, LS-KD, DIST and FitNet as distillers: their settings, their losses (pinned by hand), their
schedule, their trainable part, their place in the step (no host sync), and `mixkd distill --kd NAME`
on digits and on a tiny CIFAR folder."""

import csv
import json
from decimal import Decimal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from run_rows import epoch_rows
from test_distillation_loss import DIST_T4, DKD_MIXED, LSKD_T2, Y_MIXED, S, T, dec, softmax

from mixkd.cli import main
from mixkd.config import KDConfig, build_config
from mixkd.distiller import make_distiller, method_names
from mixkd.engine import Run
from mixkd.errors import MixkdError
from mixkd.mix import MixSpec
from mixkd.models import create_model
from mixkd.step import SGD, TrainStep

NEW = ("dkd", "lskd", "dist", "fitnet")


def soft_ce(s, y):
    """-mean_i sum_c y_ic log softmax(s_i)_c, in decimals."""
    total = Decimal(0)
    for si, yi in zip(dec(s), dec(y), strict=True):
        total -= sum(w * p.ln() for w, p in zip(yi, softmax(si, Decimal(1)), strict=True) if w)
    return float(total / len(s))


CE_MIXED = soft_ce(S, Y_MIXED)


class Fixed(torch.nn.Module):
    """Returns the given logits whatever the input, plus 0 * a parameter so that it has one."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.w = torch.tensor(logits), torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits + 0 * self.w


def test_every_method_is_registered_with_its_authors_cifar100_settings():
    assert set(NEW) <= set(method_names())
    # mdistiller cfg.py CFG.DKD; LS-KD README --base-temp 2 --kd-weight 9; dist_cifar.yaml; RepDistiller -a 0 -b 100
    assert KDConfig(method="dkd").params() == {"temperature": 4.0, "ce_weight": 1.0, "kd_weight": 1.0, "alpha": 1.0,
                                               "beta": 8.0, "warmup_epochs": 20, "standardize": False}
    assert KDConfig(method="lskd").params() == {"temperature": 2.0, "ce_weight": 0.1, "kd_weight": 9.0}
    assert KDConfig(method="dist").params() == {"temperature": 4.0, "ce_weight": 1.0, "kd_weight": 2.0, "beta": 1.0,
                                                "gamma": 1.0, "standardize": False}
    assert KDConfig(method="fitnet").params() == {"temperature": 4.0, "ce_weight": 1.0, "kd_weight": 0.0,
                                                  "hint_weight": 100.0, "hint_layer": 2}
    assert KDConfig().params() == {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9,  # kd as before
                                   "standardize": False}  # and its switch of logit standardization


def test_settings_given_win_are_written_resolved_and_unused_ones_are_refused(tmp_path):
    cfg = build_config(flags={"kd.method": "dkd", "kd.beta": 2.0, "kd.ce_weight": None})
    assert (cfg.kd.beta, cfg.kd.ce_weight) == (2.0, 1.0) and "gamma" not in cfg.kd.params()
    again = build_config(flags={"kd.method": "dkd"}, overrides=["kd.beta=2"])
    assert again.kd == cfg.kd
    with pytest.raises(MixkdError, match=r"^invalid config: kd.beta: the kd KD method does not use it \(it uses "
                                         r"kd.temperature, kd.ce_weight, kd.kd_weight, kd.standardize\); remove it$"):
        build_config(flags={"kd.beta": 2.0})
    with pytest.raises(MixkdError, match="kd.warmup_epochs: the dist KD method does not use it"):
        build_config(flags={"kd.method": "dist", "kd.warmup_epochs": 5})


@pytest.mark.parametrize("method, ce_w, kd_w, term", [
    ("dkd", 1.0, 1.0, DKD_MIXED), ("lskd", 0.1, 9.0, LSKD_T2), ("dist", 1.0, 2.0, DIST_T4)])
def test_logit_methods_give_the_hand_computed_objective(method, ce_w, kd_w, term):
    d = make_distiller(method, Fixed(S), Fixed(T), KDConfig(method=method, warmup_epochs=0).settings() if method == "dkd"
                       else KDConfig(method=method).settings())
    out = d.losses(torch.zeros(3, 1), torch.tensor(Y_MIXED))
    assert set(out) == set(d.loss_names) == {"loss", "ce", "kd"}
    assert out["ce"].item() == pytest.approx(CE_MIXED, rel=1e-6)  # CE on the raw logits, LS-KD's too
    assert out["kd"].item() == pytest.approx(term, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce_w * CE_MIXED + kd_w * term, rel=1e-5)


def test_dkd_warms_its_kd_weight_up_linearly_from_the_first_epoch():
    d = make_distiller("dkd", Fixed(S), Fixed(T), KDConfig(method="dkd", kd_weight=2.0).settings())
    y = torch.tensor(Y_MIXED)
    for epoch, factor in ((1, 1 / 20), (10, 10 / 20), (20, 1.0), (150, 1.0)):
        d.set_epoch(epoch, 240)  # mdistiller: min(epoch / 20, 1), epochs counted from 1
        loss = d.losses(torch.zeros(3, 1), y)["loss"].item()
        assert loss == pytest.approx(CE_MIXED + 2.0 * factor * DKD_MIXED, rel=1e-5), epoch


def test_fitnet_hint_is_the_mse_of_the_regressed_student_map_to_the_teachers(one_thread):
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", 10), create_model("resnet14", 10).eval()
    d = make_distiller("fitnet", student, teacher, KDConfig(method="fitnet", kd_weight=0.5).settings())
    reg = d.modules["regressor"]
    assert isinstance(reg.conv, torch.nn.Conv2d) and reg.conv.kernel_size == (1, 1)  # 32 -> 32 channels, 16x16
    assert [p for p in d.parameters()][-len(list(reg.parameters())):] == list(reg.parameters())
    assert set(d.state_dict()) >= {"regressor.conv.weight", "regressor.bn.running_mean"}
    x = torch.randn(2, 3, 32, 32)
    y = F.one_hot(torch.tensor([1, 2]), 10).float()
    d.train()
    out = d.losses(x, y)
    assert set(out) == {"loss", "ce", "kd", "hint"}
    # by hand: the middle stage (is_feat index 2) of both, 1x1 conv, batch statistics, ReLU, MSE
    fs, s_logits = student(x, is_feat=True)
    with torch.no_grad():
        ft, t_logits = teacher(x, is_feat=True)
    z = F.conv2d(fs[2], reg.conv.weight, reg.conv.bias)
    mu, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
    r = torch.relu((z - mu) / torch.sqrt(var + 1e-5) * reg.bn.weight.view(1, -1, 1, 1) + reg.bn.bias.view(1, -1, 1, 1))
    hint = ((r - ft[2]) ** 2).mean()
    ce = -(y * F.log_softmax(s_logits, -1)).sum(-1).mean()
    kd = 16 * F.kl_div(F.log_softmax(s_logits / 4, -1), F.softmax(t_logits / 4, -1), reduction="batchmean")
    assert out["hint"].item() == pytest.approx(hint.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce.item() + 0.5 * kd.item() + 100 * hint.item(), rel=1e-5)
    out["loss"].backward()
    assert reg.conv.weight.grad is not None and reg.conv.weight.grad.abs().sum() > 0


def test_fitnet_refuses_a_hint_layer_that_is_not_a_feature_map():
    s, t = create_model("resnet8", 10), create_model("resnet8", 10)
    with pytest.raises(MixkdError, match=r"fitnet: kd.hint_layer 4 is not a feature map of CifarResNet; choose one of \[0, 1, 2, 3\]"):
        make_distiller("fitnet", s, t, KDConfig(method="fitnet", hint_layer=4).settings())


class TinyNet(torch.nn.Module):
    """Three conv -> BN -> ReLU stages (feature maps 0, 1, 2), pooled, linear: the models' is_feat interface, small."""

    def __init__(self, width=4):
        super().__init__()
        chans = [3, width, width, 2 * width]
        self.stages = torch.nn.ModuleList(torch.nn.Sequential(
            torch.nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 + (i > 0), padding=1, bias=False),
            torch.nn.BatchNorm2d(chans[i + 1]), torch.nn.ReLU()) for i in range(3))
        self.fc = torch.nn.Linear(2 * width, 10)

    def forward(self, x, is_feat=False, preact=False):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        feats.append(x.mean((2, 3)))
        logits = self.fc(feats[-1])
        return (feats, logits) if is_feat else logits


def _losses_and_grads(fn, x, y, params):
    out = fn(x, y)
    return {k: v.detach() for k, v in out.items()}, torch.autograd.grad(out["loss"], params)


def test_losses_trace_as_one_graph_without_host_syncs_and_match_eager(one_thread):
    """Dynamo with fullgraph=True refuses a graph break (an .item(), a branch on a tensor): what the
    CUDA graph and the compiled step need. The traced losses and gradients equal the eager ones."""
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = 0.6 * F.one_hot(torch.arange(8) % 10, 10).float() + 0.4 * F.one_hot((torch.arange(8) + 3) % 10, 10).float()
    for method in NEW:
        torch.manual_seed(1)
        d = make_distiller(method, TinyNet(), TinyNet(8).eval(), KDConfig(method=method).settings())
        d.set_epoch(3, 10)
        params = list(d.parameters())
        torch._dynamo.reset()
        traced = torch.compile(d.losses, backend="eager", fullgraph=True)
        (eager, g_eager), (graph, g_graph) = (_losses_and_grads(fn, x, y, params) for fn in (d.losses, traced))
        for k in d.loss_names:
            assert torch.allclose(eager[k], graph[k], rtol=1e-5, atol=1e-6), (method, k)
        for a, b in zip(g_eager, g_graph, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), method


def test_fitnet_steps_measure_without_a_trace_and_its_state_round_trips(one_thread):
    torch.manual_seed(2)
    d = make_distiller("fitnet", create_model("resnet8", 10), create_model("resnet8", 10).eval(),
                       KDConfig(method="fitnet").settings())
    step = TrainStep(d, SGD(d.parameters(), lr=0.05), MixSpec("cutmix", 1.0, 0.5), 10, torch.Generator().manual_seed(0))
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    before = [t.clone() for t in d.state_tensors()]
    assert step.measure(x, y) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, d.state_tensors(), strict=True))  # regressor and its BN too
    step(x, y)
    assert not torch.equal(before[-1], d.modules["regressor"].bn.running_var)
    assert set(step.epoch_means()) == {"loss", "ce", "kd", "hint"}


# ---- through the engine and the command line ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    from cifar_fixture import write_fake_cifar

    root = tmp_path_factory.mktemp("tiny-cifar10")
    write_fake_cifar(root, num_classes=10, n_train=48, n_test=20, seed=0)
    return root


def test_fitnet_resumes_step_exact_with_its_regressor(teacher_file, tiny_cifar, tmp_path, one_thread):
    flags = {"task": "distill", "model": "resnet8", "dataset": "cifar10", "data_dir": str(tiny_cifar), "epochs": 1,
             "batch_size": 16,
             "device": "cpu", "progress": False, "compile": "off", "kd.method": "fitnet", "kd.teacher": str(teacher_file),
             "mix.method": "mixup", "mix.fraction": 0.5}

    whole = Run(build_config(flags={**flags, "out": str(tmp_path / "whole")}))
    while whole.advance():
        pass
    cut = Run(build_config(flags={**flags, "out": str(tmp_path / "cut")}))
    cut.advance()  # the first step
    assert cut.step_in_epoch == 1
    cut.stop("time")
    resumed = Run(build_config(flags={**flags, "out": str(tmp_path / "cut")}), resume=True)
    while resumed.advance():
        pass
    assert epoch_rows(tmp_path / "cut") == epoch_rows(tmp_path / "whole")
    for a, b in zip(whole.distiller.state_dict().values(), resumed.distiller.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the regressor, with its batch-norm statistics
    assert "train_hint" in epoch_rows(tmp_path / "whole")[0]


@pytest.mark.parametrize("method", NEW)
def test_mixkd_distill_trains_each_method_on_digits_and_on_a_cifar_folder(method, teacher_file, tiny_cifar,
                                                                          tmp_path, one_thread, capsys):
    for dataset, data_dir, batch in (("digits", None, 512), ("cifar10", tiny_cifar, 16)):
        out = tmp_path / dataset
        args = ["distill", "--kd", method, "--teacher", str(teacher_file), "--student", "resnet8",
                "--dataset", dataset, "--epochs", "1", "--batch-size", str(batch), "--device", "cpu",
                "--no-progress", "--mix", "cutmix", "--mix-fraction", "0.1", "--out", str(out)]
        assert main(args + (["--data-dir", str(data_dir)] if data_dir else [])) == 0
        result = json.loads((out / "result.json").read_text())
        assert result["kd_method"] == method and result["top1"] >= 0
        saved = build_config(file=out / "config.yaml")
        assert saved.kd.params() == KDConfig(method=method).params()  # written resolved
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert row["train_kd"] >= 0 and (("train_hint" in row) == (method == "fitnet"))


def test_distill_refuses_an_unused_setting_in_one_line(teacher_file, capsys):
    code = main(["distill", "--kd", "lskd", "--teacher", str(teacher_file), "--dataset", "digits", "kd.alpha=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "kd.alpha: the lskd KD method does not use it" in err[0]


# ---- CUDA (bench/device.sh runs these on the GPU) ------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_step_equals_eager_for_each_method_on_cuda(method, precision):
    from mixkd.step import GraphedTrainStep

    results = []
    for cls in (TrainStep, GraphedTrainStep):
        torch.manual_seed(0)
        student, teacher = create_model("resnet8", 10).cuda(), create_model("resnet8", 10).cuda().eval()
        d = make_distiller(method, student, teacher, KDConfig(method=method).settings())
        d.set_epoch(2, 10)
        step = cls(d, SGD(d.parameters(), lr=0.05), MixSpec("mixup", 1.0, 0.5), 10,
                   torch.Generator(device="cuda").manual_seed(1), precision)
        g = torch.Generator(device="cuda").manual_seed(5)
        for _ in range(20):
            step(torch.randn(64, 3, 32, 32, device="cuda", generator=g),
                 torch.randint(0, 10, (64,), device="cuda", generator=g))
        results.append((step.epoch_means(), [p.detach().clone() for p in d.parameters()]))
    (eager, w_eager), (graph, w_graph) = results
    tol = 1e-4 if precision == "fp32" else 2e-2
    for k in eager:
        assert graph[k] == pytest.approx(eager[k], rel=tol, abs=tol), k
    for a, b in zip(w_eager, w_graph, strict=True):
        assert torch.allclose(a, b, rtol=tol, atol=tol)


@cuda
@pytest.mark.parametrize("method", NEW)
def test_each_method_steps_without_host_sync_on_cuda(method):
    torch.manual_seed(0)
    d = make_distiller(method, create_model("resnet8", 10).cuda(), create_model("resnet8", 10).cuda().eval(),
                       KDConfig(method=method).settings())
    step = TrainStep(d, SGD(d.parameters(), lr=0.05), MixSpec("cutmix", 1.0, 0.5), 10,
                     torch.Generator(device="cuda").manual_seed(1))
    x, y = torch.randn(64, 3, 32, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    step(x, y)  # the first step may set things up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- in studies ---------------------------------------------------------------------------------
def test_a_study_accepts_every_method_alone_and_with_either_mixup():
    from mixkd.study.spec import METHODS, load_study

    # the registry's methods, each alone and with either mixup, no more, no less
    assert list(METHODS) == ["alone"] + [f"{kd}{s}" for kd in method_names() for s in ("", "_fmu", "_pmu")]
    assert METHODS["lskd_fmu"].label == "LS-KD + full mixup" and METHODS["dkd_pmu"].kd == "dkd"
    study = load_study(Path(__file__).parents[1] / "configs" / "studies" / "cifar100-methods.yaml")
    assert len(study.runs) == 2 + 2 * (1 + 6 * 3) * 3  # as its header says
    beta = {r.id: r.config.kd.beta for r in study.runs if "-dkd" in r.id}
    assert {v for k, v in beta.items() if k.startswith("students/resnet20")} == {2.0}  # mdistiller's res56_res20
    assert {v for k, v in beta.items() if k.startswith("students/resnet8x4")} == {8.0}  # its default


def test_a_tiny_study_with_the_new_methods_runs_reports_and_checks_claims_2_and_4_per_method(tiny_cifar, teacher_file,
                                                                                             tmp_path):
    import yaml

    methods = ["alone", "dkd_fmu", "dkd_pmu", "lskd_pmu", "dist_fmu", "fitnet_fmu", "fitnet_pmu"]
    study = {"name": "methods", "defaults": {"dataset": "cifar10", "data_dir": str(tiny_cifar), "epochs": 1,
                                             "batch_size": 16, "eval_batch_size": 20, "device": "cpu"},
             "teachers": [{"name": "given", "checkpoint": str(teacher_file), "model": "resnet8"}],
             "students": [{"teachers": "given", "models": "resnet8", "methods": methods, "fractions": 0.1}]}
    path = tmp_path / "methods.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "out"
    assert main(["study", "run", str(path), "--out", str(out), "--workers", "1", "--pack", "3", "--no-progress"]) == 0
    results = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["method"] for r in results if r["role"] == "student") == sorted(methods)
    report = (out / "report.md").read_text()
    for label in ("DKD+FMU T=4", "DKD+PMU T=4", "LS-KD+PMU T=2", "DIST+FMU T=4", "FitNet+PMU T=4"):
        assert label in report, label
    claims = {c["claim"]: c for c in json.loads((out / "claims.json").read_text())["claims"]}
    parts_2 = {p["part"]: p["verdict"] for p in claims[2]["parts"]}
    parts_4 = {p["part"]: p["verdict"] for p in claims[4]["parts"]}
    for short in ("DKD", "FitNet"):  # PMU and FMU students of these: claim 2 compared them (one seed: inconclusive)
        assert parts_2[f"{short}: PMU > FMU"] == "inconclusive", short
    for short in ("DKD", "LS-KD", "DIST", "FitNet"):
        assert parts_4[f"{short} > student alone"] in ("holds", "does not hold", "inconclusive"), short
