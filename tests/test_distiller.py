"""The distiller interface: the registry, the built-in methods' losses (pinned by hand), and a new
method with its own trainable module and an epoch schedule going through step, engine and checkpoint
without any change to them."""


import pytest
import torch
from run_rows import epoch_rows

from mixkd.checkpoint import save_checkpoint
from mixkd.config import KDConfig, RunConfig, build_config
from mixkd.distiller import Distiller, make_distiller, method_names
from mixkd.engine import Run
from mixkd.errors import MixkdError
from mixkd.losses import soft_cross_entropy
from mixkd.mix import MixSpec
from mixkd.models import create_model
from mixkd.registry import KD_METHODS, NoSettings
from mixkd.step import SGD, TrainStep

# the logits and labels of tests/test_losses.py, with its hand-computed values
S = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
T = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 4.0]])
Y = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
KD_T4, STD_KD, CE, CE_STD = 0.7703364776835958, 0.5832815506628678, 1.1744586305507685, 1.2576059644443802


class Fixed(torch.nn.Module):
    """Returns the given logits (the input is ignored), plus 0 * a parameter so that it has one."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.w = logits, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits + 0 * self.w


def test_registry_lists_the_methods_that_take_a_teacher():
    catalogue = ["at", "nst", "sp", "pkt", "rkd", "kdsvd", "vid", "ofd", "reviewkd", "crd", "ctkd", "mlkd"]
    assert method_names() == ["kd", "std", "dkd", "lskd", "lsdkd", "dist", "fitnet", *catalogue]
    assert method_names(teacher=False) == ["alone"]
    assert method_names(None) == ["alone", "kd", "std", "dkd", "lskd", "lsdkd", "dist", "fitnet", *catalogue]
    assert KD_METHODS.get("kd").obj.__module__ == "mixkd.methods.kd" and issubclass(KD_METHODS.get("std").obj, Distiller)


@pytest.mark.parametrize("method, expected", [
    ("kd", {"loss": 0.1 * CE + 0.9 * KD_T4, "ce": CE, "kd": KD_T4}),
    ("std", {"loss": 0.1 * CE_STD + 0.9 * STD_KD, "ce": CE_STD, "kd": STD_KD}),
])
def test_builtin_methods_give_the_hand_computed_losses(method, expected):
    d = make_distiller(method, Fixed(S), Fixed(T), KDConfig(method=method, temperature=4.0).settings())
    losses = d.losses(torch.zeros(2, 3), Y)
    assert set(losses) == set(d.loss_names) == set(expected)
    for k, v in expected.items():
        assert losses[k].item() == pytest.approx(v, rel=1e-6), k


def test_without_a_teacher_the_student_is_trained_alone():
    d = make_distiller("kd", Fixed(S), None)
    assert d.name == "alone" and d.loss_names == ("loss", "ce")
    assert d.losses(torch.zeros(2, 3), Y)["loss"].item() == pytest.approx(CE, rel=1e-6)


def test_unknown_method_is_one_clear_problem():
    line = ("kd.method: unknown KD method 'dkdd'; did you mean 'dkd'?; choose one of alone, kd, std, dkd, lskd, lsdkd, dist, "
            "fitnet, at, nst, sp, pkt, rkd, kdsvd, vid, ofd, reviewkd, crd, ctkd, mlkd (one of your own: load its file with "
            "--plugin FILE)")
    with pytest.raises(MixkdError) as err:
        make_distiller("dkdd", Fixed(S), Fixed(T))
    assert str(err.value) == line
    # never Hinton's settings in its place: the config itself is refused, in one line
    with pytest.raises(MixkdError) as err:
        RunConfig.model_validate({"model": "resnet8", "dataset": "digits", "kd": {"method": "dkdd"}})
    assert str(err.value) == line
    with pytest.raises(MixkdError) as err:
        build_config(flags={"task": "distill", "kd.method": "dkdd", "kd.teacher": "t.pth"})
    assert str(err.value) == f"invalid config: {line}"
    with pytest.raises(MixkdError, match="unknown KD method 'alone'; choose one of kd, std, dkd"):
        make_distiller("alone", Fixed(S), Fixed(T))  # the student alone takes no teacher


class Hint(Distiller):
    """A new method: CE + (epoch / epochs) * |scale * student - teacher|^2 with a trainable ``scale``."""

    def __init__(self, student, teacher, settings):
        super().__init__(student, teacher, settings)
        self.modules["scale"] = torch.nn.Linear(1, 1, bias=False).to(self.device)
        torch.nn.init.constant_(self.modules["scale"].weight, 0.5)

    def forward_train(self, x, target):
        s = self.student(x)
        with torch.no_grad():
            t = self.teacher(x)
        ce = soft_cross_entropy(s, target)
        kd = (self.modules["scale"](s.float().unsqueeze(-1)).squeeze(-1) - t.float()).pow(2).mean()
        weight = torch.clamp(self.epoch / self.epochs, max=1.0)
        return {"loss": ce + weight * kd, "ce": ce, "kd": kd}


@pytest.fixture
def hint(monkeypatch):
    KD_METHODS.add("hint", Hint, settings=NoSettings)
    yield Hint
    KD_METHODS.remove("hint")


def test_a_new_method_trains_its_module_follows_the_epoch_and_leaves_no_trace_when_measured(hint):
    d = make_distiller("hint", Fixed(S.clone()), Fixed(T))
    scale = d.modules["scale"].weight
    params = list(d.parameters())
    assert len(params) == 2 and params[1] is scale  # student first, then the method's own
    assert any(t is scale for t in d.state_tensors())
    d.set_epoch(1, 4)
    at1 = d.losses(torch.zeros(2, 3), Y)
    d.set_epoch(4, 4)
    at4 = d.losses(torch.zeros(2, 3), Y)
    kd = ((0.5 * S - T) ** 2).mean().item()
    assert at1["kd"].item() == pytest.approx(kd) and at1["loss"].item() == pytest.approx(CE + kd / 4, rel=1e-6)
    assert at4["loss"].item() == pytest.approx(CE + kd, rel=1e-6)
    step = TrainStep(d, SGD(d.parameters(), lr=0.1), MixSpec("none"), 3, torch.Generator().manual_seed(0))
    x, y = torch.zeros(2, 3), torch.tensor([0, 2])
    assert step.measure(x, y) > 0
    assert scale.item() == 0.5  # restored
    step(x, y)
    assert scale.item() != 0.5 and set(step.epoch_means()) == {"loss", "ce", "kd"}
    state = d.state_dict()
    other = make_distiller("hint", Fixed(S), Fixed(T))
    other.load_state_dict(state)
    assert torch.equal(other.modules["scale"].weight, scale)
    with pytest.raises(MixkdError, match="another kd.method"):
        make_distiller("kd", Fixed(S), Fixed(T)).load_state_dict(state)


def test_a_new_method_runs_through_the_engine_and_resumes_exactly(hint, tmp_path, one_thread):
    teacher = create_model("resnet8", 10)
    save_checkpoint(tmp_path / "teacher.safetensors", teacher, model_name="resnet8", num_classes=10, epoch=1)
    flags = {"task": "distill", "model": "resnet8", "dataset": "digits", "epochs": 1, "batch_size": 256,
             "device": "cpu", "progress": False, "compile": "off", "kd.method": "hint",
             "kd.teacher": str(tmp_path / "teacher.safetensors")}

    whole = Run(build_config(flags={**flags, "out": str(tmp_path / "whole")}))
    while whole.advance():
        pass
    cut = Run(build_config(flags={**flags, "out": str(tmp_path / "cut")}))
    for _ in range(3):
        cut.advance()
    assert cut.step_in_epoch == 3
    cut.stop("time")
    resumed = Run(build_config(flags={**flags, "out": str(tmp_path / "cut")}), resume=True)
    assert resumed.advance() and resumed.distiller.modules["scale"].weight.item() != 0.5  # restored, trained
    while resumed.advance():
        pass
    assert epoch_rows(tmp_path / "cut") == epoch_rows(tmp_path / "whole")
    assert whole.result["kd_method"] == "hint"
