"""mixkd.analysis: metric definitions (ECE, fidelity, vicinal linearity), attacks and image selection."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixkd.analysis.attacks import fgsm, pgd, robust_accuracy
from mixkd.analysis.inputs import Normalized, PixelImages, load_images, subset_indices, tsne_indices
from mixkd.analysis.metrics import (
    calibration,
    expected_calibration_error,
    fidelity,
    output_metrics,
    predict,
    vicinal,
    vicinal_pairs,
)
from mixkd.data import load_dataset

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster, and steady


# ---- calibration ----------------------------------------------------------------------------

def test_ece_matches_a_hand_computed_example():
    conf = torch.tensor([0.95, 0.85, 0.65, 0.62, 0.30], dtype=torch.float64)
    correct = torch.tensor([True, False, True, True, False])
    # 15 bins of width 1/15, (lo, hi]: 0.95 -> bin 14, 0.85 -> 12, 0.65 and 0.62 -> 9, 0.30 -> 4.
    # ECE = (1/5)|1 - .95| + (1/5)|0 - .85| + (2/5)|1 - .635| + (1/5)|0 - .30| = 1.93 / 5
    cal = calibration(conf, correct, bins=15)
    assert cal["ece"] == pytest.approx(0.386, abs=1e-9)
    assert cal["bin_count"][14] == 1 and cal["bin_count"][12] == 1 and cal["bin_count"][9] == 2
    assert cal["bin_count"][4] == 1 and sum(cal["bin_count"]) == 5
    assert cal["bin_accuracy"][9] == 1.0 and cal["bin_confidence"][9] == pytest.approx(0.635)
    assert cal["bin_accuracy"][0] is None  # empty bin
    # confidence 1.0 falls in the last bin; 3 bins give a different, also hand-checkable ECE
    assert calibration(torch.tensor([1.0]), torch.tensor([True]))["bin_count"][14] == 1
    # bins (0, 1/3], (1/3, 2/3], (2/3, 1]: {.30}, {.65, .62}, {.95, .85}
    assert expected_calibration_error(conf, correct, bins=3) == pytest.approx(
        (1 / 5) * 0.30 + (2 / 5) * abs(1 - 0.635) + (2 / 5) * abs(0.5 - 0.90), abs=1e-12)


def test_a_perfectly_calibrated_predictor_has_ece_near_zero():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(100_000, 10, generator=g) * 2.5
    # labels drawn from the predictor's own distribution: P(correct | confidence c) = c exactly
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    m = output_metrics(logits, labels)
    assert m["ece"] < 0.01
    # the same predictor made over-confident is clearly miscalibrated
    assert output_metrics(logits * 3, labels)["ece"] > 0.1
    assert 0 < m["confidence"] < 1 and 0 < m["entropy"] < math.log(10)
    assert m["logit_std"]["mean"] == pytest.approx(float(logits.std(dim=1).mean()), rel=1e-5)
    assert sum(m["logit_std"]["hist_counts"]) == 100_000


def test_accuracy_and_nll():
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0]]).repeat(3, 1)
    labels = torch.tensor([0, 4, 5])  # ranks 1, 5 and 6
    m = output_metrics(logits, labels)
    assert m["top1"] == pytest.approx(100 / 3)
    assert m["top5"] == pytest.approx(200 / 3)
    assert m["nll"] == pytest.approx(float(F.cross_entropy(logits, labels)))


# ---- fidelity and vicinal -------------------------------------------------------------------

def test_agreement_with_itself_is_one_and_kl_zero():
    logits = torch.randn(500, 7, generator=torch.Generator().manual_seed(1))
    f = fidelity(logits, logits.clone())
    assert f["agreement"] == 100.0 and f["kl"] == 0.0
    other = fidelity(logits, torch.randn(500, 7, generator=torch.Generator().manual_seed(2)))
    assert other["agreement"] < 50 and other["kl"] > 0.1


class ProbLinear(nn.Module):
    """p(x) = 1/C + W x with class-sums of W equal to zero: a probability vector affine in x.
    Returns log p, so softmax(output) = p exactly."""

    def __init__(self, dim: int, classes: int, scale: float):
        super().__init__()
        w = torch.randn(classes, dim, generator=torch.Generator().manual_seed(3))
        self.register_buffer("w", (w - w.mean(0, keepdim=True)) * scale)
        self.classes = classes

    def forward(self, x, is_feat=False):
        p = 1.0 / self.classes + x.flatten(1) @ self.w.t()
        return p.log()


def _pixels(n, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 5, (n,), generator=g)
    return PixelImages(images, labels, torch.arange(n))


def test_linearity_gap_of_a_linear_model_is_zero():
    data = _pixels(64)
    linear = Normalized(ProbLinear(3 * 8 * 8, 5, scale=1e-3), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    probs = predict(linear, data, 16, CPU).softmax(1)
    assert probs.min() > 0  # a valid probability vector everywhere
    v = vicinal({"student": linear}, {"student": probs}, data, 16, CPU, lambdas=(0.5, 0.7, 0.9))
    for lam in ("0.5", "0.7", "0.9"):
        assert v["student"][lam]["linearity_gap"] < 1e-5
    # a softmax classifier on the same inputs is not linear between samples
    torch.manual_seed(0)
    net = Normalized(nn.Sequential(nn.Flatten(), nn.Linear(192, 5)), (0.5,) * 3, (0.2,) * 3)
    p = predict(net, data, 16, CPU).softmax(1)
    assert vicinal({"student": net}, {"student": p}, data, 16, CPU)["student"]["0.5"]["linearity_gap"] > 0.01


class Position(nn.Module):
    """Predicts the brightest of the first 5 pixels of row 0 (ties: the lowest index)."""

    def forward(self, x, is_feat=False):
        return x[:, 0, 0, :5] * 10


class AlwaysZero(nn.Module):
    def forward(self, x, is_feat=False):
        return torch.tensor([5.0, 0, 0, 0, 0]).expand(x.shape[0], 5)


def test_vicinal_accuracy_counts_the_majority_class_and_either_class_at_one_half():
    labels = torch.arange(40) % 5
    images = torch.zeros(40, 3, 1, 8, dtype=torch.uint8)
    images[torch.arange(40), :, 0, labels] = 255  # class c: pixel c lit
    data = PixelImages(images, labels, torch.arange(40))
    models = {"student": Normalized(Position(), (0.0,) * 3, (1.0,) * 3),
              "teacher": Normalized(AlwaysZero(), (0.0,) * 3, (1.0,) * 3)}
    probs = {k: predict(m, data, 8, CPU).softmax(1) for k, m in models.items()}
    v = vicinal(models, probs, data, 8, CPU, lambdas=(0.5, 0.7))
    # the mix lights pixel y1 at lam and y2 at 1 - lam: Position predicts y1, or at 0.5 the lower of
    # the two (y2 half of the time), which counts too
    assert v["student"]["0.7"]["accuracy"] == 100.0 and v["student"]["0.5"]["accuracy"] == 100.0
    first, second = vicinal_pairs(40, 0)
    y1, y2 = labels[first], labels[second]
    assert v["teacher"]["0.7"]["accuracy"] == pytest.approx(100.0 * float((y1 == 0).double().mean()))
    assert v["teacher"]["0.5"]["accuracy"] == pytest.approx(100.0 * float(((y1 == 0) | (y2 == 0)).double().mean()))
    assert v["teacher"]["0.5"]["linearity_gap"] == pytest.approx(0.0, abs=1e-6)  # a constant is linear
    agree = 100.0 * float((torch.where(y1 <= y2, y1, y2) == 0).double().mean())
    assert v["fidelity"]["0.5"]["agreement"] == pytest.approx(agree)
    assert v["fidelity"]["0.7"]["agreement"] == pytest.approx(100.0 * float((y1 == 0).double().mean()))


def test_vicinal_pairs_are_fixed_and_never_self():
    a, b = vicinal_pairs(100, seed=5)
    assert (a != b).all() and sorted(a.tolist()) == list(range(100)) and sorted(b.tolist()) == list(range(100))
    a2, b2 = vicinal_pairs(100, seed=5)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, vicinal_pairs(100, seed=6)[0])


# ---- image selection ------------------------------------------------------------------------

def test_subset_is_evenly_spaced_and_tsne_set_is_fixed():
    assert subset_indices(10, None).tolist() == list(range(10))
    assert subset_indices(10, 20).tolist() == list(range(10))
    assert subset_indices(10, 4).tolist() == [0, 2, 5, 7]
    labels = torch.tensor([3, 0, 1, 0, 2, 0, 1, 11])
    assert tsne_indices(labels, classes=3, per_class=2).tolist() == [1, 3, 2, 6, 4]


def test_digits_tsne_set_is_the_first_images_of_each_class():
    spec = load_dataset("digits")
    idx = tsne_indices(spec.test.labels)
    assert len(idx) == len(spec.test)  # 360 images, fewer than 100 per class
    assert (spec.test.labels[idx].diff() >= 0).all()  # grouped by class


def test_image_folder_pixels_are_recovered_exactly(tmp_path):
    from PIL import Image
    from torchvision import transforms as T

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for k in range(3):
                arr = torch.randint(0, 256, (20, 20, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(arr).save(tmp_path / split / c / f"{k}.png")
    spec = load_dataset("imagefolder", tmp_path, image_size=16)
    got = load_images(spec, torch.tensor([0, 4, 5]), CPU, workers=0)
    pipeline = T.Compose([T.Resize(int(16 * 256 / 224)), T.CenterCrop(16), T.PILToTensor()])
    for row, i in enumerate([0, 4, 5]):
        path, label = spec.test.samples[i]
        assert torch.equal(got.images[row], pipeline(Image.open(path).convert("RGB")))
        assert got.labels[row] == label


# ---- attacks --------------------------------------------------------------------------------

class SmallNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten())
        self.fc = nn.Linear(128, classes)

    def forward(self, x, is_feat=False):
        f = self.body(x)
        return ([f], self.fc(f)) if is_feat else self.fc(f)


@pytest.fixture(scope="module")
def trained_digits():
    """A small CNN trained on digits for 150 steps (about 2 s on one thread; ~90% test accuracy), in pixel space."""
    torch.set_num_threads(1)
    spec = load_dataset("digits")
    torch.manual_seed(0)
    model = Normalized(SmallNet(), spec.mean, spec.std)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x_all, y_all = spec.train.images.float() / 255, spec.train.labels
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(y_all), (64,), generator=g)
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = PixelImages(spec.test.images[:200], spec.test.labels[:200], torch.arange(200))
    return model, test


def test_trained_model_is_accurate(trained_digits):
    model, test = trained_digits
    assert (predict(model, test, 100, CPU).argmax(1) == test.labels).float().mean() > 0.8


def test_attacks_at_epsilon_zero_keep_clean_accuracy(trained_digits):
    model, test = trained_digits
    clean = 100 * float((predict(model, test, 64, CPU).argmax(1) == test.labels).double().mean())
    acc = robust_accuracy(model, test, 64, CPU, [0.0], steps=3)
    assert acc["fgsm"] == [pytest.approx(clean, abs=1e-9)] and acc["pgd"] == [pytest.approx(clean, abs=1e-9)]
    x, y = next(test.batches(32, CPU))[1:]
    assert torch.equal(fgsm(model, x, y, 0.0), x) and torch.equal(pgd(model, x, y, 0.0, steps=2)[0], x)


@pytest.mark.parametrize("eps", [1 / 255, 8 / 255, 0.3])
def test_perturbations_stay_in_the_ball_and_in_range(trained_digits, eps):
    model, test = trained_digits
    _, x, y = next(test.batches(48, CPU))
    assert (x == 0).any() and (x == 1).any()  # digits images touch both ends: clipping is exercised
    g = torch.Generator().manual_seed(0)
    for adv in (fgsm(model, x, y, eps), pgd(model, x, y, eps, steps=4, generator=g)[0]):
        assert (adv - x).abs().max() <= eps + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert (adv != x).any()
    assert all(p.requires_grad for p in model.parameters())  # the attacks froze the weights only while running


def test_pgd_is_at_least_as_strong_as_fgsm(trained_digits):
    model, test = trained_digits
    eps = [1 / 255, 2 / 255, 4 / 255, 8 / 255]
    acc = robust_accuracy(model, test, 100, CPU, eps, steps=10, seed=0)
    clean = 100 * float((predict(model, test, 100, CPU).argmax(1) == test.labels).double().mean())
    for f, p in zip(acc["fgsm"], acc["pgd"], strict=True):
        assert p <= f
    assert acc["pgd"] == sorted(acc["pgd"], reverse=True)  # stronger with a larger epsilon
    assert acc["pgd"][-1] < clean - 20 and acc["fgsm"][-1] < clean  # the attacks do something
