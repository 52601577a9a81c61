"""The study's standardized KD: CE and KL on z-scored logits, no temperature."""

from __future__ import annotations

from pydantic import Field

from mixkd.distiller import KDSettings
from mixkd.methods.kd import LogitObjectiveDistiller
from mixkd.registry import KD_METHODS


class STDSettings(KDSettings):
    temperature: float = Field(4.0, ge=0.01, le=1000, description="not used by std (kept so that its configs "
                               "read as kd's; RepDistiller --kd_T 4)")


# Weights as kd's: RepDistiller scripts/run_cifar_distill.sh (-r 0.1 -a 0.9), the study's setting.
@KD_METHODS.register("std", settings=STDSettings, label="STD", title="standardized KD", uses_temperature=False)
class StandardizedKD(LogitObjectiveDistiller):
    """Standardized KD: CE on standardized student logits + KL of standardized logits (no temperature)."""

    objective_method = "std"
