"""L-infinity adversarial attacks in pixel space: FGSM and PGD (random start).

The model takes pixels in [0, 1] (wrap it in :class:`mixkd.analysis.inputs.Normalized`), so
epsilon is in pixel units and every adversarial image is clipped to the valid range [0, 1] and
to the epsilon-ball around the clean image. Only the input gradient is computed: the model's
parameters are frozen for the duration of an attack.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mixkd.analysis.inputs import PixelImages
from mixkd.analysis.metrics import autocast

EPSILONS_255 = (1, 2, 4, 8)  # epsilon x 255
PGD_STEPS = 10


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters need no gradient inside (restored on exit); the model is put in eval mode."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(d sum-CE / d x, logits at x), float32."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), autocast(x.device, amp):
        logits = model(x).float()
        loss = F.cross_entropy(logits, y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip to the L-inf ball of radius ``eps`` around ``x``, then to [0, 1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, grad: torch.Tensor | None = None,
         amp: bool = False) -> torch.Tensor:
    """x + eps * sign(grad of the loss at x), clipped to [0, 1]. ``grad`` may be passed in (it does
    not depend on eps, so one gradient serves every epsilon)."""
    if grad is None:
        grad, _ = input_gradient(model, x, y, amp)
    return project(x + eps * grad.sign(), x, eps)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = PGD_STEPS,
        step_size: float | None = None, generator: torch.Generator | None = None,
        amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD (Madry et al. 2018): a uniform random start in the eps-ball, then ``steps`` signed-gradient
    steps of ``step_size`` (default eps / 4), each projected to the ball and to [0, 1].

    Returns (final adversarial images, robust mask): a sample is robust only if the model classifies
    it correctly at every iterate (the random start included) and at the final one, i.e. the
    strongest adversarial example PGD found counts.
    """
    step_size = eps / 4 if step_size is None else step_size
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = project(x + (noise * 2 - 1) * eps, x, eps)
    robust = torch.ones_like(y, dtype=torch.bool)
    for _ in range(steps):
        grad, logits = input_gradient(model, x_adv, y, amp)
        robust &= logits.argmax(dim=1) == y
        x_adv = project(x_adv + step_size * grad.sign(), x, eps)
    with torch.no_grad(), autocast(x.device, amp):
        robust &= model(x_adv).argmax(dim=1) == y
    return x_adv, robust


def robust_accuracy(model: nn.Module, data: PixelImages, batch_size: int, device: torch.device,
                    epsilons: Sequence[float], steps: int = PGD_STEPS, seed: int = 0,
                    amp: bool = False) -> dict[str, list[float]]:
    """Accuracy (%) under FGSM and PGD at each epsilon (pixel units): {"fgsm": [...], "pgd": [...]}."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hits = {name: torch.zeros(len(epsilons), device=device, dtype=torch.float64) for name in ("fgsm", "pgd")}
    with frozen(model):
        for _, x, y in data.batches(batch_size, device):
            grad, _ = input_gradient(model, x, y, amp)
            for k, eps in enumerate(epsilons):
                with torch.no_grad(), autocast(device, amp):
                    hits["fgsm"][k] += (model(fgsm(model, x, y, eps, grad)).argmax(1) == y).sum()
                _, robust = pgd(model, x, y, eps, steps, generator=generator, amp=amp)
                hits["pgd"][k] += robust.sum()
    n = max(len(data), 1)
    return {name: (h * 100 / n).cpu().tolist() for name, h in hits.items()}
