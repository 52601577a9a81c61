"""SP: similarity-preserving KD (Tung & Mori, ICCV 2019), as mdistiller trains it."""

from __future__ import annotations

from mixkd.feature_losses import sp_loss
from mixkd.methods._feature import FeatureDistiller, FeatureSettings, feature_weight_field
from mixkd.registry import KD_METHODS


class SPSettings(FeatureSettings):
    feat_weight: float = feature_weight_field(3000.0, "weight of the similarity term "
                               "(mdistiller engine/cfg.py CFG.SP.LOSS.FEAT_WEIGHT)")


@KD_METHODS.register("sp", settings=SPSettings, label="SP", title="similarity-preserving KD")
class SP(FeatureDistiller):
    """Similarity-preserving KD (Tung & Mori 2019; mdistiller distillers/SP.py) on the last stage's output.

    ``ce_weight * CE +
    feat_weight * ||G_t - G_s||_F^2 / B^2``, G the row-normalized B x B Gram matrix of the last stage's
    flattened output. Under mixup the batch's pairwise similarities are those of the mixed images."""

    def feature_term(self, feats_s, feats_t):
        return sp_loss([feats_s[-2]], [feats_t[-2]])
