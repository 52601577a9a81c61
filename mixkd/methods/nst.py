"""NST: neuron selectivity transfer (Huang & Wang, 2017), as mdistiller trains it."""

from __future__ import annotations

from mixkd.feature_losses import nst_loss
from mixkd.methods._feature import FeatureDistiller, FeatureSettings, feature_weight_field, paired, stages
from mixkd.registry import KD_METHODS


class NSTSettings(FeatureSettings):
    feat_weight: float = feature_weight_field(50.0, "weight of the MMD term "
                               "(mdistiller engine/cfg.py CFG.NST.LOSS.FEAT_WEIGHT)")


@KD_METHODS.register("nst", settings=NSTSettings, label="NST", title="neuron selectivity transfer")
class NST(FeatureDistiller):
    """Neuron selectivity transfer (Huang & Wang 2017; mdistiller distillers/NST.py) on the stage outputs.

    ``ce_weight * CE +
    feat_weight * sum over stages of MMD^2`` between the channels' spatially normalized activations,
    degree-2 polynomial kernel (the larger map average-pooled to the smaller), stem excluded."""

    def feature_term(self, feats_s, feats_t):
        return nst_loss(*paired(stages(feats_s), stages(feats_t)))
