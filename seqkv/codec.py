"""encode / decode / inspect: caches to container bytes and back."""
from __future__ import annotations

import numpy as np
import torch

from . import __version__
from .container import FLAG_PRUNED, Container, write_container
from .errors import ConfigError, FormatError, ModelMismatchError, SeqKVError
from .hf_adapter import DTYPES_BY_NAME, SUPPORTED_DTYPES, build_cache, cache_layers
from .layout import ModelLayout, layout_from_model
from .presets import pipeline_config
from .progress import progress_bar
from .stages import stage_from_config
from .stages.base import TensorContext
from .wire import Reader

KINDS = ("keys", "values")
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_HEAD_DIM = 16384
MAX_TOKENS = 1 << 26
DEFAULT_MAX_DECODED_BYTES = 16 << 30
_BITS_DTYPE = {"float32": (torch.int32, np.uint32), "float16": (torch.int16, np.uint16), "bfloat16": (torch.int16, np.uint16)}


def section_name(layer: int, kind: str) -> str:
    return f"layer.{layer}.{kind}"


class _Pipeline:
    """The stages named by a pipeline config, built once per encode/decode."""

    def __init__(self, config: dict):
        if not isinstance(config, dict) or config.get("mode") not in ("lossy", "lossless"):
            raise ConfigError(f"invalid pipeline config: {config!r}")
        self.config = config
        self.lossless = config["mode"] == "lossless"
        self.coder = self._stage(config.get("coder"), "tensor_coder" if self.lossless else "symbol_coder")
        if self.lossless:
            return
        self.sink_tokens = config.get("sink_tokens", 0)
        if not isinstance(self.sink_tokens, int) or isinstance(self.sink_tokens, bool) or not 0 <= self.sink_tokens <= MAX_TOKENS:
            raise ConfigError(f"invalid sink_tokens {self.sink_tokens!r}")
        transforms = config.get("transforms", [])
        if not isinstance(transforms, list):
            raise ConfigError("pipeline 'transforms' must be a list")
        self.transforms = [self._stage(t, "transform") for t in transforms]
        self.quantizer = self._stage(config.get("quantizer"), "quantizer")

    @staticmethod
    def _stage(config, role: str):
        stage = stage_from_config(config)
        if stage.role != role:
            raise ConfigError(f"stage {stage.id!r} is a {stage.role}; this place in the pipeline needs a {role}")
        return stage

    def full_config(self) -> dict:
        """The config with every stage option spelled out, as recorded in the container."""
        out = dict(self.config, coder=self.coder.get_config())
        if not self.lossless:
            out["transforms"] = [t.get_config() for t in self.transforms]
            out["quantizer"] = self.quantizer.get_config()
        return out

    # -- one tensor [H, T, D] <-> section bytes ------------------------------------------
    def encode_tensor(self, x: torch.Tensor, ctx: TensorContext, dtype_name: str) -> bytes:
        if self.lossless:
            torch_int, np_uint = _BITS_DTYPE[dtype_name]
            bits = x.contiguous().view(torch_int).numpy().view(np_uint)
            return self.coder.encode(bits, dtype_name)
        sinks = min(self.sink_tokens, x.shape[1])
        out = bytearray(_raw_bytes(x[:, :sinks]))
        y = x.to(torch.float32)
        for t in self.transforms:
            y = t.forward(y, ctx)
        q, side = self.quantizer.quantize(y[:, sinks:].contiguous(), ctx)
        out += side
        out += self.coder.encode(q)
        return bytes(out)

    def decode_tensor(self, payload, ctx: TensorContext, dtype_name: str, shape) -> torch.Tensor:
        heads, tokens, dim = shape
        if self.lossless:
            torch_int, _ = _BITS_DTYPE[dtype_name]
            bits = self.coder.decode(payload, dtype_name, shape)
            return torch.from_numpy(np.ascontiguousarray(bits)).view(torch_int).view(DTYPES_BY_NAME[dtype_name])
        reader = Reader(payload, what=section_name(ctx.layer, ctx.kind))
        sinks = min(self.sink_tokens, tokens)
        dtype = DTYPES_BY_NAME[dtype_name]
        sink_part = _from_raw_bytes(reader.bytes(heads * sinks * dim * dtype.itemsize), dtype, (heads, sinks, dim))
        side = self.quantizer.read_side(reader, heads, dim)
        q = self.coder.decode(reader, (heads, tokens - sinks, dim))
        reader.expect_end()
        y = torch.zeros(heads, tokens, dim)
        y[:, sinks:] = self.quantizer.dequantize(torch.from_numpy(q), side, ctx)
        for t in reversed(self.transforms):
            y = t.inverse(y, ctx)
        y = y.to(dtype)
        y[:, :sinks] = sink_part
        return y


def _raw_bytes(x: torch.Tensor) -> bytes:
    """The tensor's IEEE bit patterns, little-endian."""
    torch_int, np_uint = _BITS_DTYPE[SUPPORTED_DTYPES[x.dtype]]
    return _le_bytes(x.contiguous().view(torch_int).numpy().view(np_uint))


def _le_bytes(a: np.ndarray) -> bytes:
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def _from_raw_bytes(raw: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    torch_int, np_uint = _BITS_DTYPE[SUPPORTED_DTYPES[dtype]]
    arr = np.frombuffer(raw, dtype=np.dtype(np_uint).newbyteorder("<")).astype(np_uint).reshape(shape)
    return torch.from_numpy(arr).view(torch_int).view(dtype)


# -- public API ---------------------------------------------------------------------------

def _positions_of(positions, tokens: int) -> torch.Tensor:
    if positions is None:
        return torch.arange(tokens, dtype=torch.int64)
    if isinstance(positions, int) and not isinstance(positions, bool):
        if positions < 0:
            raise ConfigError(f"start position must be >= 0, got {positions}")
        return torch.arange(positions, positions + tokens, dtype=torch.int64)
    pos = torch.as_tensor(positions).to(torch.int64).flatten()
    if pos.numel() != tokens:
        raise ConfigError(f"positions has {pos.numel()} entries for {tokens} cached tokens")
    if tokens and (pos.min() < 0 or bool((pos[1:] <= pos[:-1]).any())):
        raise ConfigError("positions must be non-negative and strictly increasing")
    return pos


def _layout_for(model, config, layers, lossless: bool) -> ModelLayout:
    if model is not None or config is not None:
        layout = layout_from_model(model if model is not None else config)
    elif lossless:
        heads, _, dim = layers[0][0].shape
        layout = ModelLayout(layers=len(layers), kv_heads=heads, head_dim=dim, rope_type="unknown")
    else:
        raise ConfigError(
            "lossy presets move keys to pre-RoPE and need the model's RoPE parameters: "
            "pass model= (or config=) to encode, or use preset='lossless'"
        )
    heads, _, dim = layers[0][0].shape
    if (layout.layers, layout.kv_heads, layout.head_dim) != (len(layers), heads, dim):
        raise ModelMismatchError(
            f"the cache has {len(layers)} layers x {heads} KV heads x head_dim {dim}, but the model has "
            f"{layout.layers} x {layout.kv_heads} x {layout.head_dim}: it comes from a different model"
        )
    return layout


def encode(cache, *, preset: str = "balanced", model=None, config=None, positions=None,
           prune=None, progress: bool = False, **options) -> bytes:
    """Encode a transformers ``DynamicCache`` into a self-describing seqkv container.

    ``preset`` is one of "lossless", "near_lossless", "balanced", "small".
    ``model``/``config`` give the layout, RoPE parameters and fingerprint
    (required for lossy presets).  ``positions`` is the start position (int)
    or the position of every cached token (default 0, 1, 2, ...).
    ``options`` override the preset: ``step`` (the quality knob), ``sink_tokens``,
    ``rotation`` ("none"/"hadamard"), ``quantizer`` ("uniform"/"lloydmax"),
    ``bits`` (Lloyd-Max), ``rounding``, ``key_channel_gamma``, ``seed``.
    ``prune`` (a ``seqkv.pruner(...)``) drops tokens first; caches pruned before are
    encoded with their kept positions either way (docs/format.md §9).
    """
    if not isinstance(preset, str):
        raise ConfigError(f"preset must be a string, got {type(preset).__name__}")
    if prune is not None or getattr(cache, "seqkv_pruned", None) is not None:
        from .pruning.container import encode_pruned

        return encode_pruned(cache, prune, preset=preset, model=model, config=config, positions=positions,
                             progress=progress, **options)
    config_dict = pipeline_config(preset, **options)
    pipeline = _Pipeline(config_dict)
    layers = cache_layers(cache)
    layout = _layout_for(model, config, layers, pipeline.lossless)
    heads, tokens, dim = layers[0][0].shape
    dtype_name = SUPPORTED_DTYPES[layers[0][0].dtype]
    pos = _positions_of(positions, tokens)
    sections = []
    for i, (keys, values) in progress_bar(list(enumerate(layers)), desc=f"encode {preset}", enabled=progress):
        for kind, x in zip(KINDS, (keys, values)):
            ctx = TensorContext(layer=i, kind=kind, positions=pos, layout=layout)
            sections.append((section_name(i, kind), pipeline.encode_tensor(x.cpu(), ctx, dtype_name)))
    contiguous = bool(tokens == 0 or torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + tokens)))
    if not contiguous:
        sections.append(("positions", _le_bytes(pos.numpy())))
    header = _header(pipeline, layout, dtype_name, len(layers), heads, dim, tokens,
                     {"start": int(pos[0]), "next": int(pos[-1]) + 1, "contiguous": contiguous})
    return write_container(header, sections)


def _header(pipeline, layout, dtype_name, layers, heads, dim, tokens, positions) -> dict:
    return {
        "created_by": f"seqkv {__version__}",
        "pipeline": pipeline.full_config(),
        "model": layout.to_json(),
        "dtype": dtype_name,
        "batch": 1,
        "layers": layers,
        "kv_heads": heads,
        "head_dim": dim,
        "tokens": tokens,
        "positions": positions,
    }


def _json_int(obj: dict, key: str) -> int:
    """A header integer: a JSON int, not a float, bool or string."""
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key!r} must be an integer, got {value!r}")
    return value


class _Parsed:
    """A container whose header has been validated against the v1 schema."""

    def __init__(self, data, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise FormatError(f"expected bytes, got {type(data).__name__}")
        self.container = c = Container(data)
        h = c.header
        try:
            self.dtype = str(h["dtype"])
            self.layers, self.heads, self.dim, self.tokens = (_json_int(h, k) for k in ("layers", "kv_heads", "head_dim", "tokens"))
            self.layout = ModelLayout.from_json(h["model"])
            pos = h["positions"]
            self.start, self.next_position = _json_int(pos, "start"), _json_int(pos, "next")
            self.contiguous = pos["contiguous"]
            if not isinstance(self.contiguous, bool):
                raise TypeError("positions.contiguous must be a boolean")
            self.pipeline_config = h["pipeline"]
            if _json_int(h, "batch") != 1:
                raise FormatError("only batch-1 containers exist in format v1")
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError, ConfigError) as exc:
            raise FormatError(f"header is missing or has invalid fields: {exc}") from None
        if self.dtype not in DTYPES_BY_NAME:
            raise FormatError(f"unknown dtype {self.dtype!r}")
        for name, value, cap in [("layers", self.layers, MAX_LAYERS), ("kv_heads", self.heads, MAX_HEADS),
                                 ("head_dim", self.dim, MAX_HEAD_DIM), ("tokens", self.tokens, MAX_TOKENS)]:
            if not 1 <= value <= cap:
                raise FormatError(f"{name}={value} is outside [1, {cap}]")
        if (self.layout.layers, self.layout.kv_heads, self.layout.head_dim) != (self.layers, self.heads, self.dim):
            raise FormatError("the header's model layout disagrees with its tensor shapes")
        if self.layout.rope_inv_freq and len(self.layout.rope_inv_freq) != self.dim // 2:
            raise FormatError("the RoPE table does not match head_dim")
        decoded = self.layers * 2 * self.heads * self.tokens * self.dim * 4
        if decoded > max_decoded_bytes:
            raise FormatError(f"decoding would need {decoded} bytes, over the max_decoded_bytes={max_decoded_bytes} cap")
        try:
            self.pipeline = _Pipeline(self.pipeline_config)
        except ConfigError as exc:
            raise FormatError(f"the container's pipeline is invalid or unknown to this version: {exc}") from None
        self.pruning = None
        if c.flags & FLAG_PRUNED:
            from .pruning.container import PrunedInfo

            self.pruning = PrunedInfo(self)   # kept positions are per layer, read with the layer
            self.positions = None
        elif self.contiguous:
            if self.next_position != self.start + self.tokens or self.start < 0:
                raise FormatError("positions in the header are inconsistent")
            self.positions = torch.arange(self.start, self.start + self.tokens, dtype=torch.int64)
        else:
            raw = c.section("positions")
            if len(raw) != 8 * self.tokens:
                raise FormatError("the positions section has the wrong length")
            self.positions = torch.from_numpy(np.frombuffer(raw, dtype="<i8").astype(np.int64))
            if self.tokens and (int(self.positions[-1]) + 1 != self.next_position or bool((self.positions[1:] <= self.positions[:-1]).any())):
                raise FormatError("the positions section is inconsistent")

    def decode_layer(self, i: int):
        out = []
        for kind in KINDS:
            ctx = TensorContext(layer=i, kind=kind, positions=self.positions, layout=self.layout)
            payload = self.container.section(section_name(i, kind))
            try:
                out.append(self.pipeline.decode_tensor(payload, ctx, self.dtype, (self.heads, self.tokens, self.dim)))
            except SeqKVError:
                raise
            except (ValueError, TypeError, IndexError, RuntimeError, OverflowError, MemoryError) as exc:
                raise FormatError(f"{section_name(i, kind)}: cannot decode: {exc}") from None
        return tuple(out)


def decode(data, *, device=None, dtype=None, model=None, layers=None, progress: bool = False,
           max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES):
    """Decode container bytes into a ``DynamicCache`` on ``device`` in ``dtype`` (default: the original).

    Pass ``model`` to refuse containers made for another model.  ``layers``
    (an iterable of layer indices) decodes only those layers, in that order.
    The next RoPE position is ``inspect(data)["positions"]["next"]``.
    """
    parsed = _Parsed(data, max_decoded_bytes)
    if model is not None:
        parsed.layout.check_same_model(layout_from_model(model))
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    indices = range(parsed.layers) if layers is None else list(layers)
    for i in indices:
        if not isinstance(i, int) or not 0 <= i < parsed.layers:
            raise ConfigError(f"layer index {i!r} is outside [0, {parsed.layers})")
    if parsed.pruning is not None:
        from .pruning.container import decode_pruned

        return decode_pruned(parsed, indices, device=device, dtype=dtype, progress=progress)
    decoded = [parsed.decode_layer(i) for i in progress_bar(list(indices), desc="decode", enabled=progress)]
    return build_cache(decoded, device=device, dtype=dtype)


def inspect(data) -> dict:
    """Header facts, sizes, ratio vs fp16 and bits/element, without decoding any tensor."""
    parsed = _Parsed(data, max_decoded_bytes=1 << 62)
    c = parsed.container
    # a pruned container is measured against the cache it came from (every source token in fp16)
    tokens = parsed.pruning.source_tokens if parsed.pruning is not None else parsed.tokens
    elements = parsed.layers * 2 * parsed.heads * parsed.dim * tokens
    raw_fp16 = elements * 2
    sizes = c.section_sizes()
    return {
        "format_version": "%d.%d" % c.version,
        "created_by": c.header.get("created_by", ""),
        "preset": parsed.pipeline_config.get("preset"),
        "pipeline": parsed.pipeline_config,
        "model": {k: v for k, v in parsed.layout.to_json().items() if k != "rope_inv_freq"},
        "dtype": parsed.dtype,
        "layers": parsed.layers,
        "kv_heads": parsed.heads,
        "head_dim": parsed.dim,
        "tokens": parsed.tokens,
        "positions": {"start": parsed.start, "next": parsed.next_position, "contiguous": parsed.contiguous},
        "pruning": None if parsed.pruning is None else {
            "level": parsed.pruning.level, "pruner": parsed.pruning.pruner,
            "source_tokens": parsed.pruning.source_tokens,
            "kept_bytes": sum(v for k, v in sizes.items() if k.endswith(".kept"))},
        "total_bytes": c.total_bytes,
        "header_bytes": c.payload_start,
        "raw_fp16_bytes": raw_fp16,
        "ratio_vs_fp16": raw_fp16 / c.total_bytes,
        "bits_per_element": 8 * c.total_bytes / elements,
        "section_bytes": sizes,
        "keys_bytes": sum(v for k, v in sizes.items() if k.endswith(".keys")),
        "values_bytes": sum(v for k, v in sizes.items() if k.endswith(".values")),
    }
