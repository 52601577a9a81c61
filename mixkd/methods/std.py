"""The study's standardized KD: CE and KL on z-scored logits, no temperature."""

from __future__ import annotations

from mixkd.distiller import KDSettings, temperature_field
from mixkd.methods.kd import LogitObjectiveDistiller
from mixkd.registry import KD_METHODS


class STDSettings(KDSettings):
    temperature: float = temperature_field(4.0, "not used by std (kept so that its configs "
                                           "read as kd's; RepDistiller --kd_T 4)")


# Weights as kd's: RepDistiller scripts/run_cifar_distill.sh (-r 0.1 -a 0.9), the study's setting.
@KD_METHODS.register("std", settings=STDSettings, label="STD", title="standardized KD", uses_temperature=False)
class StandardizedKD(LogitObjectiveDistiller):
    """Standardized KD: CE on standardized student logits + KL of standardized logits (no temperature)."""

    objective_method = "std"
