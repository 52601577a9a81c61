"""CRD: contrastive representation distillation (Tian et al., ICLR 2020), as mdistiller trains it, its
memory a queue of the last embeddings (mixkd's step gives a method images, not dataset indices)."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from mixkd.methods._feature import FeatureDistiller, FeatureSettings, feature_weight_field
from mixkd.registry import KD_METHODS


class CRDSettings(FeatureSettings):
    feat_weight: float = feature_weight_field(0.8, "weight of the contrastive term "
                               "(mdistiller engine/cfg.py CFG.CRD.LOSS.FEAT_WEIGHT)")
    feat_dim: int = Field(128, ge=2, le=4096, description="dimension of the embeddings contrasted "
                          "(mdistiller engine/cfg.py CFG.CRD.FEAT.DIM)")
    nce_k: int = Field(16384, ge=1, le=1_000_000, description="negatives per sample, drawn from the memory "
                       "(mdistiller engine/cfg.py CFG.CRD.NCE.K)")
    nce_t: float = Field(0.07, gt=0, le=10, description="temperature of the contrast "
                         "(mdistiller engine/cfg.py CFG.CRD.NCE.TEMPERATURE)")
    memory_size: int = Field(50000, ge=1, le=10_000_000, description="embeddings kept in the memory: the "
                             "training set's size in CRD (50000 for CIFAR-100); the noise probability is 1/memory_size")


class Embed(torch.nn.Module):
    """Linear map then L2 normalization (CRD.py ``Embed`` / ``Normalize``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = torch.nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.reshape(x.shape[0], -1)).float()
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


class Memory(torch.nn.Module):
    """The two memories (student and teacher embeddings) as rings of ``size`` rows, initialized uniform in
    +-1/sqrt(dim / 3) as CRD.py ``ContrastMemory``; ``z_s``/``z_t`` the normalization constants, set from
    the first batch (-1 until then); all saved in checkpoints, so that a resumed run goes on exactly."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", torch.rand(size, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(size, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("z_s", torch.full((), -1.0))
        self.register_buffer("z_t", torch.full((), -1.0))

    @torch.no_grad()
    def push(self, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        size = self.memory_s.shape[0]
        rows = (self.pointer + torch.arange(v_s.shape[0], device=v_s.device)) % size
        self.memory_s.index_copy_(0, rows, v_s.detach().to(self.memory_s.dtype))
        self.memory_t.index_copy_(0, rows, v_t.detach().to(self.memory_t.dtype))
        self.pointer.copy_((self.pointer + v_s.shape[0]) % size)


def contrast_loss(x: torch.Tensor, noise: float) -> torch.Tensor:
    """NCE loss of (B, 1 + K) scores, the positive first (CRD.py ``ContrastLoss``): -(sum log D1 + sum
    log D0) / B with D1 = P / (P + K Pn), D0 = K Pn / (P + K Pn), Pn = ``noise``."""
    eps, m = 1e-7, x.shape[1] - 1
    pos, neg = x[:, 0], x[:, 1:]
    log_d1 = torch.log(pos / (pos + m * noise + eps))
    log_d0 = torch.log((m * noise) / (neg + m * noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


def _scores(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, z: torch.Tensor,
            size: int, temperature: float) -> torch.Tensor:
    """exp(<w, anchor> / T) / Z for w the positive then the negatives; Z set in place from the first call
    (mean score times the memory size, CRD.py ``ContrastMemory.forward``), without a host sync."""
    weights = torch.cat([positive.detach().unsqueeze(1), negatives], dim=1)  # (B, 1 + K, d), no gradient
    out = torch.exp(torch.bmm(weights, anchor.unsqueeze(2)).squeeze(2) / temperature)
    z.copy_(torch.where(z < 0, out.detach().mean() * size, z))
    return out / z


@KD_METHODS.register("crd", settings=CRDSettings, label="CRD", title="contrastive representation distillation")
class CRD(FeatureDistiller):
    """Contrastive representation distillation (Tian et al. 2020; mdistiller distillers/CRD.py), pooled features.

    ``ce_weight * CE + feat_weight * (NCE_s + NCE_t)`` on L2-normalized linear embeddings of the pooled features, each
    model's embedding contrasted with the other model's: its positive and ``nce_k`` negatives drawn
    uniformly, on the device, from a memory of past embeddings.

    What a (mixed) sample's index means here: the mixed image itself. CRD keeps one memory row per
    training sample, refreshed by momentum and indexed by the dataset index, and takes the positive from
    the sample's own row; mixkd's step hands a method images and label distributions, not indices, and a
    mixed image is no dataset sample. So the positive of a sample is the other model's embedding of the
    same (mixed) image in this batch, and the memory is a ring of the last ``memory_size`` embeddings
    (one epoch of CIFAR-100 by default: every row is at most an epoch old, as in CRD), written
    without momentum; negatives are drawn from all of it (CRD's "relax" sampling: same-class negatives
    are not excluded). The embeddings are the method's trainable modules, the memory its saved state."""

    def __init__(self, student, teacher, settings):
        super().__init__(student, teacher, settings)
        shape_s, shape_t = self.shapes()
        self.modules["embed_s"] = Embed(shape_s[-1][1:].numel(), settings.feat_dim)
        self.modules["embed_t"] = Embed(shape_t[-1][1:].numel(), settings.feat_dim)
        self.modules["memory"] = Memory(settings.memory_size, settings.feat_dim)

    def feature_term(self, feats_s, feats_t):
        s, memory = self.settings, self.modules["memory"]
        v_s = self.modules["embed_s"](feats_s[-1])
        v_t = self.modules["embed_t"](feats_t[-1].detach())
        idx = torch.randint(s.memory_size, (v_s.shape[0], s.nce_k), device=v_s.device)
        out_t = _scores(v_t, v_s, memory.memory_s[idx], memory.z_t, s.memory_size, s.nce_t)  # CRD's out_v2
        out_s = _scores(v_s, v_t, memory.memory_t[idx], memory.z_s, s.memory_size, s.nce_t)  # CRD's out_v1
        memory.push(v_s, v_t)
        noise = 1.0 / s.memory_size
        return contrast_loss(out_s, noise) + contrast_loss(out_t, noise)
