"""What mdistiller's feature methods share: their settings (CE weight, feature weight), the forward of
both models with features, and the probe that sizes a method's own modules.

mdistiller's models return ``feats`` (the stage outputs, stem first), ``preact_feats`` (the same before
the last ReLU of each stage) and ``pooled_feat``; mixkd's return one list, the stage maps then the
pooled vector (``model(x, is_feat=True, preact=...)``), so mdistiller's ``feats[1:]`` is
:func:`stages` and its ``pooled_feat`` is ``feats[-1]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from mixkd.distiller import Distiller, weight_field
from mixkd.errors import MixkdError
from mixkd.losses import soft_cross_entropy
from mixkd.registry import Settings

PROBE_SIZE = 32  # the CIFAR size mdistiller probes with (cfg.py CFG.VID.INPUT_SIZE, CFG.FITNET.INPUT_SIZE)


def feature_weight_field(default: float, description: str) -> Any:
    """A feature term's weight: a float in [0, 10^6] (mdistiller's reach 30000, PKT's)."""
    return Field(default, ge=0, le=1e6, description=description)


class FeatureSettings(Settings):
    """``ce_weight * CE + feat_weight * term``: mdistiller's ``<METHOD>.LOSS.CE_WEIGHT`` and ``FEAT_WEIGHT``."""

    ce_weight: float = weight_field(1.0, "weight of the cross-entropy on the (mixed) labels "
                                    "(mdistiller engine/cfg.py CFG.<METHOD>.LOSS.CE_WEIGHT)")


def stages(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """The stage outputs without the stem and the pooled vector (mdistiller's ``feats[1:]``)."""
    return list(feats[1:-1])


def paired(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first ``min(len)`` of each, as mdistiller's ``zip`` pairs a student's and a teacher's stages."""
    n = min(len(a), len(b))
    return a[:n], b[:n]


def probe(model: torch.nn.Module, device: torch.device, preact: bool = False) -> list[torch.Size]:
    """The shapes of ``model``'s features on a 2-image CIFAR-sized batch (eval mode, no gradient)."""
    x = torch.zeros(2, 3, PROBE_SIZE, PROBE_SIZE, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        feats, _ = model(x, is_feat=True, preact=preact)
    model.train(was_training)
    return [f.shape for f in feats]


class FeatureDistiller(Distiller):
    """``ce_weight * CE(student, mixed labels) + feat_weight * feature_term(student feats, teacher feats)``,
    both models on the same mixed batch, the teacher without gradients. Subclasses write
    :meth:`feature_term`; ``preact`` asks the models for pre-ReLU stage outputs."""

    loss_names: ClassVar[tuple[str, ...]] = ("loss", "ce", "feat")
    student_preact: ClassVar[bool] = False
    teacher_preact: ClassVar[bool] = False

    def feature_term(self, feats_s: list[torch.Tensor], feats_t: list[torch.Tensor], **inputs: torch.Tensor
                     ) -> torch.Tensor:
        """The feature term; ``inputs``: what the method reads besides images and labels (its ``inputs``)."""
        raise NotImplementedError

    def feat_factor(self) -> torch.Tensor | float:
        """What multiplies the term: ``feat_weight`` (a warm-up makes it a device tensor)."""
        return self.settings.feat_weight

    def forward_train(self, x, target, **inputs):
        feats_s, logits_s = self.student(x, is_feat=True, preact=self.student_preact)
        with torch.no_grad():
            feats_t, _ = self.teacher(x, is_feat=True, preact=self.teacher_preact)
        ce = soft_cross_entropy(logits_s, target)
        feat = self.feature_term(feats_s, feats_t, **inputs)
        return {"loss": self.settings.ce_weight * ce + self.feat_factor() * feat, "ce": ce, "feat": feat}

    def shapes(self, preact: bool = False) -> tuple[list[torch.Size], list[torch.Size]]:
        """(student's, teacher's) feature shapes (see :func:`probe`)."""
        return probe(self.student, self.device, preact), probe(self.teacher, self.device, preact)

    def refuse(self, why: str) -> MixkdError:
        return MixkdError(f"kd.method {self.registry_entry.name}: {why}")
