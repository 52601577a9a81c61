"""mixkd augment-score: Wang et al.'s T. stddev, its bootstrap interval, the teacher's entropy, the table.

The statistic is pinned to hand-computed values; the scoring loop and the command run a tiny resnet8
teacher on digits through a local stand-in of the policy pipeline (``mixkd.augment.make_pipeline``'s
contract: ``sample(x_uint8)`` then ``mix(x, y_onehot, teacher=...)``)."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from mixkd.analysis.augment_score import (
    augment_batch,
    augment_score,
    batch_mean_probs,
    bootstrap_interval,
    entropy,
    format_scores,
    parse_policies,
    score_means,
    score_policy,
    t_stddev,
)
from mixkd.data.spec import DIGITS_MEAN, DIGITS_STD
from mixkd.errors import MixkdError


def test_batch_mean_probs_and_entropy_by_hand():
    # softmax([0, 0]) = [1/2, 1/2]; softmax([2 ln 3, 0] / 2) = [3/4, 1/4]: batch mean [5/8, 3/8] at T = 2
    logits = torch.tensor([[0.0, 0.0], [2 * math.log(3), 0.0]])
    assert batch_mean_probs(logits, 2.0).tolist() == pytest.approx([0.625, 0.375])
    h = entropy(logits, 2.0).tolist()
    assert h == pytest.approx([math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))])


def test_t_stddev_by_hand():
    # per class 0.2, 0.4, 0.6 (sample std 0.2) and 0.8, 0.6, 0.4 (0.2): the mean over classes 0.2;
    # a third class constant at 0: (0.2 + 0.2 + 0) / 3
    means = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])
    assert t_stddev(means) == pytest.approx(0.2)
    three = torch.tensor([[0.2, 0.8, 0.0], [0.4, 0.6, 0.0], [0.6, 0.4, 0.0]])
    assert t_stddev(three) == pytest.approx(0.4 / 3)
    with pytest.raises(MixkdError, match="at least 2 batches"):
        t_stddev(means[:1])


def test_bootstrap_interval_by_hand():
    # two batches: the estimate is |a - b| / sqrt(2) = 0.4 / sqrt(2) per class; a resample is (a, a) or (b, b)
    # with probability 1/2 (std 0), else (a, b) (the estimate): quantiles 0 and est, basic interval [est, 2 est]
    means = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    low, high = bootstrap_interval(means, reps=4000, generator=torch.Generator().manual_seed(0), chunk=300)
    assert (low, high) == (pytest.approx(0.4 / math.sqrt(2)), pytest.approx(0.8 / math.sqrt(2)))
    # identical batches: no spread, a zero-width interval
    assert bootstrap_interval(torch.full((5, 3), 1 / 3), reps=200) == pytest.approx((0.0, 0.0))
    # many batches: the interval brackets the estimate, and narrows as batches are added
    gen = torch.Generator().manual_seed(1)
    few = torch.softmax(torch.randn(10, 4, generator=gen), -1)
    many = torch.softmax(torch.randn(400, 4, generator=gen), -1)
    lf, hf = bootstrap_interval(few, reps=500, generator=gen)
    lm, hm = bootstrap_interval(many, reps=500, generator=gen)
    assert lf < t_stddev(few) < hf and lm < t_stddev(many) < hm and lf >= 0
    assert hm - lm < (hf - lf) / 2


class _Linear(torch.nn.Module):
    """A teacher whose logits are known: the mean of each image's channels, one logit per class (scaled)."""

    def __init__(self, classes: int):
        super().__init__()
        self.scale = torch.arange(1, classes + 1, dtype=torch.float32)

    def forward(self, x):
        return x.float().mean((1, 2, 3))[:, None] * self.scale


class _Pick:
    """A batch policy that picks with the teacher (CutMixPick's interface): a pool of the batch and its mirror
    image, the teacher's most confident half kept."""

    needs_models = True
    settings = types.SimpleNamespace(criterion="teacher_entropy")

    def __init__(self):
        self.scored = []

    def candidates(self, x, y, generator=None):
        return torch.cat([x, x.flip(-1)]), torch.cat([y, y])

    def pick(self, pool, teacher_logits, student_logits, batch_size):
        self.scored.append((teacher_logits, student_logits))
        return teacher_logits.max(-1).values.topk(batch_size // 2).indices


class _StandIn:
    """The policy pipeline's interface (mixkd.augment.Pipeline): ``sample(x_uint8, native=...)`` scales to
    [0, 1] (and, for 'flip', flips); ``batch``: None, a mixing policy (``method``) or one that picks."""

    def __init__(self, spec: str):
        self.spec, self.natives = spec, []
        self.batch = _Pick() if spec == "pick" else types.SimpleNamespace(method="mixup") if spec == "mixup" else None

    def sample(self, x, seed=None, native=False):
        self.natives.append(native)
        x = x.float() / 255
        return x.flip(-1) if self.spec == "flip" else x


def test_augment_batch_per_sample_then_batch_stage():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 2, 2), dtype=torch.uint8, generator=gen)
    y = torch.eye(3)[[0, 1, 2, 0, 1, 2]]
    teacher = _Linear(3)
    flip = _StandIn("flip")
    assert torch.equal(augment_batch(flip, x, y, teacher), (x.float() / 255).flip(-1)) and flip.natives == [True]
    # mixup: every sample a convex combination of two images of the batch (Beta(1, 1) weights)
    mixed = augment_batch(_StandIn("mixup"), x, y, teacher, torch.Generator().manual_seed(1))
    assert mixed.shape == x.shape and not torch.equal(mixed, x.float() / 255)
    assert mixed.min() >= (x.float() / 255).min() and mixed.max() <= (x.float() / 255).max()
    # a pick: scored by the teacher only, the kept half of the pool returned
    pick = _StandIn("pick")
    out = augment_batch(pick, x, y, teacher)
    pool = torch.cat([x.float() / 255, (x.float() / 255).flip(-1)])
    (t_logits, s_logits), = pick.batch.scored
    assert torch.equal(t_logits, teacher(pool)) and s_logits is None
    assert torch.equal(out, pool[teacher(pool).max(-1).values.topk(3).indices])
    pick.batch.settings = types.SimpleNamespace(criterion="student_entropy")
    with pytest.raises(MixkdError, match="teacher only"):
        augment_batch(pick, x, y, teacher)


def test_score_policy_runs_the_teacher_on_the_pipelines_batches():
    gen = torch.Generator().manual_seed(0)
    raw = [(torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8, generator=gen), torch.tensor([0, 1, 2, 0]))
           for _ in range(3)]
    teacher = _Linear(3)
    pipe = _StandIn("pick")
    done = []
    means, ents = score_policy(teacher, iter(raw), pipe, 3, 3, temperature=2.0, progress=done.append)
    assert done == [1, 2, 3] and len(pipe.batch.scored) == 3
    expected = []
    for x, _ in raw:
        pool = torch.cat([x.float() / 255, (x.float() / 255).flip(-1)])
        top = teacher(pool).max(-1).values.topk(2).indices
        expected.append(torch.softmax(teacher(pool[top]) / 2, -1).mean(0))
    assert torch.allclose(means, torch.stack(expected))
    assert ents.shape == (6,)


def test_score_means_and_table():
    means = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])
    a = score_means("mixup", means, torch.tensor([1.0, 2.0]), 4.0, reps=100)
    b = score_means("none", means / 2, torch.tensor([0.5]), 4.0, reps=100)
    assert (a.t_stddev, a.entropy, a.batches) == (pytest.approx(0.2), 1.5, 3)
    text = format_scores([a, b]).splitlines()
    assert "3 batches" in text[0] and "T = 4" in text[0]
    assert [line.split()[0] for line in text[2:]] == ["none", "mixup"]  # lowest T. stddev first
    assert text[3].split()[1] == "2.000e-01"


def test_parse_policies():
    assert parse_policies("none, flip_crop+cutout,mixup") == ["none", "flip_crop+cutout", "mixup"]
    for bad in ("", "none,,mixup", "mixup,mixup"):
        with pytest.raises(MixkdError, match="--augment"):
            parse_policies(bad)


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    from mixkd.checkpoint import save_checkpoint
    from mixkd.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_checkpoint(path, create_model("resnet8", 10), model_name="resnet8", num_classes=10, epoch=1,
                    extra={"dataset": "digits"})
    return path


def test_augment_score_command_on_digits(digits_teacher, monkeypatch, capsys):
    pipes = {}

    def make(spec, settings, *, image_size, mean, std, device, generator, dataset, temperature):
        assert (image_size, len(mean), len(std), settings, dataset, temperature) == (32, 3, 3, {}, "digits", 4.0)
        pipes[spec] = _StandIn(spec)
        return pipes[spec]

    seen = []
    scores = augment_score(str(digits_teacher), ["none", "flip"], dataset="digits", batches=3, batch_size=8,
                           reps=50, make_pipeline=make, progress=lambda p, i, n: seen.append((p, i, n)))
    assert [s.policy for s in scores] == ["none", "flip"] and seen[-1] == ("flip", 3, 3)
    assert all(s.batches == 3 and s.temperature == 4.0 and s.low <= s.t_stddev <= s.high for s in scores)
    assert scores[0].t_stddev != scores[1].t_stddev  # the same batches, augmented differently
    # the command, with mixkd.augment's own pipelines (CutMixPick picks with the teacher), --json
    from mixkd.cli import main

    assert main(["augment-score", "--teacher", str(digits_teacher), "--augment", "flip_crop,flip_crop+cutmix_pick",
                 "--dataset", "digits", "--batches", "2", "--batch-size", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in rows] == ["flip_crop", "flip_crop+cutmix_pick"] and rows[0]["batches"] == 2
    assert main(["augment-score", "--teacher", str(digits_teacher), "--augment", "flip_crop+nonsense",
                 "--dataset", "digits", "--batches", "2"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["augment-score", "--teacher", str(digits_teacher), "--augment", "none", "--batches", "1"]) == 2
    assert "--batches" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "mixkd.augment", None)  # an import of it fails
    assert main(["augment-score", "--teacher", str(digits_teacher), "--dataset", "digits"]) == 2
    assert "needs the augmentation policies" in capsys.readouterr().err


def test_scores_saved_in_the_teacher_folder_reach_a_study_row(tmp_path):
    from mixkd.analysis.augment_score import read_scores, save_scores
    from mixkd.study.rows import _t_stddev

    teacher = tmp_path / "teachers" / "resnet8-plain-s0"
    teacher.mkdir(parents=True)
    means = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])
    save_scores(teacher, [score_means("flip_crop", means, torch.ones(2), 4.0, reps=20),
                          score_means("flip_crop+mixup", means / 2, torch.ones(2), 4.0, reps=20)], 64)
    save_scores(teacher, [score_means("flip_crop", means / 4, torch.ones(2), 4.0, reps=20)], 64)  # scored again
    assert read_scores(teacher) == {"flip_crop": pytest.approx(0.05), "flip_crop+mixup": pytest.approx(0.1)}
    cfg = {"task": "distill", "augment": "flip_crop", "mix": {"method": "none"}}
    assert _t_stddev(tmp_path, "teachers/resnet8-plain-s0", cfg) == pytest.approx(0.05)
    full = {**cfg, "mix": {"method": "mixup", "fraction": 1.0}}  # mixing every sample by mix:, as the spec's +mixup
    assert _t_stddev(tmp_path, "teachers/resnet8-plain-s0", full) == pytest.approx(0.1)
    partial = {**cfg, "mix": {"method": "mixup", "fraction": 0.1}}
    assert _t_stddev(tmp_path, "teachers/resnet8-plain-s0", partial) is None
    assert _t_stddev(tmp_path, "teachers/other", cfg) is None and read_scores(tmp_path) == {}
    (teacher / "augment-score.json").write_text("[1]")
    with pytest.raises(MixkdError, match="not an augment-score file"):
        read_scores(teacher)


def test_the_teacher_gets_the_preprocessing_a_distillation_gives_it(digits_teacher, monkeypatch):
    """As in a distillation (mixkd.engine), the teacher is loaded with the dataset's preprocessing and the
    student's view, so that library weights (timm, torchvision) get their own mean, std and size."""
    import mixkd.loading

    calls, load = [], mixkd.loading.load_teacher

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(mixkd.loading, "load_teacher", recording)
    augment_score(str(digits_teacher), ["none"], dataset="digits", batches=2, batch_size=8, reps=10)
    (kw,) = calls
    data = kw["data"]
    assert (kw["view"], kw["teacher_input"], data.size, data.crop_pct) == ("same", "auto", 32, 1.0)
    assert tuple(data.mean) == pytest.approx(DIGITS_MEAN) and tuple(data.std) == pytest.approx(DIGITS_STD)
