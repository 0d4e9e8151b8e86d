"""Uniform quantizer of KLT components with steps from the model profile.

Component ``c`` of a tensor gets the step ``scale / sqrt(sensitivity * weight_c)``:
equal slope of weighted distortion everywhere, which is the optimal (reverse
water-filling) allocation at high rate; components much weaker than their step
quantize to zero and cost almost nothing, which is water-filling's "zero bits".
The one number per section is ``scale`` (float32 side info), chosen by rate
control; the steps themselves come from the profile.  Cross-layer prediction: see
:class:`KLTQuantizer`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError, FormatError, NonFiniteError, ValueRangeError
from ..wire import Reader
from .base import Quantizer, TensorContext, register
from .quantize_uniform import quantize_symbols
from .klt import columns_of, from_columns, matmul, profile_part

MIN_SCALE, MAX_SCALE = 1e-6, 1e6


MAX_MEMO_SCALES = 16  # steps kept per profile part (a store uses one scale; rate control tries a few)


def component_steps(part, scale: float, heads: int, dim: int) -> torch.Tensor:
    """Steps laid out like the KLT stage's output, [H, D] (do not modify: it may be shared).

    Computed once per part and scale, then kept in ``part.derived`` (a store decodes every tensor of every
    chunk with the same steps); an entry is used only while the part still has the weights tensor (same
    object, unmodified) and sensitivity it was computed from."""
    memo = getattr(part, "derived", None)
    if memo is None:  # a stand-in part without the cache
        return part.steps(scale).reshape(heads, dim).to(torch.float32)
    key = ("steps", float(scale), heads, dim)
    source = (part.weights, part.weights._version, part.sensitivity)
    hit = memo.get(key)
    if hit is not None and hit[0] is source[0] and hit[1:3] == source[1:]:
        return hit[3]
    steps = part.steps(scale).reshape(heads, dim).to(torch.float32)
    kept = [k for k in memo if k[0] == "steps"]
    if len(kept) >= MAX_MEMO_SCALES:
        del memo[kept[0]]  # the oldest
    memo[key] = (*source, steps)
    return steps


def quantize_components(z: torch.Tensor, steps: torch.Tensor, rounding: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(symbols as floats, reconstruction ``q * step``) of KLT coefficients ``z`` [H, T, D] at per-component
    ``steps`` [H, D]: the reference arithmetic of this quantizer (the compiled pass in :class:`KLTQuantizer`
    computes the same), shared by rate control's stand-in and the store's residual sections."""
    q = quantize_symbols(z, steps, rounding)
    return q, q * steps[:, None, :]


def weighted_mse(z: torch.Tensor, recon: torch.Tensor, part) -> float:
    """Mean over elements of weight_c * (z - recon)^2 ([H, T, D], T > 0): what the profile's KL model reads."""
    return weighted_by_component((z - recon).pow(2).mean(1), part)


def weighted_by_component(err: torch.Tensor, part) -> float:
    """Mean over components of weight_c * err_c, ``err`` the per-component mean squared error ([H, D] or [H*D])."""
    return float((err * part.weights.reshape(err.shape).to(err.dtype)).mean())


def cross_layer_prediction(part, ctx: TensorContext, shape) -> torch.Tensor | None:
    """The previous layer's reconstruction (same kind) mapped through the profile's ``cross``, [H, T, D];
    None for layer 0 or when the previous layer is not in ``ctx.state.chain``.  (All components are
    computed: on SmolLM2 about 95 % of them use the prediction.)

    In a pruned cache two layers may keep different positions: a token is then predicted from the
    previous layer's reconstruction of the same position, and tokens that layer did not keep are
    predicted as zero (their residual is the coefficient itself)."""
    heads, tokens, dim = shape
    link = (ctx.state.chain or {}).get(ctx.kind)
    if part.cross is None or link is None or link[0] != ctx.layer - 1:
        return None
    columns = aligned_columns(link, _body_positions(ctx.positions, tokens), tokens)
    return None if columns is None else from_columns(matmul(part.cross, columns), heads, dim)


def _body_positions(positions: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """The positions of the quantized tokens: the last ``tokens`` ones (exact sink tokens come first)."""
    if positions is None or tokens == 0 or positions.numel() < tokens:
        return None
    return positions[positions.numel() - tokens:]


def aligned_columns(link: tuple, positions: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """The previous layer's [H*D, T] reconstruction at this layer's token positions (zero where it has none)."""
    prev = link[1]
    prev_pos = link[2] if len(link) > 2 else None
    if prev_pos is None or positions is None or torch.equal(prev_pos, positions):
        return prev if prev.shape[1] == tokens else None
    if prev_pos.numel() == 0:
        return None
    idx = torch.searchsorted(prev_pos, positions).clamp_max(prev_pos.numel() - 1)
    hit = prev_pos[idx] == positions
    if not bool(hit.any()):
        return None
    return prev[:, idx] * hit[None, :]


def remember_reconstruction(ctx: TensorContext, recon: torch.Tensor) -> None:
    """Keep this layer's reconstruction (and its tokens' positions) for the next layer's cross-layer prediction."""
    if ctx.state.chain is not None:
        # channel-major [H*D, T] and contiguous, in encoder and decoder alike, so that both compute the next
        # layer's prediction with the same matrix product and get the same floats
        ctx.state.chain[ctx.kind] = (ctx.layer, columns_of(recon).contiguous(),
                                        _body_positions(ctx.positions, recon.shape[1]))


@register
class KLTQuantizer(Quantizer):
    """Profile-stepped uniform quantizer, with optional cross-layer prediction (DPCM).

    With ``cross_layer``, each component may instead quantize its residual against the
    previous layer's reconstruction mapped through the profile (``cross``); the encoder
    picks, per component, whichever gives symbols of lower empirical entropy, so it is
    never worse than no prediction (apart from a bit per component of side info).  The
    prediction is added back in floating point, so platform rounding differences only
    move the output by float noise, never a symbol.  A section then depends on the
    previous layer's section of the same kind (decode(layers=...) decodes those first).
    """

    id = "klt_uniform"
    min_minor = 1  # defined by format 1.1
    reads_profile = True
    params = {"rounding": (float, 0.5), "cross_layer": (bool, False)}

    def validate(self) -> None:
        if not 0.0 < self.rounding <= 0.5:
            raise ConfigError(f"klt_uniform: rounding must be in (0, 0.5], got {self.rounding}")

    def quantize(self, z: torch.Tensor, ctx: TensorContext):
        from seqkv_ext.quantize import QuantizeError, quantize_rows

        if ctx.state.scale is None:
            raise ConfigError("klt_uniform needs the rate knob: the coding state has no scale")
        scale = float(np.float32(ctx.state.scale))  # what the decoder will read back
        part = profile_part(ctx)
        heads, tokens, dim = z.shape
        steps = component_steps(part, scale, heads, dim).reshape(-1).contiguous()
        pred = cross_layer_prediction(part, ctx, z.shape) if (self.cross_layer and tokens) else None
        try:
            # one compiled pass per component: plain and residual symbols, the choice, the reconstruction
            q, recon, use, sq_err = quantize_rows(columns_of(z).numpy(), steps.numpy(), self.rounding,
                                                  None if pred is None else columns_of(pred).numpy())
        except QuantizeError as exc:
            if "NaN" in str(exc):
                raise NonFiniteError(f"layer {ctx.layer} {ctx.kind}: {exc}; lossy presets reject them, "
                                     "use preset='lossless' to keep them bit-exact") from None
            raise ValueRangeError(f"layer {ctx.layer} {ctx.kind}: {exc} (symbols beyond 2**30 at this scale); "
                                  "use a smaller target or preset='lossless'") from None
        side = bytearray(np.float32(scale).astype("<f4").tobytes())
        if self.cross_layer:
            if use is None or not use.any():
                side.append(0)
            else:
                side.append(1)
                side += np.packbits(use, bitorder="little").tobytes()
        recon = from_columns(torch.from_numpy(recon), heads, dim)
        if tokens:
            # the weighted MSE this quantization causes: rate control's KL model reads it
            ctx.state.weighted_mse[(ctx.layer, ctx.kind)] = weighted_by_component(
                torch.from_numpy(sq_err) / tokens, part)
        remember_reconstruction(ctx, recon)
        # channel-major [H, T, D] view, the order the temporal predictor and the coder work in
        return q.reshape(heads, dim, tokens).transpose(0, 2, 1), bytes(side)

    def read_side(self, reader: Reader, heads: int, dim: int):
        scale = float(reader.array("<f4", 1)[0])
        if not (math.isfinite(scale) and MIN_SCALE <= scale <= MAX_SCALE):
            raise FormatError(f"{reader.what}: quantizer scale {scale!r} is out of range")
        use = None
        if self.cross_layer:
            mode = reader.u8()
            if mode == 1:
                bits = np.frombuffer(reader.bytes((heads * dim + 7) // 8), dtype=np.uint8)
                use = torch.from_numpy(np.unpackbits(bits, bitorder="little")[:heads * dim].astype(bool)).reshape(heads, dim)
            elif mode != 0:
                raise FormatError(f"{reader.what}: unknown cross-layer mode {mode}")
        return scale, use

    def dequantize(self, q: torch.Tensor, side, ctx: TensorContext) -> torch.Tensor:
        from seqkv_ext.quantize import dequantize_rows

        scale, use = side
        part = profile_part(ctx)
        heads, tokens, dim = q.shape
        steps = component_steps(part, scale, heads, dim).reshape(-1).contiguous()
        pred = None
        if use is not None:
            pred = cross_layer_prediction(part, ctx, q.shape)
            if pred is None:
                raise FormatError(f"layer {ctx.layer} {ctx.kind}: cross-layer prediction without layer "
                                  f"{ctx.layer - 1} decoded first")
            pred = columns_of(pred).numpy()
            use = use.reshape(-1).numpy()
        # channel-major, the coder's order; one compiled pass, elementwise exactly the encoder's q * steps + pred
        recon = from_columns(torch.from_numpy(dequantize_rows(columns_of(q).numpy(), steps.numpy(), pred, use)),
                             heads, dim)
        remember_reconstruction(ctx, recon)
        return recon
