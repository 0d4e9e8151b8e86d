"""Pipeline stages, one per module; importing this package registers them all."""
from . import context_ans, hadamard, klt, predict_temporal, quantize_klt, quantize_lloydmax, quantize_uniform, rope  # noqa: F401  (registration)
from .base import Stage, TensorContext, register, registered_stages, stage_from_config

try:
    from . import lossless_float  # noqa: F401
except ImportError:  # pragma: no cover - being written
    pass

__all__ = ["Stage", "TensorContext", "register", "registered_stages", "stage_from_config"]
