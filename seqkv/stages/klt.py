"""Calibrated decorrelating transform: a per-layer KLT over all KV heads of the layer.

Each token's vectors of all KV heads are put side by side ([H*D]), centred on the
profile's mean and projected on the profile's KLT basis.  Component ``c`` lands
in slot (head ``c // D``, channel ``c % D``) of the [H, T, D] tensor, so the
stages after it see components in decreasing-variance order.  The basis lives in
the model profile (``ctx.state.profile``), never in the container.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .base import TensorContext, Transform, register


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """[H, T, D] -> [T, H*D]: one row per token, the layer's heads side by side (component c = h*D + d)."""
    # explicit width: a tensor with no tokens (a cache of sink tokens only has an empty body) has none to infer
    return x.permute(1, 0, 2).reshape(x.shape[1], x.shape[0] * x.shape[2])


def from_rows(rows: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`rows_of`: [T, H*D] -> [H, T, D] (a view where possible)."""
    return rows.reshape(rows.shape[0], heads, dim).permute(1, 0, 2)


def columns_of(x: torch.Tensor) -> torch.Tensor:
    """[H, T, D] -> [H*D, T]: one row per component (c = h*D + d), channel-major.  A view when ``x`` is laid out
    channel-major already (as the entropy coder hands symbols over, and as this module's stages return)."""
    return x.transpose(1, 2).reshape(x.shape[0] * x.shape[2], x.shape[1])


def from_columns(columns: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`columns_of`: [H*D, T] -> [H, T, D] (a view)."""
    return columns.reshape(heads, dim, columns.shape[1]).transpose(1, 2)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of CPU float32 tensors through numpy's BLAS (any strides): on the AMD EPYC we benchmark on,
    OpenBLAS runs the codec's [T x 192] x [192 x 192] products about 25 % faster than torch's MKL
    (docs/bench.md), and these products are the calibrated decoder's largest cost."""
    if a.device.type != "cpu" or b.device.type != "cpu" or a.requires_grad or b.requires_grad:
        return a @ b
    return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))


def on_cpu(*tensors: torch.Tensor) -> bool:
    """CPU tensors without autograd: numpy can run on them in place of torch."""
    return all(t.device.type == "cpu" and not t.requires_grad for t in tensors)


def centred_columns(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``columns_of(x) - mean[:, None]`` ([H*D, T], contiguous).  On the CPU one numpy pass does the transpose
    and the subtraction (the same float32 differences): torch's elementwise ops start their thread pool for
    tensors of this size, and on a loaded machine waiting for it costs more than the work."""
    if not on_cpu(x, mean) or x.dtype != torch.float32 or mean.dtype != torch.float32:
        return columns_of(x) - mean[:, None]
    heads, tokens, dim = x.shape
    out = np.empty((heads, dim, tokens), dtype=np.float32)
    np.subtract(x.numpy().transpose(0, 2, 1), mean.numpy().reshape(heads, dim, 1), out=out)
    return torch.from_numpy(out.reshape(heads * dim, tokens))


def add_rows(rows: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``rows.add_(vector)`` (every row plus ``vector``), in numpy on the CPU (see :func:`centred_columns`)."""
    if not on_cpu(rows, vector) or rows.dtype != torch.float32 or vector.dtype != torch.float32:
        return rows.add_(vector)
    a = rows.numpy()
    np.add(a, vector.numpy(), out=a)
    return rows


def profile_part(ctx: TensorContext):
    """The profile entry for the tensor in ``ctx``; ConfigError when no profile was given."""
    profile = ctx.state.profile
    if profile is None:
        raise ConfigError("this pipeline uses a calibrated profile: pass profile= (seqkv.Profile.load(path))")
    return profile.parts[(ctx.layer, ctx.kind)]


@register
class KLTransform(Transform):
    id = "klt"
    min_minor = 1  # defined by format 1.1
    reads_profile = True
    params = {}

    def forward(self, x: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        """Coefficients laid out channel-major ([H*D, T] columns): the quantizer, the temporal predictor and
        the entropy coder all run along the tokens of one component, so none of them copies."""
        part = profile_part(ctx)
        return from_columns(matmul(part.basis.T, centred_columns(x, part.mean)), x.shape[0], x.shape[2])

    def inverse(self, y: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        """Tokens laid out [T, H, D] (rows): RoPE then runs along contiguous channels, and the copy into the
        cache's [H, T, D] moves whole head vectors.  The product reads channel-major input as it is."""
        part = profile_part(ctx)
        return from_rows(add_rows(matmul(rows_of(y), part.basis.T), part.mean), y.shape[0], y.shape[2])
