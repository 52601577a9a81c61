"""Augmentation policies (issue 28): the registry's entries, the pipeline, the loader's per-sample
stage, the teacher's views, CutMix's box, CutMixPick, and ``mixkd distill --augment`` on digits."""

import csv
import json
import math

import pytest
import torch

from mixkd.augment import AUGMENTATIONS, augment_label, effective_spec, make_pipeline, parse_augment
from mixkd.augment.cutmix_pick import entropy
from mixkd.cli import main
from mixkd.data.layout import BatchLayout
from mixkd.data.loaders import DeviceLoader
from mixkd.data.spec import ArraySplit
from mixkd.distiller import make_distiller
from mixkd.errors import MixkdError
from mixkd.mix import MixSpec, cutmix
from mixkd.models import create_model
from mixkd.registry import load_plugin
from mixkd.step import SGD, TrainStep, one_hot

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
SAMPLE = AUGMENTATIONS.names(lambda e: e.extra.get("stage") == "sample")


@pytest.fixture(scope="module")
def split():
    g = torch.Generator().manual_seed(0)
    return ArraySplit(torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.arange(24) % 4)


def loader(split, spec="flip_crop", view="same", **kw):
    pipe = make_pipeline(spec, image_size=32, mean=MEAN, std=STD)
    return DeviceLoader(split, 8, "cpu", MEAN, STD, shuffle=True, augment=True, drop_last=True, seed=3,
                        crop=pipe.crop, flip=pipe.flip, sample=pipe.sample_extra if pipe.extra else None,
                        layout=BatchLayout(teacher_view=view), **kw)


def normalized(u8):
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (u8.float() / 255 - m) / s


# ---- the registry and the spec ----------------------------------------------------------------------
def test_the_issue_s_policies_are_registered_with_their_stage():
    assert set(SAMPLE) == {"none", "flip", "flip_crop", "cutout", "autoaugment", "randaugment", "trivialaugment",
                           "random_erasing"}
    assert set(AUGMENTATIONS.names(lambda e: e.extra.get("stage") == "batch")) == {"mixup", "cutmix", "cutmix_pick"}
    assert augment_label("flip_crop+cutout+cutmix_pick") == "flip+crop+Cutout+CutMixPick"
    assert effective_spec("flip_crop", "mixup") == "flip_crop+mixup"
    assert effective_spec("flip_crop+cutmix", "cutmix") == "flip_crop+cutmix"
    assert AUGMENTATIONS.get("randaugment").resolve({"magnitude": 14}).num_ops == 2


@pytest.mark.parametrize("spec,words", [("flpi_crop", "did you mean 'flip_crop'"), ("mixup+cutout", "must come last"),
                                        ("flip+mixup+cutmix", "keep one"), ("flip++cutout", "empty name"),
                                        ("cutout+cutout", "twice")])
def test_a_bad_spec_is_one_line(spec, words):
    with pytest.raises(MixkdError) as err:
        parse_augment(spec)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_cli_refuses_a_bad_augment_in_one_line(capsys):
    assert main(["train", "--dataset", "digits", "--augment", "flip+cutmixx", "--device", "cpu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'cutmix'" in err[0]


# ---- the per-sample stage -------------------------------------------------------------------------
def test_flip_crop_keeps_today_s_loader_numbers(split):
    # today's draws, by hand: the order, then every sample's row and column offsets (0..8), then its flip
    g = torch.Generator().manual_seed(3)
    order = torch.randperm(24, generator=g)
    off_y, off_x = torch.randint(0, 9, (24,), generator=g), torch.randint(0, 9, (24,), generator=g)
    flip = torch.rand(24, generator=g) < 0.5
    padded = torch.nn.functional.pad(split.images, (4, 4, 4, 4))
    expected = []
    for k, i in enumerate(order.tolist()):
        crop = padded[i, :, off_y[k]:off_y[k] + 32, off_x[k]:off_x[k] + 32]
        expected.append(crop.flip(-1) if flip[k] else crop)
    got = torch.cat([x for x, _ in loader(split, "flip_crop")])
    assert torch.equal(got, normalized(torch.stack(expected)))
    today = DeviceLoader(split, 8, "cpu", MEAN, STD, shuffle=True, augment=True, drop_last=True, seed=3)
    for (a, ya), (b, yb) in zip(today, loader(split, "flip_crop"), strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    # a policy after flip + crop leaves the crop and flip draws (and the order) as they were
    plain, after = list(loader(split, "flip_crop")), list(loader(split, "flip_crop+randaugment"))
    assert all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(plain, after, strict=True))


def test_flip_alone_flips_some_samples_and_shifts_none(split):
    clean = {i: normalized(split.images[i:i + 1])[0] for i in range(24)}
    flipped = 0
    for x, _ in loader(split, "flip"):
        for s in x:
            same = [i for i, c in clean.items() if torch.equal(s, c)]
            mirrored = [i for i, c in clean.items() if torch.equal(s, c.flip(-1))]
            assert same or mirrored  # never shifted
            flipped += bool(mirrored)
    assert 0 < flipped < 24


@pytest.mark.parametrize("name", [n for n in SAMPLE if n not in ("none", "flip", "flip_crop")])
def test_each_policy_changes_samples_with_draws_of_their_own(split, name):
    pipe = make_pipeline(name, image_size=32, mean=MEAN, std=STD)
    x = split.images[:16]
    out = pipe.sample(x, seed=1)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    changed = [not torch.equal(o, c) for o, c in zip(out, normalized(x), strict=True)]
    assert any(changed)
    assert torch.equal(out, pipe.sample(x, seed=1))  # a function of the seed
    assert not torch.equal(out, pipe.sample(x, seed=2))
    # per sample: one image repeated gets different draws (kornia's auto policies draw one per batch)
    rep = pipe.sample(x[:1].expand(16, -1, -1, -1).contiguous(), seed=5)
    if name != "random_erasing":  # p = 0.5: some copies are left alone, checked below
        assert len({tuple(r.flatten()[::7].tolist()) for r in rep}) > 2


def test_each_rank_s_part_gets_draws_of_its_own(split):
    # cutout draws its boxes per position in the batch it is given: with one seed for every rank's part,
    # rank 1's sample k would get rank 0's sample k's box; flip and crop are drawn for the global batch
    def boxes(rank, world):
        x, _ = next(iter(loader(split, "flip_crop+cutout", rank=rank, world=world)))
        return (x == 0).all(dim=1)  # cutout zeroes every channel after normalization (channel 0 is never 0 else)

    r0, r1 = boxes(0, 2), boxes(1, 2)
    assert r0.any(dim=(1, 2)).all() and r1.any(dim=(1, 2)).all()
    assert not torch.equal(r0, r1)


def test_cutout_zeroes_a_16_square_after_normalization_clipped_at_the_border():
    pipe = make_pipeline("cutout", image_size=32, mean=MEAN, std=STD)
    x = torch.full((400, 3, 32, 32), 200, dtype=torch.uint8)
    out = pipe.sample(x, seed=0)
    zeros = (out == 0).all(dim=1).flatten(1).sum(1)  # pixels cut, per sample
    assert zeros.max().item() == 256 and zeros.min().item() >= 64  # 8x8 when centred on a corner pixel
    # centre uniform over 32 rows: the cut rows are min(c+8, 32) - max(c-8, 0): mean 16 - 2*(8*9/2)/32
    rows = 16 - 2 * 36 / 32
    assert abs(zeros.float().mean().item() - rows * rows) < 12


def test_image_folders_get_the_policies_in_their_worker_transform():
    from PIL import Image
    from torchvision import transforms as T

    base = T.Compose([T.RandomResizedCrop(32), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    pipe = make_pipeline("flip_crop+autoaugment+cutout", image_size=32, mean=MEAN, std=STD)
    tf = pipe.folder_transform(base)
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:4] == ["RandomResizedCrop", "RandomHorizontalFlip", "PILToTensor", "AutoAugment"]
    img = Image.fromarray((torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy())
    torch.manual_seed(0)
    x = tf(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert ((x == 0).all(0).sum() >= 64)  # Cutout's square (at least its clipped corner), after Normalize
    assert make_pipeline("flip_crop", image_size=32, mean=MEAN, std=STD).folder_transform(base) is base


def test_random_erasing_erases_about_half(split):
    pipe = make_pipeline("random_erasing", image_size=32, mean=MEAN, std=STD)
    out = pipe.sample(torch.full((200, 3, 32, 32), 250, dtype=torch.uint8), seed=0)
    erased = (out == 0).all(dim=1).flatten(1).any(1).float().mean().item()
    assert 0.4 < erased < 0.6  # p = 0.5 (Zhong et al.)


# ---- the teacher's views --------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    """A teacher that records what it receives."""

    def __init__(self):
        super().__init__()
        self.net = create_model("resnet8", 4)
        self.seen = []

    def forward(self, x, *a, **k):
        self.seen.append(x.detach().clone())
        return self.net(x, *a, **k)


def view_step(view, mix):
    torch.manual_seed(0)
    teacher = Recorder().eval()
    d = make_distiller("kd", create_model("resnet8", 4), teacher)
    step = TrainStep(d, SGD(d.parameters(), lr=0.01), mix, 4, torch.Generator().manual_seed(0),
                     layout=BatchLayout(teacher_view=view))
    return step, teacher


def student_input(step):
    seen = []
    handle = step.distiller.student.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    return seen, handle


@pytest.mark.parametrize("view", ["same", "independent", "clean"])
def test_the_teacher_sees_its_view(split, view):
    mix = MixSpec("mixup", 1.0, 1.0)
    step, teacher = view_step(view, mix)
    seen, handle = student_input(step)
    x, y = next(iter(loader(split, "flip_crop+cutout", view=view)))
    step(x, y)
    handle.remove()
    xs, xt = seen[-1], teacher.seen[-1]
    if view == "same":
        assert x.dim() == 4 and torch.equal(xt, xs)
        return
    assert x.shape[0] == 2 and not torch.allclose(xt, xs)
    # the student's batch: the loader's first view, mixed with the step's generator
    g = torch.Generator().manual_seed(0)
    from mixkd.mix import mix_batch
    mixed, _ = mix_batch(x[0], one_hot(y, 4), mix, g)
    assert torch.equal(xs, mixed)
    if view == "clean":  # the un-augmented, un-mixed images of the batch
        lo = loader(split, "flip_crop+cutout")
        order = torch.randperm(24, generator=torch.Generator().manual_seed(3))[:8]
        assert torch.equal(xt, normalized(split.images[order])) and torch.equal(lo.labels[order], y)
    else:  # its own draw of the augmentation, then of the mixing (after the student's, same generator)
        assert not torch.equal(x[1], x[0])
        assert torch.equal(xt, mix_batch(x[1], one_hot(y, 4), mix, g)[0])


# ---- the teacher's views of an image folder -----------------------------------------------------------
FOLDER_SEED = 7


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """A tiny ImageNet-shaped JPEG folder: 4 classes x 2 training images (and 1 val image each), 40x40."""
    from test_imagenet import write_jpeg_folder

    return write_jpeg_folder(tmp_path_factory.mktemp("jpegs"), n_train=2, n_val=1, size=40)


def folder_loader(folder, view):
    from mixkd.data import load_dataset, make_loaders

    spec = load_dataset("imagefolder", folder, image_size=32)
    pipe = make_pipeline("flip_crop", image_size=32, mean=spec.mean, std=spec.std, dataset="imagefolder")
    train, _ = make_loaders(spec, 4, "cpu", workers=0, pipeline=pipe, layout=BatchLayout(teacher_view=view))
    return spec, train


def seeded(transform, img, seed):
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform(img)


def epoch(loader, seed=FOLDER_SEED, start=0):
    loader.set_epoch_seed(seed)
    batches = list(loader.iter_from(start))
    return torch.cat([x for x, _ in batches], dim=-4), torch.cat([y for _, y in batches])  # (V,) B stacked


@pytest.mark.parametrize("view", ["same", "independent", "clean"])
def test_image_folders_give_the_teacher_its_view(jpeg_folder, view):
    """The epoch as the folder loader drew it before teacher views (order and per-sample seeds from the
    epoch's seed), by hand: same keeps those batches (4-D); clean adds the folder's test view (resize 36,
    centre crop 32) of each image; independent the training transform under a seed of its own (reproducible,
    resumable mid-epoch)."""
    from mixkd.data.loaders import FolderLoader

    spec, loader = folder_loader(jpeg_folder, view)
    g = torch.Generator().manual_seed(FOLDER_SEED)
    order, seeds = torch.randperm(8, generator=g), torch.randint(0, 2**62, (8,), generator=g).tolist()
    images = [spec.train.loader(spec.train.samples[i][0]) for i in order.tolist()]
    student = torch.stack([seeded(spec.train.transform, im, s) for im, s in zip(images, seeds, strict=True)])
    x, y = epoch(loader)
    assert y.tolist() == [spec.train.targets[i] for i in order.tolist()]
    if view == "same":
        plain = FolderLoader(spec.train, 4, "cpu", shuffle=True, drop_last=True, workers=0)  # no layout, as before
        assert x.dim() == 4 and torch.equal(x, student) and torch.equal(x, epoch(plain)[0])
        return
    assert x.shape == (2, 8, 3, 32, 32) and torch.equal(x[0], student)
    if view == "clean":
        assert torch.equal(x[1], torch.stack([spec.test.transform(im) for im in images]))
        assert not torch.allclose(x[1], x[0])
        return
    own = [(s * 1_000_003 + 1) % (2**63 - 1) for s in seeds]
    assert torch.equal(x[1], torch.stack([seeded(spec.train.transform, im, s) for im, s in zip(images, own, strict=True)]))
    assert not torch.allclose(x[1], x[0])
    assert torch.equal(epoch(loader)[0], x)  # a function of the epoch's seed
    assert torch.equal(epoch(loader, start=1)[0], x[:, 4:])  # resumed at batch 1: the same batches
    assert not torch.allclose(epoch(loader, seed=FOLDER_SEED + 1)[0][1], x[1])


def test_mixkd_distill_shows_the_teacher_an_image_folder_s_clean_view(jpeg_folder, tmp_path, monkeypatch, one_thread):
    """Through the CLI: every image the teacher reads is the test view of a training image (no augmentation)."""
    from mixkd.checkpoint import save_checkpoint
    from mixkd.data import load_dataset
    from mixkd.step import _TeacherInput

    seen, forward = [], _TeacherInput.forward
    monkeypatch.setattr(_TeacherInput, "forward", lambda self, x, *a, **k: (seen.append(self.x), forward(self, x, *a, **k))[1])
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "t.safetensors", create_model("resnet8", 4), model_name="resnet8", num_classes=4, epoch=1)
    out = tmp_path / "run"
    assert main(["distill", "--dataset", "imagefolder", "--data-dir", str(jpeg_folder), "--image-size", "32",
                 "--teacher", str(tmp_path / "t.safetensors"), "--student", "resnet8", "--teacher-view", "clean",
                 "--epochs", "1", "--batch-size", "4", "--eval-batch-size", "4", "--workers", "0", "--device", "cpu",
                 "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["teacher_view"] == "clean" and math.isfinite(result["top1"])
    spec = load_dataset("imagefolder", jpeg_folder, image_size=32)
    clean = [spec.test.transform(spec.train.loader(path)) for path, _ in spec.train.samples]
    assert len(seen) == 2 and all(any(torch.equal(img, c) for c in clean) for batch in seen for img in batch)


# ---- CutMix's box ---------------------------------------------------------------------------------
def test_cutmix_box_side_is_sqrt_one_minus_lambda_of_the_image():
    """Mean pasted area over many draws against a hand calculation: lambda ~ U(0, 1) (alpha 1), half-side
    a = floor(sqrt(1 - lambda) * 32 / 2), centre c uniform in 0..31, rows min(c + a, 32) - max(c - a, 0),
    area (E_c rows / 32)^2, averaged over lambda. Side (1 - lambda) would give 0.203."""
    n = 32

    def rows(a):
        return sum(min(c + a, n) - max(c - a, 0) for c in range(n)) / n

    k = 4000
    table = {a: (rows(a) / n) ** 2 for a in range(n // 2 + 1)}
    expected = sum(table[math.floor(math.sqrt((i + 0.5) / k) * n / 2)] for i in range(k)) / k
    assert abs(expected - 0.2993) < 1e-3
    b = 4000
    xm, ym = cutmix(torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 1, n, n).contiguous(),
                    torch.eye(b), 1.0, generator=torch.Generator().manual_seed(0))
    pasted = (xm != torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1)).flatten(1).float().mean(1)
    assert abs(pasted.mean().item() - expected) < 0.015  # stderr ~0.0045
    # the label weight of one's own class is 1 - the pasted area, sample by sample
    assert torch.allclose(ym.diagonal(), 1 - pasted)


# ---- CutMixPick -----------------------------------------------------------------------------------
def test_cutmix_pick_keeps_the_highest_teacher_entropy_and_adds_their_kd(split):
    torch.manual_seed(0)
    teacher = create_model("resnet8", 4).eval()
    d = make_distiller("kd", create_model("resnet8", 4), teacher)
    pipe = make_pipeline("cutmix_pick", {"cutmix_pick": {"pool": 2, "keep": 5}}, image_size=32, mean=MEAN, std=STD)
    step = TrainStep(d, SGD(d.parameters(), lr=0.0), MixSpec(), 4, torch.Generator().manual_seed(0), pick=pipe.batch)
    assert step.loss_names[-1] == "pick_kd"
    x, y = next(iter(loader(split, "flip_crop")))
    losses = step._mixed_losses(x, y, True)
    # by hand: the same pool (same generator), the teacher's entropies at T = 4, the 5 largest
    pool, _ = pipe.batch.candidates(x, one_hot(y, 4), torch.Generator().manual_seed(0))
    assert pool.shape[0] == 16
    with torch.no_grad():
        t = teacher(pool)
        ent = entropy(t, 4.0)
        top = ent.argsort(descending=True)[:5]
        s = d.student(pool[top])
    kl = (torch.softmax(t[top] / 4, 1) * (torch.log_softmax(t[top] / 4, 1) - torch.log_softmax(s / 4, 1))).sum(1)
    assert torch.allclose(losses["pick_kd"], kl.mean() * 16, rtol=1e-4)
    with torch.no_grad():
        clean = d.losses(x, one_hot(y, 4))
    assert torch.allclose(losses["loss"], clean["loss"] + 0.9 * losses["pick_kd"], rtol=1e-4)  # weight 1 x kd 0.9
    # the pipeline's batch stage (what mixkd augment-score runs): the same 5 candidates, with their CutMix labels
    picked, labels = pipe.mix(x, one_hot(y, 4), teacher, generator=torch.Generator().manual_seed(0))
    assert torch.equal(picked, pool[top]) and labels.shape == (5, 4) and torch.allclose(labels.sum(1), torch.ones(5))


# ---- a plugin -------------------------------------------------------------------------------------
def test_a_policy_plugin_file_from_outside_the_package(tmp_path, split):
    path = tmp_path / "invert_policy.py"
    path.write_text(
        "from mixkd.augment.base import SamplePolicy\n"
        "from mixkd.registry import AUGMENTATIONS\n\n"
        "@AUGMENTATIONS.register('invert28', label='Invert', stage='sample')\n"
        "class Invert(SamplePolicy):\n"
        "    '''255 - x.'''\n"
        "    def __call__(self, x):\n"
        "        return 255 - x\n")
    load_plugin(str(path))
    x, _ = next(iter(loader(split, "none+invert28")))
    plain, _ = next(iter(loader(split, "none")))
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(x, ((1 - (plain * s + m)) - m) / s, atol=1e-5)
    assert augment_label("flip_crop+invert28") == "flip+crop+Invert"


# ---- the study axis ---------------------------------------------------------------------------------
AUGMENT_STUDY = """\
name: augment
defaults: {dataset: digits, epochs: 1}
teachers:
  - {name: plain, models: resnet14}
students:
  - name: policies
    teachers: [plain]
    models: resnet8
    methods: [alone, kd, kd_pmu]
    fractions: 0.1
    augment: [flip_crop, flip_crop+cutout]
"""


def test_a_study_crosses_augment_with_methods_and_reports_a_column_per_policy(tmp_path):
    import yaml

    from mixkd.study import load_study, write_report

    path = tmp_path / "study.yaml"
    path.write_text(AUGMENT_STUDY)
    runs = [r for r in load_study(path).runs if r.role == "student"]
    assert sorted((r.method.name, r.config.augment) for r in runs) == [
        ("alone", "flip_crop"), ("alone", "flip_crop+cutout"), ("kd", "flip_crop"), ("kd", "flip_crop+cutout"),
        ("kd_pmu", "flip_crop"), ("kd_pmu", "flip_crop+cutout")]
    assert len({r.id for r in runs}) == 6
    out = tmp_path / "out"
    for run in load_study(path).runs:
        d = out / run.id
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump(run.config_for(out).model_dump(mode="json")))
        top1 = 90.0 if run.role == "teacher" else 60.0 + 3 * ("cutout" in run.config.augment) + \
            (run.method.name == "kd_pmu")
        (d / "result.json").write_text(json.dumps({"top1": top1, "teacher_model": run.teacher_model}))
    text = write_report(out).read_text()
    header = [line for line in text.split("## Teacher → student")[1].splitlines() if line.startswith("| ")][0]
    cols = [c.strip() for c in header.strip("|").split("|")][3:]
    assert cols == ["KD T=4", "KD T=4 [flip+crop+Cutout]", "KD+PMU T=4 f=0.1", "KD+PMU T=4 f=0.1 [flip+crop+Cutout]"]
    policy = [line for line in text.split("## Method × augmentation policy")[1].split("\n## ")[0].splitlines()
              if line.startswith("| ")]
    assert policy[0] == "| teacher → student | method | flip+crop | flip+crop+Cutout |"
    assert [line.split(" | ")[1:] for line in policy[1:]] == [
        ["student alone", "60.00", "**63.00** |"], ["KD T=4", "60.00", "**63.00** |"],
        ["KD+PMU T=4 f=0.1", "61.00", "**64.00** |"]]
    rows = [r for r in csv.DictReader((out / "results.csv").open()) if r["role"] == "student"]
    assert sorted((r["method"], r["augment"], float(r["top1"])) for r in rows) == [
        ("alone", "flip_crop", 60.0), ("alone", "flip_crop+cutout", 63.0), ("kd", "flip_crop", 60.0), ("kd", "flip_crop+cutout", 63.0),
        ("kd_pmu", "flip_crop", 61.0), ("kd_pmu", "flip_crop+cutout", 64.0)]


def test_a_study_refuses_a_bad_augment_in_one_line(tmp_path):
    from mixkd.study import load_study

    path = tmp_path / "study.yaml"
    path.write_text(AUGMENT_STUDY.replace("flip_crop+cutout]", "flip_crop+cutuot]"))
    with pytest.raises(MixkdError) as err:
        load_study(path)
    assert "did you mean 'cutout'" in str(err.value) and "\n" not in str(err.value)
