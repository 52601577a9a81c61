"""KDSVD: self-supervised KD with singular value decomposition (Lee et al., ECCV 2018), as mdistiller trains it."""

from __future__ import annotations

from pydantic import Field

from mixkd.feature_losses import kdsvd_loss
from mixkd.methods._feature import FeatureDistiller, FeatureSettings, feature_weight_field, paired, stages
from mixkd.registry import KD_METHODS


class KDSVDSettings(FeatureSettings):
    feat_weight: float = feature_weight_field(1.0, "weight of the KDSVD term "
                               "(mdistiller engine/cfg.py CFG.KDSVD.LOSS.FEAT_WEIGHT)")
    k: int = Field(1, ge=1, le=64, description="number of the teacher's singular vectors distilled "
                   "(mdistiller engine/cfg.py CFG.KDSVD.K)")


@KD_METHODS.register("kdsvd", settings=KDSVDSettings, label="KDSVD", title="KD with singular value decomposition")
class KDSVD(FeatureDistiller):
    """KD with SVD (Lee et al. 2018; mdistiller distillers/KDSVD.py): singular vectors of the stage outputs.

    ``ce_weight * CE + feat_weight *``
    the squared difference of the RBF kernels between consecutive stages' leading right singular
    vectors (the teacher's ``k``, the student's ``k + 3`` aligned to them). Student and teacher stages
    must have one width each (the vectors are compared entry by entry)."""

    def __init__(self, student, teacher, settings):
        super().__init__(student, teacher, settings)
        shape_s, shape_t = self.shapes()
        for a, b in zip(*paired(stages(shape_s), stages(shape_t)), strict=True):
            if a[-1] != b[-1]:
                raise self.refuse(f"the student's stage width {a[-1]} differs from the teacher's {b[-1]} "
                                  "(KDSVD compares their singular vectors entry by entry); choose models of "
                                  "one stage layout")

    def feature_term(self, feats_s, feats_t):
        return kdsvd_loss(*paired(stages(feats_s), stages(feats_t)), self.settings.k)
