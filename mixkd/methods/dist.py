"""DIST (Huang et al., NeurIPS 2022; github.com/hunto/image_classification_sota)."""

from __future__ import annotations

from mixkd.distiller import KDSettings, LogitStandardization, LogitTermDistiller, temperature_field, weight_field
from mixkd.registry import KD_METHODS

_SOTA = "image_classification_sota"


class DISTSettings(LogitStandardization, KDSettings):
    temperature: float = temperature_field(4.0, f"softmax temperature ({_SOTA} "
                                           "lib/models/losses/kd_loss.py dist_t4: tau=4)")
    ce_weight: float = weight_field(1.0, f"weight of the cross-entropy term ({_SOTA} "
                                    "configs/strategies/distill/dist_cifar.yaml ori_loss_weight 1)")
    kd_weight: float = weight_field(2.0, f"weight of the DIST term ({_SOTA} "
                                    "configs/strategies/distill/dist_cifar.yaml kd_loss_weight 2)")
    beta: float = weight_field(1.0, "weight of the inter-class relation (DIST(beta=1) in "
                               f"{_SOTA} kd_loss.py)")
    gamma: float = weight_field(1.0, "weight of the intra-class relation (DIST(gamma=1) in "
                                f"{_SOTA} kd_loss.py)")


@KD_METHODS.register("dist", settings=DISTSettings, label="DIST", title="DIST")
class DIST(LogitTermDistiller):
    """DIST (Huang et al., NeurIPS 2022): T^2 (beta * inter-class + gamma * intra-class relation).

    Each relation is 1 - Pearson correlation of softmax(z / T) across classes / across the batch."""

    term = "dist"
    term_settings = ("beta", "gamma", "temperature")
