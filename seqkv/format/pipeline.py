"""The pipeline: the stages a container's config names, and one tensor [H, T, D] <-> section bytes.

A lossy pipeline is ``transforms -> quantizer -> [predictor] -> symbol coder`` (docs/format.md §5-§6); a lossless
one is a single tensor coder of the raw IEEE bits (§8).  Each place takes a stage of one role class
(:mod:`seqkv.stages.base`), so the signatures below are the only ones a stage must offer."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import ConfigError, NonFiniteError, ValueRangeError
from ..hf_adapter import DTYPES_BY_NAME, SUPPORTED_DTYPES
from ..stages import stage_from_config
from ..stages.base import Predictor, Quantizer, SymbolCoder, TensorCoder, TensorContext, Transform
from ..wire import Reader

KINDS = ("keys", "values")
MAX_TOKENS = 1 << 26
# the largest magnitude a lossy pipeline carries (2^50, about 1.1e15): squares summed over 2^26 tokens stay
# below the float32 range, so every step, scale and reconstruction of the encoder and the decoder is finite
MAX_LOSSY_MAGNITUDE = float(1 << 50)
BITS_DTYPE = {"float32": (torch.int32, np.uint32), "float16": (torch.int16, np.uint16), "bfloat16": (torch.int16, np.uint16)}


def section_name(layer: int, kind: str) -> str:
    return f"layer.{layer}.{kind}"


class Pipeline:
    """The stages named by a pipeline config, built once per encode/decode."""

    def __init__(self, config: dict):
        if not isinstance(config, dict) or config.get("mode") not in ("lossy", "lossless"):
            raise ConfigError(f"invalid pipeline config: {config!r}")
        self.config = config
        self.lossless = config["mode"] == "lossless"
        self.tensor_coder: TensorCoder | None = None   # the lossless pipeline's one stage
        self.symbol_coder: SymbolCoder | None = None   # the lossy pipeline's entropy coder
        self.transforms: list[Transform] = []
        self.quantizer: Quantizer | None = None
        self.predictor: Predictor | None = None
        self.sink_tokens = 0
        if self.lossless:
            self.tensor_coder = self._stage(config.get("coder"), TensorCoder)
        else:
            self.symbol_coder = self._stage(config.get("coder"), SymbolCoder)
            self.sink_tokens = config.get("sink_tokens", 0)
            if not isinstance(self.sink_tokens, int) or isinstance(self.sink_tokens, bool) or not 0 <= self.sink_tokens <= MAX_TOKENS:
                raise ConfigError(f"invalid sink_tokens {self.sink_tokens!r}")
            transforms = config.get("transforms", [])
            if not isinstance(transforms, list):
                raise ConfigError("pipeline 'transforms' must be a list")
            self.transforms = [self._stage(t, Transform) for t in transforms]
            self.quantizer = self._stage(config.get("quantizer"), Quantizer)
            predictor = config.get("predictor")
            self.predictor = None if predictor is None else self._stage(predictor, Predictor)
        stages = self.stages()
        # a pipeline whose stages read the model profile (the KLT and its quantizer)
        self.needs_profile = any(stage.reads_profile for stage in stages)
        # a section that depends on the previous layer's (cross-layer prediction)
        self.cross_layer = bool(getattr(self.quantizer, "cross_layer", False))
        # repeat prediction reads layer 0's symbols: a section then needs layer 0 decoded first
        self.repeat = bool(getattr(self.predictor, "repeat", False))
        if self.repeat and getattr(self.quantizer, "id", None) != "klt_uniform":
            # only with a profile: its shape bounds the match finder's work against the decoding's (§6.5)
            raise ConfigError("temporal_ar's repeat mode needs the klt_uniform quantizer (the calibrated codec)")
        # the lowest container minor that defines every stage used (seqkv.format.header.required_minor)
        self.min_minor = max(stage.min_minor for stage in stages)

    def check_head_dim(self, head_dim: int) -> None:
        """ConfigError when a stage cannot handle ``head_dim`` (the Hadamard rotation needs a power of two)."""
        for stage in self.stages():
            stage.check_head_dim(head_dim)

    def stages(self) -> list:
        """Every stage, in encode order."""
        if self.lossless:
            return [self.tensor_coder]
        return [*self.transforms, self.quantizer, *([self.predictor] if self.predictor else []), self.symbol_coder]

    @staticmethod
    def _stage(config, role: type):
        stage = stage_from_config(config)
        if not isinstance(stage, role):
            raise ConfigError(f"stage {stage.id!r} is a {stage.role}; this place in the pipeline needs a {role.role}")
        return stage

    @property
    def coder(self):
        """The pipeline's last stage (the symbol coder, or the lossless tensor coder)."""
        return self.tensor_coder if self.lossless else self.symbol_coder

    def full_config(self) -> dict:
        """The config with every stage option spelled out, as recorded in the container."""
        out = dict(self.config, coder=self.coder.get_config())
        if not self.lossless:
            out["transforms"] = [t.get_config() for t in self.transforms]
            out["quantizer"] = self.quantizer.get_config()
            if self.predictor is not None:
                out["predictor"] = self.predictor.get_config()
        return out

    # -- one tensor [H, T, D] <-> section bytes ------------------------------------------
    def encode_tensor(self, x: torch.Tensor, ctx: TensorContext, dtype_name: str) -> bytes:
        if self.lossless:
            torch_int, np_uint = BITS_DTYPE[dtype_name]
            bits = x.contiguous().view(torch_int).numpy().view(np_uint)
            return self.tensor_coder.encode(bits, dtype_name)
        return self.code(x, self.transform(x, ctx), ctx)

    def transform(self, x: torch.Tensor, ctx: TensorContext, *, check: bool = True) -> torch.Tensor:
        """The lossy stack's transforms: the tensor the quantizer sees (float32 [H, T, D]).  ``check`` (every
        encode) refuses what a lossy pipeline cannot carry first, sink tokens included: NaN/Inf
        (NonFiniteError) and magnitudes above MAX_LOSSY_MAGNITUDE (ValueRangeError)."""
        y = x.to(torch.float32)
        if check:
            check_lossy_values(y, ctx)
        for t in self.transforms:
            y = t.forward(y, ctx)
        return y

    def code(self, x: torch.Tensor, y: torch.Tensor, ctx: TensorContext) -> bytes:
        """Section bytes: exact sinks from ``x``, then ``y``'s other tokens quantized, predicted, coded."""
        sinks = min(self.sink_tokens, x.shape[1])
        # no copy: the transform's layout (channel-major for the KLT) is the quantizer's and the coder's
        q, side = self.quantizer.quantize(y[:, sinks:], ctx)
        return self.pack(x[:, :sinks], side, q, ctx)

    def pack(self, sinks: torch.Tensor, side: bytes, q: np.ndarray, ctx: TensorContext) -> bytes:
        """Section bytes (§6.1) from the exact sink tokens, the quantizer's side info and its symbols
        (int32 [H, T - sinks, D]): the predictor runs on ``q``, then the coder."""
        out = bytearray(raw_bytes(sinks))
        out += side
        if self.predictor is not None:
            q, predictor_side = self.predictor.forward(q, ctx)
            out += predictor_side
        out += self.symbol_coder.encode(q)
        return bytes(out)

    def decode_tensor(self, payload, ctx: TensorContext, dtype_name: str, shape, symbols_out: dict | None = None) -> torch.Tensor:
        """Section bytes -> the tensor; ``symbols_out`` (lossy only) receives the section's
        SectionSymbols under (layer, kind), for analyses that need them."""
        heads, tokens, dim = shape
        if self.lossless:
            torch_int, _ = BITS_DTYPE[dtype_name]
            bits = self.tensor_coder.decode(payload, dtype_name, shape)
            return torch.from_numpy(np.ascontiguousarray(bits)).view(torch_int).view(DTYPES_BY_NAME[dtype_name])
        sections = self.read_symbols(payload, ctx, dtype_name, shape, keep_residuals=symbols_out is not None)
        if symbols_out is not None:
            symbols_out[(ctx.layer, ctx.kind)] = sections
        body = self.quantizer.dequantize(torch.from_numpy(sections.symbols), sections.side, ctx)
        return self.restore(body, sections.sinks, ctx, dtype_name)

    def restore(self, body: torch.Tensor, sinks: torch.Tensor, ctx: TensorContext, dtype_name: str) -> torch.Tensor:
        """The tensor from its dequantized tokens after the sinks (transform domain, any layout) and the exact
        sinks: the transforms inverted, the dtype restored, laid out [H, T, D] contiguously as caches are."""
        count = sinks.shape[1]
        # every transform works token by token, so the inverse runs on the quantized tokens alone: no
        # full-size buffer to fill first
        body_ctx = ctx if not count or ctx.positions is None else replace(ctx, positions=ctx.positions[count:])
        for t in reversed(self.transforms):
            body = t.inverse(body, body_ctx)
        dtype = DTYPES_BY_NAME[dtype_name]
        out = torch.empty((body.shape[0], count + body.shape[1], body.shape[2]), dtype=dtype)
        # one pass converts the dtype and the layout; a reconstruction within half a step of a finite value near
        # the dtype's largest one may round past it: clamped, so a finite value never comes back as inf
        out[:, count:] = clamp_to_dtype(body, dtype)
        out[:, :count] = sinks
        return out

    def read_symbols(self, payload, ctx: TensorContext, dtype_name: str, shape,
                     keep_residuals: bool = False, quantizer_side: bool = True) -> "SectionSymbols":
        """A lossy section's parts: exact sinks, quantizer side info, coded residuals and symbols.

        The predictor turns residuals into symbols in place; ``keep_residuals`` keeps a copy of
        the residuals (for analysis), else ``residuals`` may hold the symbols.  ``quantizer_side``
        False reads a section written by :meth:`pack` without quantizer side info (``side`` None)."""
        heads, tokens, dim = shape
        reader = Reader(payload, what=section_name(ctx.layer, ctx.kind))
        sinks = min(self.sink_tokens, tokens)
        dtype = DTYPES_BY_NAME[dtype_name]
        sink_part = from_raw_bytes(reader.bytes(heads * sinks * dim * dtype.itemsize), dtype, (heads, sinks, dim))
        side = self.quantizer.read_side(reader, heads, dim) if quantizer_side else None
        predictor_side = None if self.predictor is None else self.predictor.read_side(reader, heads, dim)
        coder_start = reader.pos
        residuals = self.symbol_coder.decode(reader, (heads, tokens - sinks, dim))
        reader.expect_end()
        if self.predictor is not None:
            symbols = self.predictor.inverse(residuals.copy() if keep_residuals else residuals, predictor_side, ctx)
        else:
            symbols = residuals
        return SectionSymbols(sink_part, side, residuals, symbols, reader.pos - coder_start)


@dataclass
class SectionSymbols:
    sinks: torch.Tensor        # [H, sinks, D], exact
    side: object               # the quantizer's side info
    residuals: np.ndarray      # int32 [H, T - sinks, D]: what the entropy coder coded
    symbols: np.ndarray        # int32 [H, T - sinks, D]: the quantizer's output
    coder_bytes: int           # bytes of the entropy coder's part (tables, offsets, ANS words)


def check_lossy_values(x: torch.Tensor, ctx: TensorContext) -> None:
    """What a lossy pipeline refuses up front (the whole tensor, sink tokens included)."""
    if not x.numel():
        return
    a = x.detach().to(device="cpu", dtype=torch.float32).numpy()   # exact for float16 and bfloat16
    high, low = float(a.max()), float(a.min())                     # NaN or inf shows in one of them
    if not (math.isfinite(high) and math.isfinite(low)):
        raise NonFiniteError(
            f"layer {ctx.layer} {ctx.kind}: NaN or Inf values; lossy presets reject them, "
            "use preset='lossless' to keep them bit-exact")
    largest = max(high, -low)
    if largest > MAX_LOSSY_MAGNITUDE:
        raise ValueRangeError(
            f"layer {ctx.layer} {ctx.kind}: a value of magnitude {largest:.3g} is above the {MAX_LOSSY_MAGNITUDE:.3g} "
            "that lossy presets carry; use preset='lossless' to keep it bit-exact")


def clamp_to_dtype(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``y`` (float32, CPU) with values beyond ``dtype``'s finite range clamped to it (NaN stays NaN).  The
    check is two numpy reductions (torch's take ten times longer here); a NaN hides the extremes, so then
    the clamp runs anyway."""
    if not y.numel():
        return y
    limit = torch.finfo(dtype).max
    a = y.numpy() if y.device.type == "cpu" and not y.requires_grad else None
    if a is not None:
        high, low = float(a.max()), float(a.min())
        if -limit <= low and high <= limit:   # False for NaN: clamped below, which keeps NaN
            return y
    return y.clamp(-limit, limit)


def raw_bytes(x: torch.Tensor) -> bytes:
    """The tensor's IEEE bit patterns, little-endian."""
    torch_int, np_uint = BITS_DTYPE[SUPPORTED_DTYPES[x.dtype]]
    return le_bytes(x.contiguous().view(torch_int).numpy().view(np_uint))


def le_bytes(a: np.ndarray) -> bytes:
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def from_raw_bytes(raw: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    torch_int, np_uint = BITS_DTYPE[SUPPORTED_DTYPES[dtype]]
    arr = np.frombuffer(raw, dtype=np.dtype(np_uint).newbyteorder("<")).astype(np_uint).reshape(shape)
    return torch.from_numpy(arr).view(torch_int).view(dtype)


