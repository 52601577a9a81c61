"""CRD: contrastive representation distillation (Tian et al., ICLR 2020), as mdistiller trains it: one memory
row per training sample, indexed by the samples' dataset indices, refreshed by momentum, its negatives drawn
on the device from the samples of the other classes."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from mixkd import distributed
from mixkd.methods._feature import FeatureDistiller, FeatureSettings, feature_weight_field
from mixkd.registry import KD_METHODS


class CRDSettings(FeatureSettings):
    feat_weight: float = feature_weight_field(0.8, "weight of the contrastive term "
                               "(mdistiller engine/cfg.py CFG.CRD.LOSS.FEAT_WEIGHT)")
    feat_dim: int = Field(128, ge=2, le=4096, description="dimension of the embeddings contrasted "
                          "(mdistiller engine/cfg.py CFG.CRD.FEAT.DIM)")
    nce_k: int = Field(16384, ge=1, le=1_000_000, description="negatives per sample, rows of samples of the other "
                       "classes (mdistiller engine/cfg.py CFG.CRD.NCE.K)")
    nce_t: float = Field(0.07, gt=0, le=10, description="temperature of the contrast "
                         "(mdistiller engine/cfg.py CFG.CRD.NCE.TEMPERATURE)")
    nce_momentum: float = Field(0.5, ge=0, lt=1, description="momentum of a sample's memory row: row * m + "
                                "embedding * (1 - m), then L2-normalized (mdistiller engine/cfg.py "
                                "CFG.CRD.NCE.MOMENTUM; distillers/CRD.py ContrastMemory.forward)")
    mode: Literal["exact", "relax"] = Field("exact", description="the positive: exact, the sample's own memory row; "
                                            "relax, the row of a random sample of its class (mdistiller "
                                            "engine/cfg.py CFG.CRD.MODE; dataset/cifar100.py CIFAR100InstanceSample)")
    nce_replace: bool = Field(False, description="draw the negatives with replacement (O(B K) work a step) "
                              "instead of as the authors: nce_k distinct samples of the other classes, with "
                              "replacement only where a class has fewer (dataset/cifar100.py "
                              "CIFAR100InstanceSample: np.random.choice(cls_negative[target], k, replace=k > "
                              "len(...))), drawn by random keys over the training set (O(B N) work a step)")


class Embed(torch.nn.Module):
    """Linear map then L2 normalization (CRD.py ``Embed`` / ``Normalize``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = torch.nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.reshape(x.shape[0], -1)).float()
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


class ContrastMemory(torch.nn.Module):
    """CRD.py ``ContrastMemory``: the student's and the teacher's memories, one row per training sample
    (``labels``: the training split's labels, row ``i`` sample ``i``'s), initialized uniform in
    +-1/sqrt(dim / 3); ``z_s``/``z_t`` the normalization constants, set from the first batch (-1 until
    then). Those four are the saved state. What the draws need is derived from ``labels`` on the
    device: the dataset's indices ordered by class (``order``), each class's first position in it
    (``start``) and its size (``count``)."""

    def __init__(self, labels: torch.Tensor, dim: int):
        super().__init__()
        labels = labels.to(torch.int64)
        size = labels.shape[0]
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", torch.rand(size, dim, device=labels.device).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(size, dim, device=labels.device).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z_s", torch.full((), -1.0, device=labels.device))
        self.register_buffer("z_t", torch.full((), -1.0, device=labels.device))
        count = torch.bincount(labels)
        self.labels, self.order, self.count = labels, torch.argsort(labels, stable=True), count
        self.start = torch.cumsum(count, 0) - count
        self.fewest_others = size - int(count.max())  # host values, read once here
        self.most_others = size - int(count[count > 0].min())

    @property
    def size(self) -> int:
        return self.memory_s.shape[0]

    def positives(self, index: torch.Tensor, mode: str) -> torch.Tensor:
        """The positive row of each sample: its own (``exact``), or a uniform draw from its class (``relax``)."""
        if mode == "exact":
            return index
        c = self.labels[index]
        r = torch.randint(0, 2**62, index.shape, device=index.device) % self.count[c]
        return self.order[self.start[c] + r]

    def negatives(self, index: torch.Tensor, k: int, replace: bool) -> torch.Tensor:
        """``k`` rows of other-class samples for each of ``index``'s samples, (B, k), drawn on the device
        without a host sync: with replacement (``replace``, or where the other classes have fewer than
        ``k`` samples), else ``k`` distinct ones (the ``k`` largest of uniform keys over the training
        set, the sample's class keyed below them all: a uniform ``k``-subset)."""
        c = self.labels[index]
        if replace or k > self.most_others:  # every class draws with replacement
            return self._with_replacement(c, k)
        keys = torch.rand(index.shape[0], self.size, device=index.device)
        keys.masked_fill_(self.labels.unsqueeze(0) == c.unsqueeze(1), -1.0)
        distinct = keys.topk(k, dim=1, sorted=False).indices
        if k <= self.fewest_others:
            return distinct
        return torch.where((k > self.size - self.count[c]).unsqueeze(1), self._with_replacement(c, k), distinct)

    def _with_replacement(self, c: torch.Tensor, k: int) -> torch.Tensor:
        """Uniform over the other classes' samples: a draw ``r`` in [0, N - n_c) read from the class-sorted
        indices, skipping class ``c``'s block (the modulo's bias is below (N / 2^62))."""
        others = (self.size - self.count[c]).unsqueeze(1)
        r = torch.randint(0, 2**62, (c.shape[0], k), device=c.device) % others
        start = self.start[c].unsqueeze(1)
        return self.order[r + (r >= start) * self.count[c].unsqueeze(1)]

    @torch.no_grad()
    def update(self, index: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor, momentum: float) -> None:
        """Rows ``index`` to ``row * momentum + v * (1 - momentum)``, L2-normalized (CRD.py ``ContrastMemory``)."""
        for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            rows = memory.index_select(0, index).mul_(momentum).add_(v.to(memory.dtype), alpha=1 - momentum)
            memory.index_copy_(0, index, rows.div_(rows.pow(2).sum(1, keepdim=True).pow(0.5)))


def contrast_loss(x: torch.Tensor, noise: float) -> torch.Tensor:
    """NCE loss of (B, 1 + K) scores, the positive first (CRD.py ``ContrastLoss``): -(sum log D1 + sum
    log D0) / B with D1 = P / (P + K Pn), D0 = K Pn / (P + K Pn), Pn = ``noise``."""
    eps, m = 1e-7, x.shape[1] - 1
    pos, neg = x[:, 0], x[:, 1:]
    log_d1 = torch.log(pos / (pos + m * noise + eps))
    log_d0 = torch.log((m * noise) / (neg + m * noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


def _scores(anchor: torch.Tensor, memory: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(<w, anchor> / T) for w the memory's ``rows`` (B, 1 + K), without gradient to the memory."""
    weights = memory.index_select(0, rows.reshape(-1)).view(*rows.shape, -1)  # (B, 1 + K, d)
    return torch.exp(torch.bmm(weights, anchor.unsqueeze(2)).squeeze(2) / temperature)


@KD_METHODS.register("crd", settings=CRDSettings, label="CRD", title="contrastive representation distillation")
class CRD(FeatureDistiller):
    """Contrastive representation distillation (Tian et al. 2020; mdistiller distillers/CRD.py), pooled features.

    ``ce_weight * CE + feat_weight * (NCE_s + NCE_t)`` on L2-normalized linear embeddings of the pooled
    features, each model's embedding contrasted with the other model's memory: its positive the memory
    row of the sample itself (``mode: exact``), its ``nce_k`` negatives rows of samples of the other
    classes, drawn on the device. The memory holds one row per training sample (its size: the training
    split's, given by the engine), refreshed after the scores by momentum (``nce_momentum``) from the
    sample's embeddings; the noise probability of the NCE is 1 / (training set's size).

    What a mixed sample's index means: **the sample it was mixed into**, the one at its batch position
    (mixkd.data.layout). A mixed image therefore takes its own sample's row as its positive, its
    negatives exclude that sample's class only (the partner's class may be among them), and its
    embedding refreshes that sample's row; the partner's share of the image is credited to no row
    of the partner's (the partner refreshes its own row from its own batch position, where it is
    mixed with another). Under mixing the memory holds, per sample, a momentum average of the
    embeddings of the images mixed into it; with partial mixing (a fraction of the batch mixed) the
    rows of unmixed samples are CRD's own.

    Data-parallel runs keep the memory the same on every rank: the ranks' embeddings and indices are
    gathered before the update (and the first batch's scores, for Z). The memory and the normalization
    constants are saved in checkpoints; the class bookkeeping is rebuilt from the training split."""

    inputs = ("index",)

    def __init__(self, student, teacher, settings):
        super().__init__(student, teacher, settings)
        shape_s, shape_t = self.shapes()
        self.modules["embed_s"] = Embed(shape_s[-1][1:].numel(), settings.feat_dim)
        self.modules["embed_t"] = Embed(shape_t[-1][1:].numel(), settings.feat_dim)

    def set_training_set(self, labels: torch.Tensor) -> None:
        self.memory["contrast"] = ContrastMemory(labels.to(self.device), self.settings.feat_dim)
        distributed.broadcast_(list(self.memory.buffers()))  # rank 0's initial memory on every rank

    def feature_term(self, feats_s, feats_t, index=None):
        if "contrast" not in self.memory or index is None:
            raise self.refuse("CRD needs the training set (Distiller.set_training_set) and the samples' "
                              "dataset indices (index=)")
        s, memory = self.settings, self.memory["contrast"]
        v_s = self.modules["embed_s"](feats_s[-1])
        v_t = self.modules["embed_t"](feats_t[-1].detach())
        rows = torch.cat([memory.positives(index, s.mode).unsqueeze(1),
                          memory.negatives(index, s.nce_k, s.nce_replace)], dim=1)  # CRD.py's contrast_idx
        out_s = _scores(v_s, memory.memory_t, rows, s.nce_t)  # CRD's out_v1: student against the teacher's memory
        out_t = _scores(v_t, memory.memory_s, rows, s.nce_t)  # CRD's out_v2
        # one gather a step under data parallelism: the embeddings, the scores' row means (for Z), the indices
        seen = distributed.all_gather(torch.cat([v_s, v_t, out_s.mean(1, keepdim=True),
                                                 out_t.mean(1, keepdim=True)], dim=1).detach())
        index_all = distributed.all_gather(index)
        d = v_s.shape[1]
        for z, means in ((memory.z_s, seen[:, 2 * d]), (memory.z_t, seen[:, 2 * d + 1])):
            z.copy_(torch.where(z < 0, means.mean() * memory.size, z))  # set once, from the first batch
        out_s, out_t = out_s / memory.z_s, out_t / memory.z_t
        memory.update(index_all, seen[:, :d], seen[:, d:2 * d], s.nce_momentum)
        noise = 1.0 / memory.size
        return contrast_loss(out_s, noise) + contrast_loss(out_t, noise)
