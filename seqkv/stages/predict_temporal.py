"""Temporal prediction of quantized symbols from the previous token, per component.

Each component (one [H, D] slot, along the tokens) is coded as the residual
``q[t] - floor((k * q[t-1] + 2) / 4)`` with ``k`` in 0..4 (prediction
coefficient k/4; k = 0 is no prediction).  The encoder takes, per component,
the least-squares lag-1 coefficient rounded to quarters, and keeps it only
where the residuals' empirical entropy is below the symbols', so the stage is
never worse than no prediction (apart from one byte of side info per
component, or one byte in all when no component gains).  Prediction runs
on the decoded symbols themselves, in integers, so encoder and decoder agree
bit for bit on every platform.  Both loops are compiled (seqkv_ext.predict).
"""
from __future__ import annotations

import numpy as np

from ..errors import FormatError
from ..wire import Reader
from .base import Predictor, TensorContext, register

COEFFICIENTS = 5     # k = 0, 1, 2, 3, 4  ->  0, 1/4, 1/2, 3/4, 1


@register
class TemporalPredictor(Predictor):
    id = "temporal_ar"
    params = {}

    def forward(self, q: np.ndarray, ctx: TensorContext):
        """q int32 [H, T, D] -> (residuals int32 [H, T, D], channel-major like the coder wants; side bytes)."""
        from seqkv_ext.predict import ar_encode

        heads, tokens, dim = q.shape
        columns = np.ascontiguousarray(q.transpose(0, 2, 1)).reshape(heads * dim, tokens)
        res, k, saved_bits = ar_encode(columns.astype(np.int32, copy=False))
        # the coefficients cost one byte per component: predict only when that pays for itself
        if saved_bits <= 8 * (heads * dim):
            return q, bytes([0])
        return res.reshape(heads, dim, tokens).transpose(0, 2, 1), bytes([1]) + k.tobytes()

    def read_side(self, reader: Reader, heads: int, dim: int) -> np.ndarray | None:
        mode = reader.u8()
        if mode == 0:
            return None
        if mode != 1:
            raise FormatError(f"{reader.what}: unknown temporal prediction mode {mode}")
        k = np.frombuffer(reader.bytes(heads * dim), dtype=np.uint8)
        if k.size and k.max() >= COEFFICIENTS:
            raise FormatError(f"{reader.what}: prediction coefficient out of range")
        return k

    def inverse(self, res: np.ndarray, k: np.ndarray, ctx: TensorContext) -> np.ndarray:
        """residuals [H, T, D] (any strides) -> symbols int32, as a channel-major view like the coder's."""
        from seqkv_ext.predict import ar_undo

        if k is None:
            return res
        heads, tokens, dim = res.shape
        columns = np.ascontiguousarray(res.transpose(0, 2, 1), dtype=np.int32).reshape(heads * dim, tokens)
        try:
            ar_undo(columns, np.ascontiguousarray(k))
        except ValueError as exc:
            raise FormatError(f"layer {ctx.layer} {ctx.kind}: {exc}") from None
        return columns.reshape(heads, dim, tokens).transpose(0, 2, 1)
