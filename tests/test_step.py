"""The training step: SGD equals torch's, losses are summed on the device, graphed == eager on CUDA."""

import pytest
import torch

from mixkd.distiller import make_distiller
from mixkd.losses import KDObjective
from mixkd.mix import MixSpec, mix_batch
from mixkd.models import create_model
from mixkd.step import SGD, GraphedTrainStep, TrainStep, one_hot


def test_sgd_matches_torch_optim_sgd():
    torch.manual_seed(0)
    a = create_model("resnet8", 10)
    b = create_model("resnet8", 10)
    b.load_state_dict(a.state_dict())
    ours = SGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ref = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for step in range(4):
        if step == 2:
            ours.set_lr(0.005)
            ref.param_groups[0]["lr"] = 0.005
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    # equal up to float rounding (torch fuses lr * buffer into the add; the lr tensor here cannot be)
    assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_sgd_state_dict_has_torch_layout_and_round_trips():
    model = create_model("resnet8", 10)
    opt = SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = opt.state_dict()
    ref = torch.optim.SGD(create_model("resnet8", 10).parameters(), lr=0.1, momentum=0.9)
    ref.load_state_dict(state)  # torch accepts it
    other = SGD(create_model("resnet8", 10).parameters(), lr=1.0)
    other.load_state_dict(state)
    assert float(other.lr) == pytest.approx(0.1)
    assert all(torch.equal(x, y) for x, y in zip(other.buffers, opt.buffers, strict=True))


def test_one_hot_matches_torch():
    y = torch.tensor([3, 0, 9])
    assert torch.equal(one_hot(y, 10), torch.nn.functional.one_hot(y, 10).float())


def _step(cls, device, precision="fp32"):
    torch.manual_seed(0)
    student = create_model("resnet8", 10).to(device)
    teacher = create_model("resnet8", 10).to(device).eval()
    learner = make_distiller("std", student, teacher)
    gen = torch.Generator(device=device).manual_seed(1)
    opt = SGD(student.parameters(), lr=0.05)
    return cls(learner, opt, MixSpec("mixup", 1.0, 0.1), 10, gen, precision), student


def test_eager_step_trains_and_reports_mean_losses():
    step, student = _step(TrainStep, "cpu")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    before = [p.clone() for p in student.parameters()]
    for _ in range(3):
        step(x, y)
    means = step.epoch_means()
    assert set(means) == {"loss", "ce", "kd"} and all(v > 0 for v in means.values())
    assert means["loss"] == pytest.approx(0.1 * means["ce"] + 0.9 * means["kd"], rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert step.epoch_means() == {"loss": 0.0, "ce": 0.0, "kd": 0.0}  # reset after reading


@pytest.mark.parametrize("method,mix", [("kd", MixSpec("mixup", 1.0, 1.0)), ("std", MixSpec("cutmix", 1.0, 0.5))])
def test_step_loss_is_the_objective_on_the_batch_mixed_with_the_runs_generator(method, mix):
    """One step's loss is the objective on the batch that mix_batch makes from the run's generator
    (never on the unmixed batch), with the weights before the update."""
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5)).eval()
    objective = KDObjective(method, temperature=4.0)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(8, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    with torch.no_grad():
        xm, ym = mix_batch(x, one_hot(y, 5), mix, torch.Generator().manual_seed(11))
        expected = objective(student(xm), teacher(xm), ym)
        unmixed = objective(student(x), teacher(x), one_hot(y, 5))
    step = TrainStep(make_distiller(method, student, teacher), SGD(student.parameters(), lr=0.1), mix, 5,
                     torch.Generator().manual_seed(11))
    step(x, y)
    means = step.epoch_means()
    assert means == pytest.approx({k: v.item() for k, v in expected.items()}, rel=1e-5)
    assert means["loss"] != pytest.approx(unmixed["loss"].item(), rel=1e-3)


def test_bf16_step_runs_with_fp32_losses_on_cpu():
    step, _ = _step(TrainStep, "cpu", "bf16")
    step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    assert step.sums.dtype == torch.float32 and torch.isfinite(step.sums).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_and_eager_steps_give_the_same_losses_over_20_steps(precision):
    losses = {}
    for cls in (TrainStep, GraphedTrainStep):
        step, student = _step(cls, "cuda", precision)
        g = torch.Generator(device="cuda").manual_seed(5)
        per_step = []
        for i in range(20):
            if i == 10:
                step.optimizer.set_lr(0.005)  # lr changes must reach the captured graph
            x = torch.randn(64, 3, 32, 32, device="cuda", generator=g)
            y = torch.randint(0, 10, (64,), device="cuda", generator=g)
            step(x, y)
            per_step.append(step.epoch_means()["loss"])
        losses[cls.__name__] = per_step
    tol = 1e-4 if precision == "fp32" else 2e-2
    assert losses["GraphedTrainStep"] == pytest.approx(losses["TrainStep"], rel=tol, abs=tol)
