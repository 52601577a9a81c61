"""MLKD (issue 28): the strong view the loaders build (in-memory and image folders), both views mixed alike by
the step, the method's forward pass against :func:`mixkd.mlkd_loss.mlkd_losses`, ``mixkd distill --kd mlkd`` on
digits, its refusals, and its 480-epoch recipe."""

import json
from pathlib import Path

import pytest
import torch

from mixkd.augment import make_pipeline
from mixkd.cli import main
from mixkd.config import build_config
from mixkd.data.layout import BatchLayout
from mixkd.data.loaders import CROP_PADDING, DeviceLoader, _SeededFolder, make_loaders
from mixkd.data.spec import ArraySplit
from mixkd.distiller import make_distiller
from mixkd.mix import MixSpec, mix_batch
from mixkd.mlkd_loss import mlkd_losses
from mixkd.models import create_model
from mixkd.step import SGD, TrainStep, one_hot

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
STRONG = BatchLayout(strong=True)
RECIPE = Path(__file__).parents[1] / "configs" / "cifar100" / "student_mlkd.yaml"


@pytest.fixture(scope="module")
def split():
    g = torch.Generator().manual_seed(0)
    return ArraySplit(torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(24) % 4)


def pipe(spec):
    return make_pipeline(spec, image_size=32, mean=MEAN, std=STD)


def device_loader(split, strong=None, seed=3):
    weak = pipe("flip_crop")
    return DeviceLoader(split, 8, "cpu", MEAN, STD, shuffle=True, augment=True, drop_last=True, seed=seed,
                        crop=weak.crop, flip=weak.flip, layout=STRONG if strong else BatchLayout(),
                        strong=None if strong is None else pipe(strong))


def normalized(u8):
    return (u8.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def crop_flip(img, dy, dx, flip):
    """One sample's RandomCrop(32, padding 4) at offsets (dy, dx), then its flip."""
    out = torch.nn.functional.pad(img, (CROP_PADDING,) * 4)[:, dy:dy + 32, dx:dx + 32]
    return out.flip(-1) if flip else out


# ---- the strong view in the loaders ---------------------------------------------------------------------
def test_the_in_memory_strong_view_is_its_own_draw_after_the_weak_one(split):
    (x, y), = [next(iter(device_loader(split, "flip_crop")))]
    plain_x, plain_y = next(iter(device_loader(split)))
    assert x.shape == (2, 8, 3, 32, 32) and torch.equal(y, plain_y)
    assert torch.equal(x[0], plain_x)  # the weak view: today's numbers, whatever the strong view draws
    # by hand: the epoch's order, the weak view's 24 offsets and flips, then the strong view's, one generator
    g = torch.Generator().manual_seed(3)
    order = torch.randperm(24, generator=g)
    for _ in range(2):
        off_y, off_x = torch.randint(0, 9, (24,), generator=g), torch.randint(0, 9, (24,), generator=g)
        flips = torch.rand(24, generator=g) < 0.5
    expected = torch.stack([crop_flip(split.images[order[k]], off_y[k], off_x[k], flips[k]) for k in range(8)])
    assert torch.equal(x[1], normalized(expected)) and not torch.equal(x[1], x[0])


def test_the_in_memory_strong_view_s_policies_run_under_the_batch_s_seed_of_view_2(split):
    loader = device_loader(split, "flip_crop+randaugment")
    first, second = list(loader)[:2], list(device_loader(split, "flip_crop+randaugment"))[:2]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))  # reproducible per seed
    (x, _), _ = first
    native = device_loader(split, "flip_crop")  # the same flips and crops, without RandAugment
    n0 = next(iter(native))
    assert torch.equal(x[0], n0[0][0]) and not torch.equal(x[1], n0[0][1])
    # batch b's RandAugment seed: epoch seed * 1,000,003 + 2 b + 2 + 2**31 (no batch's view 0 or 1)
    to_u8 = (n0[0][1] * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
    u8 = to_u8.round().to(torch.uint8)
    assert torch.allclose(x[1], pipe("flip_crop+randaugment").sample_extra(u8, 3 * 1_000_003 + 2 + 2**31), atol=1e-5)
    assert not torch.equal(x[1], pipe("flip_crop+randaugment").sample_extra(u8, 3 * 1_000_003 + 2))  # batch 1's view 0
    other = list(device_loader(split, "flip_crop+randaugment", seed=4))[0][0]
    assert not torch.equal(other[1], x[1])


def test_image_folders_build_the_strong_view_under_a_seed_of_its_own(tmp_path):
    from test_imagenet import write_jpeg_folder

    from mixkd.data import load_dataset

    spec = load_dataset("imagefolder", write_jpeg_folder(tmp_path, n_train=2, n_val=1, size=40), image_size=32)
    weak, strong = pipe("flip_crop"), pipe("flip_crop+randaugment")

    def first(layout, strong_pipe, seed=5):
        train, _ = make_loaders(spec, 4, "cpu", workers=0, pipeline=weak, layout=layout, strong=strong_pipe)
        train.set_epoch_seed(seed)
        return next(iter(train)), train

    (x, y), train = first(STRONG, strong)
    (again, _), _ = first(STRONG, strong)
    (plain, plain_y), _ = first(BatchLayout(), None)
    assert x.shape == (2, 4, 3, 32, 32) and torch.equal(x, again) and torch.equal(y, plain_y)
    assert torch.equal(x[0], plain) and not torch.equal(x[1], x[0])
    # by hand: the sampler's order and per-sample seeds, the strong transform under seed * 1,000,003 + 2
    g = torch.Generator().manual_seed(5)
    order, seeds = torch.randperm(8, generator=g), torch.randint(0, 2**62, (8,), generator=g)
    path, _ = spec.train.samples[int(order[0])]
    strong_tf = strong.folder_transform(spec.train.transform)
    img = spec.train.loader(path)
    assert torch.equal(x[1][0], _SeededFolder._seeded(strong_tf, img, (int(seeds[0]) * 1_000_003 + 2) % (2**63 - 1)))
    assert not torch.equal(x[1][0], _SeededFolder._seeded(strong_tf, img, int(seeds[0])))


# ---- the step and the method ---------------------------------------------------------------------------
def mlkd(seed=0):
    torch.manual_seed(seed)
    return make_distiller("mlkd", create_model("resnet8", 4), create_model("resnet8", 4).eval())


@pytest.mark.parametrize("method", ["mixup", "cutmix"])
def test_the_step_mixes_both_views_with_the_same_partners_weights_and_boxes(split, method):
    d = mlkd()
    seen = []
    handle = d.student.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    mix = MixSpec(method, 1.0, 1.0)
    step = TrainStep(d, SGD(d.parameters(), lr=0.01), mix, 4, torch.Generator().manual_seed(0), layout=STRONG)
    x, y = next(iter(device_loader(split, "flip_crop+cutout")))
    step(x, y)
    handle.remove()
    weak, strong = seen  # the student's two passes: the weak view, then the strong one
    # each view mixed on its own from the step's generator state: the same draws must give both
    mixed_weak, target = mix_batch(x[0], one_hot(y, 4), mix, torch.Generator().manual_seed(0))
    mixed_strong, target_strong = mix_batch(x[1], one_hot(y, 4), mix, torch.Generator().manual_seed(0))
    assert torch.equal(weak, mixed_weak) and torch.equal(strong, mixed_strong) and torch.equal(target, target_strong)
    assert not torch.equal(weak, x[0])


def test_mlkd_forward_is_mlkd_losses_on_each_model_s_two_views():
    d = mlkd()
    assert type(d).inputs == ("strong",) and d.loss_names == ("loss", "ce", "kd", "cc", "bc")
    g = torch.Generator().manual_seed(1)
    x, strong = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
    target = one_hot(torch.arange(8) % 4, 4) * 0.7 + 0.3 * one_hot((torch.arange(8) + 1) % 4, 4)  # mixed labels
    losses = d.losses(x, target, strong=strong)
    with torch.no_grad():  # two passes per model, as KD_ours: each view normalized by its own batch statistics
        s_weak, s_strong = d.student(x), d.student(strong)
        t_weak, t_strong = d.teacher(x), d.teacher(strong)
    expected = mlkd_losses(s_weak, s_strong, t_weak, t_strong, target, temperature=4.0, ce_weight=0.1, kd_weight=0.9)
    for k in ("ce", "kd", "cc", "bc"):
        assert torch.allclose(losses[k], expected[k], rtol=1e-5), k
    assert torch.allclose(losses["loss"], sum(expected.values()), rtol=1e-5)
    losses["loss"].backward()
    assert all(p.grad is None for p in d.teacher.parameters())


# ---- the CLI -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mix", ["none", "mixup"])
def test_mixkd_distill_kd_mlkd_trains_on_digits(teacher_file, tmp_path, capsys, one_thread, mix):
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher_file), "--student", "resnet8", "--kd", "mlkd", "--dataset",
                 "digits", "--epochs", "1", "--batch-size", "512", "--device", "cpu", "--no-progress", "--mix", mix,
                 "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["kd_method"] == "mlkd" and result["mix"]["method"] == mix
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    terms = [row[f"train_{k}"] for k in ("ce", "kd", "cc", "bc")]
    assert all(t > 0 for t in terms) and row["train_loss"] == pytest.approx(sum(terms), rel=1e-5)
    saved = (out / "config.yaml").read_text()
    assert "strong_augment: flip_crop+randaugment" in saved
    printed = capsys.readouterr()
    assert "note: augment flip_crop+randaugment (the strong view): randaugment run in the loader" in printed.out + printed.err


@pytest.mark.parametrize("flags, words", [
    (["--teacher-view", "independent"], "teacher_view: independent with kd.method mlkd: a strong view is seen by both models: it needs teacher_view same"),
    (["--augment", "flip_crop+cutmix_pick"], "augment: cutmix_pick picks among images: kd.method mlkd"),
    (["--strong-augment", "flip_crop+mixup"], "kd.strong_augment: Value error, mixup is a batch policy"),
])
def test_what_mlkd_does_not_combine_with_is_one_line(teacher_file, tmp_path, capsys, flags, words):
    code = main(["distill", "--teacher", str(teacher_file), "--student", "resnet8", "--kd", "mlkd", "--dataset",
                 "digits", "--epochs", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "r"), *flags])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mixkd: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert words in lines[0], lines[0]


def test_the_recipe_is_the_authors_480_epochs_with_the_strong_view():
    cfg = build_config(RECIPE, {"kd.teacher": "teacher"})
    assert (cfg.kd.method, cfg.epochs, cfg.batch_size, cfg.optim.lr, cfg.milestones()) == (
        "mlkd", 480, 64, 0.025, [150, 180, 210])
    assert (cfg.kd.temperature, cfg.kd.ce_weight, cfg.kd.kd_weight, cfg.kd.strong_augment) == (
        4.0, 0.1, 0.9, "flip_crop+randaugment")
    assert (cfg.augment, cfg.teacher_view, cfg.mix.method) == ("flip_crop", "same", "none")
