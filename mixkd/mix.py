"""Mixup, CutMix, full and partial mixing of a batch, on the batch's device.

Every sample i gets a partner j(i) != i and its own lambda_i ~ Beta(a, a). Partners come from one
random permutation `order` of the batch: the partner of order[k] is order[k + 1] (cyclically), so no
sample is ever mixed with itself (the released code's two independent permutations sometimes did).

All functions take an optional ``torch.Generator`` on the batch's device; with it, a run's mixing is
reproducible. No function reads values back to the host, so a training step stays asynchronous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

MixMethod = Literal["none", "mixup", "cutmix"]
Sampling = Literal["exact", "reference"]

# Marsaglia-Tsang accepts > 95% of candidates for shape >= 1; with 16 candidates per draw the chance
# that none is accepted is below 1e-20, and the fixed shape keeps the draw free of host syncs.
_GAMMA_CANDIDATES = 16


@dataclass(frozen=True)
class MixSpec:
    """What to mix: ``method`` with Beta(``alpha``, ``alpha``) weights on a ``fraction`` of the batch."""

    method: MixMethod = "none"
    alpha: float = 1.0
    fraction: float = 1.0
    sampling: Sampling = "exact"

    def __post_init__(self) -> None:
        if self.method not in ("none", "mixup", "cutmix"):
            raise ValueError(f"mix method must be none, mixup or cutmix, got {self.method!r}")
        if not self.alpha > 0:
            raise ValueError(f"mix alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"mix fraction must be in [0, 1], got {self.fraction}")
        if self.sampling not in ("exact", "reference"):
            raise ValueError(f"mix sampling must be exact or reference, got {self.sampling!r}")

    @property
    def active(self) -> bool:
        return self.method != "none" and self.fraction > 0


def _log_gamma_sample(shape: float, n: int, generator, device) -> torch.Tensor:
    """log of n draws from Gamma(shape, 1), batched (Marsaglia-Tsang; boosted for shape < 1)."""
    a = shape + 1.0 if shape < 1.0 else shape
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    z = torch.randn(_GAMMA_CANDIDATES, n, generator=generator, device=device)
    u = torch.rand(_GAMMA_CANDIDATES, n, generator=generator, device=device)
    v = (1.0 + c * z).clamp_min(1e-12) ** 3
    accept = (1.0 + c * z > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v))
    first = accept.to(torch.uint8).argmax(dim=0, keepdim=True)
    log_g = math.log(d) + torch.log(v.gather(0, first)[0])
    if shape < 1.0:
        boost = torch.rand(n, generator=generator, device=device).clamp_min(1e-30)
        log_g = log_g + torch.log(boost) / shape
    return log_g


def sample_beta(alpha: float, n: int, generator=None, device=None) -> torch.Tensor:
    """n independent draws of lambda ~ Beta(alpha, alpha), float32, on ``device``."""
    if alpha == 1.0:
        return torch.rand(n, generator=generator, device=device)
    g1 = _log_gamma_sample(alpha, n, generator, device)
    g2 = _log_gamma_sample(alpha, n, generator, device)
    return torch.sigmoid(g1 - g2)  # G1 / (G1 + G2), stable when both are tiny


def random_permutation(n: int, generator=None, device=None) -> torch.Tensor:
    """A uniformly random permutation of 0..n-1 (argsort of uniform keys: capturable in a CUDA graph)."""
    return torch.rand(n, generator=generator, device=device).argsort()


def random_partners(batch_size: int, generator=None, device=None) -> torch.Tensor:
    """partner[i] != i for every i (for batch_size >= 2), from one random cyclic ordering."""
    order = random_permutation(batch_size, generator, device)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return partner


def mixed_count(batch_size: int, fraction: float) -> int:
    """Number of samples partial mixup mixes: round(fraction * B), halves rounded up."""
    return int(math.floor(fraction * batch_size + 0.5))


def rank_mixed_count(part: int, fraction: float, rank: int = 0, world: int = 1) -> int:
    """The samples that rank ``rank`` of ``world`` mixes in its ``part`` of a global batch of
    ``part * world`` (equal parts, as data-parallel training batches are): the global batch mixes
    exactly ``mixed_count(part * world, fraction)`` whatever ``world``, rank r taking
    ``c((r + 1) * part) - c(r * part)`` with ``c(p) = round(K * p / B)`` (halves up), a deterministic
    share in proportion to its part. One process (``world=1``): ``mixed_count(part, fraction)``."""
    total = part * world
    k = mixed_count(total, fraction)

    def c(p: int) -> int:  # the mixed samples among the global batch's first p, in integers (exact)
        return (2 * k * p + total) // (2 * total)

    return c((rank + 1) * part) - c(rank * part)


def mixed_mask(batch_size: int, fraction: float, sampling: Sampling = "exact", generator=None, device=None,
               count: int | None = None):
    """Boolean mask of the samples to mix.

    ``exact``: exactly round(fraction * B) samples (``count`` where given), chosen without replacement.
    ``reference``: the released MIX-KD code's choice: int(B * (1 - fraction)) indices of *unmixed*
    samples drawn with replacement, so duplicates leave more samples mixed than asked
    (expected mixed share (1 - 1/B) ** int(B * (1 - fraction)); about 41% at B = 64, fraction 0.1).
    """
    if sampling == "exact":
        k = mixed_count(batch_size, fraction) if count is None else count
        chosen = random_permutation(batch_size, generator, device)[:k]
        return torch.zeros(batch_size, dtype=torch.bool, device=device).index_fill_(0, chosen, True)
    if sampling == "reference":
        n_unmixed = int(batch_size * (1.0 - fraction))
        unmixed = torch.randint(0, batch_size, (n_unmixed,), generator=generator, device=device)
        return torch.ones(batch_size, dtype=torch.bool, device=device).index_fill_(0, unmixed, False)
    raise ValueError(f"sampling must be 'exact' or 'reference', got {sampling!r}")


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def mixup(x, y, alpha: float, mask=None, generator=None):
    """Mixup of images ``x`` (B, ...) and soft labels ``y`` (B, C); samples outside ``mask`` unchanged."""
    lam = sample_beta(alpha, x.shape[0], generator, x.device)
    if mask is not None:
        lam = torch.where(mask, lam, torch.ones_like(lam))
    partner = random_partners(x.shape[0], generator, x.device)
    lam_x = _expand(lam, x)
    x_mixed = lam_x * x + (1 - lam_x) * x[partner]
    lam_y = _expand(lam, y)
    y_mixed = lam_y * y + (1 - lam_y) * y[partner]
    return x_mixed, y_mixed


def box_mask(cy, cx, half_h, half_w, h: int, w: int) -> torch.Tensor:
    """(B, H, W) boolean masks of the boxes [cy - half_h, cy + half_h) x [cx - half_w, cx + half_w),
    clipped to the image, one per sample (all arguments (B,) integer tensors): CutMix's and Cutout's box."""
    dev = cy.device
    y0, y1 = (cy - half_h).clamp(0, h), (cy + half_h).clamp(0, h)
    x0, x1 = (cx - half_w).clamp(0, w), (cx + half_w).clamp(0, w)
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    in_rows = (rows[None] >= y0[:, None]) & (rows[None] < y1[:, None])
    in_cols = (cols[None] >= x0[:, None]) & (cols[None] < x1[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :]


def cutmix_box(lam: torch.Tensor, h: int, w: int, generator=None) -> torch.Tensor:
    """CutMix's boxes (Yun et al. 2019; clovaai/CutMix-PyTorch ``rand_bbox``): side sqrt(1 - lambda) times
    the image's (halves floored), centre uniform over the pixels, clipped to the image: (B, H, W) masks."""
    b, dev = lam.shape[0], lam.device
    cut = torch.sqrt(1.0 - lam)
    cy = torch.randint(0, h, (b,), generator=generator, device=dev)
    cx = torch.randint(0, w, (b,), generator=generator, device=dev)
    half_h = (cut * h / 2).floor().long()
    half_w = (cut * w / 2).floor().long()
    return box_mask(cy, cx, half_h, half_w, h, w)


def cutmix(x, y, alpha: float, mask=None, generator=None):
    """CutMix with one box per sample: a box of area (1 - lambda) of the partner's image is pasted.

    The label weight is the pasted box's actual area after clipping to the image, as in CutMix.
    """
    b, _, h, w = x.shape
    dev = x.device
    lam = sample_beta(alpha, b, generator, dev)
    box = cutmix_box(lam, h, w, generator)  # (B, H, W)
    if mask is not None:
        box = box & mask[:, None, None]
    partner = random_partners(b, generator, dev)
    x_mixed = torch.where(box[:, None], x[partner], x)
    lam_area = 1.0 - box.flatten(1).float().mean(dim=1)
    lam_y = _expand(lam_area, y)
    y_mixed = lam_y * y + (1 - lam_y) * y[partner]
    return x_mixed, y_mixed


def partial_mixup(x, y_onehot, alpha: float, fraction: float, sampling: Sampling = "exact", generator=None):
    """Mix a ``fraction`` of the batch with mixup; the rest keep their image and one-hot label.

    Returns ``(x_mixed, y_mixed)``. ``sampling='exact'`` mixes exactly round(fraction * B) samples;
    ``'reference'`` reproduces the released code (see :func:`mixed_mask`).
    """
    mask = mixed_mask(x.shape[0], fraction, sampling, generator, x.device)
    return mixup(x, y_onehot, alpha, mask=mask, generator=generator)


def mix_batch(x, y_onehot, spec: MixSpec, generator=None, rank: int = 0, world: int = 1):
    """Apply ``spec`` to a batch; full mixing when ``spec.fraction == 1`` with exact sampling.

    ``rank``, ``world``: ``x`` is rank ``rank``'s part of a data-parallel global batch of ``world``
    equal parts; exact partial mixing then mixes this rank's share (:func:`rank_mixed_count`) of
    round(fraction x global batch), so that the global batch's mixed count does not depend on
    ``world``. (``reference`` sampling draws within each part, as the released single-process code
    draws within its batch.)"""
    if not spec.active:
        return x, y_onehot
    full = spec.fraction >= 1.0 and spec.sampling == "exact"
    count = rank_mixed_count(x.shape[0], spec.fraction, rank, world) if spec.sampling == "exact" else None
    mask = None if full else mixed_mask(x.shape[0], spec.fraction, spec.sampling, generator, x.device, count=count)
    fn = mixup if spec.method == "mixup" else cutmix
    return fn(x, y_onehot, spec.alpha, mask=mask, generator=generator)
