"""mdistiller's catalogue (AT, NST, SP, PKT, RKD, KDSVD, VID, OFD, ReviewKD, CRD) and CTKD as mixkd methods:
the subtle parts pinned by hand (CTKD's reversed temperature gradient, OFD's margins and partial L2, CRD's
NCE loss and memory), the step free of host syncs, and one epoch of each on digits with and without mixup."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_kd_methods import Fixed

from mixkd.cli import main
from mixkd.distiller import make_distiller
from mixkd.methods.crd import contrast_loss
from mixkd.methods.ctkd import CTKDSettings, reversal_factor
from mixkd.methods.ofd import margins, ofd_distill_loss
from mixkd.mix import MixSpec
from mixkd.models import create_model
from mixkd.registry import KD_METHODS
from mixkd.step import SGD, TrainStep

NEW = ("at", "nst", "sp", "pkt", "rkd", "kdsvd", "vid", "ofd", "reviewkd", "crd", "ctkd")
# CRD's memory and negatives, ReviewKD's fusion width at test size
SMALL = {"crd": {"nce_k": 16}, "reviewkd": {"max_mid_channel": 8}}


def test_the_methods_are_registered_with_their_authors_defaults():
    assert set(NEW) <= set(KD_METHODS.names())
    defaults = {m: KD_METHODS.get(m).defaults() for m in NEW}
    # mdistiller engine/cfg.py
    assert defaults["at"] == {"ce_weight": 1.0, "feat_weight": 1000.0, "p": 2.0}
    assert (defaults["nst"]["feat_weight"], defaults["sp"]["feat_weight"], defaults["pkt"]["feat_weight"]) == (50, 3000, 30000)
    assert defaults["rkd"] == {"ce_weight": 1.0, "feat_weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0,
                               "squared": False, "eps": 1e-12}
    assert (defaults["kdsvd"]["k"], defaults["vid"]["init_pred_var"], defaults["ofd"]["feat_weight"]) == (1, 5.0, 0.001)
    assert (defaults["crd"]["nce_k"], defaults["crd"]["nce_t"], defaults["crd"]["feat_weight"]) == (16384, 0.07, 0.8)
    # configs/cifar100/reviewkd.yaml: REVIEWKD_WEIGHT 5 for resnet32x4 -> resnet8x4 only
    assert KD_METHODS.get("reviewkd").defaults({"pair": "resnet32x4->resnet8x4"})["feat_weight"] == 5.0
    assert KD_METHODS.get("reviewkd").defaults({"pair": "resnet56->resnet20"})["feat_weight"] == 1.0
    # CTKD scripts/run_cifar_distill.sh
    assert defaults["ctkd"] == {"ce_weight": 0.1, "kd_weight": 0.9, "t_start": 1.0, "t_end": 20.0, "decay_max": 0.0,
                                "decay_min": -1.0, "decay_loops": 10}


# ---- CTKD -------------------------------------------------------------------------------------------------
def test_ctkd_reversal_factor_follows_the_cosine_curriculum():
    s = CTKDSettings()
    got = [reversal_factor(torch.tensor(float(e)), s).item() for e in (0, 1, 5, 10, 30)]
    # decay_min + (decay_max - decay_min) (1 + cos(pi e / 10)) / 2 = (1 + cos(pi e / 10)) / 2 - 1, held from e = 10
    assert got == pytest.approx([0.0, (1 + math.cos(math.pi / 10)) / 2 - 1, -0.5, -1.0, -1.0], abs=1e-6)


S_LOGITS = [[1.0, 2.0, 3.0, -1.0], [0.5, -1.0, 2.0, 0.0]]
T_LOGITS = [[3.0, 2.0, 1.0, 0.5], [1.0, 0.0, 4.0, -2.0]]


@pytest.mark.parametrize("epoch, factor", [(10, -1.0), (5, -0.5)])
def test_ctkd_temperature_ascends_the_kd_loss_the_student_descends(epoch, factor):
    """The temperature's gradient is the KD loss's own gradient times the (negative) curriculum factor.
    t_end 2 keeps T near 2.5, where float32's KL is far from cancelling (at T = 15.6 it loses 0.3%)."""
    d = make_distiller("ctkd", Fixed(S_LOGITS), Fixed(T_LOGITS), {"t_end": 2.0})
    d.set_epoch(epoch, 20)
    target = F.one_hot(torch.tensor([2, 0]), 4).float()
    d.losses(torch.zeros(2), target)["loss"].backward()
    got = d.modules["temperature"].global_t.grad.item()
    # the same loss as a plain float64 function of the temperature logit g = 1: 0.9 T^2 KL at T = 1 + 2 sigmoid(g)
    g = torch.ones((), dtype=torch.float64, requires_grad=True)
    temp = 1.0 + 2.0 * torch.sigmoid(g)
    p_t = F.softmax(torch.tensor(T_LOGITS, dtype=torch.float64) / temp, dim=1)
    log_p_s = F.log_softmax(torch.tensor(S_LOGITS, dtype=torch.float64) / temp, dim=1)
    (0.9 * temp**2 * (p_t * (p_t.log() - log_p_s)).sum(1).mean()).backward()
    assert abs(g.grad.item()) > 1e-2
    assert got == pytest.approx(factor * g.grad.item(), rel=1e-4)


# ---- OFD --------------------------------------------------------------------------------------------------
def phi(x):
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def big_phi(x):
    return (1 + math.erf(x / math.sqrt(2))) / 2


def test_ofd_margin_is_the_mean_negative_response_of_the_teachers_batch_norm():
    bn = torch.nn.BatchNorm2d(4)
    bn.weight.data = torch.tensor([1.0, 1.0, -2.0, 0.5])
    bn.bias.data = torch.tensor([0.0, 5.0, -1.0, 0.3])
    got = margins(bn).flatten().tolist()
    # E[x | x < 0] for x ~ N(m, s^2), s = |weight|: m - s phi(m/s) / Phi(-m/s); -3 s once Phi(-m/s) <= 0.001
    expected = [-math.sqrt(2 / math.pi),  # N(0, 1): -sqrt(2 / pi)
                -3.0,  # Phi(-5) = 2.9e-7
                -1.0 - 2 * phi(0.5) / big_phi(0.5),
                0.3 - 0.5 * phi(0.6) / big_phi(-0.6)]
    assert got == pytest.approx(expected, rel=1e-6)
    assert margins(bn).shape == (1, 4, 1, 1)


def test_ofd_partial_l2_skips_what_the_relu_would_hide():
    margin = torch.full((1, 6, 1, 1), -1.0)
    source = torch.tensor([2.0, 0.0, 0.0, -3.0, -0.2, -0.8]).view(1, 6, 1, 1)
    target = torch.tensor([1.0, -2.0, -0.5, -2.0, -0.5, -0.5]).view(1, 6, 1, 1)
    # t > 0: (s - t)^2 = 1; t <= m < s: (s - m)^2 = 1; m < t <= 0 < s - t: (s - t)^2 = 0.25; s below m: 0;
    # m < t <= 0 with s > t: (s - t)^2 = 0.09; m < t <= 0 with s below t: 0
    got = ofd_distill_loss(source, target, margin).item()
    assert got == pytest.approx(1 + 1 + 0.25 + 0 + 0.09 + 0, rel=1e-6)
    two = ofd_distill_loss(source.repeat(2, 1, 1, 1), target.repeat(2, 1, 1, 1), margin).item()
    assert two == pytest.approx(got, rel=1e-6)  # summed over channels and pixels, mean over the batch


def test_ofd_refuses_a_teacher_whose_batch_norms_it_does_not_know():
    from mixkd.errors import MixkdError

    with pytest.raises(MixkdError, match="kd.method ofd: no batch norm before each stage's ReLU known for the teacher"):
        make_distiller("ofd", create_model("resnet8", 10), create_model("MobileNetV2", 10).eval())


# ---- CRD --------------------------------------------------------------------------------------------------
def test_crd_nce_loss_by_hand():
    # one sample, positive 0.5, two negatives 0.25, noise 1/4: K Pn = 1/2;
    # -(log(0.5 / 1.0) + 2 log(0.5 / 0.75)) = log 2 + 2 log 1.5 = log 4.5
    assert contrast_loss(torch.tensor([[0.5, 0.25, 0.25]]), 0.25).item() == pytest.approx(math.log(4.5), rel=1e-6)


# ---- in the step --------------------------------------------------------------------------------------------
def test_losses_trace_as_one_graph_without_host_syncs(one_thread):
    """Dynamo with fullgraph=True refuses a graph break (an .item(), a branch on a tensor, a boolean
    index): what the CUDA graph and the compiled step need. The models' forward traces for every method
    already (tests/test_kd_methods.py); here each method's own part: the feature term on the models'
    features, and CTKD's whole loss on fixed logits."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = 0.6 * F.one_hot(torch.arange(4), 10).float() + 0.4 * F.one_hot(torch.arange(4) + 3, 10).float()
    for method in NEW:
        torch.manual_seed(1)
        torch._dynamo.reset()
        if method == "ctkd":
            d = make_distiller(method, Fixed(S_LOGITS), Fixed(T_LOGITS))
            d.set_epoch(3, 10)
            out = torch.compile(d.losses, backend="eager", fullgraph=True)(torch.zeros(2), y[:2, :4])
            assert all(torch.isfinite(out[k]) for k in d.loss_names)
            continue
        d = make_distiller(method, create_model("resnet8", 10), create_model("resnet8", 10).eval(), SMALL.get(method))
        d.set_epoch(3, 10)
        d.set_training_set(torch.arange(40) % 10)
        inputs = {"index": torch.tensor([3, 17, 25, 38])} if "index" in d.inputs else {}
        feats_s, _ = d.student(x, is_feat=True, preact=d.student_preact)
        with torch.no_grad():
            feats_t, _ = d.teacher(x, is_feat=True, preact=d.teacher_preact)
        term = torch.compile(d.feature_term, backend="eager", fullgraph=True)(feats_s, feats_t, **inputs)
        assert term.dim() == 0 and torch.isfinite(term), method


@pytest.fixture(scope="module")
def digits_batch():
    from mixkd.data.digits import load_digits

    train = load_digits(("train",)).train
    return train.images[:16].float() / 255, train.labels[:16], train.labels


@pytest.mark.parametrize("method", NEW)
def test_each_method_trains_an_epoch_on_digits_with_partial_mixup_and_steps_without_and_with_full_mixup(
        method, teacher_file, digits_batch, tmp_path, one_thread):  # noqa: F811
    """One epoch through ``mixkd distill`` with PMU (10% mixed), then a step of the method without mixing
    and one with every sample mixed, on 16 digits: the losses stay finite and the method's own modules
    (if any) are trained."""
    args = ["distill", "--kd", method, "--teacher", str(teacher_file), "--student", "resnet8", "--dataset", "digits",
            "--epochs", "1", "--batch-size", "256", "--device", "cpu", "--no-progress", "--mix", "mixup",
            "--mix-fraction", "0.1", "--out", str(tmp_path)]
    assert main(args + [f"kd.{k}={v}" for k, v in SMALL.get(method, {}).items()]) == 0
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    losses = {k: v for k, v in row.items() if k.startswith("train_")}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    assert json.loads((tmp_path / "result.json").read_text())["kd_method"] == method

    x, y, labels = digits_batch
    torch.manual_seed(0)
    d = make_distiller(method, create_model("resnet8", 10), create_model("resnet8", 10).eval(), SMALL.get(method))
    d.set_training_set(labels)
    if "index" in d.inputs:  # the batch's samples are the training set's first 16
        y = torch.stack([y, torch.arange(16)])
    before = [p.detach().clone() for p in d.modules.parameters()]
    for mix in (MixSpec("none"), MixSpec("mixup", 1.0, 1.0)):
        step = TrainStep(d, SGD(d.parameters(), lr=0.05), mix, 10, torch.Generator().manual_seed(0))
        step(x, y)
        means = step.epoch_means()
        assert set(means) == set(d.loss_names) and all(math.isfinite(v) for v in means.values()), (mix, means)
    after = list(d.modules.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.isfinite(p).all() for p in d.parameters())


# ---- logit standardization as a switch of the logit methods ------------------------------------------------
def test_kd_with_standardize_at_the_authors_recipe_is_lskd():
    """LS-KD's KD + LS (--logit-stand --base-temp 2 --kd-weight 9) is kd with standardize, -T 2, --kd-weight 9."""
    target = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    switched = make_distiller("kd", Fixed(S_LOGITS), Fixed(T_LOGITS), {"standardize": True, "temperature": 2.0,
                                                                       "kd_weight": 9.0})
    lskd = make_distiller("lskd", Fixed(S_LOGITS), Fixed(T_LOGITS))
    a, b = switched.losses(torch.zeros(2), target), lskd.losses(torch.zeros(2), target)
    assert {k: v.item() for k, v in a.items()} == pytest.approx({k: v.item() for k, v in b.items()}, rel=1e-6)
    plain = make_distiller("kd", Fixed(S_LOGITS), Fixed(T_LOGITS), {"temperature": 2.0, "kd_weight": 9.0})
    assert plain.losses(torch.zeros(2), target)["kd"].item() != pytest.approx(a["kd"].item(), rel=1e-2)


def test_dkd_and_dist_with_standardize_equal_the_authors_terms_on_z_scored_logits():
    from test_distillation_loss import authors_dist, authors_dkd

    def normalize(z):  # logit-standardization-KD mdistiller/distillers/DKD.py ``normalize``
        return (z - z.mean(dim=-1, keepdims=True)) / (1e-7 + z.std(dim=-1, keepdims=True))

    g = torch.Generator().manual_seed(4)
    s, t = 3 * torch.randn(16, 100, generator=g), 3 * torch.randn(16, 100, generator=g)
    labels = torch.randint(0, 100, (16,), generator=g)
    y = F.one_hot(labels, 100).float()
    # LS-KD tools/train.py for DKD: alpha and beta times --kd-weight 9, T = --base-temp 2; here kd_weight 9
    dkd = make_distiller("dkd", Fixed(s.tolist()), Fixed(t.tolist()), {"standardize": True, "temperature": 2.0,
                                                                       "kd_weight": 9.0, "warmup_epochs": 0})
    out = dkd.losses(torch.zeros(16), y)
    ce = F.cross_entropy(s, labels)  # on the raw logits, as LS-KD's
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    authors = authors_dkd(normalize(s), normalize(t), labels, 9.0, 72.0, 2.0)
    assert out["loss"].item() == pytest.approx((ce + authors).item(), rel=1e-5)
    dist = make_distiller("dist", Fixed(s.tolist()), Fixed(t.tolist()), {"standardize": True})
    assert dist.losses(torch.zeros(16), y)["kd"].item() == pytest.approx(
        authors_dist(normalize(s), normalize(t), 1.0, 1.0, 4.0).item(), rel=1e-5)


# ---- CUDA (bench/device.sh methods runs these on the GPU) ----------------------------------------------------
CUDA_METHODS = NEW + ("mlkd",)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_step(method: str, step_cls, mix: MixSpec):
    """A resnet8 pair's step of ``method`` on CUDA, and a function giving the batches it reads in its
    layout (mixkd.data.layout: MLKD's strong view, CRD's sample indices)."""
    from mixkd.data.layout import BatchLayout

    torch.manual_seed(0)
    d = make_distiller(method, create_model("resnet8", 10).cuda(), create_model("resnet8", 10).cuda().eval(),
                       SMALL.get(method))
    d.set_epoch(2, 10)
    d.set_training_set(torch.arange(640, device="cuda") % 10)
    layout = BatchLayout.for_method(d.inputs)
    step = step_cls(d, SGD(d.parameters(), lr=0.05), mix, 10, torch.Generator(device="cuda").manual_seed(1))
    g = torch.Generator(device="cuda").manual_seed(5)

    def batch(i: int):
        x = torch.randn(64, 3, 32, 32, device="cuda", generator=g)
        y = torch.randint(0, 10, (64,), device="cuda", generator=g)
        strong = torch.randn(64, 3, 32, 32, device="cuda", generator=g) if layout.strong else None
        index = torch.arange(64 * i, 64 * (i + 1), device="cuda") % 640 if layout.index else None
        return layout.pack(x, y, strong=strong, index=index)

    return d, step, batch


@cuda
@pytest.mark.parametrize("method", CUDA_METHODS)
def test_each_catalogue_method_is_captured_by_the_cuda_graph(method):
    """The graphed step (one CUDA graph a step) computes what the eager step computes over 20 steps (CRD: its
    negatives are drawn from torch's generator, which eager and graphed steps consume differently: there the
    graphed run's losses are finite and its memory rows of the batches' samples are written)."""
    from mixkd.step import GraphedTrainStep

    results = []
    for cls in (TrainStep, GraphedTrainStep):
        d, step, batch = cuda_step(method, cls, MixSpec("mixup", 1.0, 0.5))
        memory = [t.detach().clone() for t in d.memory.buffers()] if method == "crd" else []
        for i in range(20):
            step(*batch(i % 10))
        means = step.epoch_means()
        assert all(math.isfinite(v) for v in means.values()), (cls.__name__, means)
        if method == "crd":
            assert any(not torch.equal(a, b) for a, b in zip(memory, d.memory.buffers(), strict=True))
        results.append((means, [p.detach().clone() for p in d.parameters()]))
    if method == "crd":
        return
    (eager, w_eager), (graph, w_graph) = results
    for k in eager:
        assert graph[k] == pytest.approx(eager[k], rel=1e-4, abs=1e-4), k
    for a, b in zip(w_eager, w_graph, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("method", CUDA_METHODS)
def test_each_catalogue_method_steps_without_host_sync_on_cuda(method):
    """No step of the method reads a value back to the host (KDSVD's SVD, CRD's draws, MLKD's medians)."""
    _, step, batch = cuda_step(method, TrainStep, MixSpec("cutmix", 1.0, 0.5))
    step(*batch(0))  # the first step may set things up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 4):
            step(*batch(i))
    finally:
        torch.cuda.set_sync_debug_mode("default")
