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
from typing import NamedTuple

import numpy as np
import torch

from ..errors import ConfigError, FormatError, NonFiniteError, ValueRangeError
from ..ans_coding import decode_symbols, read_table, table_and_words, write_table
from ..wire import Reader, write_uvarint
from .base import Quantizer, TensorContext, body_positions, register
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


def weighted_mse(z: torch.Tensor, recon: torch.Tensor, part, token_weights: torch.Tensor | None = None) -> float:
    """Mean over elements of weight_c * (z - recon)^2 ([H, T, D], T > 0): what the profile's KL model reads.
    ``token_weights`` [T] (mean about 1): each token's error counts by the attention it receives."""
    err = (z - recon).pow(2)
    if token_weights is None:
        return weighted_by_component(err.mean(1), part)
    return weighted_by_component((err * token_weights.to(err.dtype)[None, :, None]).mean(1), part)


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
    columns = aligned_columns(link, body_positions(ctx.positions, tokens), tokens)
    return None if columns is None else from_columns(matmul(part.cross, columns), heads, dim)


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
                                        body_positions(ctx.positions, recon.shape[1]))


class KLTSide(NamedTuple):
    """A klt_uniform section's side info."""
    scale: float
    use: torch.Tensor | None          # bool [H, D]: the components predicted from the previous layer
    codes: np.ndarray | None          # uint8 [T']: the tokens' step codes (token_steps)


MAX_TOKENS_PER_SECTION = 1 << 26   # the container's token cap (format.pipeline.MAX_TOKENS)
TOKEN_STEPS_MINOR = 3               # the container minor that defines token_steps
MAX_TOKEN_CODE = 40          # multiplier 2**(40/4) = 1024: the token is as good as pruned
TOKEN_CODES_PER_OCTAVE = 4


def token_multipliers(codes: np.ndarray) -> np.ndarray:
    """float32 step multipliers ``2 ** (code / 4)`` of per-token codes (uint8)."""
    return np.exp2(codes.astype(np.float32) / np.float32(TOKEN_CODES_PER_OCTAVE)).astype(np.float32)


def token_codes_for(ctx: TensorContext, tokens: int) -> np.ndarray | None:
    """The encoder's per-token step codes of this section's quantized tokens (None: all zero)."""
    table = ctx.state.token_codes
    if not table:
        return None
    codes = table.get((ctx.layer, ctx.kind))
    if codes is None:
        return None
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.size < tokens:
        raise ConfigError(f"layer {ctx.layer} {ctx.kind}: {codes.size} token step codes for {tokens} tokens")
    codes = codes[codes.size - tokens:]   # the quantized tokens are the last ones (sinks come first)
    if codes.size and int(codes.max()) > MAX_TOKEN_CODE:
        raise ConfigError(f"token step codes above {MAX_TOKEN_CODE}")
    return codes


def token_weights_for(ctx: TensorContext, tokens: int) -> np.ndarray | None:
    """The attention weights (mean 1 over the cache's tokens) of this section's quantized tokens, or None."""
    table = ctx.state.token_weights
    weights = None if not table else table.get((ctx.layer, ctx.kind))
    if weights is None or len(weights) < tokens:
        return None
    return np.asarray(weights, dtype=np.float32)[len(weights) - tokens:]


def write_token_codes(out: bytearray, codes: np.ndarray) -> None:
    """Token step codes: u8 mode (0: all zero; 1: an ANS table, uvarint word count, the words)."""
    if not codes.size or not codes.any():
        out.append(0)
        return
    table, words = table_and_words(codes.astype(np.int64))
    out.append(1)
    write_uvarint(out, codes.size)
    write_table(out, table)
    write_uvarint(out, len(words))
    out += words.astype("<u4").tobytes()


def read_token_codes(reader: Reader) -> np.ndarray | None:
    mode = reader.u8()
    if mode == 0:
        return None
    if mode != 1:
        raise FormatError(f"{reader.what}: unknown token-step mode {mode}")
    count = reader.uvarint(max_value=MAX_TOKENS_PER_SECTION)
    table = read_table(reader)
    # (a table spans at least 2 symbols, so one code of 40 alone has lo + K - 1 = 41: checked after decoding)
    if not 0 <= table.lo <= MAX_TOKEN_CODE or table.size > MAX_TOKEN_CODE + 2:
        raise FormatError(f"{reader.what}: token step codes outside [0, {MAX_TOKEN_CODE}]")
    n_words = reader.uvarint(max_value=min(count // 2 + 3, reader.remaining() // 4))
    words = reader.array("<u4", n_words)
    codes = decode_symbols(words, table, count)
    if codes.size and int(codes.max()) > MAX_TOKEN_CODE:
        raise FormatError(f"{reader.what}: token step codes outside [0, {MAX_TOKEN_CODE}]")
    return codes.astype(np.uint8)


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
    params = {"rounding": (float, 0.5), "cross_layer": (bool, False), "token_steps": (bool, False)}

    def validate(self) -> None:
        if not 0.0 < self.rounding <= 0.5:
            raise ConfigError(f"klt_uniform: rounding must be in (0, 0.5], got {self.rounding}")
        if self.token_steps:
            self.min_minor = TOKEN_STEPS_MINOR   # containers with per-token steps need a reader that knows them

    def get_config(self) -> dict:
        config = super().get_config()
        if not self.token_steps:   # written only when on: containers without it keep their bytes
            del config["token_steps"]
        return config

    def quantize(self, z: torch.Tensor, ctx: TensorContext):
        from seqkv_ext.quantize import QuantizeError, quantize_rows

        if ctx.state.scale is None:
            raise ConfigError("klt_uniform needs the rate knob: the coding state has no scale")
        scale = float(np.float32(ctx.state.scale))  # what the decoder will read back
        part = profile_part(ctx)
        heads, tokens, dim = z.shape
        steps = component_steps(part, scale, heads, dim).reshape(-1).contiguous()
        pred = cross_layer_prediction(part, ctx, z.shape) if (self.cross_layer and tokens) else None
        codes = token_codes_for(ctx, tokens) if self.token_steps else None
        z_cols = columns_of(z).numpy()
        pred_cols = None if pred is None else columns_of(pred).numpy()
        if codes is not None and codes.any():
            # a token's steps are all multiplied by its multiplier: quantize the token divided by it
            mult = token_multipliers(codes)
            z_cols = np.divide(z_cols, mult[None, :])
            pred_cols = None if pred_cols is None else np.divide(pred_cols, mult[None, :])
        else:
            mult = None
        try:
            # one compiled pass per component: plain and residual symbols, the choice, the reconstruction
            q, recon, use, sq_err = quantize_rows(np.ascontiguousarray(z_cols, dtype=np.float32), steps.numpy(),
                                                  self.rounding, None if pred_cols is None else
                                                  np.ascontiguousarray(pred_cols, dtype=np.float32))
            if mult is not None:
                recon = recon * mult[None, :]
                sq_err = np.square(columns_of(z).numpy() - recon)
                weights = token_weights_for(ctx, tokens)
                # the KL model reads errors where attention reads them (issue 12, item 3): a token's error
                # counts in proportion to the attention it receives (mean weight 1, so uniform errors predict
                # what they did before)
                sq_err = (sq_err.sum(axis=1) if weights is None else sq_err @ weights).astype(np.float64)
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
        if self.token_steps:
            write_token_codes(side, codes if codes is not None else np.zeros(tokens, np.uint8))
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
        codes = read_token_codes(reader) if self.token_steps else None
        return KLTSide(scale, use, codes)

    def dequantize(self, q: torch.Tensor, side, ctx: TensorContext) -> torch.Tensor:
        from seqkv_ext.quantize import dequantize_rows

        scale, use, codes = side
        part = profile_part(ctx)
        heads, tokens, dim = q.shape
        if codes is not None and codes.size != tokens:
            raise FormatError(f"layer {ctx.layer} {ctx.kind}: {codes.size} token step codes for {tokens} tokens")
        mult = token_multipliers(codes) if codes is not None and codes.any() else None
        steps = component_steps(part, scale, heads, dim).reshape(-1).contiguous()
        pred = None
        if use is not None:
            pred = cross_layer_prediction(part, ctx, q.shape)
            if pred is None:
                raise FormatError(f"layer {ctx.layer} {ctx.kind}: cross-layer prediction without layer "
                                  f"{ctx.layer - 1} decoded first")
            pred = columns_of(pred).numpy()
            if mult is not None:
                pred = np.ascontiguousarray(np.divide(pred, mult[None, :]), dtype=np.float32)
            use = use.reshape(-1).numpy()
        # channel-major, the coder's order; one compiled pass, elementwise exactly the encoder's q * steps + pred
        cols = dequantize_rows(columns_of(q).numpy(), steps.numpy(), pred, use)
        if mult is not None:
            cols = cols * mult[None, :]
        recon = from_columns(torch.from_numpy(cols), heads, dim)
        remember_reconstruction(ctx, recon)
        return recon
