"""Pipeline stages, one per module; importing this package registers them all."""
from . import (  # noqa: F401  (registration)
    context_ans, hadamard, klt, lossless_float, predict_temporal, quantize_klt, quantize_lloydmax, quantize_uniform, rope,
)
from .base import (
    CodingState, Predictor, Quantizer, Stage, SymbolCoder, TensorCoder, TensorContext, Transform, register,
    registered_stages, stage_from_config,
)

__all__ = ["Stage", "Transform", "Quantizer", "Predictor", "SymbolCoder", "TensorCoder", "CodingState", "TensorContext",
           "register", "registered_stages", "stage_from_config"]
