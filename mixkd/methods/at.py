"""AT: attention transfer (Zagoruyko & Komodakis, ICLR 2017), as mdistiller trains it."""

from __future__ import annotations

from pydantic import Field

from mixkd.feature_losses import at_loss
from mixkd.methods._feature import FeatureDistiller, FeatureSettings, feature_weight_field, paired, stages
from mixkd.registry import KD_METHODS


class ATSettings(FeatureSettings):
    feat_weight: float = feature_weight_field(1000.0, "weight of the attention term "
                               "(mdistiller engine/cfg.py CFG.AT.LOSS.FEAT_WEIGHT)")
    p: float = Field(2.0, gt=0, le=8, description="exponent of the attention map mean_c |f_c|^p "
                     "(mdistiller engine/cfg.py CFG.AT.P)")


@KD_METHODS.register("at", settings=ATSettings, label="AT", title="attention transfer")
class AT(FeatureDistiller):
    """Attention transfer (Zagoruyko & Komodakis 2017; mdistiller distillers/AT.py) on the stage outputs.

    ``ce_weight * CE +
    feat_weight * sum over stages of mean((a_s - a_t)^2)``, a = the L2-normalized map mean_c f_c^p of
    each stage output (the larger map average-pooled to the smaller), stem excluded."""

    def feature_term(self, feats_s, feats_t):
        return at_loss(*paired(stages(feats_s), stages(feats_t)), self.settings.p)
