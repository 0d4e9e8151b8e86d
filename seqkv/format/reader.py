"""The only container reader, lazy like safetensors' ``safe_open``: opening checks the preamble, the header and
the section table; each layer is decoded only when asked for.

    reader = seqkv.format.open_container(blob, profile=profile)   # profile: calibrated containers only
    reader.header.tokens, reader.section_sizes()
    keys, values = reader.layer(3)                                  # [H, T, D] each
    parts = reader.section_symbols(3, "keys")                       # sinks, side info, residuals, symbols

Checks, in order (docs/format.md §3): length, magic, version, flags, header size cap, header checksum,
header fields and bounds, the decoded-size cap, the pipeline, the minor version the contents need, the
profile reference, the section plan, positions; a section's checksum when it is read.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError, FormatError, SeqKVError
from ..profile import Profile, ProfileMismatchError
from ..stages.base import CodingState, TensorContext
from .container import FLAG_PRUNED, Container
from .header import Header
from .kept_positions import decode_kept
from .pipeline import KINDS, Pipeline, SectionSymbols, section_name
from .plan import check_sections, decode_per_head, kept_section_name, section_order
from .residual import decode_residual, is_calibrated

DEFAULT_MAX_DECODED_BYTES = 16 << 30
DIALECTS = ("cache", "store_chunk")
# what decoding a section may raise besides SeqKVError when its bytes are hostile: reported as FormatError
# (LookupError: IndexError, KeyError; ArithmeticError: OverflowError, ZeroDivisionError; RuntimeError: RecursionError)
DECODE_FAILURES = (ValueError, TypeError, LookupError, ArithmeticError, RuntimeError, MemoryError, AttributeError)


def open_container(data, *, profile=None, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
                   dialect: str = "cache") -> "ContainerReader":
    """Open container bytes for reading (nothing is decoded yet)."""
    return ContainerReader(data, profile=profile, max_decoded_bytes=max_decoded_bytes, dialect=dialect)


class ContainerReader:
    def __init__(self, data, *, profile=None, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
                 dialect: str = "cache"):
        if dialect not in DIALECTS:
            raise ConfigError(f"dialect must be one of {DIALECTS}, got {dialect!r}")
        if isinstance(max_decoded_bytes, bool) or not isinstance(max_decoded_bytes, int) or max_decoded_bytes < 0:
            raise ConfigError(f"max_decoded_bytes must be an integer >= 0, got {max_decoded_bytes!r}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise FormatError(f"expected bytes, got {type(data).__name__}")
        self.container = c = Container(data)
        self.version, self.flags = c.version, c.flags
        self.header = h = Header.from_json(c.header, c.flags)
        if dialect == "cache" and h.is_store_chunk:
            raise FormatError("this is a store chunk (a PrefixStore entry's payload), not a cache container: "
                              "read it through the store")
        if dialect == "store_chunk" and not h.is_store_chunk:
            raise FormatError("store chunk header is invalid: not a store chunk of a known version")
        h.check_expansion(c.total_bytes)
        if h.decoded_bytes() > max_decoded_bytes:
            raise FormatError(f"decoding would need {h.decoded_bytes()} bytes, over the "
                              f"max_decoded_bytes={max_decoded_bytes} cap")
        try:
            self.pipeline = Pipeline(h.pipeline)
            self.pipeline.check_head_dim(h.head_dim)
        except ConfigError as exc:
            raise FormatError(f"the container's pipeline is invalid or unknown to this version: {exc}") from None
        h.check_contents(self.pipeline, c.version[1], c.flags)
        if h.is_store_chunk and not ((h.profile is not None) == is_calibrated(self.pipeline) == self.pipeline.needs_profile):
            raise FormatError("store chunk header is invalid: the calibrated field does not match the pipeline")
        self.pruned = bool(c.flags & FLAG_PRUNED)
        check_sections(c.sections, section_order(h, self.pruned))
        self.positions = None if self.pruned else self._read_positions()
        # cross-layer prediction: the last decoded reconstruction per kind
        self.state = CodingState(chain={}, scale=None if h.chunk is None else h.chunk.scale)
        if profile is not None:
            self.use_profile(profile)

    # -- what the header and the section table say ----------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return self.container.total_bytes

    @property
    def header_bytes(self) -> int:
        """Preamble and header."""
        return self.container.payload_start

    def section_names(self) -> list[str]:
        return list(self.container.sections)

    def section_sizes(self) -> dict[str, int]:
        return self.container.section_sizes()

    def section(self, name: str) -> memoryview:
        """A section's payload, its checksum verified."""
        return self.container.section(name)

    def _read_positions(self) -> torch.Tensor:
        h = self.header
        start = h.positions.start
        if h.positions.contiguous:
            return torch.arange(start, start + h.tokens, dtype=torch.int64)
        raw = self.section("positions")
        if len(raw) != 8 * h.tokens:
            raise FormatError("the positions section has the wrong length")
        pos = torch.from_numpy(np.frombuffer(raw, dtype="<i8").astype(np.int64))
        if bool((pos[1:] <= pos[:-1]).any()) or int(pos[0]) < 0:
            raise FormatError("the positions section is inconsistent")
        if h.is_store_chunk:
            if int(pos[0]) != start:
                raise FormatError("store chunk positions are inconsistent")
        elif int(pos[0]) != start or int(pos[-1]) + 1 != h.positions.next:
            raise FormatError("the positions section is inconsistent")
        return pos

    def use_profile(self, profile) -> None:
        """Check and attach the profile a calibrated container needs (ignored by the others)."""
        ref = self.header.profile
        if ref is None:
            return
        if profile is None:
            if self.header.is_store_chunk:
                raise ProfileMismatchError(
                    f"this store chunk was coded with a calibrated profile (sha256 {ref.sha256[:16]}…):"
                    " open the store with profile=seqkv.Profile.load(path)")
            raise ProfileMismatchError(
                f"this container was encoded with a calibrated profile (sha256 {ref.sha256[:16]}…, "
                f"{ref.bytes} bytes): pass profile=seqkv.Profile.load(path) to decode it")
        if not isinstance(profile, Profile):
            raise ConfigError(f"profile must be a seqkv.Profile, got {type(profile).__name__}")
        profile.check_ref(ref.to_json())
        h = self.header
        # the profile the container names made it: a shape other than the profile's is a damaged header
        if (profile.layout.layers, profile.layout.kv_heads, profile.layout.head_dim) != (h.layers, h.kv_heads, h.head_dim):
            raise FormatError(f"the container's shape ({h.layers} layers x {h.kv_heads} heads x {h.head_dim}) is not "
                              f"the shape of the profile it names ({profile.layout.layers} x {profile.layout.kv_heads}"
                              f" x {profile.layout.head_dim})")
        self.state.profile = profile

    @property
    def profile(self):
        return self.state.profile

    # -- decoding --------------------------------------------------------------------------------------
    def _ctx(self, i: int, kind: str, positions) -> TensorContext:
        return TensorContext(layer=i, kind=kind, positions=positions, layout=self.header.layout, state=self.state)

    def decode_section(self, i: int, kind: str, decode):
        """``decode(the section's bytes)`` for layer ``i``'s ``kind``; a failure other than a SeqKVError becomes a
        FormatError naming the section (hostile bytes are the container's problem, never another exception)."""
        try:
            return decode(self.section(section_name(i, kind)))
        except SeqKVError:
            raise
        except DECODE_FAILURES as exc:
            raise FormatError(f"{section_name(i, kind)}: cannot decode: {exc}") from None

    def _chain_up_to(self, i: int) -> None:
        """A chained section needs the previous layer's reconstruction (and a repeat-predicted one layer 0's
        symbols): decode the missing ones in order."""
        if not (self.pipeline.cross_layer or self.pipeline.repeat) or i == 0:
            return
        chain = self.state.chain
        if all(chain.get(k, (-1,))[0] == i - 1 for k in KINDS):
            return
        done = min(chain.get(k, (-1,))[0] for k in KINDS)
        for j in range(done + 1 if done < i else 0, i):
            self._any_layer(j)

    def _any_layer(self, i: int):
        return self._pruned_layer(i) if self.pruned else self._layer(i)

    def _check_layer_index(self, i) -> None:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.header.layers:
            raise ConfigError(f"layer index {i!r} is outside [0, {self.header.layers})")

    def layer(self, i: int, symbols_out: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s (keys, values), [H, T, D] each, in the container's dtype.  ``symbols_out`` (lossy
        only) receives each section's :class:`SectionSymbols` under ``(i, kind)``."""
        self._check_layer_index(i)
        if self.pruned:
            raise ConfigError("a pruned container keeps tokens per head: read it with pruned_layer(i)")
        if self.header.is_store_chunk:
            raise ConfigError("a store chunk's layers are read with chunk_layers(base)")
        self._chain_up_to(i)
        return self._layer(i, symbols_out)

    def _layer(self, i: int, symbols_out: dict | None = None):
        h = self.header
        shape = (h.kv_heads, h.tokens, h.head_dim)
        return tuple(self.decode_section(i, kind, lambda payload, kind=kind: self.pipeline.decode_tensor(
            payload, self._ctx(i, kind, self.positions), h.dtype, shape, symbols_out)) for kind in KINDS)

    def section_symbols(self, i: int, kind: str) -> SectionSymbols:
        """A lossy section's parts (exact sinks, quantizer side info, coded residuals, symbols)."""
        if self.pipeline.lossless:
            raise ConfigError("a lossless container has no quantized symbols")
        out: dict = {}
        self.layer(i, symbols_out=out)
        return out[(i, kind)]

    def pruned_layer(self, i: int):
        """A pruned container's layer ``i``: per head ``(keys [n, D], values [n, D])``, and the positions
        each head kept."""
        self._check_layer_index(i)
        if not self.pruned:
            raise ConfigError("this container is not pruned: read it with layer(i)")
        self._chain_up_to(i)
        return self._pruned_layer(i)

    def _pruned_layer(self, i: int):
        h = self.header
        span = h.positions.next - h.positions.start
        lists, shared = decode_kept(self.section(kept_section_name(i)), h.kv_heads, h.tokens, h.positions.start,
                                    span, kept_section_name(i))
        if self.pipeline.needs_profile and not shared:
            raise FormatError(f"{kept_section_name(i)}: a calibrated pruned container keeps the same positions in every head")
        tensors = []
        for kind in KINDS:
            if shared:
                x = self.decode_section(i, kind, lambda payload, kind=kind: self.pipeline.decode_tensor(
                    payload, self._ctx(i, kind, lists[0]), h.dtype, (h.kv_heads, len(lists[0]), h.head_dim)))
                tensors.append(list(x))
            else:
                tensors.append(self.decode_section(i, kind, lambda payload, kind=kind: decode_per_head(
                    self.pipeline, payload, lists, i, kind, h.layout, h.dtype, h.head_dim)))
        return list(zip(tensors[0], tensors[1])), lists

    def start_chunk(self, base, what: str) -> tuple:
        """Before decoding a store chunk's sections (here or in :mod:`seqkv.format.chunk_run`): the chunk, its
        profile and its ``base`` ((layers, positions) of the base entry, for residual sections) are checked and
        the cross-layer chain is reset.  Returns ``(base_layers, base_positions)``, ``(None, None)`` without base."""
        h = self.header
        if not h.is_store_chunk:
            raise ConfigError(f"{what} reads store chunks; read a cache container with layer(i)")
        if h.profile is not None and self.state.profile is None:
            self.use_profile(None)  # raises the clear ProfileMismatchError
        base_layers = base_pos = None
        if h.chunk.base is not None:
            if base is None:
                raise FormatError("this chunk is a residual and needs its base")
            base_layers, base_pos = base
            if len(base_layers) != h.layers or tuple(base_layers[0][0].shape) != (h.kv_heads, h.tokens, h.head_dim) \
                    or base_layers[0][0].dtype != getattr(torch, h.dtype):
                raise FormatError("the base chunk does not match this chunk's shape or dtype")
        self.state.chain = {}
        return base_layers, base_pos

    def chunk_layers(self, base=None) -> list:
        """A store chunk's layers [(K, V)] of [H, T, D]; ``base``: (layers, positions) of the base entry when
        the chunk has residual sections."""
        h = self.header
        base_layers, base_pos = self.start_chunk(base, "chunk_layers()")
        shape = (h.kv_heads, h.tokens, h.head_dim)
        out = []
        for i in range(h.layers):
            pair = []
            for j, kind in enumerate(KINDS):
                ctx = self._ctx(i, kind, self.positions)
                if h.chunk.modes[2 * i + j] == "p":
                    def decode(payload, ctx=ctx):
                        return self.pipeline.decode_tensor(payload, ctx, h.dtype, shape)
                else:
                    def decode(payload, ctx=ctx, j=j, i=i):
                        return decode_residual(self.pipeline, payload, base_layers[i][j], ctx, base_pos, h.dtype, shape)
                pair.append(self.decode_section(i, kind, decode))
            out.append(tuple(pair))
        return out

    def token_section(self) -> bytes | None:
        """A store chunk's coded token ids (None when they are its base's)."""
        return None if self.header.chunk.token_code == "base" else bytes(self.section("tokens"))
