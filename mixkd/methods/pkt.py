"""PKT: probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as mdistiller trains it."""

from __future__ import annotations

from mixkd.feature_losses import pkt_loss
from mixkd.methods._feature import FeatureDistiller, FeatureSettings, feature_weight_field
from mixkd.registry import KD_METHODS


class PKTSettings(FeatureSettings):
    feat_weight: float = feature_weight_field(30000.0, "weight of the PKT term "
                               "(mdistiller engine/cfg.py CFG.PKT.LOSS.FEAT_WEIGHT)")


@KD_METHODS.register("pkt", settings=PKTSettings, label="PKT", title="probabilistic knowledge transfer")
class PKT(FeatureDistiller):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018; mdistiller distillers/PKT.py), pooled features.

    ``ce_weight * CE + feat_weight * KL`` between the teacher's and the student's conditional distributions of
    cosine similarity over the batch, on the pooled features."""

    def feature_term(self, feats_s, feats_t):
        return pkt_loss(feats_s[-1], feats_t[-1])
