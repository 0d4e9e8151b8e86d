"""Randomized Hadamard rotation over head_dim (TurboQuant's first step).

y = H · diag(s) · x / sqrt(d), with H the Sylvester Hadamard matrix and s
random signs drawn from ``seed``.  It spreads outlier channels over all
coordinates, which suits fixed-rate quantizers (Lloyd-Max).  With
entropy-coded uniform quantization and per-channel contexts it *costs*
rate, because it equalises channel variances; see docs/results.md.
"""
from __future__ import annotations

import functools

import torch

from ..errors import ConfigError
from .base import TensorContext, Transform, register


@functools.lru_cache(maxsize=16)
def _rotation(dim: int, seed: int) -> torch.Tensor:
    if dim & (dim - 1):
        raise ConfigError(f"the Hadamard rotation needs a power-of-two head_dim, got {dim}")
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(dim, generator=gen) < 0.5, -1.0, 1.0)
    return h * signs[None, :] / dim ** 0.5   # orthogonal: R @ R.T == I


@register
class HadamardRotation(Transform):
    id = "hadamard"
    params = {"seed": (int, 0)}

    def forward(self, x: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        return x @ _rotation(x.shape[-1], self.seed).T

    def inverse(self, y: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        return y @ _rotation(y.shape[-1], self.seed)
