"""Calibrated decorrelating transform: a per-layer KLT over all KV heads of the layer.

Each token's vectors of all KV heads are put side by side ([H*D]), centred on the
profile's mean and projected on the profile's KLT basis.  Component ``c`` lands
in slot (head ``c // D``, channel ``c % D``) of the [H, T, D] tensor, so the
stages after it see components in decreasing-variance order.  The basis lives in
the model profile (``ctx.extra["profile"]``), never in the container.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Stage, TensorContext, register


def profile_part(ctx: TensorContext):
    """The profile entry for the tensor in ``ctx``; ConfigError when no profile was given."""
    profile = ctx.extra.get("profile")
    if profile is None:
        raise ConfigError("this pipeline uses a calibrated profile: pass profile= (seqkv.Profile.load(path))")
    return profile.parts[(ctx.layer, ctx.kind)]


@register
class KLTransform(Stage):
    id = "klt"
    role = "transform"
    params = {}

    def forward(self, x: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        part = profile_part(ctx)
        heads, tokens, dim = x.shape
        rows = x.permute(1, 0, 2).reshape(tokens, heads * dim)
        z = (rows - part.mean) @ part.basis
        return z.reshape(tokens, heads, dim).permute(1, 0, 2)

    def inverse(self, y: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        part = profile_part(ctx)
        heads, tokens, dim = y.shape
        z = y.permute(1, 0, 2).reshape(tokens, heads * dim)
        rows = torch.addmm(part.mean, z, part.basis.T)
        return rows.reshape(tokens, heads, dim).permute(1, 0, 2)
