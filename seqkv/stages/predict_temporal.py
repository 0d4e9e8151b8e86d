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

With ``repeat`` (format 1.4), layers 1 and up may also predict a token that repeats an earlier run of
tokens from that earlier token's symbols: ``q[t] - q[src[t]]`` where the match is at least ``min_len``
tokens long, in the components where that is cheaper (the map: :mod:`seqkv.stages.repeat_map`); the other
tokens are coded plainly (mode 2) or lag-1 predicted (mode 3).  The encoder picks the mode and ``min_len``
per section by the rows' plug-in entropy, and writes a repeat mode only where it beats modes 0 and 1 with
the side info counted.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import FormatError
from ..wire import Reader
from .base import Predictor, TensorContext, register
from .repeat_map import MAX_MATCH, map_for, note_layer0

COEFFICIENTS = 5     # k = 0, 1, 2, 3, 4  ->  0, 1/4, 1/2, 3/4, 1
REPEAT_MINOR = 4     # the container minor that defines repeat prediction
MIN_LEN_CHOICES = (1, 2, 4, 8, 16)   # the encoder's thresholds (the format allows 1..MAX_MATCH)


class RepeatSide(NamedTuple):
    """Mode 2's side info."""
    k: np.ndarray          # uint8 [H*D]: lag-1 coefficients for the tokens not predicted from a repeat (mode 2: 0)
    use: np.ndarray        # uint8 [H*D] 0/1: the components that predict repeats
    min_len: int           # the shortest match that is predicted


@register
class TemporalPredictor(Predictor):
    id = "temporal_ar"
    params = {"repeat": (bool, False)}

    def validate(self) -> None:
        if self.repeat:
            self.min_minor = REPEAT_MINOR   # containers that may predict repeats need a reader that knows them

    def get_config(self) -> dict:
        config = super().get_config()
        if not self.repeat:   # written only when on: containers without it keep their bytes
            del config["repeat"]
        return config

    def forward(self, q: np.ndarray, ctx: TensorContext):
        """q int32 [H, T, D] -> (residuals int32 [H, T, D], channel-major like the coder wants; side bytes)."""
        from seqkv_ext.predict import ar_encode

        heads, tokens, dim = q.shape
        if self.repeat and ctx.layer == 0:
            note_layer0(ctx, q)
        columns = np.ascontiguousarray(q.transpose(0, 2, 1)).reshape(heads * dim, tokens).astype(np.int32, copy=False)
        res, k, saved_bits = ar_encode(columns)
        rmap = map_for(ctx, tokens) if self.repeat else None
        repeat = None if rmap is None else _best_repeat(columns, res, k, saved_bits, rmap)
        if repeat is not None:
            res, side = repeat
            return res.reshape(heads, dim, tokens).transpose(0, 2, 1), side
        # the coefficients cost one byte per component: predict only when that pays for itself
        if saved_bits <= 8 * (heads * dim):
            return q, bytes([0])
        return res.reshape(heads, dim, tokens).transpose(0, 2, 1), bytes([1]) + k.tobytes()

    def read_side(self, reader: Reader, heads: int, dim: int) -> np.ndarray | RepeatSide | None:
        mode = reader.u8()
        if mode == 0:
            return None
        if mode in (2, 3) and self.repeat:
            min_len = reader.u8()
            if not 1 <= min_len <= MAX_MATCH:
                raise FormatError(f"{reader.what}: repeat match length {min_len} outside [1, {MAX_MATCH}]")
        elif mode != 1:
            raise FormatError(f"{reader.what}: unknown temporal prediction mode {mode}")
        if mode == 2:   # repeats only: the other tokens are not predicted
            k = np.zeros(heads * dim, dtype=np.uint8)
        else:
            k = np.frombuffer(reader.bytes(heads * dim), dtype=np.uint8)
            if k.size and k.max() >= COEFFICIENTS:
                raise FormatError(f"{reader.what}: prediction coefficient out of range")
        if mode == 1:
            return k
        bits = np.frombuffer(reader.bytes((heads * dim + 7) // 8), dtype=np.uint8)
        use = np.unpackbits(bits, bitorder="little")[:heads * dim]
        return RepeatSide(k, np.ascontiguousarray(use), min_len)

    def inverse(self, res: np.ndarray, k: np.ndarray, ctx: TensorContext) -> np.ndarray:
        """residuals [H, T, D] (any strides) -> symbols int32, as a channel-major view like the coder's."""
        from seqkv_ext.predict import ar_undo
        from seqkv_ext.repeat import repeat_undo

        if k is None:
            if self.repeat and ctx.layer == 0:
                note_layer0(ctx, res)
            return res
        heads, tokens, dim = res.shape
        columns = np.ascontiguousarray(res.transpose(0, 2, 1), dtype=np.int32).reshape(heads * dim, tokens)
        try:
            if isinstance(k, RepeatSide):
                rmap = map_for(ctx, tokens)
                if rmap is None:
                    raise FormatError(f"layer {ctx.layer} {ctx.kind}: repeat prediction needs layer 0's symbols "
                                      "at the same tokens, decoded first")
                ar_undo(columns, np.where(k.use == 1, 0, k.k).astype(np.uint8))
                repeat_undo(columns, k.k, k.use, rmap.src, rmap.length, k.min_len)
            else:
                ar_undo(columns, np.ascontiguousarray(k))
        except ValueError as exc:
            raise FormatError(f"layer {ctx.layer} {ctx.kind}: {exc}") from None
        symbols = columns.reshape(heads, dim, tokens).transpose(0, 2, 1)
        if self.repeat and ctx.layer == 0:
            note_layer0(ctx, symbols)
        return symbols


def _best_repeat(columns: np.ndarray, res: np.ndarray, k: np.ndarray, saved_bits: float, rmap):
    """(residuals [H*D, T], side bytes) of mode 2 (repeats, other tokens plain) or 3 (repeats, other tokens
    lag-1 predicted) at its best threshold, or None when modes 0/1 cost less.  Costs: the rows' plug-in
    entropy plus the side info, in bits."""
    from seqkv_ext.repeat import rows_entropy_bits

    rows = columns.shape[0]
    bases = {2: (columns, rows_entropy_bits(columns), 0), 3: (res, rows_entropy_bits(res), 8 * rows)}
    ar_pays = saved_bits > 8 * rows
    best_cost = float(bases[3 if ar_pays else 2][1].sum()) + (8 * rows if ar_pays else 0)   # modes 1 / 0
    best = None
    for min_len in MIN_LEN_CHOICES:
        sel = np.flatnonzero(rmap.length >= min_len)
        if sel.size == 0:
            break
        repeats = columns[:, sel] - columns[:, rmap.src[sel]]
        for mode, (base, base_rows, k_bits) in bases.items():
            trial = base.copy()
            trial[:, sel] = repeats
            trial_rows = rows_entropy_bits(trial)
            use = trial_rows < base_rows
            cost = float(np.where(use, trial_rows, base_rows).sum()) + k_bits + rows + 16
            if cost < best_cost:
                best_cost, best = cost, (mode, min_len, use, trial, base)
    if best is None:
        return None
    mode, min_len, use, trial, base = best
    out = np.where(use[:, None], trial, base).astype(np.int32)
    side = bytes([mode, min_len]) + (k.tobytes() if mode == 3 else b"") + \
        np.packbits(use.astype(np.uint8), bitorder="little").tobytes()
    return out, side
