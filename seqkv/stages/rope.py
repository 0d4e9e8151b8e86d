"""Keys to pre-RoPE and back.

Cached keys carry RoPE, a position-dependent rotation of each (i, i + d/2)
channel pair.  Undoing it makes keys of nearby tokens look alike, which
compresses better.  The inverse frequencies and attention scaling are stored
in the container, so decoding needs no model.
"""
from __future__ import annotations

import hashlib

import torch

try:  # the compiled rotation; the torch code below is the reference and the fallback
    from seqkv_ext import rope as _ext_rope
except ImportError:  # pragma: no cover - the extension is built by `pip install`
    _ext_rope = None

_ANGLE_CACHE: dict = {}


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """cos and sin of every (position, frequency) angle, [tokens, head_dim/2]; memoised per call pattern,
    because every layer of a cache uses the same positions."""
    # keyed by content, never by address: a freed tensor's memory may hold other positions later
    key = (hashlib.blake2b(positions.to(torch.int64).numpy().tobytes(), digest_size=16).digest(),
           inv_freq.to(torch.float32).numpy().tobytes())
    hit = _ANGLE_CACHE.get(key)
    if hit is None:
        angles = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
        hit = (angles.cos(), angles.sin())
        _ANGLE_CACHE.clear()  # keep one entry: the cache being encoded or decoded
        _ANGLE_CACHE[key] = hit
    return hit


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float) -> torch.Tensor:
    """Rotate each channel pair (i, i + d/2) by the angle whose cos/sin are given, then scale."""
    if (_ext_rope is not None and x.dim() == 3 and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.stride(2) == 1 and not x.requires_grad):
        # one compiled pass, same floats; the output is [H, T, D] C-contiguous whatever x's layout
        return torch.from_numpy(_ext_rope.rotate_heads(x.numpy(), cos.contiguous().numpy(),
                                                       sin.contiguous().numpy(), scale))
    half = x.shape[-1] // 2
    lo, hi = x[..., :half], x[..., half:]
    out = torch.empty_like(x)
    torch.sub(lo * cos, hi * sin, out=out[..., :half])
    torch.add(hi * cos, lo * sin, out=out[..., half:])
    if scale != 1.0:
        out *= scale
    return out


def apply_rope(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """keys: [..., tokens, head_dim] float32 pre-RoPE -> post-RoPE (as transformers does:
    ``k*cos + rotate_half(k)*sin``, with cos/sin multiplied by the attention scaling)."""
    cos, sin = _cos_sin(positions, inv_freq)
    return _rotate(keys, cos, sin, scaling)


def remove_rope(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """Inverse of :func:`apply_rope` (rotation by -angle, divided by the scaling)."""
    cos, sin = _cos_sin(positions, inv_freq)
    return _rotate(keys, cos, -sin, 1.0 / scaling)


def keys_to_pre_rope(x: torch.Tensor, kind: str, positions: torch.Tensor, layout) -> torch.Tensor:
    """A cached tensor [..., tokens, head_dim] -> float32 with RoPE removed from keys (values unchanged),
    with the layout's inverse frequencies and attention scaling."""
    x = x.to(torch.float32)
    if kind != "keys" or not layout.has_rope:
        return x
    return remove_rope(x, positions, torch.as_tensor(layout.inv_freq_array()), float(layout.rope_attention_scaling))


def keys_to_post_rope(y: torch.Tensor, kind: str, positions: torch.Tensor, layout) -> torch.Tensor:
    """Inverse of :func:`keys_to_pre_rope` (stays float32)."""
    if kind != "keys" or not layout.has_rope:
        return y
    return apply_rope(y, positions, torch.as_tensor(layout.inv_freq_array()), float(layout.rope_attention_scaling))


from .base import TensorContext, Transform, register  # noqa: E402  (the stage wraps the functions above)


@register
class PreRope(Transform):
    """Transform stage: keys to pre-RoPE on encode, RoPE re-applied on decode. Values pass through."""

    id = "prerope"
    params = {}

    def forward(self, x: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        return keys_to_pre_rope(x, ctx.kind, ctx.positions, ctx.layout)

    def inverse(self, y: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        return keys_to_post_rope(y, ctx.kind, ctx.positions, ctx.layout)
