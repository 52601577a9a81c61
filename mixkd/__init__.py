"""mixkd: knowledge distillation with mixup (partial mixup, standardized KD), after Choi et al., WACV 2023."""

__version__ = "0.1.0"

from mixkd.errors import MixkdError  # noqa: E402

__all__ = ["MixkdError", "__version__"]
