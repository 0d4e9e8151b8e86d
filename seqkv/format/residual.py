"""Residual sections: a store chunk's tensor coded against the decoded tensor of its base entry (the same
tokens at other positions or under another prefix; docs/format.md §10.1).

* lossless: the XOR of the IEEE bits, coded by the tensor coder; bit-exact.
* presets (``prerope`` then ``uniform``): ``r = x - base`` in the pre-RoPE domain (each at its own positions),
  steps from the pre-RoPE base (``channel_steps``, so no side info), ``q = round(r / step)`` coded by the
  symbol coder alone.
* the calibrated pipeline (``prerope``, ``klt``, ``klt_uniform``): KLT coefficients minus the base's, with
  exactly the plain section's per-component steps; the section is laid out like a lossy section without
  quantizer side info (exact sinks, predictor side info, coder bytes).

Each keeps the plain section's error bound: half a step per coefficient.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import EncodeError
from ..hf_adapter import DTYPES_BY_NAME
from ..stages.base import TensorContext
from ..stages.klt import profile_part
from ..stages.quantize_klt import component_steps, quantize_components, remember_reconstruction
from ..stages.quantize_uniform import quantize_symbols
from ..stages.rope import keys_to_pre_rope
from ..wire import Reader
from .pipeline import BITS_DTYPE, Pipeline, check_lossy_values, section_name

MAX_RESIDUAL_SYMBOL = 2**30


def is_calibrated(pipeline: Pipeline) -> bool:
    """The calibrated pipeline (pre-RoPE, the profile's KLT, profile-stepped quantizer)."""
    return (not pipeline.lossless and pipeline.quantizer.id == "klt_uniform"
            and [t.id for t in pipeline.transforms] == ["prerope", "klt"])


def residual_capable(pipeline: Pipeline) -> bool:
    if pipeline.lossless or is_calibrated(pipeline):
        return True
    return pipeline.quantizer.id == "uniform" and [t.id for t in pipeline.transforms] == ["prerope"]


def _bits(x: torch.Tensor, dtype_name: str) -> np.ndarray:
    torch_int, np_uint = BITS_DTYPE[dtype_name]
    return x.contiguous().view(torch_int).numpy().view(np_uint)


def _checked_symbols(q: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(q).all() or (q.numel() and q.abs().max() > MAX_RESIDUAL_SYMBOL):
        raise EncodeError("residual out of range")
    return q


def _checked_steps(steps: torch.Tensor) -> torch.Tensor:
    """The steps the decoder will recompute must be finite and positive (a section whose steps are not could
    not be decoded)."""
    if steps.numel() and not (bool(torch.isfinite(steps).all()) and bool((steps > 0).all())):
        raise EncodeError("residual steps out of range")
    return steps


def encode_residual(pipeline: Pipeline, x: torch.Tensor, base: torch.Tensor, ctx: TensorContext,
                    base_positions: torch.Tensor, dtype_name: str) -> bytes:
    """The residual section of ``x`` [H, T, D] (positions ``ctx.positions``) against ``base`` (at
    ``base_positions``); EncodeError when the residual cannot be coded.  A calibrated section leaves its
    reconstruction for the next layer's cross-layer prediction in ``ctx.state`` only if the caller keeps it
    (:func:`seqkv.stages.quantize_klt.remember_reconstruction`)."""
    if pipeline.lossless:
        return pipeline.tensor_coder.encode(np.bitwise_xor(_bits(x, dtype_name), _bits(base, dtype_name)), dtype_name)
    if is_calibrated(pipeline):
        section, _recon = encode_klt_residual(pipeline, x, base, ctx, base_positions)
        return section
    check_lossy_values(x, ctx)
    xp = keys_to_pre_rope(x, ctx.kind, ctx.positions, ctx.layout)
    bp = keys_to_pre_rope(base, ctx.kind, base_positions, ctx.layout)
    steps = _checked_steps(pipeline.quantizer.channel_steps(bp, ctx.kind).to(torch.float32))
    q = _checked_symbols(quantize_symbols(xp - bp, steps, pipeline.quantizer.rounding))
    return pipeline.symbol_coder.encode(q.to(torch.int32).numpy())


def _klt_parts(pipeline: Pipeline, base: torch.Tensor, ctx: TensorContext, base_positions, tokens: int):
    """(sink count, the base's KLT coefficients after the sinks, the plain section's steps)."""
    sinks = min(pipeline.sink_tokens, tokens)
    base_ctx = TensorContext(layer=ctx.layer, kind=ctx.kind, positions=base_positions, layout=ctx.layout, state=ctx.state)
    z_b = pipeline.transform(base, base_ctx, check=False)[:, sinks:]  # the base is a decoded tensor
    steps = component_steps(profile_part(ctx), float(np.float32(ctx.state.scale)), base.shape[0], base.shape[2])
    return sinks, z_b, steps


def encode_klt_residual(pipeline: Pipeline, x, base, ctx: TensorContext, base_positions) -> tuple[bytes, torch.Tensor]:
    """(section bytes, the reconstruction of the KLT coefficients after the sinks)."""
    sinks, z_b, steps = _klt_parts(pipeline, base, ctx, base_positions, x.shape[1])
    q, recon = quantize_components(pipeline.transform(x, ctx)[:, sinks:] - z_b, steps, pipeline.quantizer.rounding)
    q = _checked_symbols(q)
    return pipeline.pack(x[:, :sinks], b"", q.to(torch.int32).numpy(), ctx), z_b + recon


def decode_residual(pipeline: Pipeline, payload, base: torch.Tensor, ctx: TensorContext, base_positions,
                    dtype_name: str, shape) -> torch.Tensor:
    """The tensor [H, T, D] of a residual section."""
    sinks, body = decode_residual_parts(pipeline, payload, base, ctx, base_positions, dtype_name, shape)
    return body if pipeline.lossless else pipeline.restore(body, sinks, ctx, dtype_name)


def decode_residual_parts(pipeline: Pipeline, payload, base: torch.Tensor, ctx: TensorContext, base_positions,
                          dtype_name: str, shape) -> tuple:
    """A residual section up to the pipeline's inverse transforms, as ``Pipeline.restore`` takes it:
    (exact sink tokens [H, s, D], the tokens after them in the transform domain); lossless: (None, the
    tensor).  A calibrated section leaves its reconstruction in ``ctx.state`` for the next layer."""
    if pipeline.lossless:
        torch_int, _ = BITS_DTYPE[dtype_name]
        bits = np.bitwise_xor(pipeline.tensor_coder.decode(payload, dtype_name, shape), _bits(base, dtype_name))
        return None, torch.from_numpy(np.ascontiguousarray(bits)).view(torch_int).view(DTYPES_BY_NAME[dtype_name])
    if is_calibrated(pipeline):
        sinks, z_b, steps = _klt_parts(pipeline, base, ctx, base_positions, shape[1])
        parts = pipeline.read_symbols(payload, ctx, dtype_name, shape, quantizer_side=False)
        recon = z_b + torch.from_numpy(np.ascontiguousarray(parts.symbols)).to(torch.float32) * steps[:, None, :]
        remember_reconstruction(ctx, recon)
        return parts.sinks, recon
    reader = Reader(payload, what=section_name(ctx.layer, ctx.kind))
    q = pipeline.symbol_coder.decode(reader, shape)
    reader.expect_end()
    bp = keys_to_pre_rope(base, ctx.kind, base_positions, ctx.layout)
    steps = pipeline.quantizer.channel_steps(bp, ctx.kind).to(torch.float32)
    y = bp + torch.from_numpy(np.ascontiguousarray(q)).to(torch.float32) * steps[:, None, :]
    # every token is in the residual (no exact sinks): RoPE, the dtype and the layout as for a plain section
    return torch.empty((shape[0], 0, shape[2]), dtype=DTYPES_BY_NAME[dtype_name]), y
