"""Keys to pre-RoPE and back.

Cached keys carry RoPE, a position-dependent rotation of each (i, i + d/2)
channel pair.  Undoing it makes keys of nearby tokens look alike, which
compresses better.  The inverse frequencies and attention scaling are stored
in the container, so decoding needs no model.
"""
from __future__ import annotations

import torch


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float):
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """keys: [..., tokens, head_dim] float32 pre-RoPE -> post-RoPE (as transformers does)."""
    cos, sin = _cos_sin(positions, inv_freq, scaling)
    return keys * cos + _rotate_half(keys) * sin


def remove_rope(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """Inverse of :func:`apply_rope` (rotation by -angle, divided by the scaling)."""
    cos, sin = _cos_sin(positions, inv_freq, 1.0)
    return (keys * cos - _rotate_half(keys) * sin) / scaling


from .base import Stage, TensorContext, register  # noqa: E402  (the stage wraps the functions above)


@register
class PreRope(Stage):
    """Transform stage: keys to pre-RoPE on encode, RoPE re-applied on decode. Values pass through."""

    id = "prerope"
    params = {}

    def _args(self, ctx: TensorContext):
        inv_freq = torch.as_tensor(ctx.layout.inv_freq_array())
        return ctx.positions, inv_freq, float(ctx.layout.rope_attention_scaling)

    def forward(self, x: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        if ctx.kind != "keys" or not ctx.layout.has_rope:
            return x
        return remove_rope(x, *self._args(ctx))

    def inverse(self, y: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        if ctx.kind != "keys" or not ctx.layout.has_rope:
            return y
        return apply_rope(y, *self._args(ctx))
