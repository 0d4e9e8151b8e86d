"""Lloyd-Max scalar quantizer for a unit Gaussian, applied per channel after scaling.

This is TurboQuant's quantizer (usually after the Hadamard rotation): each
(head, channel) is divided by its RMS, then mapped to the nearest of 2**bits
levels optimised for N(0, 1).  The levels are computed once at encode time
and stored, so decoding never re-derives them.  Side info: float32 RMS per
(head, channel), then the float32 levels.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ..errors import ConfigError, FormatError, NonFiniteError, ValueRangeError
from ..wire import Reader
from .base import Quantizer, TensorContext, register


@functools.lru_cache(maxsize=8)
def lloyd_max_levels(bits: int) -> np.ndarray:
    """Levels minimising E[(X - Q(X))^2] for X ~ N(0, 1), by Lloyd iterations on a fine grid."""
    grid = np.linspace(-8.0, 8.0, 1 << 16)
    weight = np.exp(-0.5 * grid * grid)
    n = 1 << bits
    levels = np.linspace(-3.0, 3.0, n + 2)[1:-1]  # symmetric start -> symmetric levels
    for _ in range(500):
        edges = (levels[1:] + levels[:-1]) / 2
        idx = np.searchsorted(edges, grid)
        sums = np.bincount(idx, weight * grid, minlength=n)
        mass = np.bincount(idx, weight, minlength=n)
        levels = np.where(mass > 0, sums / np.maximum(mass, 1e-300), levels)
    return levels.astype(np.float32)


@register
class LloydMaxQuantizer(Quantizer):
    id = "lloydmax"
    params = {"bits": (int, 4)}

    def validate(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ConfigError(f"lloydmax: bits must be in [1, 8], got {self.bits}")

    def quantize(self, x: torch.Tensor, ctx: TensorContext):
        if not torch.isfinite(x).all():
            raise NonFiniteError(
                f"layer {ctx.layer} {ctx.kind}: NaN or Inf values; lossy presets reject them, "
                "use preset='lossless' to keep them bit-exact"
            )
        heads, tokens, dim = x.shape
        scale = (x.pow(2).mean(1).sqrt() if tokens else torch.ones(heads, dim, dtype=torch.float32)).clamp_min(1e-12)
        if not bool(torch.isfinite(scale).all()):  # what read_side demands
            raise ValueRangeError(f"layer {ctx.layer} {ctx.kind}: values too large for the Lloyd-Max quantizer; "
                                  "use preset='lossless'")
        levels = torch.from_numpy(lloyd_max_levels(self.bits))
        edges = (levels[1:] + levels[:-1]) / 2
        idx = torch.bucketize((x / scale[:, None, :]).contiguous(), edges)
        q = idx.to(torch.int32) - (1 << (self.bits - 1))
        side = scale.numpy().astype("<f4").tobytes() + levels.numpy().astype("<f4").tobytes()
        return q.numpy(), side

    def read_side(self, reader: Reader, heads: int, dim: int):
        scale = reader.array("<f4", heads * dim).reshape(heads, dim)
        levels = reader.array("<f4", 1 << self.bits)
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(levels))):
            raise FormatError(f"{reader.what}: Lloyd-Max side info is not finite")
        return torch.from_numpy(scale), torch.from_numpy(levels)

    def dequantize(self, q: torch.Tensor, side, ctx: TensorContext) -> torch.Tensor:
        scale, levels = side
        idx = q.to(torch.int64) + (1 << (self.bits - 1))
        if idx.numel() and (idx.min() < 0 or idx.max() >= levels.numel()):
            raise FormatError(f"layer {ctx.layer} {ctx.kind}: Lloyd-Max index out of range")
        return levels[idx] * scale[:, None, :]
