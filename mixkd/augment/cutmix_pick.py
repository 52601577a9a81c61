"""``cutmix_pick`` (Wang, Lohit, Jones, Fu, "What Makes a Good Data Augmentation in Knowledge
Distillation - A Statistical Perspective", NeurIPS 2022; code MingSun-Tse/Good-DA-in-KD,
``helper/loops.py`` ``cutmix_pick`` and ``train_distill``).

Each step draws ``pool`` CutMix versions of the batch (``--mix_n_run``), scores every candidate with
the teacher's entropy (or the student's, or the teacher-student KL: ``--cutmix_pick_criterion``),
keeps the ``keep`` highest-scoring ones (``--n_pick``) by a top-k on the device, and adds their KD
term, ``weight`` times the run's ``kd_weight`` times T^2 KL(teacher || student) at the KD temperature
(their ``--lw_mix [1,0,1]``: KL on the clean batch and on the picked mixed samples, no CE on those,
all of it multiplied by ``-a 0.9``), to the method's losses on the clean batch. The teacher's logits on
the candidates are computed once, for the score and for the picked samples' targets (the teacher is
in eval mode: the same numbers as a second pass).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from mixkd.augment.base import BatchPolicy
from mixkd.mix import cutmix
from mixkd.registry import AUGMENTATIONS, Settings


class CutMixPickSettings(Settings):
    pool: int = Field(2, ge=1, le=64, description="CutMix draws of the batch in the pool (Good-DA-in-KD scripts: "
                                                  "--mix_n_run 2)")
    keep: int = Field(64, ge=1, le=65_536, description="candidates kept, the highest scores (Good-DA-in-KD "
                                                       "option.py --n_pick 64: half the pool at batch 64); at most "
                                                       "pool x batch")
    criterion: Literal["teacher_entropy", "student_entropy", "kl"] = Field(
        "teacher_entropy", description="the score (Good-DA-in-KD --cutmix_pick_criterion: teacher_entropy, "
                                       "student_entropy, kld; scripts use the two entropies)")
    temperature: float | None = Field(None, gt=0, le=1000, description="softmax temperature of the score (default: "
                                      "the run's KD temperature, as issue 28 asks; the authors' entropies use 1, "
                                      "their kld the KD temperature)")
    weight: float = Field(1.0, ge=0, le=1000, description="weight of the picked samples' KD term relative to the "
                                                          "clean batch's (Good-DA-in-KD --lw_mix [1,0,1]: 1)")
    alpha: float = Field(1.0, gt=0, le=1000, description="CutMix's Beta(alpha, alpha) (Good-DA-in-KD: 1.0)")


def entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row entropy of softmax(logits / T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row KL(softmax(t / T) || softmax(s / T))."""
    logp_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    logp_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return (logp_t.exp() * (logp_t - logp_s)).sum(dim=1)


@AUGMENTATIONS.register("cutmix_pick", settings=CutMixPickSettings, label="CutMixPick",
                        title="CutMixPick (Wang et al. 2022)", stage="batch")
class CutMixPick(BatchPolicy):
    """CutMix candidates picked by the teacher's entropy, distilled beside the clean batch."""

    method = "cutmix_pick"
    needs_models = True

    def candidates(self, x: torch.Tensor, y_onehot: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``pool`` CutMix draws of the batch, concatenated: images (pool * B, C, H, W) and their labels."""
        draws = [cutmix(x, y_onehot, self.settings.alpha, generator=generator) for _ in range(self.settings.pool)]
        return torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])

    def kept(self, batch_size: int) -> int:
        return min(self.settings.keep, self.settings.pool * batch_size)

    @property
    def temperature(self) -> float:
        return self.settings.temperature or self.context.temperature

    def pick(self, pool: torch.Tensor, teacher_logits: torch.Tensor, student_logits: torch.Tensor | None,
             batch_size: int) -> torch.Tensor:
        """Indices of the kept candidates: a top-k on the device (no host read)."""
        t, crit = self.temperature, self.settings.criterion
        if crit == "teacher_entropy":
            score = entropy(teacher_logits, t)
        elif crit == "student_entropy":
            score = entropy(student_logits, t)
        else:
            score = kl_rows(teacher_logits, student_logits, t)
        return score.topk(self.kept(batch_size)).indices

    def picked_kd(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """T^2 KL(teacher || student) at the KD temperature, mean over the picked samples (DistillKL)."""
        t = self.context.temperature
        return kl_rows(teacher_logits, student_logits, t).mean() * t * t
