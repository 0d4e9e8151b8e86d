"""One KV chunk as one self-describing, length-prefixed blob (the bytes of the LMCache serde).

    offset  size  field
    0       8     magic   89 53 51 4B 56 43 4B 0A   ("\\x89SQKVCK\\n")
    8       8     length  (u64, little-endian): N, the bytes of the container that follows
    16      N     a seqkv container (docs/format.md) of the chunk: its layers' keys and values,
                  [kv_heads, tokens, head_dim] each, at the RoPE positions the header records

Why the length: LMCache reads a blob back into a buffer sized by ``estimate_serialized_size`` (an upper
bound), so a reader may see the blob followed by stale bytes, and an L2 adapter may hand back fewer bytes than
were written; the frame says where the blob ends, and a buffer shorter than ``16 + N`` is a truncated blob
(FormatError).  The container is self-describing (preset or profile reference, dtype, shape, model
fingerprint), so a reader needs no serde options to decode it, only the profile a calibrated one names.

LMCache gives a serde no token positions.  The chunk's start is recovered from its keys where a calibrated
profile of the model is at hand (:mod:`.chunk_positions`; ``positions="recover"``, the default), else the
chunk is coded at chunk-local positions ``0 .. tokens-1`` (``positions="local"``).  Either is exact for the RoPE
transform (undone and redone at the positions the container records); true positions only make the calibrated
codec's KLT fit better, and tell which chunk starts the sequence: only that one keeps its first tokens (the
attention sinks) exact, as a whole-cache container does.  docs/lmcache.md has the figures.
"""
from __future__ import annotations

import dataclasses
import json
import struct

import torch

from ..codec import decode, encode
from ..errors import ConfigError, DecodeError, FormatError, NonFiniteError
from ..format.container import PREAMBLE_SIZE
from ..hf_adapter import SUPPORTED_DTYPES, build_cache, cache_layers
from ..layout import layout_from_model
from .chunk_layout import ChunkShape
from .chunk_positions import StartFinder

MAGIC = b"\x89SQKVCK\n"
FRAME = struct.Struct("<8sQ")     # magic, container length
FRAME_SIZE = FRAME.size           # 16

# the lossless worst case, per docs/format.md: every section is its raw bit patterns plus one mode byte (§8),
# and the JSON header is the layout, a section table entry per section and a few small fields
LOSSLESS_SECTION_OVERHEAD = 1
SECTION_ENTRY_MAX = 128           # {"crc32c":<10 digits>,"length":<20>,"name":"layer.<10>.values","offset":<20>},
HEADER_FIXED_MAX = 4096           # everything in the header but the layout and the section table
POSITIONS = ("recover", "local")


class ChunkMismatchError(DecodeError):
    """The blob is a valid chunk, but not of the shape or dtype of the buffer it is read into."""


def frame(container: bytes) -> bytes:
    return FRAME.pack(MAGIC, len(container)) + container


def is_framed(prefix) -> bool:
    """Whether ``prefix`` (at least the first 8 bytes of a buffer) starts a seqkv chunk blob."""
    return bytes(prefix[:len(MAGIC)]) == MAGIC


def unframe(buffer) -> memoryview:
    """The container inside a blob that starts ``buffer`` (which may run on past the blob's end)."""
    view = memoryview(buffer).cast("B")
    if len(view) < FRAME_SIZE:
        raise FormatError(f"truncated seqkv chunk blob: {len(view)} bytes, the frame alone is {FRAME_SIZE}")
    magic, length = FRAME.unpack_from(view, 0)
    if magic != MAGIC:
        raise FormatError("not a seqkv chunk blob (bad magic bytes)")
    if FRAME_SIZE + length > len(view):
        raise FormatError(f"truncated seqkv chunk blob: its frame says {length} bytes of container, "
                          f"{len(view) - FRAME_SIZE} present")
    return view[FRAME_SIZE:FRAME_SIZE + length]


class ChunkCodec:
    """Codes chunks of one model with one choice of codec: a ``preset``, or a calibrated ``profile`` with a
    rate target (``target_kl``, the default 0.01, or ``scale``).  ``config``: the model's transformers config.
    ``positions``: "recover" (find each chunk's start from its keys with ``reference``, a calibrated profile of
    the model: by default the ``profile``) or "local" (every chunk starts at 0 and keeps its sink tokens).

    A lossy encode that cannot carry a chunk (NaN/Inf, values out of the codec's range) or that would come out
    larger than the lossless worst case writes the chunk losslessly instead (``fallbacks`` counts them), so
    every blob fits :meth:`max_blob_bytes`."""

    def __init__(self, config, *, preset: str | None = None, profile=None, target_kl: float | None = None,
                 scale: float | None = None, positions: str = "recover", reference=None):
        if positions not in POSITIONS:
            raise ConfigError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
        self.config = config
        self.layout = layout_from_model(config)
        self.preset, self.profile = preset, profile
        self.fallbacks = 0
        if profile is not None:
            target = {"scale": scale} if scale is not None else {"target_kl": 0.01 if target_kl is None else target_kl}
            self._encode_kwargs = dict(profile=profile, **target)
            # chunks found to start past position 0 have no attention sinks to keep exact
            self._sinkless_kwargs = dict(self._encode_kwargs, profile=profile_without_sinks(profile))
        else:
            self._encode_kwargs = dict(preset=preset or "lossless")
            self._sinkless_kwargs = dict(self._encode_kwargs, sink_tokens=0)
        reference = profile if reference is None else reference
        self.start_finder = None
        if positions == "recover" and reference is not None and not self.lossless:
            self.start_finder = StartFinder(self.layout, reference,
                                            getattr(config, "max_position_embeddings", None) or 1 << 17)
        self._layout_json_bytes = len(json.dumps(self.layout.to_json()))

    @property
    def lossless(self) -> bool:
        return self.profile is None and self._encode_kwargs["preset"] == "lossless"

    def max_blob_bytes(self, shape: ChunkShape, dtype: torch.dtype) -> int:
        """An upper bound on the bytes of any blob :meth:`encode` writes for a chunk of ``shape``/``dtype``:
        the lossless worst case (raw bit patterns), which every lossy blob is held under too."""
        sections = 2 * shape.layers
        raw_section = shape.kv_heads * shape.tokens * shape.head_dim * dtype.itemsize
        header = HEADER_FIXED_MAX + self._layout_json_bytes + sections * SECTION_ENTRY_MAX
        return FRAME_SIZE + PREAMBLE_SIZE + header + sections * (raw_section + LOSSLESS_SECTION_OVERHEAD)

    def encode(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> bytes:
        """The blob of one chunk's per-layer (keys, values) [kv_heads, tokens, head_dim]."""
        cache = build_cache(layers)
        if not self.lossless:
            start = 0 if self.start_finder is None else self.start_finder.start([k for k, _v in layers])
            kwargs = self._encode_kwargs if start == 0 else self._sinkless_kwargs
            try:
                container = encode(cache, config=self.config, positions=start, **kwargs)
            except NonFiniteError:   # NaN/Inf or out-of-range values: only lossless carries them
                container = None
            limit = self.max_blob_bytes(_shape_of(layers), layers[0][0].dtype) - FRAME_SIZE
            if container is not None and len(container) <= limit:
                return frame(container)
            self.fallbacks += 1
        return frame(encode(cache, preset="lossless", config=self.config))

    def decode(self, blob, shape: ChunkShape, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (keys, values) of the blob at the start of ``blob``, checked against the model (a
        ModelMismatchError for another model's blob) and against the ``shape`` and ``dtype`` expected."""
        cache = decode(unframe(blob), model=self.config, profile=self.profile)
        layers = cache_layers(cache)
        got = _shape_of(layers)
        if (got.layers, got.tokens, got.kv_heads, got.head_dim) != (shape.layers, shape.tokens, shape.kv_heads,
                                                                    shape.head_dim):
            raise ChunkMismatchError(f"the blob holds {got.tokens} tokens x {got.layers} layers x {got.kv_heads} "
                                     f"heads x head_dim {got.head_dim}, the buffer is for {shape.tokens} x "
                                     f"{shape.layers} x {shape.kv_heads} x {shape.head_dim}")
        if layers[0][0].dtype != dtype:
            raise ChunkMismatchError(f"the blob holds {SUPPORTED_DTYPES[layers[0][0].dtype]} values, the buffer is "
                                     f"{dtype}: refusing to convert a KV chunk silently")
        return layers


def profile_without_sinks(profile):
    """A copy of ``profile`` that keeps no sink tokens exact.  Its codec part (the bytes containers refer to, and
    so their profile reference) is ``profile``'s own: the sink count is recorded in each container's pipeline,
    so ``profile`` itself decodes what the copy encodes."""
    codec = profile.codec_bytes()   # cached on the profile: the copy below shares it, and so its hash
    copy = dataclasses.replace(profile, sink_tokens=0)
    if copy.codec_bytes() is not codec:
        raise ConfigError("this profile does not cache its codec part; cannot drop its sink tokens")
    return copy


def _shape_of(layers) -> ChunkShape:
    heads, tokens, dim = layers[0][0].shape
    return ChunkShape("kv", len(layers), int(tokens), int(heads), int(dim))

