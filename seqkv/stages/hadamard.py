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


MIN_SEED, MAX_SEED = -(1 << 63), (1 << 64) - 1   # what torch.Generator.manual_seed takes


def check_power_of_two(dim: int) -> None:
    if dim < 1 or dim & (dim - 1):
        raise ConfigError(f"the Hadamard rotation needs a power-of-two head_dim, got {dim}")


@functools.lru_cache(maxsize=16)
def rotation_matrix(dim: int, seed: int) -> torch.Tensor:
    check_power_of_two(dim)
    # float32 throughout, whatever torch's default dtype (the signs are the float32 draw of docs/format.md §6.1.1)
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    gen = torch.Generator().manual_seed(seed)
    uniform = torch.rand(dim, generator=gen, dtype=torch.float32)
    signs = torch.where(uniform < 0.5, torch.tensor(-1.0, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32))
    return h * signs[None, :] / dim ** 0.5   # orthogonal: R @ R.T == I


@register
class HadamardRotation(Transform):
    id = "hadamard"
    params = {"seed": (int, 0)}

    def validate(self) -> None:
        if not MIN_SEED <= self.seed <= MAX_SEED:
            raise ConfigError(f"hadamard: seed must be in [-2**63, 2**64 - 1], got {self.seed}")

    def check_head_dim(self, head_dim: int) -> None:
        check_power_of_two(head_dim)

    def forward(self, x: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        return x @ rotation_matrix(x.shape[-1], self.seed).T

    def inverse(self, y: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        return y @ rotation_matrix(y.shape[-1], self.seed)
