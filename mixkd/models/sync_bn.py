"""Synchronised BatchNorm for data-parallel runs (``--sync-bn``).

On GPUs with NCCL, ``torch.nn.SyncBatchNorm``. It refuses CPU tensors, so elsewhere (gloo: the CPU,
or ranks sharing one GPU) :class:`GlooSyncBatchNorm`: the batch's mean and variance over every
rank's part, through autograd-aware all-reduces (:class:`AllReduceSum`, whose backward sums the
gradients over the ranks, as ``torch.distributed.nn.functional.all_reduce`` did), and the running statistics updated as
``BatchNorm`` updates them (with the unbiased variance of the global batch). Both keep
``BatchNorm``'s state_dict keys, so checkpoints do not depend on them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


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


def convert_sync_batchnorm(module: nn.Module, use_torch: bool) -> nn.Module:
    """``module`` with every BatchNorm layer synchronised over the process group: torch's
    ``SyncBatchNorm`` when ``use_torch`` (CUDA tensors under NCCL), else :class:`GlooSyncBatchNorm`."""
    if use_torch:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        new = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, device=_device_of(module))
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
        module.add_module(name, convert_sync_batchnorm(child, use_torch))
    return module


def _device_of(module: nn.Module) -> torch.device | None:
    t = next(iter(list(module.parameters()) + list(module.buffers())), None)
    return None if t is None else t.device


__all__ = ["AllReduceSum", "GlooSyncBatchNorm", "convert_sync_batchnorm"]
