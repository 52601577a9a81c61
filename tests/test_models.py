"""Model zoo: registry, forward contract, and RepDistiller checkpoint compatibility."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn

from mixkd.errors import MixkdError
from mixkd.models import available_models, create_model, default_lr

REPDISTILLER = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "ResNet50", "MobileNetV2", "ShuffleV1", "ShuffleV2",
]  # fmt: skip
TORCHVISION = ["tv_resnet18", "tv_resnet34", "tv_resnet50", "tv_mobilenet_v2"]
ALL = REPDISTILLER + TORCHVISION

# Trainable parameters at num_classes=100. Published (RepDistiller/CRD) figures agree:
# resnet8x4 1.23M, resnet32x4 7.43M, wrn_40_2 2.26M, wrn_16_2 0.70M, resnet56 0.86M,
# resnet20 0.28M, resnet110 1.74M, vgg13 9.46M, vgg8 3.96M, MobileNetV2 0.81M,
# ShuffleV1 0.95M, ShuffleV2 1.36M, ResNet50 23.7M.
PARAM_COUNTS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "ResNet50": 23_705_252,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
}

# A few state_dict entries per model, read off RepDistiller's models/*.py, plus the
# total number of state_dict entries (parameters and BN buffers) at num_classes=100.
KEY_LAYOUT: dict[str, tuple[int, dict[str, tuple[int, ...]]]] = {
    "resnet8x4": (62, {
        "conv1.weight": (32, 3, 3, 3),
        "bn1.running_mean": (32,),
        "layer1.0.conv1.weight": (64, 32, 3, 3),
        "layer1.0.downsample.0.weight": (64, 32, 1, 1),
        "layer3.0.downsample.1.running_var": (256,),
        "layer3.0.bn2.num_batches_tracked": (),
        "fc.weight": (100, 256),
        "fc.bias": (100,),
    }),
    "resnet32x4": (206, {
        "conv1.weight": (32, 3, 3, 3),
        "layer1.4.conv2.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer3.4.bn2.running_mean": (256,),
        "fc.weight": (100, 256),
    }),
    "wrn_40_2": (227, {
        "conv1.weight": (16, 3, 3, 3),
        "block1.layer.0.bn1.weight": (16,),
        "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
        "block2.layer.0.convShortcut.weight": (64, 32, 1, 1),
        "block3.layer.5.conv2.weight": (128, 128, 3, 3),
        "bn1.running_mean": (128,),
        "fc.weight": (100, 128),
    }),
    "vgg13": (72, {
        "block0.0.weight": (64, 3, 3, 3),
        "block0.0.bias": (64,),
        "block0.1.running_mean": (64,),
        "block0.3.weight": (64, 64, 3, 3),
        "block4.4.running_var": (512,),
        "classifier.weight": (100, 512),
    }),
    "MobileNetV2": (320, {
        "conv1.0.weight": (16, 3, 3, 3),
        "conv1.1.running_mean": (16,),
        "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
        "blocks.1.0.conv.3.weight": (48, 1, 3, 3),
        "blocks.6.0.conv.6.weight": (160, 480, 1, 1),
        "conv2.0.weight": (1280, 160, 1, 1),
        "classifier.0.weight": (100, 1280),
    }),
    "ShuffleV1": (296, {
        "conv1.weight": (24, 3, 1, 1),
        "layer1.0.conv1.weight": (54, 24, 1, 1),
        "layer1.0.conv3.weight": (216, 18, 1, 1),
        "layer1.1.conv1.weight": (60, 80, 1, 1),
        "layer3.3.bn3.running_var": (960,),
        "linear.weight": (100, 960),
    }),
    "ShuffleV2": (338, {
        "conv1.weight": (24, 3, 1, 1),
        "layer1.0.conv1.weight": (24, 1, 3, 3),
        "layer1.0.conv2.weight": (58, 24, 1, 1),
        "layer1.1.conv2.weight": (58, 1, 3, 3),
        "layer3.3.bn3.running_mean": (232,),
        "conv2.weight": (1024, 464, 1, 1),
        "linear.weight": (100, 1024),
    }),
    "ResNet50": (320, {
        "conv1.weight": (64, 3, 3, 3),
        "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
        "layer1.0.shortcut.1.running_mean": (256,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "linear.weight": (100, 2048),
    }),
}  # fmt: skip


@functools.cache
def _model100(name: str) -> nn.Module:
    """A shared num_classes=100 instance; only read from, never modified."""
    torch.manual_seed(0)
    return create_model(name, num_classes=100)


def _classifier(model: nn.Module) -> nn.Module:
    for attr in ("fc", "linear", "classifier"):
        if hasattr(model, attr):
            return getattr(model, attr)
    raise AssertionError(f"{type(model).__name__} has no classifier")


def _randomize_bn_buffers(model: nn.Module) -> None:
    """Make BN buffers non-default so a load that skipped them would show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)


# --- registry -----------------------------------------------------------------


def test_available_models_is_sorted_naturally_and_complete() -> None:
    names = available_models()
    assert names[:6] == ["MobileNetV2", "resnet8", "resnet8x4", "resnet14", "resnet20", "resnet32"]  # numbers by value
    assert names.index("resnet44") < names.index("ResNet50") < names.index("resnet56") < names.index("resnet110")
    assert sorted(names) == sorted(ALL)
    assert len(names) == 26


def test_default_lr() -> None:
    small = {"MobileNetV2", "ShuffleV1", "ShuffleV2", "tv_mobilenet_v2"}
    assert {n for n in ALL if default_lr(n) == 0.01} == small
    assert all(default_lr(n) == 0.05 for n in ALL if n not in small)


def test_unknown_model_lists_names() -> None:
    with pytest.raises(MixkdError) as info:
        create_model("foo")
    msg = str(info.value)
    assert msg.startswith("unknown model 'foo'; available: ")
    assert "\n" not in msg and "did you mean" not in msg
    for name in ALL:
        assert name in msg


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("resnet32x5", "resnet32x4"),
        ("mobilenetv2", "MobileNetV2"),
        ("wrn_40_3", "wrn_40_2"),
        ("shufflev2", "ShuffleV2"),
    ],
)
def test_unknown_model_suggests_close_name(typo: str, suggestion: str) -> None:
    with pytest.raises(MixkdError, match=f"did you mean '{suggestion}'"):
        create_model(typo)
    with pytest.raises(MixkdError, match=f"did you mean '{suggestion}'"):
        default_lr(typo)


@pytest.mark.parametrize("num_classes", [1, 0, -3])
def test_num_classes_below_two_rejected(num_classes: int) -> None:
    with pytest.raises(MixkdError, match="num_classes"):
        create_model("resnet8", num_classes=num_classes)


# --- forward contract ---------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_forward_contract(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats, feat_logits = model(x, is_feat=True)
        pre_feats, pre_logits = model(x, is_feat=True, preact=True)
        head = _classifier(model)(feats[-1])
    assert logits.shape == (2, 10)
    assert isinstance(feats, list) and len(feats) >= 5
    assert feats[-1].dim() == 2 and feats[-1].shape[0] == 2
    torch.testing.assert_close(feat_logits, logits)
    torch.testing.assert_close(head, logits)
    torch.testing.assert_close(pre_logits, logits)
    assert [f.shape for f in pre_feats] == [f.shape for f in feats]


@pytest.mark.parametrize(
    "name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "tv_resnet18", "tv_mobilenet_v2"]
)
def test_train_mode_backward(name: str) -> None:
    model = create_model(name, num_classes=5).train()
    feats, logits = model(torch.randn(2, 3, 32, 32), is_feat=True)
    (logits.sum() + feats[-1].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


# --- RepDistiller compatibility -----------------------------------------------


@pytest.mark.parametrize("name", REPDISTILLER)
def test_param_count(name: str) -> None:
    model = _model100(name)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(KEY_LAYOUT))
def test_repdistiller_key_layout(name: str) -> None:
    n_keys, pinned = KEY_LAYOUT[name]
    sd = _model100(name).state_dict()
    assert len(sd) == n_keys
    for key, shape in pinned.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key


@pytest.mark.parametrize("name", REPDISTILLER)
def test_checkpoint_roundtrip_strict(name: str, tmp_path) -> None:
    torch.manual_seed(1)
    src = create_model(name, num_classes=100)
    _randomize_bn_buffers(src)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict(), "epoch": 240}, path)

    torch.manual_seed(2)
    dst = create_model(name, num_classes=100)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    dst.load_state_dict(ckpt["model"], strict=True)

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        src_feats, src_logits = src.eval()(x, is_feat=True)
        dst_feats, dst_logits = dst.eval()(x, is_feat=True)
    assert torch.equal(src_logits, dst_logits)
    assert all(torch.equal(a, b) for a, b in zip(src_feats, dst_feats, strict=True))


# --- torchvision wrappers -----------------------------------------------------


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_keys_and_outputs_match_torchvision(name: str) -> None:
    reference = getattr(torchvision.models, name.removeprefix("tv_"))(weights=None, num_classes=10).eval()
    model = create_model(name, num_classes=10).eval()
    assert isinstance(model, type(reference))
    ref_sd = reference.state_dict()
    assert list(model.state_dict()) == list(ref_sd)
    model.load_state_dict(ref_sd, strict=True)
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        expected = reference(x)
        feats, logits = model(x, is_feat=True)
        _, pre_logits = model(x, is_feat=True, preact=True)
    torch.testing.assert_close(model(x).detach(), expected)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(pre_logits, expected)
    head = _classifier(model)
    linear = head if isinstance(head, nn.Linear) else head[-1]  # MobileNet-V2: Sequential(Dropout, Linear)
    assert feats[-1].shape == (1, linear.in_features)


def test_torchvision_preact_features() -> None:
    model = create_model("tv_resnet18", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        post, _ = model(x, is_feat=True)
        pre, _ = model(x, is_feat=True, preact=True)
    assert len(pre) == len(post) == 6
    for a, b in zip(pre[1:5], post[1:5], strict=True):  # the four stage outputs
        assert a.min() < 0
        torch.testing.assert_close(torch.relu(a), b)


def test_torchvision_feature_maps_align_for_hints() -> None:
    """tv_mobilenet_v2's feature i has the torchvision ResNets' spatial size (strides 2, 4, 8, 16, 32, then
    the pooled vector; the same for ResNet-18/34/50), and RepDistiller's channel grouping (24, 32, 96,
    320 at the four stages)."""
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        mobile, _ = create_model("tv_mobilenet_v2", num_classes=10).eval()(x, is_feat=True)
        resnet, _ = create_model("tv_resnet18", num_classes=10).eval()(x, is_feat=True)
    assert [tuple(f.shape[1:]) for f in mobile] == [(32, 32, 32), (24, 16, 16), (32, 8, 8), (96, 4, 4), (320, 2, 2),
                                                   (1280,)]
    assert [f.shape[2:] for f in mobile] == [f.shape[2:] for f in resnet]


# --- teachers from torchvision weight files -----------------------------------


@pytest.mark.parametrize(("name", "arch"), [("resnet18", "tv_resnet18"), ("mobilenet_v2", "tv_mobilenet_v2")])
def test_teacher_from_a_torchvision_state_dict_gives_torchvision_logits(tmp_path, name: str, arch: str) -> None:
    from mixkd.loading import load_teacher

    torch.manual_seed(3)
    reference = getattr(torchvision.models, name)(weights=None, num_classes=7)
    _randomize_bn_buffers(reference)
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)  # a bare state_dict, as torchvision's own weight files are
    teacher, got_arch = load_teacher(str(path), arch, 7, "cpu")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.eval()(x)
        logits = teacher(x)
        _, feat_logits = teacher(x, is_feat=True)
    assert got_arch == arch and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(logits, expected)
    assert torch.equal(feat_logits, expected)


def test_a_torchvision_file_of_another_architecture_is_one_line_naming_file_and_keys(tmp_path) -> None:
    from mixkd.loading import load_teacher

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=7).state_dict(), path)
    with pytest.raises(MixkdError) as info:
        load_teacher(str(path), "tv_resnet34", 7, "cpu")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"checkpoint {path} does not fit tv_resnet34: missing keys: layer1.2.conv1.weight, ")
    assert "(+" in msg and "more)" in msg  # the first few keys, then a count
    with pytest.raises(MixkdError, match=r"does not fit tv_resnet18: shape mismatches \(checkpoint vs model\): "
                                         r"fc.weight \(7, 512\) vs \(1000, 512\)"):
        load_teacher(str(path), "tv_resnet18", 1000, "cpu")  # the 1000 ImageNet classes against a 7-class file
    with pytest.raises(MixkdError, match=r"does not fit tv_mobilenet_v2: missing keys: features\.0\.0\.weight"):
        load_teacher(str(path), "tv_mobilenet_v2", 7, "cpu")


def test_fitnet_hint_from_resnet50_to_mobilenet_v2_needs_no_resizing() -> None:
    from mixkd.config import KDConfig
    from mixkd.distiller import make_distiller

    torch.manual_seed(0)
    d = make_distiller("fitnet", create_model("tv_mobilenet_v2", 5), create_model("tv_resnet50", 5).eval(),
                       KDConfig(method="fitnet", teacher="t.pth").settings())
    conv = d.modules["regressor"].conv  # from the student's stride-8 map (32 channels) to the teacher's (512)
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and (conv.in_channels, conv.out_channels) == (32, 512)
    losses = d.forward_train(torch.randn(2, 3, 32, 32), torch.eye(5)[[0, 3]])
    assert all(torch.isfinite(v) for v in losses.values()) and losses["hint"] > 0
