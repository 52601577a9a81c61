"""RKD: relational KD (Park et al., CVPR 2019), as mdistiller trains it."""

from __future__ import annotations

from pydantic import Field

from mixkd.distiller import weight_field
from mixkd.feature_losses import rkd_loss
from mixkd.methods._feature import FeatureDistiller, FeatureSettings, feature_weight_field
from mixkd.registry import KD_METHODS


class RKDSettings(FeatureSettings):
    feat_weight: float = feature_weight_field(1.0, "weight of the RKD term "
                               "(mdistiller engine/cfg.py CFG.RKD.LOSS.FEAT_WEIGHT)")
    distance_weight: float = weight_field(25.0, "weight of RKD's distance loss "
                                          "(mdistiller engine/cfg.py CFG.RKD.DISTANCE_WEIGHT)")
    angle_weight: float = weight_field(50.0, "weight of RKD's angle loss (mdistiller engine/cfg.py CFG.RKD.ANGLE_WEIGHT)")
    squared: bool = Field(False, description="squared pairwise distances (mdistiller engine/cfg.py "
                          "CFG.RKD.PDIST.SQUARED)")
    eps: float = Field(1e-12, gt=0, le=1, description="lower clamp of the pairwise distances "
                       "(mdistiller engine/cfg.py CFG.RKD.PDIST.EPSILON)")


@KD_METHODS.register("rkd", settings=RKDSettings, label="RKD", title="relational KD")
class RKD(FeatureDistiller):
    """Relational KD (Park et al. 2019; mdistiller distillers/RKD.py): distances and angles of pooled features.

    ``ce_weight * CE + feat_weight *
    (distance_weight * distance loss + angle_weight * angle loss)`` on the pooled features, the
    distances between the batch's samples normalized by their mean, smooth-L1 losses."""

    def feature_term(self, feats_s, feats_t):
        s = self.settings
        return rkd_loss(feats_s[-1], feats_t[-1], s.distance_weight, s.angle_weight, s.squared, s.eps)
