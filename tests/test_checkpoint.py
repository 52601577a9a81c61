"""Checkpoints: round trips, atomic writes, corruption detection, RepDistiller layout."""

import pytest
import torch

from mixkd.checkpoint import atomic_write_text, load_checkpoint, load_weights, save_checkpoint
from mixkd.errors import MixkdError
from mixkd.models import create_model


def _trained_optimizer(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    return opt


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet8", 10)
    opt = _trained_optimizer(model)
    path = tmp_path / "checkpoint.safetensors"
    rng = torch.get_rng_state()
    save_checkpoint(path, model, model_name="resnet8", num_classes=10, epoch=7, optimizer=opt,
                    rng={"torch_cpu": rng}, extra={"dataset": "cifar10"})
    ckpt = load_checkpoint(tmp_path)  # a run directory stands for its checkpoint
    assert (ckpt.epoch, ckpt.model_name, ckpt.meta["num_classes"], ckpt.meta["dataset"]) == (7, "resnet8", 10, "cifar10")
    fresh = create_model("resnet8", 10)
    load_weights(fresh, ckpt.state_dict, "x")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt2.load_state_dict(ckpt.optimizer_state)
    for p1, p2 in zip(opt.param_groups[0]["params"], opt2.param_groups[0]["params"], strict=True):
        assert torch.equal(opt.state[p1]["momentum_buffer"], opt2.state[p2]["momentum_buffer"])
    assert torch.equal(ckpt.rng["torch_cpu"], rng)


def test_bf16_weights_round_trip(tmp_path):
    model = create_model("resnet8", 10).to(torch.bfloat16)
    save_checkpoint(tmp_path / "c.safetensors", model, model_name="resnet8", num_classes=10, epoch=1)
    ckpt = load_checkpoint(tmp_path / "c.safetensors")
    assert all(v.dtype == torch.bfloat16 for k, v in ckpt.state_dict.items() if "num_batches" not in k)


def test_failed_write_leaves_the_previous_file_intact(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_text(target, "old")

    def explode(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    from mixkd.checkpoint import atomic_write

    with pytest.raises(RuntimeError):
        atomic_write(target, explode)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_repdistiller_pth_layouts_load(tmp_path):
    model = create_model("resnet8x4", 100)
    sd = model.state_dict()
    torch.save({"model": sd, "epoch": 240, "best_acc": 79.42}, tmp_path / "a.pth")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "b.pth")  # bare, saved from DataParallel
    for name in ("a.pth", "b.pth"):
        ckpt = load_checkpoint(tmp_path / name)
        fresh = create_model("resnet8x4", 100)
        load_weights(fresh, ckpt.state_dict, name)
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values(), strict=True))
    assert load_checkpoint(tmp_path / "a.pth").epoch == 240


def test_pth_without_state_dict_is_rejected(tmp_path):
    torch.save({"acc": 1.0}, tmp_path / "x.pth")
    with pytest.raises(MixkdError, match="holds no state_dict"):
        load_checkpoint(tmp_path / "x.pth")


def test_missing_checkpoint_is_reported(tmp_path):
    with pytest.raises(MixkdError, match="not found"):
        load_checkpoint(tmp_path / "none.safetensors")


def test_safetensors_whose_header_length_starts_with_pickle_byte_is_not_misread(tmp_path):
    # a safetensors header length with low byte 0x80 once made the file look like a pickle
    for extra in range(0, 256):
        path = tmp_path / f"c{extra}.safetensors"
        save_checkpoint(path, create_model("resnet8", 10), model_name="resnet8", num_classes=10, epoch=1,
                        extra={"pad": "x" * extra})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.skip("no header length with low byte 0x80 found")
    assert load_checkpoint(path).model_name == "resnet8"
    renamed = tmp_path / "weights.bin"  # the extension does not matter either
    renamed.write_bytes(path.read_bytes())
    assert load_checkpoint(renamed).model_name == "resnet8"
