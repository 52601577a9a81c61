"""Compilation of the step (torch.compile) computes what the plain step does, is paid once per
architecture in a process, and `TrainStep.measure` leaves a run exactly as it was."""

import os
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from mixkd.distiller import make_distiller
from mixkd.errors import MixkdError
from mixkd.mix import MixSpec
from mixkd.models import create_model
from mixkd.step import (
    RECOMPILE_LIMIT,
    SGD,
    CompileSpec,
    GraphedTrainStep,
    TrainStep,
    allow_recompiles,
    resolve_compile,
    set_compile_cache,
)

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="inductor on the CPU needs a C++ compiler")


class Tiny(torch.nn.Module):
    """conv -> batch norm -> ReLU -> pool -> linear: the kernels of a CIFAR ResNet, small enough to compile on 2 cores."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.drop = torch.nn.Dropout(dropout)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


def _tiny_step(seed=0, compile=None, dropout=0.0):
    torch.manual_seed(seed)
    student, teacher = Tiny(dropout), Tiny().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    step = TrainStep(make_distiller("std", student, teacher), SGD(student.parameters(), lr=0.05),
                     MixSpec("mixup", 1.0, 0.5), 10, gen, "fp32", compile)
    return step, student


def _batches(n, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def _state(step, student):
    return [t.clone() for t in [*student.parameters(), *student.buffers(), *step.optimizer.buffers, step.sums]]


def test_resolve_compile():
    assert resolve_compile("auto", "cuda", "cifar100") and resolve_compile("auto", "cuda", "digits")
    assert not resolve_compile("auto", "cpu", "cifar100")
    assert not resolve_compile("auto", "cuda", "imagefolder")
    assert resolve_compile("on", "cpu", "imagefolder") and not resolve_compile("off", "cuda", "cifar100")
    with pytest.raises(MixkdError, match="compile must be one of auto, on, off"):
        resolve_compile("yes", "cuda", "cifar100")


def test_compile_setting_in_config_and_cli(tmp_path):
    from mixkd.cli import build_parser
    from mixkd.config import build_config

    assert build_config().compile == "auto"
    f = tmp_path / "run.yaml"
    f.write_text("compile: on\n")  # YAML reads a bare on as true
    cfg = build_config(file=f)
    assert cfg.compile == "on" and "compile: 'on'" in cfg.to_yaml()
    assert build_config(overrides=["compile=off"]).compile == "off"
    with pytest.raises(MixkdError, match="compile"):
        build_config(overrides=["compile=sometimes"])
    assert build_parser().parse_args(["train", "--compile", "off"]).opt_compile == "off"


def test_compile_spec_rejects_unknown_scope_and_cudagraph_modes():
    assert CompileSpec().options() == {"backend": "inductor", "dynamic": False, "mode": None}
    assert CompileSpec("step", "max-autotune-no-cudagraphs").options()["mode"] == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="scope"):
        CompileSpec("everything")
    with pytest.raises(ValueError, match="mode"):
        CompileSpec(mode="reduce-overhead")  # inductor's CUDA graphs cannot nest in the step's


def test_set_compile_cache_points_inductor_at_the_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    path = set_compile_cache(tmp_path / "study" / ".compile-cache")
    assert path.is_dir() and path.is_absolute()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(path)


_LIMIT_OPTIONS = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                  "accumulated_cache_size_limit", "fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")


@pytest.fixture
def dynamo_limits():
    """Dynamo's recompile options as the test found them, restored after it (allow_recompiles sets them
    for the whole process). Not monkeypatch: pytest >= 9.2 undoes a config-module attribute by deleting it."""
    cfg = torch._dynamo.config
    saved = {n: getattr(cfg, n) for n in _LIMIT_OPTIONS if hasattr(cfg, n)}
    yield cfg
    for n, v in saved.items():
        setattr(cfg, n, v)
    assert {n: getattr(cfg, n) for n in saved} == saved


def test_raised_recompile_limit_keeps_many_variants_compiled(dynamo_limits):
    """Past dynamo's default limit (8 variants of one function) it would run the rest eagerly."""
    cfg = dynamo_limits
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    fail = next((n for n in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit") if hasattr(cfg, n)), None)
    setattr(cfg, name, 8)
    if fail:
        setattr(cfg, fail, False)
    allow_recompiles()
    assert getattr(cfg, name) == RECOMPILE_LIMIT
    assert fail is None or getattr(cfg, fail) is True  # hitting the raised limit is an error, never eager
    allow_recompiles(4)
    assert getattr(cfg, name) == RECOMPILE_LIMIT  # never lowered

    def f(x):
        return x * 2 + 1

    fn = torch.compile(f, backend="eager", dynamic=False)  # dynamo only: cheap
    before = counters["stats"]["unique_graphs"]
    for n in range(1, 13):  # 12 shapes: 12 variants of one code object
        assert torch.equal(fn(torch.ones(n)), torch.full((n,), 3.0))
    assert counters["stats"]["unique_graphs"] - before == 12


def test_a_dynamo_without_the_limit_option_is_one_clear_error(monkeypatch):
    """Never a bare StopIteration: the torch version, the missing option, and what to do."""
    monkeypatch.setattr(torch._dynamo, "config", type("Config", (), {})())
    with pytest.raises(MixkdError, match=r"torch .*: torch._dynamo.config has no recompile_limit or "
                                         r"cache_size_limit.*set compile: off"):
        allow_recompiles()


def test_measure_restores_everything_bit_exactly(one_thread):
    """measure() before the first step and mid-run changes nothing (dropout draws from torch's RNG)."""
    data = _batches(4)
    runs = []
    for with_measure in (False, True):
        torch.manual_seed(123)
        step, student = _tiny_step(dropout=0.2)
        torch.manual_seed(7)
        losses = []
        for i, (x, y) in enumerate(data):
            if with_measure and i in (0, 2):
                steps, sums = step.steps, step.sums.clone()
                assert step.measure(x, y) > 0
                assert step.steps == steps and torch.equal(step.sums, sums)
            step(x, y)
            losses.append(step.sums.clone())
        runs.append((losses, _state(step, student), step.generator.get_state(), torch.get_rng_state()))
    (l0, s0, g0, r0), (l1, s1, g1, r1) = runs
    assert all(torch.equal(a, b) for a, b in zip(l0, l1, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(s0, s1, strict=True))
    assert torch.equal(g0, g1) and torch.equal(r0, r1)


@needs_compiler
def test_compiled_step_matches_plain_step_and_compiles_once(one_thread, dynamo_limits):
    """Teacher and student compiled (inductor, CPU): same losses and weights; more runs of the same
    architecture in the process reuse the compiled code (no recompilation, no eager fallback)."""
    data = _batches(3)
    plain, plain_student = _tiny_step()
    compiled, compiled_student = _tiny_step(compile=True)
    assert compiled.compiled and not plain.compiled
    assert compiled.measure(*data[0]) > 0  # compiles in its untimed first step, then restores
    for x, y in data:
        plain(x, y)
        compiled(x, y)
        assert compiled.epoch_means() == pytest.approx(plain.epoch_means(), rel=1e-5, abs=1e-6)
    for a, b in zip(_state(plain, plain_student), _state(compiled, compiled_student), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # the plain modules are untouched: evaluation and checkpoints see the usual module
    assert compiled.distiller.student is compiled_student and not hasattr(compiled_student, "_orig_mod")
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    for seed in range(1, 4):  # three more runs of the pair, as in a pack
        step, _ = _tiny_step(seed=seed, compile=True)
        step(*data[0])
        assert torch.isfinite(step.sums).all()
    assert counters["stats"]["unique_graphs"] == graphs and counters["frames"]["total"] == frames


# ---- on a GPU ---------------------------------------------------------------------------------------
def _resnet_step(cls, precision="fp32", compile=None):
    torch.manual_seed(0)
    student = create_model("resnet8", 10).to("cuda")
    teacher = create_model("resnet8", 10).to("cuda").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if precision == "bf16":
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    learner = make_distiller("std", student, teacher)
    learner.channels_last = precision == "bf16"
    gen = torch.Generator(device="cuda").manual_seed(1)
    step = cls(learner, SGD(student.parameters(), lr=0.05), MixSpec("mixup", 1.0, 0.1), 10, gen, precision, compile)
    return step, student


def _train_20(step, measure_at=()):
    g = torch.Generator(device="cuda").manual_seed(5)
    per_step = []
    for i in range(20):
        if i == 10:
            step.optimizer.set_lr(0.005)  # lr changes must reach the captured graph
        x = torch.randn(64, 3, 32, 32, device="cuda", generator=g)
        y = torch.randint(0, 10, (64,), device="cuda", generator=g)
        if i in measure_at:
            assert step.measure(x, y) > 0
        step(x, y)
        per_step.append(step.epoch_means()["loss"])
    return per_step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("precision,scope", [("fp32", "models"), ("bf16", "models"), ("bf16", "step")])
def test_compiled_graphed_step_matches_uncompiled_over_20_steps(precision, scope):
    """Within test_step.py's graphed-vs-eager tolerance: losses of every step, and the weights."""
    runs = {}
    for compile in (None, CompileSpec(scope)):
        step, student = _resnet_step(GraphedTrainStep, precision, compile)
        runs[compile is not None] = (_train_20(step), [p.detach().float().clone() for p in student.parameters()])
    tol = 1e-4 if precision == "fp32" else 2e-2
    assert runs[True][0] == pytest.approx(runs[False][0], rel=tol, abs=tol)
    for a, b in zip(runs[True][1], runs[False][1], strict=True):
        assert torch.allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_measure_leaves_a_graphed_run_as_it_was():
    """measure() before the capture and mid-run: the same losses and weights as without it."""
    runs = []
    for measure_at in ((), (0, 7)):
        step, student = _resnet_step(GraphedTrainStep)
        runs.append((_train_20(step, measure_at), [p.detach().clone() for p in student.parameters()]))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-4, abs=1e-4)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(runs[0][1], runs[1][1], strict=True))
