"""The container header: one typed object for both dialects, validated field by field.

Two dialects share the preamble, the section table and this type (docs/format.md §4, §10.1):

* ``cache``: what :func:`seqkv.encode` writes; its pipeline sits under ``"pipeline"``.
* ``store_chunk``: one chunk of a :class:`seqkv.PrefixStore` entry, marked ``"seqkv_store_chunk": 1``; its
  pipeline sits under ``"chunk_pipeline"`` instead, so a cache reader refuses it (a residual section means
  nothing without its base).

The JSON schemas are docs/container-header.schema.json and docs/store-chunk-header.schema.json.  The rule
for the minor version (:func:`required_minor`) is here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError, FormatError
from ..hf_adapter import DTYPES_BY_NAME
from ..layout import ModelLayout
from ..positions import MAX_POSITION
from .container import FLAG_PRUNED
from .pipeline import MAX_TOKENS, Pipeline

MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_HEAD_DIM = 16384
MAX_SPAN = 1 << 40          # a pruned container's positions cover at most this many source positions
MAX_CHUNK_TOKENS = 1 << 20
STORE_CHUNK_FORMAT = 1
PRUNING_HEADER_VERSION = 1
PRUNING_LEVELS = ("token", "layer", "chunk")
CHUNK_MODES = ("p", "r")                    # a store chunk section: plain, or a residual on the base entry
TOKEN_CODES = ("trie", "zstd", "base")
MIN_CHUNK_SCALE, MAX_CHUNK_SCALE = 1e-6, 1e6
# The expansion bound (docs/format.md §3, check 9): a container of n bytes decodes to at most
# MAX_ELEMENTS_PER_BYTE * n elements (layers x 2 x kv_heads x tokens x head_dim), so what a decode allocates and
# how long it runs are proportional to its input.  The token count is in the header only, and the section bytes
# cannot bound it: an ANS stream codes any run of its table's first symbol from state 0 at no cost (§7.2), so a
# stream of 0 words is M such symbols for any M.  Real caches code at 0.5-16 bits per element (0.5-16 elements per
# byte); only a nearly constant cache with tens of thousands of tokens comes near 4096, and the writer refuses
# it (CompressionBoundError) rather than write a container that readers refuse.
MAX_ELEMENTS_PER_BYTE = 4096


def required_minor(flags: int, pipeline: Pipeline) -> int:
    """The lowest 1.x that defines everything a container uses: writers write it, readers demand exactly it
    (the preamble's minor is not under a checksum).  1.0: presets; 1.1 adds the PRUNED flag and the
    calibrated stages; 1.2 allows both in one container; 1.3 adds klt_uniform's token steps."""
    pruned = bool(flags & FLAG_PRUNED)
    if pruned and pipeline.min_minor >= 1:
        return max(2, pipeline.min_minor)
    return max(pipeline.min_minor, 1 if pruned else 0)


@dataclass(frozen=True)
class PositionsInfo:
    start: int
    next: int | None          # the store chunk dialect does not record it
    contiguous: bool


@dataclass(frozen=True)
class ProfileRef:
    """Which calibrated profile a container needs: its codec part's sha256 and size."""
    sha256: str
    bytes: int

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class PruningInfo:
    """The ``pruning`` object of a pruned container (flag PRUNED, docs/format.md §9.1)."""
    level: str
    pruner: dict
    source_tokens: int
    version: int = PRUNING_HEADER_VERSION

    def to_json(self) -> dict:
        return {"version": self.version, "level": self.level, "pruner": self.pruner,
                "source_tokens": self.source_tokens}


@dataclass(frozen=True)
class ChunkInfo:
    """The store chunk dialect's own fields (docs/format.md §10.1)."""
    modes: str                 # one of CHUNK_MODES per section layer.{i}.{keys,values}, in that order
    base: str | None           # the base entry's key when a section is a residual
    token_code: str            # how the ``tokens`` section codes the chunk's token ids
    scale: float | None = None  # the calibrated pipeline's fixed quantizer knob


@dataclass(frozen=True)
class Header:
    pipeline: dict             # the full pipeline config (every stage option spelled out)
    layout: ModelLayout
    dtype: str
    layers: int
    kv_heads: int
    head_dim: int
    tokens: int                # tokens per section (a pruned container: the widest head's)
    positions: PositionsInfo
    created_by: str = ""
    profile: ProfileRef | None = None
    rate_control: dict | None = None
    pruning: PruningInfo | None = None
    chunk: ChunkInfo | None = None   # set: the store chunk dialect

    @property
    def is_store_chunk(self) -> bool:
        return self.chunk is not None

    def elements(self) -> int:
        """The elements of every tensor (a pruned container: as if every head kept the widest head's tokens)."""
        return self.layers * 2 * self.kv_heads * self.tokens * self.head_dim

    def decoded_bytes(self) -> int:
        """What decoding every tensor allocates, as float32."""
        return self.elements() * 4

    def check_expansion(self, total_bytes: int, error=FormatError) -> None:
        """The expansion bound (MAX_ELEMENTS_PER_BYTE): raises ``error`` unless a container of ``total_bytes``
        bytes may hold this header's elements.  The reader checks it at open, the writer before it returns."""
        if self.elements() > MAX_ELEMENTS_PER_BYTE * total_bytes:
            raise error(f"{self.elements()} elements ({self.layers} layers x 2 x {self.kv_heads} heads x "
                        f"{self.tokens} tokens x {self.head_dim}) in a container of {total_bytes} bytes: over the "
                        f"format's bound of {MAX_ELEMENTS_PER_BYTE} elements per byte")

    # -- to JSON ---------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The header object without its section table (the writer adds ``sections``)."""
        if self.chunk is not None:
            out = {
                "seqkv_store_chunk": STORE_CHUNK_FORMAT, "chunk_pipeline": self.pipeline, "model": self.layout.to_json(),
                "dtype": self.dtype, "layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "tokens": self.tokens,
                "positions": {"start": self.positions.start, "contiguous": self.positions.contiguous},
                "modes": self.chunk.modes, "base": self.chunk.base, "token_code": self.chunk.token_code,
            }
            if self.profile is not None:
                out["calibrated"] = {"profile": self.profile.to_json(), "scale": self.chunk.scale}
            return out
        out = {
            "created_by": self.created_by, "pipeline": self.pipeline, "model": self.layout.to_json(),
            "dtype": self.dtype, "batch": 1, "layers": self.layers, "kv_heads": self.kv_heads,
            "head_dim": self.head_dim, "tokens": self.tokens,
            "positions": {"start": self.positions.start, "next": self.positions.next,
                          "contiguous": self.positions.contiguous},
        }
        if self.profile is not None:
            out["profile"] = self.profile.to_json()
        if self.rate_control is not None:
            out["rate_control"] = self.rate_control
        if self.pruning is not None:
            out["pruning"] = self.pruning.to_json()
        return out

    # -- from JSON -------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, h: dict, flags: int = 0) -> "Header":
        """Validate a parsed header object (either dialect); FormatError on anything out of place."""
        chunk_dialect = "seqkv_store_chunk" in h
        try:
            if chunk_dialect and (h["seqkv_store_chunk"] != STORE_CHUNK_FORMAT or isinstance(h["seqkv_store_chunk"], bool)):
                raise ValueError("not a store chunk of a known version")
            pipeline = h["chunk_pipeline"] if chunk_dialect else h["pipeline"]
            if not isinstance(pipeline, dict):
                raise TypeError("the pipeline must be an object")
            dtype = h["dtype"]
            if not isinstance(dtype, str):
                raise TypeError("dtype must be a string")
            layers, heads, dim, tokens = (_json_int(h, k) for k in ("layers", "kv_heads", "head_dim", "tokens"))
            layout = ModelLayout.from_json(h["model"])
            pos = h["positions"]
            if not isinstance(pos, dict):
                raise TypeError("positions must be an object")
            start = _json_int(pos, "start")
            next_position = None if chunk_dialect else _json_int(pos, "next")
            contiguous = pos["contiguous"]
            if not isinstance(contiguous, bool):
                raise TypeError("positions.contiguous must be a boolean")
            created_by = "" if chunk_dialect else h.get("created_by", "")
            if not chunk_dialect and _json_int(h, "batch") != 1:
                raise FormatError("only batch-1 containers exist in format v1")
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError, ConfigError) as exc:
            raise FormatError(f"{'store chunk ' if chunk_dialect else ''}header is missing or has invalid fields: {exc}") from None
        if dtype not in DTYPES_BY_NAME:
            raise FormatError(f"unknown dtype {dtype!r}")
        max_tokens = MAX_CHUNK_TOKENS if chunk_dialect else MAX_TOKENS
        for name, value, cap in [("layers", layers, MAX_LAYERS), ("kv_heads", heads, MAX_HEADS),
                                 ("head_dim", dim, MAX_HEAD_DIM), ("tokens", tokens, max_tokens)]:
            if not 1 <= value <= cap:
                raise FormatError(f"{name}={value} is outside [1, {cap}]")
        if (layout.layers, layout.kv_heads, layout.head_dim) != (layers, heads, dim):
            raise FormatError("the header's model layout disagrees with its tensor shapes")
        if layout.rope_inv_freq and len(layout.rope_inv_freq) != dim // 2:
            raise FormatError("the RoPE table does not match head_dim")
        if not 0 <= start <= MAX_POSITION - tokens or (next_position is not None and not 0 <= next_position <= MAX_POSITION):
            raise FormatError(f"positions start/next are outside [0, {MAX_POSITION}]")
        positions = PositionsInfo(start, next_position, contiguous)
        fields = dict(pipeline=pipeline, layout=layout, dtype=dtype, layers=layers, kv_heads=heads, head_dim=dim,
                      tokens=tokens, positions=positions, created_by=str(created_by))
        if chunk_dialect:
            return cls(**fields, **_chunk_fields(h, layers))
        return cls(**fields, profile=_profile_ref(h.get("profile")), rate_control=h.get("rate_control"),
                   pruning=_pruning_info(h, flags, tokens, positions))

    def check_contents(self, pipeline: Pipeline, minor: int, flags: int) -> None:
        """Cross-checks between the header, its pipeline and the preamble (the reader calls this once it
        has built the pipeline)."""
        if self.chunk is None and minor != required_minor(flags, pipeline):
            raise FormatError(f"the preamble says format 1.{minor} but the contents are format "
                              f"1.{required_minor(flags, pipeline)}")
        if pipeline.needs_profile != (self.profile is not None):
            raise FormatError("the header's profile reference does not match its pipeline")
        if self.chunk is not None and pipeline.needs_profile and self.chunk.scale is None:
            raise FormatError("a calibrated store chunk needs its scale")


def _json_int(obj: dict, key: str) -> int:
    """A header integer: a JSON int, not a float, bool or string."""
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key!r} must be an integer, got {value!r}")
    return value


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _profile_ref(raw) -> ProfileRef | None:
    if raw is None:
        return None
    if not (isinstance(raw, dict) and isinstance(raw.get("sha256"), str) and _is_count(raw.get("bytes"))):
        raise FormatError(f"invalid profile reference {raw!r}")
    return ProfileRef(raw["sha256"], raw["bytes"])


def _pruning_info(h: dict, flags: int, tokens: int, positions: PositionsInfo) -> PruningInfo | None:
    if not flags & FLAG_PRUNED:
        if positions.contiguous and positions.next != positions.start + tokens:
            raise FormatError("positions in the header are inconsistent")
        return None
    try:
        p = h["pruning"]
        version = _json_int(p, "version")
        level, pruner, source_tokens = p["level"], dict(p["pruner"]), _json_int(p, "source_tokens")
        if not isinstance(level, str):
            raise TypeError("level must be a string")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FormatError(f"the pruning header is missing or invalid: {exc}") from None
    if version != PRUNING_HEADER_VERSION:
        raise FormatError(f"pruning header version {version} is unknown to this reader")
    if level not in PRUNING_LEVELS:
        raise FormatError(f"unknown pruning level {level!r}")
    if positions.contiguous:
        raise FormatError("a pruned container must have positions.contiguous == false")
    span = positions.next - positions.start
    if not 1 <= span <= MAX_SPAN:
        raise FormatError("pruned positions start/next are out of range")
    if not tokens <= source_tokens <= MAX_TOKENS:
        raise FormatError("pruning source_tokens is inconsistent with the positions")
    return PruningInfo(level=level, pruner=pruner, source_tokens=source_tokens, version=version)


def _chunk_fields(h: dict, layers: int) -> dict:
    try:
        modes, base, token_code = h["modes"], h["base"], h["token_code"]
        calibrated = h.get("calibrated")
        profile, scale = None, None
        if calibrated is not None:
            profile = _profile_ref(calibrated["profile"])
            scale = calibrated["scale"]
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not MIN_CHUNK_SCALE <= scale <= MAX_CHUNK_SCALE:
                raise ValueError(f"invalid scale {scale!r}")
    except (KeyError, TypeError, ValueError, AttributeError, FormatError) as exc:
        raise FormatError(f"store chunk header is invalid: {exc}") from None
    if not isinstance(modes, str) or len(modes) != 2 * layers or set(modes) - set(CHUNK_MODES):
        raise FormatError("store chunk section modes are invalid")
    if ("r" in modes) != (base is not None) or (base is not None and not isinstance(base, str)):
        raise FormatError("store chunk base and section modes disagree")
    if token_code not in TOKEN_CODES or (token_code == "base") != (base is not None):
        raise FormatError("store chunk token coding is invalid")
    return {"profile": profile, "chunk": ChunkInfo(modes=modes, base=base, token_code=token_code,
                                                   scale=None if scale is None else float(scale))}
