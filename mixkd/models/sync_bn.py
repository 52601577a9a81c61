"""Synchronised BatchNorm for data-parallel runs (``--sync-bn``).

On GPUs with NCCL, ``torch.nn.SyncBatchNorm``. It refuses CPU tensors, so elsewhere (gloo: the CPU,
or ranks sharing one GPU) :class:`GlooSyncBatchNorm`: the batch's mean and variance over every
rank's part, through autograd-aware all-reduces (:class:`AllReduceSum`, whose backward sums the
gradients over the ranks, as ``torch.distributed.nn.functional.all_reduce`` did), and the running statistics updated as
``BatchNorm`` updates them (with the unbiased variance of the global batch). Both keep
``BatchNorm``'s state_dict keys, so checkpoints do not depend on them.

timm's ``BatchNormAct2d`` (BatchNorm, then its ``drop`` and ``act`` modules; timm's EfficientNets,
MobileNetV3s, ...) keeps its dropout and activation: under NCCL through timm's own
``convert_sync_batchnorm`` (its ``SyncBatchNormAct``), under gloo as :class:`GlooSyncBatchNormAct`.
A BatchNorm of another class with a forward of its own (timm's ``SplitBatchNorm2d``, a plugin's) is
refused in one line: replaced by a plain synchronised BatchNorm, what its forward adds would be lost
without a word.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from mixkd.errors import MixkdError


class AllReduceSum(torch.autograd.Function):
    """``x`` summed over the ranks; the gradient of each rank's ``x`` is the sum of every rank's
    gradient of the result (each rank's loss depends on every rank's ``x``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch (every rank's part);
    in eval mode it is plain BatchNorm. Two passes (mean, then squared deviations), as one process
    computes them."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        dtype = x.dtype
        xf = x.float()
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        total = AllReduceSum.apply(torch.cat([xf.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = AllReduceSum.apply((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        return y.to(dtype)


class GlooSyncBatchNormAct(GlooSyncBatchNorm):
    """timm's ``BatchNormAct2d`` synchronised: :class:`GlooSyncBatchNorm`, then the layer's own
    ``drop`` and ``act`` modules, in its order (the state_dict keys stay the layer's)."""

    def __init__(self, *args, drop: nn.Module, act: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _norm_act():
    """timm's ``norm_act`` module where timm is loaded (a model holding its layers has loaded it), else None."""
    return sys.modules.get("timm.layers.norm_act")


def _plain_forward(cls: type) -> bool:
    """Whether BatchNorm class ``cls`` normalises as BatchNorm does (torch's BatchNorm1d/2d/3d and
    subclasses that keep their forward), or is synchronised already."""
    synced = (nn.SyncBatchNorm, GlooSyncBatchNorm)
    return cls.forward is nn.modules.batchnorm._BatchNorm.forward or issubclass(cls, synced)


def _refuse_unknown_norms(module: nn.Module, owner: str) -> None:
    norm_act = _norm_act()
    known = (norm_act.BatchNormAct2d,) if norm_act is not None else ()
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, known) and not _plain_forward(type(m)):
            cls = type(m)
            raise MixkdError(f"--sync-bn: layer {name or '(the whole module)'!r} of {owner} is a "
                             f"{cls.__module__}.{cls.__qualname__}, a BatchNorm with a forward of its own that mixkd "
                             "cannot synchronise over the ranks (a plain SyncBatchNorm would drop what it adds); "
                             "run without --sync-bn")


def convert_sync_batchnorm(module: nn.Module, use_torch: bool, owner: str = "the model") -> nn.Module:
    """``module`` with every BatchNorm layer synchronised over the process group: torch's
    ``SyncBatchNorm`` when ``use_torch`` (CUDA tensors under NCCL), else :class:`GlooSyncBatchNorm`;
    timm's ``BatchNormAct2d`` keeps its activation (:class:`GlooSyncBatchNormAct`, timm's
    ``SyncBatchNormAct``). A BatchNorm class with a forward of its own is a :class:`MixkdError`
    naming the layer of ``owner`` (what the message calls ``module``)."""
    _refuse_unknown_norms(module, owner)
    return _convert(module, use_torch, _norm_act())


def _convert(module: nn.Module, use_torch: bool, norm_act) -> nn.Module:
    if use_torch:
        if norm_act is not None:  # timm's own conversion: BatchNormAct2d to its SyncBatchNormAct, the rest to torch's
            return norm_act.convert_sync_batchnorm(module)
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        args = (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if norm_act is not None and isinstance(module, norm_act.BatchNormAct2d):
            new = GlooSyncBatchNormAct(*args, drop=module.drop, act=module.act, device=_device_of(module))
        else:
            new = GlooSyncBatchNorm(*args, device=_device_of(module))
        with torch.no_grad():
            if module.affine:
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
            if module.track_running_stats:
                new.running_mean.copy_(module.running_mean)
                new.running_var.copy_(module.running_var)
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert(child, use_torch, norm_act))
    return module


def _device_of(module: nn.Module) -> torch.device | None:
    t = next(iter(list(module.parameters()) + list(module.buffers())), None)
    return None if t is None else t.device


__all__ = ["AllReduceSum", "GlooSyncBatchNorm", "GlooSyncBatchNormAct", "convert_sync_batchnorm"]
