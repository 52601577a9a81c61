"""Models with the weights of a checkpoint: a mixkd run folder or ``.safetensors`` file, a
RepDistiller ``.pth`` or a torchvision state_dict file (``--teacher resnet34.pth --teacher-model
tv_resnet34``: strict keys, nothing downloaded); and the frozen teacher of a distillation."""

from __future__ import annotations

import torch

from mixkd.checkpoint import load_checkpoint, load_weights
from mixkd.errors import MixkdError
from mixkd.models import create_model


def load_model(checkpoint: str, arch: str | None, num_classes: int, flag: str = "--model") -> tuple[torch.nn.Module, str]:
    """A model with the weights of a mixkd checkpoint/run directory, a RepDistiller ``.pth`` or a
    torchvision state_dict file.

    ``arch`` may be omitted when the checkpoint names its architecture (mixkd checkpoints do).
    """
    ckpt = load_checkpoint(checkpoint)
    arch = arch or ckpt.model_name
    if not arch:
        raise MixkdError(f"{checkpoint} does not say its architecture; pass {flag} (see 'mixkd models')")
    model = create_model(arch, num_classes)
    load_weights(model, ckpt.state_dict, str(checkpoint), arch)
    return model, arch


def load_teacher(checkpoint: str, arch: str | None, num_classes: int, device,
                 channels_last: bool = False) -> tuple[torch.nn.Module, str]:
    """A frozen teacher in eval mode (see :func:`load_model`)."""
    teacher, arch = load_model(checkpoint, arch, num_classes, flag="--teacher-model")
    teacher.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, arch
