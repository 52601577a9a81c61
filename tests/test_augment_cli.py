"""``mixkd distill --augment POLICY`` on digits for every registered policy (issue 28), alone and with
mixup (full, and partial: PMU), and policies combined (a plugin's among them), one epoch on a digits
subset of 64 training images (2 steps of 32).

Each run records the images its student trains on; a policy is applied when they differ from the
``none`` run's (the same seed draws the same order; none's are the un-augmented images themselves).
"""

import dataclasses
import json
import math

import pytest
import torch

import mixkd.engine
from mixkd.augment import AUGMENTATIONS, effective_spec
from mixkd.cli import main
from mixkd.data import load_dataset
from mixkd.data.spec import ArraySplit, DataSpec

N_TRAIN, N_TEST, BATCH = 64, 32, 32
STAGE = {name: AUGMENTATIONS.get(name).extra.get("stage") for name in AUGMENTATIONS.names()}


def _variants() -> list:
    """(policy, flags) for every registered policy: a per-sample one alone, with full mixup (--mix) and with
    partial mixup (the augment spelling); mixup and CutMix alone and partial; CutMixPick alone (it is the
    batch stage: it combines with no other mixing)."""
    out = []
    for name in AUGMENTATIONS.names():
        if STAGE[name] == "sample":
            out += [(name, ()), (name, ("--mix", "mixup")), (f"{name}+mixup", ("--mix-fraction", "0.1"))]
        elif name == "cutmix_pick":
            out.append((name, ("augment_settings.cutmix_pick.pool=1",)))
        else:
            out += [(name, ()), (name, ("--mix-fraction", "0.1"))]
    return [pytest.param(a, f, id=" ".join((a, *f))) for a, f in out]


@pytest.fixture(scope="module")
def subset() -> DataSpec:
    """The first 64 training and 32 test images of digits (one spec object: one device copy per process)."""
    spec = load_dataset("digits")
    return dataclasses.replace(spec, train=ArraySplit(spec.train.images[:N_TRAIN], spec.train.labels[:N_TRAIN]),
                               test=ArraySplit(spec.test.images[:N_TEST], spec.test.labels[:N_TEST]))


def distill(mp: pytest.MonkeyPatch, subset, teacher, out, augment: str, flags=()) -> tuple[int, list[torch.Tensor]]:
    """``mixkd distill`` on the subset: (exit status, the images the student saw in training mode)."""
    seen: list[torch.Tensor] = []
    create_model = mixkd.engine.create_model

    def student(*args, **kwargs):
        model = create_model(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()) if m.training else None)
        return model

    mp.setattr(mixkd.engine, "create_model", student)
    mp.setattr(mixkd.engine, "load_dataset", lambda name, *a, **k: subset if name == "digits" else load_dataset(name, *a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["distill", "--teacher", str(teacher), "--student", "resnet8", "--dataset", "digits", "--epochs", "1",
                     "--batch-size", str(BATCH), "--eval-batch-size", str(N_TEST), "--device", "cpu", "--no-progress",
                     "--augment", augment, "--out", str(out), *flags])
    finally:
        torch.set_num_threads(threads)
    return code, seen


@pytest.fixture(scope="module")
def plain(tmp_path_factory, teacher_file, subset) -> torch.Tensor:
    """What the student sees with --augment none: the subset's un-augmented images, 2 batches of 32."""
    with pytest.MonkeyPatch.context() as mp:
        code, seen = distill(mp, subset, teacher_file, tmp_path_factory.mktemp("none") / "run", "none")
    assert code == 0 and len(seen) == 2
    x = torch.cat(seen)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (subset.mean, subset.std))
    images = subset.train.images.to(torch.float32).div_(255).sub_(mean).div_(std)
    # every image is one of the subset's, un-augmented, and each once (an epoch)
    match = (x[:, None] == images[None]).flatten(2).all(2)
    assert match.sum(1).tolist() == [1] * N_TRAIN and match.sum(0).tolist() == [1] * N_TRAIN
    return x


@pytest.mark.parametrize("augment,flags", _variants())
def test_mixkd_distill_trains_on_digits_with_each_policy(augment, flags, plain, subset, teacher_file, tmp_path,
                                                        monkeypatch):
    out = tmp_path / "run"
    code, seen = distill(monkeypatch, subset, teacher_file, out, augment, flags)
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    mix = "mixup" if "--mix" in flags else "none"
    assert result["augment"] == effective_spec(augment, mix)
    assert result["mix"]["fraction"] == (0.1 if "--mix-fraction" in flags else 1.0)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["train_loss"]) and ("train_pick_kd" in row) == (augment == "cutmix_pick")
    x = torch.cat(seen)
    if augment == "none" and not flags:
        assert torch.equal(x, plain)
    else:  # the policy (or the mixing) changed what the student trains on
        assert x.shape != plain.shape or not torch.equal(x, plain)


PLUGIN = '''\
from mixkd.augment.base import SamplePolicy
from mixkd.registry import AUGMENTATIONS


@AUGMENTATIONS.register("invert_cli", label="Invert", stage="sample")
class Invert(SamplePolicy):
    """255 - x."""

    def __call__(self, x):
        return 255 - x
'''


@pytest.fixture(scope="module")
def plugin_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "invert_cli.py"
    path.write_text(PLUGIN)  # a policy plugin file from outside the package (one file: a name registers once)
    return path


@pytest.mark.parametrize("augment,flags", [
    ("none+cutout+invert_cli+cutmix_pick", ["augment_settings.cutmix_pick.pool=1"]),
    ("flip+autoaugment+trivialaugment+randaugment+random_erasing+mixup",
     ["--mix-fraction", "0.1", "--teacher-view", "independent"]),
])
def test_mixkd_distill_trains_on_digits_with_policies_combined(augment, flags, plain, subset, teacher_file, plugin_file,
                                                               tmp_path, monkeypatch):
    out = tmp_path / "run"
    code, seen = distill(monkeypatch, subset, teacher_file, out, augment, ("--plugin", str(plugin_file), *flags))
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["augment"] == augment and result["mix"]["method"] == augment.split("+")[-1].replace("cutmix_pick", "none")
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["train_loss"]) and ("train_pick_kd" in row) == ("cutmix_pick" in augment)
    assert not torch.equal(seen[0], plain[:BATCH])
