"""PrefixStore: a store of compressed KV caches with exact-prefix sharing and near-duplicate reuse.

A cache of tokens ``t_0 .. t_{n-1}`` is cut into chunks (:mod:`seqkv.store.chunking`: every
``chunk_tokens`` tokens, or content-defined boundaries); chunk ``i`` holds the KV of its tokens for every
layer with their true positions and is stored under ``key_i`` of a sha256 hash chain over the token ids
(:mod:`seqkv.store.keys`).  Two caches that share a prefix share the entries of its whole chunks, so an
exact prefix is stored once.  ``longest_prefix`` walks the chain and returns the longest stored prefix
(whole chunks only) as one ``DynamicCache``.

Near-duplicates: every plainly coded chunk is also indexed by a content hash of its tokens alone.  A new
chunk whose tokens are stored under another prefix (or at other positions) is coded as a residual against
that entry, its *base* (:mod:`seqkv.store.chunk_codec`), section by section where that is smaller.  The
store keeps a reference record per (base, referrer); a referenced base is never evicted.

Codecs: a preset (or a full pipeline config), or the calibrated codec of a model profile
(``PrefixStore(url, model=m, profile=p, codec_options={"scale": s})``) with one fixed quantizer scale
for every chunk; its residuals are coded in the profile's KLT domain with the plain sections' steps.
The profile's sha256 is part of the namespace (so of every key) and of every entry.

Every entry is an envelope ``MAGIC | u32 header length | JSON header | chunk payload`` (docs/format.md,
"Store entries").  The JSON header carries sha256 digests of the chunk's tokens, of the whole token prefix
up to the chunk's end (computed independently of the key chain) and of the positions, the namespace
digest and a sha256 of the payload; all are compared on every read: a key collision gives a shorter
match, never a wrong cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
import time
from urllib.parse import unquote, urlparse

import numpy as np
import torch

from ..errors import ConfigError, DecodeError, ModelMismatchError, StorageError
from ..positions import positions_of
from . import keys as _keys

MAGIC = b"SKVSTORE\x01"
ENVELOPE_VERSION = 2
MAX_BASE_DEPTH = 4
MAX_HEADER_BYTES = 1 << 24
META_NAME_RE = re.compile(r"^(refs|content|score)/[0-9a-f]{64}(/[0-9a-f]{64}\.[0-9a-f]{16})?$")
META_FOLDER_RE = re.compile(r"^(refs|content|score)/[0-9a-f]{64}$")
DTYPE_NAMES = ("float32", "float16", "bfloat16")


class CorruptEntryError(StorageError):
    """A stored entry failed its checks or did not decode; it has been quarantined."""


class MissingBaseError(StorageError):
    """A residual entry's base is missing, corrupt or not what the residual was coded against."""


class Backend:
    """What a storage backend provides.  Keys are 64-char lowercase hex strings."""

    name = "abstract"

    def get(self, key: str):  # -> bytes | None
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        return self.get(key) is not None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Store ``data`` atomically unless ``key`` exists; True when this call created it."""
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        raise NotImplementedError

    def touch(self, key: str, when: float) -> None:
        """Record ``when`` (seconds since the epoch) as the entry's last use."""
        raise NotImplementedError

    def list(self):  # -> list[(key, size_bytes, last_used)]
        raise NotImplementedError

    def size(self) -> int:
        return sum(size for _, size, _ in self.list())

    def quarantine(self, key: str) -> str:
        """Move the entry out of the store's namespace (kept for inspection); returns where it went."""
        raise NotImplementedError

    def quarantined(self) -> list:
        return []

    def close(self) -> None:
        pass

    # -- small side records (reference records, the content index, reuse scores) ---------------
    # ``name`` is ``<kind>/<64 hex>`` or ``<kind>/<64 hex>/<64 hex>.<nonce>`` (see META_NAME_RE).
    def meta_set(self, name: str, data: bytes) -> None:
        """Write a side record (atomic replace)."""
        raise NotImplementedError

    def meta_get(self, name: str):  # -> bytes | None
        raise NotImplementedError

    def meta_delete(self, name: str) -> bool:
        raise NotImplementedError

    def meta_list(self, folder: str) -> list:
        """Names of the side records directly under ``folder`` (``<kind>/<hex>``), last part only."""
        raise NotImplementedError

    # reference records: one record per (base, referrer, writer nonce), so that no two writers share one
    def add_ref(self, base: str, ref_id: str) -> None:
        self.meta_set(f"refs/{base}/{ref_id}", b"")

    def remove_ref(self, base: str, ref_id: str) -> bool:
        return self.meta_delete(f"refs/{base}/{ref_id}")

    def refs(self, base: str) -> list:
        return self.meta_list(f"refs/{base}")

    def ref_bases(self) -> list:
        """Keys that have reference records."""
        raise NotImplementedError

    # the near-duplicate index: content hash of a chunk's tokens -> key of a stored chunk with them
    def content_get(self, digest: str):
        data = self.meta_get(f"content/{digest}")
        return data.decode("ascii") if data else None

    def content_set(self, digest: str, key: str) -> None:
        self.meta_set(f"content/{digest}", key.encode("ascii"))

    def content_delete(self, digest: str, key: str) -> None:
        """Drop the index record if it still names ``key``."""
        if self.content_get(digest) == key:
            self.meta_delete(f"content/{digest}")

    # expected-reuse scores (trie counts) used by eviction
    def set_score(self, key: str, score: int) -> None:
        self.meta_set(f"score/{key}", str(int(score)).encode("ascii"))

    def score(self, key: str) -> int:
        data = self.meta_get(f"score/{key}")
        try:
            return int(data) if data else 0
        except ValueError:
            return 0

    def delete_score(self, key: str) -> None:
        self.meta_delete(f"score/{key}")

    # eviction protocol: hide an entry (atomic move out of sight), then check its references, then drop
    # it or put it back.  A writer adds its reference record BEFORE it reads the base, so either it sees
    # the base gone (and codes plainly) or the evictor sees the record (and restores the base).
    def hide(self, key: str):  # -> token | None (None: the entry was not there)
        raise NotImplementedError

    def unhide(self, key: str, token) -> None:
        raise NotImplementedError

    def drop_hidden(self, token) -> None:
        raise NotImplementedError


def open_backend(url: str, *, fsync: bool = False, **options) -> Backend:
    """The backend named by ``url``: file:///path, redis://host:port/db or s3://bucket/prefix."""
    if not isinstance(url, str):
        raise ConfigError(f"the store URL must be a string, got {type(url).__name__}")
    scheme = urlparse(url).scheme
    if scheme == "file":
        from .backend_dir import DirBackend

        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"file URLs must be file:///absolute/path, got {url!r}")
        if options:
            raise ConfigError(f"unknown options for the directory backend: {sorted(options)}")
        return DirBackend(unquote(parsed.path), fsync=fsync)
    if scheme in ("redis", "rediss"):
        from .backend_redis import RedisBackend

        return RedisBackend(url, **options)
    if scheme == "s3":
        from .backend_s3 import S3Backend

        return S3Backend(url, **options)
    raise ConfigError(f"unsupported store URL {url!r}: use file:///path, redis://host:port/db or s3://bucket/prefix")


def _pack_entry(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return MAGIC + struct.pack("<I", len(head)) + head + payload


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _unpack_entry(data: bytes, key: str):
    """(header, payload) of an entry, or raise ValueError describing what is wrong."""
    data = bytes(data)
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        raise ValueError("bad magic (not a seqkv store entry, or truncated)")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    if n > MAX_HEADER_BYTES or start + n > len(data):
        raise ValueError("truncated envelope header")
    try:
        header = json.loads(data[start:start + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"envelope header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("v") != ENVELOPE_VERSION:
        raise ValueError("unknown envelope version")
    payload = data[start + n:]
    if header.get("payload_bytes") != len(payload):
        raise ValueError(f"payload has {len(payload)} bytes, the envelope says {header.get('payload_bytes')} (truncated?)")
    if header.get("payload_sha256") != hashlib.sha256(payload).hexdigest():
        raise ValueError("payload checksum mismatch")
    if header.get("key") != key:
        raise ValueError("entry stored under another key")
    for field in ("tokens_sha256", "prefix_sha256", "positions_sha256", "content", "namespace"):
        if not isinstance(header.get(field), str) or not _HEX64.match(header[field]):
            raise ValueError(f"envelope field {field!r} is invalid")
    for field in ("index", "start", "end"):
        v = header.get(field)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"envelope field {field!r} is invalid")
    base, ref = header.get("base"), header.get("base_ref")
    if (base is None) != (ref is None) or (base is not None and (not isinstance(base, str) or not _HEX64.match(base)
                                                                  or not isinstance(ref, str) or not META_NAME_RE.match(f"refs/{base}/{ref}"))):
        raise ValueError("envelope base reference is invalid")
    return header, payload


def _ref_nonce() -> str:
    """16 hex digits: the creation time in milliseconds (11) and 20 random bits (5); gc reads the age."""
    return f"{int(time.time() * 1000) & 0xFFFFFFFFFFF:011x}{os.urandom(3).hex()[:5]}"


def _ref_age(ref_id: str, now: float) -> float:
    return now - int(ref_id.rsplit(".", 1)[1][:11], 16) / 1000.0


def _envelope_version(data: bytes):
    """The envelope version of ``data``, or None when it is not readable as an envelope."""
    try:
        (n,) = struct.unpack_from("<I", data, len(MAGIC))
        if not bytes(data[:len(MAGIC)]) == MAGIC or n > MAX_HEADER_BYTES:
            return None
        return json.loads(bytes(data[len(MAGIC) + 4:len(MAGIC) + 4 + n]).decode("utf-8")).get("v")
    except (struct.error, UnicodeDecodeError, ValueError, AttributeError):
        return None


def _positions_digest(pos) -> str:
    return hashlib.sha256(b"seqkv-positions\x00" + np.asarray(pos, dtype="<i8").tobytes()).hexdigest()


def scale_for_kl(cache, profile, target_kl: float = 0.01, *, model=None) -> float:
    """The calibrated quantizer's ``scale`` that rate control picks for ``cache`` at ``target_kl``
    (predicted mean KL): resolve a KL target once, on a representative cache, into the fixed scale a
    ``PrefixStore(profile=..., codec_options={"scale": s})`` codes every chunk with."""
    from ..codec import encode, inspect

    return float(inspect(encode(cache, profile=profile, model=model, target_kl=target_kl))["rate_control"]["scale"])


class PrefixStore:
    """A KV store with exact-prefix sharing and near-duplicate reuse.  See the module docstring.

    ``url``: ``file:///path`` (local directory), ``redis://host:port/db`` (option ``key_prefix``) or
    ``s3://bucket/prefix`` (options ``endpoint_url``, ``aws_access_key_id``, ``aws_secret_access_key``,
    ``region_name``).  ``model`` gives the fingerprint mixed into every key and is checked on decode;
    lossy presets need it.

    * ``preset`` and ``codec_options`` (encode options such as ``step``) pick the codec; or pass a full
      ``pipeline_config`` instead.  All of it is part of every key.
    * ``profile`` (a calibrated :class:`seqkv.Profile` of the model): the calibrated codec (pre-RoPE, the
      profile's KLT, profile-stepped quantizer with cross-layer and temporal prediction) instead of a
      preset.  ``codec_options`` must then give ``scale``, the quantizer's one knob, fixed for the whole
      store: every chunk of every session is coded with the same steps, so a residual and its base, or two
      sessions, never differ in quality (a per-chunk rate control would pick another step for each chunk).
      To aim at a KL, resolve the scale once on a representative cache with :func:`scale_for_kl`.  Other
      options: ``rounding``, ``predict``, ``cross_layer``.  The profile's sha256 is part of every key (a
      store opened with another profile never sees these entries) and of every entry, whose decoding
      refuses another profile (``ProfileMismatchError``).
    * ``chunk_tokens``, ``chunking`` ("fixed" or "content", see :mod:`seqkv.store.chunking`) and, with
      content chunking, ``boundary_tokens`` (ids a chunk always ends before, e.g. the chat template's
      message-start token).
    * ``near_duplicates``: code chunks stored under another prefix as residuals (default True).
    * ``token_trie`` (a ``seqkv_ext.trie.TokenTrie``) and ``vocab_size``: entropy-code each entry's token
      ids with the trie's probabilities (a shared profile: readers of the ids need the same trie);
      without it the ids are zstd-coded.  The store also keeps its own in-memory trie of the token
      sequences it sees (puts and lookups): its counts are the expected-reuse scores of eviction.
    * ``max_bytes`` bounds the stored bytes (eviction after each put and in ``gc()``: lowest expected
      reuse first, then least recently used; referenced bases never).
    * ``fsync`` makes the directory backend fsync every entry.
    """

    def __init__(self, url: str, *, model=None, preset: str = "lossless", chunk_tokens: int = 256,
                 max_bytes=None, fsync: bool = False, chunking: str = "fixed", near_duplicates: bool = True,
                 codec_options=None, pipeline_config=None, token_trie=None, vocab_size=None, boundary_tokens=None,
                 profile=None, **backend_options):
        from seqkv_ext.trie import TokenTrie

        from ..format.pipeline import Pipeline
        from ..layout import layout_from_model
        from ..presets import PRESETS, pipeline_config as make_pipeline_config
        from .chunking import CHUNKINGS

        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; one of {sorted(PRESETS)}")
        if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
        if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0):
            raise ConfigError(f"max_bytes must be None or a non-negative integer, got {max_bytes!r}")
        if chunking not in CHUNKINGS:
            raise ConfigError(f"chunking must be one of {CHUNKINGS}, got {chunking!r}")
        boundary_tokens = [] if boundary_tokens is None else list(boundary_tokens)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in boundary_tokens):
            raise ConfigError("boundary_tokens must be a list of token ids")
        if boundary_tokens and chunking != "content":
            raise ConfigError("boundary_tokens need chunking='content'")
        if codec_options is not None and not isinstance(codec_options, dict):
            raise ConfigError("codec_options must be a dict of encode options")
        self.profile, self.scale = profile, None
        if profile is not None:
            if pipeline_config is not None:
                raise ConfigError("give profile= or pipeline_config, not both")
            cfg, codec_key = self._calibrated_config(profile, model, codec_options)
            preset = cfg["preset"]
        elif pipeline_config is not None:
            if codec_options:
                raise ConfigError("give codec_options or pipeline_config, not both")
            if Pipeline(pipeline_config).needs_profile:  # validates
                raise ConfigError("this pipeline reads a calibrated profile: pass profile= (and codec_options={'scale': s})")
            cfg = json.loads(json.dumps(pipeline_config))
            preset = cfg.get("preset", "custom") if isinstance(cfg.get("preset"), str) else "custom"
            codec_key = {"pipeline": cfg}
        else:
            cfg = make_pipeline_config(preset, **(codec_options or {}))
            codec_key = dict(codec_options or {})
        if model is None and cfg["mode"] != "lossless":
            raise ConfigError("lossy presets need the model (RoPE parameters): pass model=, or use preset='lossless'")
        if token_trie is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 2):
            raise ConfigError("token_trie needs vocab_size (the tokenizer's vocabulary size)")
        self.url = url
        self.model = model
        self.preset = preset
        self.pipeline = cfg
        self.codec_options = codec_key
        self.chunk_tokens = chunk_tokens
        self.chunking = chunking
        self.near_duplicates = bool(near_duplicates)
        self.boundary_tokens = sorted(set(boundary_tokens))
        self.max_bytes = max_bytes
        self.token_trie = token_trie
        self.vocab_size = vocab_size
        self.layout = layout_from_model(model) if model is not None else None
        self.fingerprint = self.layout.fingerprint if self.layout is not None else ""
        self.weights_digest = self.layout.weights_digest if self.layout is not None else ""
        self.backend = open_backend(url, fsync=fsync, **backend_options)
        self.reuse_trie = TokenTrie()
        self._lock = threading.Lock()
        self._counters = {"lookups": 0, "hits": 0, "tokens_requested": 0, "tokens_hit": 0, "bytes_saved": 0,
                          "puts": 0, "chunks_written": 0, "chunks_reused": 0, "bytes_written": 0,
                          "chunks_residual": 0, "residual_bytes_saved": 0, "token_bytes": 0, "tokens_coded": 0,
                          "token_bytes_zstd3": 0, "evicted": 0, "quarantined": 0, "collisions": 0}
        self._last_dtype = None

    def _calibrated_config(self, profile, model, codec_options):
        """(pipeline config, namespace codec fields) of the calibrated codec with a fixed scale."""
        from ..layout import layout_from_model
        from ..presets import calibrated_pipeline_config
        from ..profile import Profile
        from ..rate_control import parse_target

        if not isinstance(profile, Profile):
            raise ConfigError(f"profile must be a seqkv.Profile, got {type(profile).__name__}")
        if model is None:
            raise ConfigError("a calibrated profile needs the model: pass model=")
        profile.check_model(layout_from_model(model))
        options = dict(codec_options or {})
        if "scale" not in options:
            raise ConfigError("with profile=, give codec_options={'scale': s}: one fixed quantizer knob for every chunk "
                              "(seqkv.store.scale_for_kl(cache, profile, target_kl) resolves a KL target to one)")
        self.scale = parse_target(scale=options.pop("scale")).value
        cfg = calibrated_pipeline_config(profile.sink_tokens, **options)
        return cfg, dict(options, scale=self.scale, profile=profile.hash)

    # -- keys ---------------------------------------------------------------------------------
    def namespace(self, dtype: str) -> bytes:
        return _keys.namespace(fingerprint=self.fingerprint, weights_digest=self.weights_digest, dtype=dtype,
                               preset=self.preset, chunk_tokens=self.chunk_tokens, chunking=self.chunking,
                               codec_options=self.codec_options, boundary_tokens=self.boundary_tokens)

    def bounds_for(self, token_ids) -> list:
        from .chunking import chunk_bounds

        return chunk_bounds(_keys.token_array(token_ids), self.chunk_tokens, self.chunking, self.boundary_tokens)

    def keys_for(self, token_ids, dtype: str = "float32") -> list:
        """The hex key of every chunk of ``token_ids`` (deterministic across processes and machines)."""
        return _keys.chain_keys(token_ids, self.namespace(dtype), self.bounds_for(token_ids))

    # -- helpers --------------------------------------------------------------------------------
    def _count(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                self._counters[k] += v

    def _quarantine(self, key: str, reason: str):
        where = self.backend.quarantine(key)
        self._count(quarantined=1)
        return CorruptEntryError(
            f"store entry {key[:16]}… is corrupt ({reason}); it has been quarantined"
            + (f" to {where}" if where else " (it was already gone)") + " and will be rewritten by the next put")

    def _unpack(self, data: bytes, key: str, ns_digest: str):
        """(header, payload) or raise (CorruptEntryError after quarantine; ModelMismatchError)."""
        try:
            header, payload = _unpack_entry(data, key)
        except ValueError as exc:
            raise self._quarantine(key, str(exc)) from None
        if header["namespace"] != ns_digest:
            raise ModelMismatchError(
                f"store entry {key[:16]}… was written for another model, dtype, codec, profile or chunking "
                "(namespace digest differs); refusing it")
        return header, payload

    def _check(self, data: bytes, key: str, ns_digest: str, ids, start: int, end: int, pos_digest: str, index: int):
        """'ok', 'mismatch' (a collision: another prefix under this key) or raise."""
        header, payload = self._unpack(data, key, ns_digest)
        if (header["tokens_sha256"] != _keys.tokens_digest(ids[start:end])
                or header["prefix_sha256"] != _keys.prefix_digest(ids[:end])
                or (header["index"], header["start"], header["end"]) != (index, start, end)
                or header["positions_sha256"] != pos_digest):
            return "mismatch", None, None
        return "ok", header, payload

    def _code_tokens(self, chunk_ids) -> tuple:
        if self.token_trie is not None:
            from ..token_coding import encode_tokens

            return encode_tokens(chunk_ids, self.token_trie, self.vocab_size), "trie"
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(_keys.token_bytes(chunk_ids)), "zstd"

    def _decode_tokens(self, data: bytes, code: str, n: int) -> list:
        if code == "trie":
            from ..token_coding import decode_tokens

            if self.token_trie is None:
                raise ConfigError("this entry's token ids are trie-coded: open the store with token_trie=")
            return decode_tokens(data, self.token_trie, self.vocab_size, n)
        import zstandard

        try:
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=4 * n)
        except zstandard.ZstdError as exc:
            raise DecodeError(f"token section: {exc}") from None
        if len(raw) != 4 * n:
            raise DecodeError("token section has the wrong length")
        return np.frombuffer(raw, dtype="<i4").astype(np.int64).tolist()

    def _touch_chain(self, chain, ids, bounds) -> None:
        # expected reuse = how many of the sequences this store has seen pass through the chunk's prefix;
        # deeper chunks get older times: LRU (the tie-break) evicts the tail of a chain before its head
        base = time.time()
        for j, (key, (_, e)) in enumerate(zip(reversed(chain), reversed(bounds[:len(chain)]))):
            self.backend.touch(key, base + j * 1e-6)
            self.backend.set_score(key, self.reuse_trie.count(ids[:e]))

    def _parse_payload(self, key: str, payload):
        from .chunk_codec import ParsedChunk

        try:
            return ParsedChunk(payload)
        except DecodeError as exc:
            raise self._quarantine(key, f"{type(exc).__name__}: {exc}") from None

    def _load(self, key: str, ns_digest: str, tokens_sha: str, depth: int, memo: dict):
        """(layers, positions) of the entry ``key`` (a residual's base, recursively), checked."""
        if key in memo:
            return memo[key]
        if depth > MAX_BASE_DEPTH:
            raise MissingBaseError(f"residual chain deeper than {MAX_BASE_DEPTH} at {key[:16]}…")
        data = self.backend.get(key)
        if data is None:  # an evictor may hold it aside for a moment while it checks references
            time.sleep(0.05)
            data = self.backend.get(key)
        if data is None:
            raise MissingBaseError(f"residual base {key[:16]}… is missing from the store")
        try:
            header, payload = self._unpack(data, key, ns_digest)
        except (CorruptEntryError, ModelMismatchError) as exc:
            raise MissingBaseError(f"residual base {key[:16]}… is unusable: {exc}") from None
        if header["tokens_sha256"] != tokens_sha:
            raise MissingBaseError(f"residual base {key[:16]}… holds other tokens than its referrer")
        parsed = self._parse_payload(key, payload)
        base = None
        if parsed.base is not None:
            if parsed.base != header["base"]:
                raise self._quarantine(key, "the payload's base differs from the envelope's")
            base = self._load(parsed.base, ns_digest, tokens_sha, depth + 1, memo)
        if self.layout is not None:
            parsed.layout.check_same_model(self.layout, what="store entry")
        try:
            layers = parsed.decode(base, self.profile)
        except DecodeError as exc:
            raise self._quarantine(key, f"{type(exc).__name__}: {exc}") from None
        memo[key] = (layers, parsed.positions)
        return memo[key]

    # -- put ------------------------------------------------------------------------------------
    def put(self, token_ids, cache, *, positions=None) -> dict:
        """Store ``cache`` (a batch-1 DynamicCache of ``token_ids``); only missing chunks are written."""
        from ..hf_adapter import SUPPORTED_DTYPES, cache_layers
        from .chunk_codec import encode_chunk

        ids = _keys.token_array(token_ids)
        layers = cache_layers(cache)
        n = layers[0][0].shape[1]
        if len(ids) != n:
            raise ConfigError(f"{len(ids)} token ids for a cache of {n} tokens")
        if self.layout is not None:
            heads, _, dim = layers[0][0].shape
            if (self.layout.layers, self.layout.kv_heads, self.layout.head_dim) != (len(layers), heads, dim):
                raise ModelMismatchError("the cache's shape is not the store model's")
        from ..layout import ModelLayout

        layout = self.layout or ModelLayout(layers=len(layers), kv_heads=layers[0][0].shape[0],
                                            head_dim=layers[0][0].shape[2], rope_type="unknown")
        pos_t = positions_of(positions, n)
        pos = pos_t.tolist()
        dtype = SUPPORTED_DTYPES[layers[0][0].dtype]
        ns = self.namespace(dtype)
        ns_digest = hashlib.sha256(ns).hexdigest()
        bounds = self.bounds_for(ids)
        chain = _keys.chain_keys(ids, ns, bounds)
        self.reuse_trie.insert(ids)
        out = {"tokens": n, "chunks": len(chain), "chunks_written": 0, "chunks_reused": 0, "bytes_written": 0,
               "bytes_reused": 0, "collisions": 0, "chunks_residual": 0, "residual_bytes_saved": 0,
               "token_bytes": 0, "tokens_coded": 0, "token_bytes_zstd3": 0}
        prev = _keys.root_key(ns).hex()
        done = []
        for i, ((s, e), key) in enumerate(zip(bounds, chain)):
            pd = _positions_digest(pos[s:e])
            existing = self.backend.get(key)
            if existing is not None:
                try:
                    verdict, _, _ = self._check(existing, key, ns_digest, ids, s, e, pd, i)
                except CorruptEntryError:
                    existing = None  # quarantined: write it again below
                else:
                    if verdict != "ok":
                        out["collisions"] += 1
                        break  # another prefix owns this key: later chunks would never be reachable
                    out["chunks_reused"] += 1
                    out["bytes_reused"] += len(existing)
                    done.append(key)
                    prev = key
                    continue
            blob, info = self._encode_entry(key, prev, i, s, e, ids, pos_t, pd, layers, layout, dtype, ns, ns_digest)
            if self.backend.put_if_absent(key, blob):
                out["chunks_written"] += 1
                out["bytes_written"] += len(blob)
                out["token_bytes"] += info["token_bytes"]
                out["tokens_coded"] += info["tokens_coded"]
                out["token_bytes_zstd3"] += info["token_bytes_zstd3"]
                if info["base"] is not None:
                    out["chunks_residual"] += 1
                    out["residual_bytes_saved"] += info["saved"]
                else:
                    self._index_content(info["content"], key)
            else:  # a concurrent writer stored it first
                if info["base"] is not None:
                    self.backend.remove_ref(info["base"], info["base_ref"])
                again = self.backend.get(key)
                verdict = "ok"
                if again is not None:
                    verdict, _, _ = self._check(again, key, ns_digest, ids, s, e, pd, i)
                if verdict != "ok":
                    out["collisions"] += 1
                    break
                out["chunks_reused"] += 1
                out["bytes_reused"] += len(again) if again is not None else 0
            done.append(key)
            prev = key
        self._touch_chain(done, ids, bounds)
        self._last_dtype = dtype
        self._count(puts=1, chunks_written=out["chunks_written"], chunks_reused=out["chunks_reused"],
                    bytes_written=out["bytes_written"], bytes_saved=out["bytes_reused"], collisions=out["collisions"],
                    chunks_residual=out["chunks_residual"], residual_bytes_saved=out["residual_bytes_saved"],
                    token_bytes=out["token_bytes"], tokens_coded=out["tokens_coded"],
                    token_bytes_zstd3=out["token_bytes_zstd3"])
        if self.max_bytes is not None:
            out["evicted"] = self.gc()["evicted"]
        return out

    def _index_content(self, content: str, key: str) -> None:
        current = self.backend.content_get(content)
        if current is None or (current != key and not self.backend.exists(current)):
            self.backend.content_set(content, key)

    def _encode_entry(self, key, prev, i, s, e, ids, pos_t, pd, layers, layout, dtype, ns, ns_digest):
        from .chunk_codec import encode_chunk

        chunk_ids = ids[s:e]
        tok_sha = _keys.tokens_digest(chunk_ids)
        content = _keys.content_digest(chunk_ids, ns)
        base = ref_id = None
        base_data = None
        if self.near_duplicates:
            candidate = self.backend.content_get(content)
            if candidate is not None and candidate != key:
                ref_id = f"{key}.{_ref_nonce()}"
                # the reference record goes first: an evictor that hides the base afterwards sees it
                self.backend.add_ref(candidate, ref_id)
                try:
                    blayers, bpos = self._load(candidate, ns_digest, tok_sha, 1, {})
                    base, base_data = candidate, (candidate, blayers, bpos)
                except (MissingBaseError, CorruptEntryError, ModelMismatchError, DecodeError):
                    self.backend.remove_ref(candidate, ref_id)
                    ref_id = None
        cfg = self.pipeline
        if cfg["mode"] == "lossy" and s > 0:
            cfg = dict(cfg, sink_tokens=0)  # attention sinks are the first tokens of a sequence only
        token_blob, token_code = (None, "base") if base is not None else self._code_tokens(chunk_ids)
        chunk = [(k[:, s:e], v[:, s:e]) for k, v in layers]
        payload, info = encode_chunk(chunk, pos_t[s:e], cfg, layout, dtype,
                                     token_section=token_blob, token_code=token_code, base=base_data,
                                     profile=self.profile, scale=self.scale)
        if base is not None and info["residual_sections"] == 0:
            # plain coding was smaller everywhere: no base, and the tokens go in after all
            self.backend.remove_ref(base, ref_id)
            base = ref_id = None
            token_blob, token_code = self._code_tokens(chunk_ids)
            payload, info = encode_chunk(chunk, pos_t[s:e], cfg, layout, dtype, token_section=token_blob,
                                         token_code=token_code, base=None, profile=self.profile, scale=self.scale)
        header = {"v": ENVELOPE_VERSION, "key": key, "parent": prev, "index": i, "start": s, "end": e,
                  "namespace": ns_digest, "tokens_sha256": tok_sha, "prefix_sha256": _keys.prefix_digest(ids[:e]),
                  "positions_sha256": pd, "content": content, "base": base, "base_ref": ref_id,
                  "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}
        blob = _pack_entry(header, payload)
        saved = info["plain_section_bytes"] - info["section_bytes"]
        zstd_bytes = 0
        if token_blob is not None:  # what zstd-3 makes of the same ids, for the stats
            import zstandard

            zstd_bytes = len(zstandard.ZstdCompressor(level=3).compress(_keys.token_bytes(chunk_ids)))
        return blob, {"base": base, "base_ref": ref_id, "content": content, "saved": saved,
                      "token_bytes": len(token_blob) if token_blob is not None else 0,
                      "tokens_coded": (e - s) if token_blob is not None else 0, "token_bytes_zstd3": zstd_bytes}

    # -- lookup -----------------------------------------------------------------------------------
    def _walk(self, ids, dtype: str, pos):
        ns = self.namespace(dtype)
        ns_digest = hashlib.sha256(ns).hexdigest()
        found = []
        bounds = self.bounds_for(ids)
        for i, ((s, e), key) in enumerate(zip(bounds, _keys.chain_keys(ids, ns, bounds))):
            data = self.backend.get(key)
            if data is not None and _envelope_version(data) == 1:
                # written by seqkv before envelope v2 (no residuals): moved aside as a miss, rewritten by a put
                self.backend.quarantine(key)
                data = None
            if data is None:
                break
            verdict, header, payload = self._check(data, key, ns_digest, ids, s, e, _positions_digest(pos[s:e]), i)
            if verdict != "ok":
                self._count(collisions=1)
                break
            found.append((key, s, e, header, payload))
        return found, ns_digest, bounds

    def longest_prefix(self, token_ids, *, dtype=None, positions=None, device=None):
        """(n_tokens, DynamicCache or None): the longest stored prefix of ``token_ids`` (whole chunks).

        ``dtype`` ("float32"/"float16"/"bfloat16" or a torch dtype) picks the namespace; by default
        every dtype is tried and the longest match wins.  ``positions`` (default 0, 1, 2, ...) must
        match the stored positions.
        """
        from ..hf_adapter import SUPPORTED_DTYPES, build_cache

        ids = _keys.token_array(token_ids)
        self._count(lookups=1, tokens_requested=len(ids))
        if len(ids) == 0:
            return 0, None
        self.reuse_trie.insert(ids)
        pos = positions_of(positions, len(ids)).tolist()
        if dtype is None:
            dtypes = ([self._last_dtype] if self._last_dtype else []) + [d for d in DTYPE_NAMES if d != self._last_dtype]
        else:
            name = SUPPORTED_DTYPES.get(dtype, dtype)
            if name not in DTYPE_NAMES:
                raise ConfigError(f"dtype must be one of {DTYPE_NAMES}, got {dtype!r}")
            dtypes = [name]
        best, best_ns, best_bounds = [], None, None
        for d in dtypes:
            found, ns_digest, bounds = self._walk(ids, d, pos)
            if len(found) > len(best):
                best, best_ns, best_bounds = found, ns_digest, bounds
        if not best:
            return 0, None
        per_layer = None
        memo: dict = {}
        for key, s, e, header, payload in best:
            parsed = self._parse_payload(key, payload)
            if self.layout is not None:
                parsed.layout.check_same_model(self.layout, what="store entry")
            if parsed.base != header["base"]:
                raise self._quarantine(key, "the payload's base differs from the envelope's")
            base = None
            if parsed.base is not None:
                try:
                    base = self._load(parsed.base, best_ns, header["tokens_sha256"], 1, memo)
                except MissingBaseError as exc:
                    self.backend.remove_ref(header["base"], header["base_ref"])
                    raise self._quarantine(key, f"its residual base cannot be used: {exc}") from None
            try:
                layers = parsed.decode(base, self.profile)
            except DecodeError as exc:
                raise self._quarantine(key, f"{type(exc).__name__}: {exc}") from None
            if parsed.tokens != e - s or layers[0][0].shape[1] != e - s:
                raise self._quarantine(key, f"it decodes to {parsed.tokens} tokens, not {e - s}")
            if not torch.equal(parsed.positions, torch.as_tensor(pos[s:e], dtype=torch.int64)):
                raise self._quarantine(key, "its payload's positions differ from its envelope's")
            if per_layer is None:
                per_layer = [([k], [v]) for k, v in layers]
            else:
                if len(layers) != len(per_layer):
                    raise self._quarantine(key, "its layer count differs from the previous chunks'")
                for acc, (k, v) in zip(per_layer, layers):
                    acc[0].append(k)
                    acc[1].append(v)
        merged = [(torch.cat(ks, dim=1), torch.cat(vs, dim=1)) for ks, vs in per_layer]
        n = best[-1][2]
        self._touch_chain([k for k, _, _, _, _ in best], ids, best_bounds)
        self._count(hits=1, tokens_hit=n)
        return n, build_cache(merged, device=device)

    def tokens_of(self, key: str, dtype: str = "float32") -> list:
        """The token ids an entry carries (following residual bases), decoded from its token section."""
        ns_digest = hashlib.sha256(self.namespace(dtype)).hexdigest()
        want = None
        for _ in range(MAX_BASE_DEPTH + 1):
            data = self.backend.get(key)
            if data is None:
                raise MissingBaseError(f"entry {key[:16]}… is missing")
            header, payload = self._unpack(data, key, ns_digest)
            if want is not None and header["tokens_sha256"] != want:
                raise MissingBaseError(f"residual base {key[:16]}… holds other tokens than its referrer")
            want = header["tokens_sha256"]
            parsed = self._parse_payload(key, payload)
            if parsed.base is None:
                ids = self._decode_tokens(parsed.token_section(), parsed.token_code, parsed.tokens)
                if _keys.tokens_digest(ids) != want:
                    raise self._quarantine(key, "its token ids do not match their digest")
                return ids
            key = parsed.base
        raise MissingBaseError(f"residual chain deeper than {MAX_BASE_DEPTH}")

    # -- maintenance --------------------------------------------------------------------------------
    def evict(self, key: str) -> bool:
        """Remove one entry unless a residual still references it; True when removed.  Its own base
        reference (if any) is released."""
        if self.backend.refs(key):
            return False
        data = self.backend.get(key)
        token = self.backend.hide(key)
        if token is None:
            return False
        if self.backend.refs(key):  # a writer took a reference meanwhile: put it back
            self.backend.unhide(key, token)
            return False
        self.backend.drop_hidden(token)
        header = None
        if data is not None:
            try:
                header, _ = _unpack_entry(data, key)
            except ValueError:
                header = None
        if header is not None:
            if header.get("base") is not None:
                self.backend.remove_ref(header["base"], header["base_ref"])
            self.backend.content_delete(header["content"], key)
        self.backend.delete_score(key)
        return True

    def drop_stale_refs(self, older_than: float = 3600.0) -> int:
        """Remove reference records older than ``older_than`` seconds whose referrer is not stored (a writer
        that crashed between taking the reference and writing its entry, or an entry quarantined since).
        Younger records are kept: their writer may still be encoding."""
        now, dropped = time.time(), 0
        for base in self.backend.ref_bases():
            for ref_id in self.backend.refs(base):
                try:
                    if _ref_age(ref_id, now) <= older_than:
                        continue
                except (ValueError, IndexError):
                    pass  # not a name this version writes: judge it by its referrer alone
                referrer = ref_id.split(".", 1)[0]
                data = self.backend.get(referrer)
                alive = False
                if data is not None:
                    try:
                        header, _ = _unpack_entry(data, referrer)
                        alive = header.get("base") == base and header.get("base_ref") == ref_id
                    except ValueError:
                        alive = True  # let the read path quarantine it first
                if not alive and self.backend.remove_ref(base, ref_id):
                    dropped += 1
        return dropped

    def gc(self, max_bytes=None, *, stale_refs_after: float = 3600.0) -> dict:
        """Evict entries until the store holds at most ``max_bytes`` (default: the store's budget): lowest
        expected reuse (trie count of the entry's prefix) first, least recently used among equals; never
        a base that a residual still references.  Evicting a chunk only shortens later matches.  Reference
        records left by crashed writers are dropped first (:meth:`drop_stale_refs`)."""
        budget = self.max_bytes if max_bytes is None else max_bytes
        stale = self.drop_stale_refs(stale_refs_after) if stale_refs_after is not None else 0
        entries = self.backend.list()
        total = sum(size for _, size, _ in entries)
        evicted = freed = 0
        if budget is not None and total > budget:
            remaining = sorted(((self.backend.score(k), last, k, size) for k, size, last in entries))
            progress = True
            while total > budget and progress:  # evicting a residual can free its base for the next pass
                progress = False
                left = []
                for item in remaining:
                    if total <= budget:
                        left.append(item)
                        continue
                    _, _, key, size = item
                    if self.evict(key):
                        evicted += 1
                        freed += size
                        total -= size
                        progress = True
                    else:
                        left.append(item)
                remaining = left
        self._count(evicted=evicted)
        return {"evicted": evicted, "bytes_freed": freed, "bytes_stored": total, "entries": len(entries) - evicted,
                "stale_refs_dropped": stale}

    def stats(self) -> dict:
        """Entries and bytes in the backend, and this store object's counters."""
        entries = self.backend.list()
        with self._lock:
            c = dict(self._counters)
        c.update(entries=len(entries), bytes_stored=sum(size for _, size, _ in entries),
                 hit_rate=(c["hits"] / c["lookups"]) if c["lookups"] else 0.0,
                 token_hit_rate=(c["tokens_hit"] / c["tokens_requested"]) if c["tokens_requested"] else 0.0,
                 token_bits_per_token=(8 * c["token_bytes"] / c["tokens_coded"]) if c["tokens_coded"] else 0.0,
                 token_bits_per_token_zstd3=(8 * c["token_bytes_zstd3"] / c["tokens_coded"]) if c["tokens_coded"] else 0.0,
                 backend=self.backend.name, max_bytes=self.max_bytes)
        return c

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
