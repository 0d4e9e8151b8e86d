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

Every entry is an envelope (:mod:`seqkv.store.envelope`, docs/format.md "Store entries") whose JSON header
carries sha256 digests of the chunk's tokens, of the whole token prefix up to the chunk's end (computed
independently of the key chain) and of the positions, the namespace digest and a sha256 of the payload;
all are compared on every read: a key collision gives a shorter match, never a wrong cache.

Hostile input and crashes:

* a ``put`` is all or nothing: every missing chunk is encoded AND decoded back (the decoded form checked:
  shape, positions, bit-exact for lossless, finite for lossy) before the first one is written, so values
  the codec cannot carry are an :class:`seqkv.EncodeError` and nothing is written; where a write fails
  midway, the entries this put created are evicted again (best effort) before the error is raised;
* every argument is checked first (:mod:`seqkv.store.arguments`): only :class:`seqkv.SeqKVError`
  subclasses leave the public methods;
* a stored entry that fails its checks or does not decode (whatever the decoder raises) is quarantined
  and a :class:`CorruptEntryError` raised; the next lookup returns the shorter prefix;
* a reader that loses a race with eviction (a residual and its base evicted between its walk and its
  decode) returns the prefix before that chunk and quarantines nothing;
* ``gc`` reclaims what crashed processes leave (:mod:`seqkv.store.leftovers`).

The layers below: a :class:`~seqkv.store.backend.Backend` (blob primitives, picked by URL scheme), the side
records over it (:mod:`seqkv.store.metadata`), entries set aside (:mod:`seqkv.store.entries`), crash
leftovers (:mod:`seqkv.store.leftovers`) and the counters of :meth:`PrefixStore.stats`
(:mod:`seqkv.store.stats`).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import zstandard

from ..codec import encode, inspect
from ..errors import ConfigError, DecodeError, EncodeError, ModelMismatchError, SeqKVError, StorageError
from ..format.pipeline import Pipeline
from ..hf_adapter import SUPPORTED_DTYPES, build_cache
from ..layout import ModelLayout, layout_from_model
from ..presets import PRESETS, calibrated_pipeline_config, pipeline_config as make_pipeline_config
from ..profile import Profile
from ..rate_control import parse_target
from ..token_coding import decode_tokens, encode_tokens
from . import arguments as _args
from . import keys as _keys
from . import leftovers as _leftovers
from .arguments import DTYPE_NAMES
from .backend import open_backend
from .chunk_codec import ParsedChunk, encode_chunk
from ..format.chunk_run import all_finite, assemble
from .chunking import CHUNKINGS, chunk_bounds
from .entries import drop_hidden, hide, quarantine, unhide
from .envelope import ENVELOPE_VERSION, envelope_version, pack_entry, ref_nonce, unpack_entry
from .leftovers import LEFTOVERS_AFTER, STALE_REFS_AFTER
from .metadata import Metadata
from .stats import StoreStats

MAX_BASE_DEPTH = 4
SWEEP_INTERVAL = 60.0  # seconds between the leftover sweeps of the gc that follows a put (an explicit gc() always sweeps)
# failures of the process itself, never blamed on stored bytes or on the values given
_NOT_DATA_ERRORS = (MemoryError, RecursionError, KeyboardInterrupt, SystemExit)

__all__ = ["DTYPE_NAMES", "MAX_BASE_DEPTH", "CorruptEntryError", "MissingBaseError", "PrefixStore", "scale_for_kl"]


class CorruptEntryError(StorageError):
    """A stored entry failed its checks or did not decode; it has been quarantined."""


class MissingBaseError(StorageError):
    """A residual entry's base is missing, corrupt or not what the residual was coded against."""


class _Raced(Exception):
    """A chunk found by the walk was evicted (or replaced) before it could be decoded."""


def scale_for_kl(caches, profile, target_kl: float = 0.01, *, model=None, token_ids=None,
                 closed_loop: bool | None = None) -> float:
    """The fixed scale a ``PrefixStore(profile=..., codec_options={"scale": s})`` codes every chunk with,
    resolved once from ``target_kl`` on representative caches: rate control runs on each of ``caches`` (one
    DynamicCache or a list) and the finest scale wins, so every one of them meets the target.  With ``model``
    a model that can run, each is closed loop (the KL measured on the cache's own last tokens, see
    :func:`seqkv.encode`; ``token_ids``: one id sequence per cache, else recovered); otherwise predicted."""
    several = isinstance(caches, (list, tuple))
    caches = list(caches) if several else [caches]
    if not caches:
        raise ConfigError("scale_for_kl needs at least one cache")
    ids = [None] * len(caches) if token_ids is None else list(token_ids) if several else [token_ids]
    if len(ids) != len(caches):
        raise ConfigError(f"token_ids: {len(ids)} sequences for {len(caches)} caches")
    # the store codes every token of every chunk with the one scale: resolve it without soft pruning
    return min(float(inspect(encode(c, profile=profile, model=model, target_kl=target_kl, token_ids=t,
                                    closed_loop=closed_loop, token_steps=False))["rate_control"]["scale"])
               for c, t in zip(caches, ids))


@dataclass
class _Chunk:
    """One chunk of a put: reused (already stored) or to write (coded, decoded back, not written yet)."""

    index: int
    key: str
    start: int
    end: int
    reuse_bytes: int = 0          # a reused chunk: the stored entry's size
    header: dict | None = None    # a chunk to write: its envelope header and payload
    payload: bytes = b""
    info: dict = field(default_factory=dict)
    material: tuple | None = None  # (sections, positions, tokens digest) decoded from the payload, kept only
                                   # when a later chunk of this put may use it as its base
    base_bytes: bytes | None = None  # the stored base entry the residual was coded against (None: a base
                                     # of this put)
    index_seen: str | None = None  # the content index record when the chunk was planned
    settled: bool = False         # its reference record (if any) is released, or belongs to its written entry
    recode: object = None         # () -> a plain recoding of this chunk (used when its base went away)
    rebase: object = None         # (candidate key) -> a residual recoding against a stored entry, or None

    @property
    def new(self) -> bool:
        return self.header is not None

    def blob(self) -> bytes:
        return pack_entry(self.header, self.payload)


class PrefixStore:
    """A KV store with exact-prefix sharing and near-duplicate reuse.  See the module docstring.

    ``url``: ``file:///path`` (local directory), ``redis://host:port/db`` (options ``key_prefix``,
    ``socket_timeout`` and redis-py's), ``s3://bucket/prefix`` (options ``endpoint_url``,
    ``aws_access_key_id``, ``aws_secret_access_key``, ``region_name``), ``memory://name`` (this process
    only) or any scheme a backend registered (:func:`seqkv.store.register_backend`).  ``model`` gives the
    fingerprint mixed into every key and is checked on decode; lossy presets need it.

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
    * ``chunk_tokens`` (1 .. 2^19), ``chunking`` ("fixed" or "content", see :mod:`seqkv.store.chunking`)
      and, with content chunking, ``boundary_tokens`` (ids a chunk always ends before, e.g. the chat
      template's message-start token).
    * ``near_duplicates``: code chunks stored under another prefix as residuals (default True).
    * ``token_trie`` (a ``seqkv_ext.trie.TokenTrie``) and ``vocab_size``: entropy-code each entry's token
      ids with the trie's probabilities (a shared profile: readers of the ids need the same trie);
      without it the ids are zstd-coded.  The store also keeps its own in-memory trie of the token
      sequences it sees (puts and lookups): its counts are the expected-reuse scores of eviction.
    * ``max_bytes`` bounds the stored bytes (eviction after each put and in ``gc()``: lowest expected
      reuse first, then least recently used; referenced bases never).
    * ``fsync`` makes the directory backend fsync every entry.

    Token ids are ints in [0, 2^31 - 1]; every argument is checked (``ConfigError`` naming it).
    """

    def __init__(self, url: str, *, model=None, preset: str = "lossless", chunk_tokens: int = 256,
                 max_bytes=None, fsync: bool = False, chunking: str = "fixed", near_duplicates: bool = True,
                 codec_options=None, pipeline_config=None, token_trie=None, vocab_size=None, boundary_tokens=None,
                 profile=None, **backend_options):
        from seqkv_ext.trie import TokenTrie  # the compiled extension: needed once a store is opened

        url = _args.url(url)
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; one of {sorted(PRESETS)}")
        if not isinstance(chunking, str) or chunking not in CHUNKINGS:
            raise ConfigError(f"chunking must be one of {CHUNKINGS}, got {chunking!r}")
        chunk_tokens = _args.count(chunk_tokens, "chunk_tokens", minimum=1,
                                   maximum=_args.MAX_CHUNK_TOKENS if chunking == "content" else 2 * _args.MAX_CHUNK_TOKENS)
        max_bytes = _args.count(max_bytes, "max_bytes", allow_none=True)
        fsync = _args.flag(fsync, "fsync")
        near_duplicates = _args.flag(near_duplicates, "near_duplicates")
        boundary_tokens = _args.token_id_list(boundary_tokens, "boundary_tokens")
        if boundary_tokens and chunking != "content":
            raise ConfigError("boundary_tokens need chunking='content'")
        if codec_options is not None and (not isinstance(codec_options, dict)
                                          or not all(isinstance(k, str) for k in codec_options)):
            raise ConfigError("codec_options must be a dict of encode options (names to values)")
        if token_trie is not None:
            if not isinstance(token_trie, TokenTrie):
                raise ConfigError(f"token_trie must be a seqkv_ext.trie.TokenTrie, got {type(token_trie).__name__}")
            _args.count(vocab_size, "vocab_size (the tokenizer's vocabulary size, needed with token_trie)",
                        minimum=2, maximum=_args.MAX_VOCAB_SIZE)
        elif vocab_size is not None:
            _args.count(vocab_size, "vocab_size", minimum=2, maximum=_args.MAX_VOCAB_SIZE)
        self.profile, self.scale = profile, None
        try:
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
                cfg = json.loads(json.dumps(pipeline_config, allow_nan=False))
                preset = cfg.get("preset", "custom") if isinstance(cfg.get("preset"), str) else "custom"
                codec_key = {"pipeline": cfg}
            else:
                cfg = make_pipeline_config(preset, **(codec_options or {}))
                codec_key = dict(codec_options or {})
            json.dumps(codec_key, sort_keys=True, allow_nan=False)  # part of every key: must be plain JSON
        except SeqKVError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            raise ConfigError(f"invalid codec configuration: {type(exc).__name__}: {exc}") from None
        if model is None and cfg["mode"] != "lossless":
            raise ConfigError("lossy presets need the model (RoPE parameters): pass model=, or use preset='lossless'")
        self.url = url
        self.model = model
        self.preset = preset
        self.pipeline = cfg
        self.codec_options = codec_key
        self.chunk_tokens = chunk_tokens
        self.chunking = chunking
        self.near_duplicates = near_duplicates
        self.boundary_tokens = sorted(set(boundary_tokens))
        self.max_bytes = max_bytes
        self.token_trie = token_trie
        self.vocab_size = vocab_size
        self.layout = layout_from_model(model) if model is not None else None
        self.fingerprint = self.layout.fingerprint if self.layout is not None else ""
        self.weights_digest = self.layout.weights_digest if self.layout is not None else ""
        self.backend = open_backend(url, fsync=fsync, **backend_options)
        self.metadata = Metadata(self.backend)
        self.counters = StoreStats()
        self.reuse_trie = TokenTrie()
        self._last_dtype = None
        self._next_sweep = 0.0

    def _calibrated_config(self, profile, model, codec_options):
        """(pipeline config, namespace codec fields) of the calibrated codec with a fixed scale."""
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
        if "repeat" in options:
            raise ConfigError("repeat prediction reads a whole cache's layer 0; store chunks are coded without it")
        # chunks decode batched across chunks and against bases (format/chunk_run.py): no repeat mode there
        cfg = calibrated_pipeline_config(profile.sink_tokens, **options, repeat=False)
        return cfg, dict(options, scale=self.scale, profile=profile.hash)

    # -- keys ---------------------------------------------------------------------------------
    def namespace(self, dtype: str) -> bytes:
        return _keys.namespace(fingerprint=self.fingerprint, weights_digest=self.weights_digest,
                               dtype=_args.dtype_name(dtype), preset=self.preset, chunk_tokens=self.chunk_tokens,
                               chunking=self.chunking, codec_options=self.codec_options,
                               boundary_tokens=self.boundary_tokens)

    def bounds_for(self, token_ids) -> list:
        return chunk_bounds(_args.token_ids(token_ids), self.chunk_tokens, self.chunking, self.boundary_tokens)

    def keys_for(self, token_ids, dtype: str = "float32") -> list:
        """The hex key of every chunk of ``token_ids`` (deterministic across processes and machines)."""
        ids = _args.token_ids(token_ids)
        return _keys.chain_keys(ids, self.namespace(dtype), self.bounds_for(ids))

    # -- helpers --------------------------------------------------------------------------------
    def _quarantine(self, key: str, reason: str, read=None):
        """Move the entry aside and return the CorruptEntryError to raise.  ``read``: the bytes the caller
        judged; when the key holds other bytes now (evicted, or written again, since), it is a race
        (:class:`_Raced`), and nothing is moved."""
        if read is not None and self.backend.get(key) != read:
            raise _Raced()
        where = quarantine(self.backend, key)
        self.counters.add(quarantined=1)
        return CorruptEntryError(
            f"store entry {key[:16]}… is corrupt ({reason}); it has been quarantined"
            + (f" to {where}" if where else " (it was already gone)") + " and will be rewritten by the next put")

    def _unpack(self, data: bytes, key: str, ns_digest: str):
        """(header, payload) or raise (CorruptEntryError after quarantine; ModelMismatchError)."""
        try:
            header, payload = unpack_entry(data, key)
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
            return encode_tokens(chunk_ids, self.token_trie, self.vocab_size), "trie"
        return zstandard.ZstdCompressor(level=3).compress(_keys.token_bytes(chunk_ids)), "zstd"

    def _decode_tokens(self, data: bytes, code: str, n: int) -> list:
        if code == "trie":
            if self.token_trie is None:
                raise ConfigError("this entry's token ids are trie-coded: open the store with token_trie=")
            return decode_tokens(data, self.token_trie, self.vocab_size, n)
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
            self.metadata.set_score(key, self.reuse_trie.count(ids[:e]))

    def _parse_payload(self, key: str, payload, read=None):
        """The entry's chunk, or quarantine it: whatever the container reader raises on stored bytes (a
        DecodeError by contract, anything else being a reader bug met by hostile bytes) makes it corrupt."""
        try:
            return ParsedChunk(payload)
        except DecodeError as exc:
            raise self._quarantine(key, f"{type(exc).__name__}: {exc}", read) from None
        except SeqKVError:
            raise
        except _NOT_DATA_ERRORS:
            raise
        except Exception as exc:
            raise self._quarantine(key, f"the reader failed on it: {type(exc).__name__}: {exc}", read) from None

    def _decode_parsed(self, key: str, parsed: ParsedChunk, base, read=None):
        """The chunk's sections (decoded up to the inverse transforms), or quarantine the entry (as in
        :meth:`_parse_payload`)."""
        try:
            return parsed.sections(base, self.profile)
        except DecodeError as exc:
            raise self._quarantine(key, f"{type(exc).__name__}: {exc}", read) from None
        except SeqKVError:
            raise  # the caller's profile or model (ProfileMismatchError, ...): not the entry's fault
        except _NOT_DATA_ERRORS:
            raise
        except Exception as exc:
            raise self._quarantine(key, f"the decoder failed on it: {type(exc).__name__}: {exc}", read) from None

    def _load(self, key: str, ns_digest: str, tokens_sha: str, depth: int, memo: dict):
        """(layers, positions, entry bytes) of the entry ``key`` (a residual's base, recursively), checked."""
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
            base = self._load(parsed.base, ns_digest, tokens_sha, depth + 1, memo)[:2]
        if self.layout is not None:
            parsed.layout.check_same_model(self.layout, what="store entry")
        layers = assemble([self._decode_parsed(key, parsed, base)])
        memo[key] = (layers, parsed.positions, bytes(data))
        return memo[key]

    # -- put ------------------------------------------------------------------------------------
    def put(self, token_ids, cache, *, positions=None) -> dict:
        """Store ``cache`` (a batch-1 DynamicCache of ``token_ids``); only missing chunks are written.

        All or nothing: every missing chunk is encoded and decoded back before the first is written (values
        the codec cannot carry raise :class:`seqkv.EncodeError` and nothing is written), and when a write
        fails midway the entries this call created are evicted again before the error is raised."""
        ids = _args.token_ids(token_ids)
        layers = _args.cache(cache)
        n = layers[0][0].shape[1]
        if len(ids) != n:
            raise ConfigError(f"{len(ids)} token ids for a cache of {n} tokens")
        if self.layout is not None:
            heads, _, dim = layers[0][0].shape
            if (self.layout.layers, self.layout.kv_heads, self.layout.head_dim) != (len(layers), heads, dim):
                raise ModelMismatchError("the cache's shape is not the store model's")
        layout = self.layout or ModelLayout(layers=len(layers), kv_heads=layers[0][0].shape[0],
                                            head_dim=layers[0][0].shape[2], rope_type="unknown")
        pos_t = _args.positions(positions, n)
        dtype = SUPPORTED_DTYPES[layers[0][0].dtype]
        ns = self.namespace(dtype)
        ns_digest = hashlib.sha256(ns).hexdigest()
        bounds = self.bounds_for(ids)
        chain = _keys.chain_keys(ids, ns, bounds)
        out = {"tokens": n, "chunks": len(chain), "chunks_written": 0, "chunks_reused": 0, "bytes_written": 0,
               "bytes_reused": 0, "collisions": 0, "chunks_residual": 0, "residual_bytes_saved": 0,
               "token_bytes": 0, "tokens_coded": 0, "token_bytes_zstd3": 0}
        ctx = {"ids": ids, "pos_t": pos_t, "pos": pos_t.tolist(), "layers": layers, "layout": layout,
               "dtype": dtype, "ns": ns, "ns_digest": ns_digest,
               "contents": [_keys.content_digest(ids[s:e], ns) for s, e in bounds]}
        plan = self._plan(ctx, bounds, chain, out)
        self.reuse_trie.insert(ids)
        done = self._write(plan, ctx, out)
        self._touch_chain(done, ids, bounds)
        self._last_dtype = dtype
        self.counters.add_put(out)
        if self.max_bytes is not None:
            sweep = time.monotonic() >= self._next_sweep
            out["evicted"] = self._gc(self.max_bytes, STALE_REFS_AFTER, LEFTOVERS_AFTER, sweep=sweep)["evicted"]
        return out

    def _plan(self, ctx: dict, bounds, chain, out: dict) -> list:
        """Phase 1 of a put: every chunk either found stored (reused) or coded and decoded back; nothing is
        written.  On any error the reference records taken so far are released."""
        ids, pos = ctx["ids"], ctx["pos"]
        plan: list = []
        pending_index: dict = {}  # content digest -> key of a chunk of this put the index will name
        materials: dict = {}      # key -> (layers, positions, tokens digest) of this put's chunks, kept for
                                  # the later chunks of this put with the same tokens
        new_keys: set = set()
        later = {}
        for j, content in enumerate(ctx["contents"]):
            later[content] = j  # the last chunk with these tokens
        prev = _keys.root_key(ctx["ns"]).hex()
        try:
            for i, ((s, e), key) in enumerate(zip(bounds, chain)):
                pd = _keys.positions_digest(pos[s:e])
                existing = self.backend.get(key)
                if existing is not None:
                    try:
                        verdict, _, _ = self._check(existing, key, ctx["ns_digest"], ids, s, e, pd, i)
                    except CorruptEntryError:
                        existing = None  # quarantined: write it again
                    else:
                        if verdict != "ok":
                            out["collisions"] += 1
                            break  # another prefix owns this key: later chunks would never be reachable
                        plan.append(_Chunk(i, key, s, e, reuse_bytes=len(existing)))
                        prev = key
                        continue
                chunk = self._code_new(ctx, i, key, prev, s, e, pd, pending_index, materials)
                plan.append(chunk)
                new_keys.add(key)
                content = ctx["contents"][i]
                if chunk.info["base"] is None and self.near_duplicates:
                    # what the index will name once this chunk is written (the rule of _index_content)
                    current = pending_index.get(content, chunk.index_seen)
                    if current is None or (current != key and current not in new_keys
                                           and not self.backend.exists(current)):
                        pending_index[content] = key
                if later[content] > i and pending_index.get(content) == key:
                    sections, positions, digest = chunk.material
                    materials[key] = (assemble([sections]), positions, digest)
                chunk.material = None
                prev = key
        except BaseException:
            self._release(plan)
            raise
        return plan

    def _release(self, chunks) -> None:
        """Drop the reference records that chunks not written took (best effort: this runs on error paths)."""
        for c in chunks:
            if c.new and not c.settled and c.info.get("base") is not None:
                c.settled = True
                try:
                    self.metadata.remove_ref(c.info["base"], c.info["base_ref"])
                except SeqKVError:
                    pass

    def _code_new(self, ctx, i, key, prev, s, e, pd, pending_index, materials) -> _Chunk:
        """A chunk to write: coded (as a residual where a stored or pending chunk holds the same tokens and
        that is smaller) and decoded back."""
        ids = ctx["ids"]
        chunk_ids = ids[s:e]
        tok_sha = _keys.tokens_digest(chunk_ids)
        content = ctx["contents"][i]
        index_seen = None
        base_data = base_bytes = ref_id = None
        if self.near_duplicates:
            index_seen = self.metadata.content_get(content)
            candidate = pending_index.get(content, index_seen)
            if candidate is not None and candidate != key:
                base_data, base_bytes, ref_id = self._take_base(candidate, key, tok_sha, ctx["ns_digest"], materials)
        header_base = {"v": ENVELOPE_VERSION, "key": key, "parent": prev, "index": i, "start": s, "end": e,
                       "namespace": ctx["ns_digest"], "tokens_sha256": tok_sha,
                       "prefix_sha256": _keys.prefix_digest(ids[:e]), "positions_sha256": pd, "content": content}

        def code(base_data, ref_id, base_bytes):
            payload, info, material = self._code_payload(ctx, i, s, e, chunk_ids, base_data)
            if base_data is not None and info["base"] is None and ref_id is not None:
                self.metadata.remove_ref(base_data[0], ref_id)  # coded plainly after all
                ref_id, base_bytes = None, None
            header = dict(header_base, base=info["base"], base_ref=ref_id if info["base"] is not None else None,
                          payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
            return _Chunk(i, key, s, e, header=header, payload=payload, info=dict(info, base_ref=header["base_ref"]),
                          material=material, base_bytes=base_bytes if info["base"] is not None else None,
                          index_seen=index_seen)

        try:
            chunk = code(base_data, ref_id, base_bytes)
        except BaseException:
            if ref_id is not None:
                self.metadata.remove_ref(base_data[0], ref_id)
            raise
        chunk.recode = lambda: code(None, None, None)

        def rebase(candidate):
            bd, bb, rid = self._take_base(candidate, key, tok_sha, ctx["ns_digest"], {})
            if bd is None:
                return None
            try:
                again = code(bd, rid, bb)
            except BaseException:
                self.metadata.remove_ref(candidate, rid)
                raise
            return again if again.info["base"] is not None else None

        chunk.rebase = rebase
        return chunk

    def _take_base(self, candidate, key, tok_sha, ns_digest, materials):
        """(base data, the base's stored bytes, reference record) of a usable base, or (None, None, None).
        The reference record goes first: an evictor that hides the base afterwards sees it."""
        ref_id = f"{key}.{ref_nonce()}"
        self.metadata.add_ref(candidate, ref_id)
        try:
            if candidate in materials:  # a chunk of this put, written before this one
                blayers, bpos, btok = materials[candidate]
                if btok != tok_sha:
                    raise MissingBaseError("the pending base holds other tokens")
                return (candidate, blayers, bpos), None, ref_id
            blayers, bpos, bdata = self._load(candidate, ns_digest, tok_sha, 1, {})
            return (candidate, blayers, bpos), bdata, ref_id
        except (MissingBaseError, CorruptEntryError, ModelMismatchError, DecodeError):
            self.metadata.remove_ref(candidate, ref_id)
            return None, None, None
        except BaseException:
            self.metadata.remove_ref(candidate, ref_id)
            raise

    def _code_payload(self, ctx, i, s, e, chunk_ids, base_data):
        """(payload, info, material) of one chunk, decoded back and checked; with ``base_data`` a residual
        where that is smaller (plain when no section is, or when the residual does not decode)."""
        cfg = self.pipeline
        if cfg["mode"] == "lossy" and s > 0:
            cfg = dict(cfg, sink_tokens=0)  # attention sinks are the first tokens of a sequence only
        chunk = [(k[:, s:e], v[:, s:e]) for k, v in ctx["layers"]]
        positions = ctx["pos_t"][s:e]
        failure = None
        for base in ((base_data, None) if base_data is not None else (None,)):
            token_blob, token_code = (None, "base") if base is not None else self._code_tokens(chunk_ids)
            try:
                payload, info = encode_chunk(chunk, positions, cfg, ctx["layout"], ctx["dtype"],
                                             token_section=token_blob, token_code=token_code, base=base,
                                             profile=self.profile, scale=self.scale)
            except SeqKVError:
                raise
            except _NOT_DATA_ERRORS:
                raise
            except Exception as exc:
                raise EncodeError(f"chunk {i} (tokens {s}..{e}) cannot be encoded: {type(exc).__name__}: {exc}") from None
            if base is not None and info["residual_sections"] == 0:
                continue  # plain coding was smaller everywhere: no base, and the tokens go in after all
            try:
                material = self._decode_back(payload, base, chunk, positions, i, s, e)
            except EncodeError as exc:
                failure = exc
                continue  # a residual that does not decode: try plain coding
            saved = info["plain_section_bytes"] - info["section_bytes"]
            zstd_bytes = 0
            if token_blob is not None:  # what zstd-3 makes of the same ids, for the stats
                zstd_bytes = len(zstandard.ZstdCompressor(level=3).compress(_keys.token_bytes(chunk_ids)))
            info = {"base": base[0] if base is not None else None, "content": ctx["contents"][i], "saved": saved,
                    "token_bytes": len(token_blob) if token_blob is not None else 0,
                    "tokens_coded": (e - s) if token_blob is not None else 0, "token_bytes_zstd3": zstd_bytes}
            return payload, info, (material[0], material[1], _keys.tokens_digest(chunk_ids))
        raise failure

    def _decode_back(self, payload, base, chunk, positions, i, s, e):
        """(sections, positions) of a freshly coded payload as a reader decodes it, up to the inverse transforms
        (:mod:`seqkv.format.chunk_run`: every byte is read and checked there; the transforms after it are
        arithmetic on finite values); EncodeError when that fails or differs from what was coded (shape,
        positions; bit-exact for lossless, finite for lossy)."""
        what = f"chunk {i} (tokens {s}..{e})"
        hint = ("; a lossy codec cannot carry values this large (or NaN/Inf): store them with preset='lossless'"
                if self.pipeline["mode"] != "lossless" else "")
        try:
            parsed = ParsedChunk(payload)
            sections = parsed.sections(None if base is None else (base[1], base[2]), self.profile)
        except _NOT_DATA_ERRORS:
            raise
        except Exception as exc:
            raise EncodeError(f"{what} cannot be stored: its coded form does not decode "
                              f"({type(exc).__name__}: {exc}){hint}") from None
        if len(sections.tensors) != len(chunk) or not torch.equal(parsed.positions, positions):
            raise EncodeError(f"{what} cannot be stored: its coded form decodes to another layout or positions")
        want_shape, want_dtype = tuple(chunk[0][0].shape), chunk[0][0].dtype
        if sections.shape[1:] != want_shape or sections.dtype != SUPPORTED_DTYPES[want_dtype]:
            raise EncodeError(f"{what} cannot be stored: it decodes to {sections.shape[1:]} {sections.dtype}, "
                              f"not {want_shape} {want_dtype}")
        lossless = self.pipeline["mode"] == "lossless"
        for pair, (ck, cv) in zip(sections.tensors, chunk):
            for (_, got), want in zip(pair, (ck, cv)):
                if lossless:
                    bits = torch.int32 if want.dtype == torch.float32 else torch.int16
                    if not torch.equal(got.contiguous().view(bits), want.contiguous().view(bits)):
                        raise EncodeError(f"{what} cannot be stored: the lossless codec did not give its bits back")
                elif not all_finite(got):  # the exact sink tokens are the cache's own, checked by the encoder
                    raise EncodeError(f"{what} cannot be stored: it decodes to values that are not finite{hint}")
        return sections, parsed.positions

    def _write(self, plan: list, ctx: dict, out: dict) -> list:
        """Phase 2 of a put: write the planned chunks in order; the keys of the chunks stored (written or
        reused).  On an error, the entries this call created are evicted again (best effort)."""
        created: dict = {}  # key -> the bytes this put wrote there
        done = []
        ids, pos, ns_digest = ctx["ids"], ctx["pos"], ctx["ns_digest"]
        n = retries = 0
        try:
            while n < len(plan):
                c = plan[n]
                if not c.new:
                    out["chunks_reused"] += 1
                    out["bytes_reused"] += c.reuse_bytes
                    done.append(c.key)
                    n += 1
                    continue
                c = plan[n] = self._ready(c, created)
                blob = c.blob()
                if self.backend.put_if_absent(c.key, blob):
                    c.settled = True  # its reference record belongs to the entry now
                    created[c.key] = blob
                    self._count_written(c, len(blob), out)
                else:  # a concurrent writer stored it first
                    self._release([c])
                    again = self.backend.get(c.key)
                    if again is not None:
                        pd = _keys.positions_digest(pos[c.start:c.end])
                        try:
                            verdict, _, _ = self._check(again, c.key, ns_digest, ids, c.start, c.end, pd, c.index)
                        except CorruptEntryError:  # quarantined: ours goes in after all
                            retries += 1
                            if retries > 3:
                                raise StorageError(f"entry {c.key[:16]}… keeps being replaced by corrupt bytes") from None
                            plan[n] = c.recode()
                            continue
                        if verdict != "ok":
                            out["collisions"] += 1
                            n += 1
                            break
                    out["chunks_reused"] += 1
                    out["bytes_reused"] += len(again) if again is not None else 0
                done.append(c.key)
                n += 1
        except BaseException:
            self._release(plan[n:])
            for key in reversed(list(created)):
                try:
                    self.evict(key)
                except SeqKVError:
                    pass
            raise
        self._release(plan[n:])  # the chunks after a collision
        return done

    def _count_written(self, c: _Chunk, size: int, out: dict) -> None:
        out["chunks_written"] += 1
        out["bytes_written"] += size
        out["token_bytes"] += c.info["token_bytes"]
        out["tokens_coded"] += c.info["tokens_coded"]
        out["token_bytes_zstd3"] += c.info["token_bytes_zstd3"]
        if c.info["base"] is not None:
            out["chunks_residual"] += 1
            out["residual_bytes_saved"] += c.info["saved"]
        else:
            self._index_content(c.info["content"], c.key)

    def _ready(self, c: _Chunk, created: dict) -> _Chunk:
        """The chunk as it must be written now.

        * A residual's base must still be the entry it was coded against.  Its reference record, taken
          before the base was read, guarantees that while it is there (an evictor never drops a referenced
          entry); a base of this put must also be the bytes this put wrote.  Where the record was dropped
          meanwhile (a put slower than gc's stale_refs_after), a fresh record is taken and the base's bytes
          compared with what was read; where they differ (or the base is gone) the chunk is coded plainly.
        * A plain chunk whose tokens a concurrent writer stored meanwhile (the content index names another
          entry now) becomes a residual against it where that is smaller: concurrent writers reuse as
          sequential ones do, but for writers that finish coding at the same moment."""
        base = c.info["base"]
        if base is not None:
            ours = created.get(base)
            if c.base_bytes is None and ours is None:  # a base of this put that a concurrent writer stored
                self._release([c])
                return c.recode()
            if self.metadata.has_ref(base, c.info["base_ref"]):
                return c
            fresh = f"{c.key}.{ref_nonce()}"
            self.metadata.add_ref(base, fresh)
            expected = c.base_bytes if c.base_bytes is not None else ours
            if self.backend.get(base) == expected:
                self._release([c])
                c.header = dict(c.header, base_ref=fresh)
                c.info["base_ref"] = fresh
                c.settled = False
                return c
            self.metadata.remove_ref(base, fresh)
            self._release([c])
            return c.recode()
        if self.near_duplicates:
            current = self.metadata.content_get(c.info["content"])
            if current is not None and current not in (c.index_seen, c.key) and current not in created:
                rebased = c.rebase(current)
                if rebased is not None:
                    return rebased
        return c

    def _index_content(self, content: str, key: str) -> None:
        current = self.metadata.content_get(content)
        if current is None or (current != key and not self.backend.exists(current)):
            self.metadata.content_set(content, key)

    # -- lookup -----------------------------------------------------------------------------------
    def _walk(self, ids, dtype: str, pos):
        ns = self.namespace(dtype)
        ns_digest = hashlib.sha256(ns).hexdigest()
        found = []
        bounds = self.bounds_for(ids)
        for i, ((s, e), key) in enumerate(zip(bounds, _keys.chain_keys(ids, ns, bounds))):
            data = self.backend.get(key)
            if data is not None and envelope_version(data) == 1:
                # written by seqkv before envelope v2 (no residuals): moved aside as a miss, rewritten by a put
                quarantine(self.backend, key)
                data = None
            if data is None:
                break
            verdict, header, payload = self._check(data, key, ns_digest, ids, s, e, _keys.positions_digest(pos[s:e]), i)
            if verdict != "ok":
                self.counters.add(collisions=1)
                break
            found.append((key, s, e, header, payload, data))
        return found, ns_digest, bounds

    def longest_prefix(self, token_ids, *, dtype=None, positions=None, device=None):
        """(n_tokens, DynamicCache or None): the longest stored prefix of ``token_ids`` (whole chunks).

        ``dtype`` ("float32"/"float16"/"bfloat16" or a torch dtype) picks the namespace; by default
        every dtype is tried and the longest match wins.  ``positions`` (default 0, 1, 2, ...) must
        match the stored positions.  ``device``: where the cache is built (default the CPU).

        A corrupt entry is quarantined and raises :class:`CorruptEntryError` (the next lookup returns the
        shorter prefix).  A chunk evicted by a concurrent ``gc`` between this call's reads ends the match
        there: the prefix before it is returned and nothing is quarantined.
        """
        ids = _args.token_ids(token_ids)
        want = _args.dtype_name(dtype, allow_none=True)
        dev = _args.device(device)
        pos = _args.positions(positions, len(ids)).tolist()
        self.counters.add_lookup(len(ids))
        if len(ids) == 0:
            return 0, None
        self.reuse_trie.insert(ids)
        if want is None:
            dtypes = ([self._last_dtype] if self._last_dtype else []) + [d for d in DTYPE_NAMES if d != self._last_dtype]
        else:
            dtypes = [want]
        best, best_ns, best_bounds = [], None, None
        for d in dtypes:
            found, ns_digest, bounds = self._walk(ids, d, pos)
            if len(found) > len(best):
                best, best_ns, best_bounds = found, ns_digest, bounds
        # each chunk's sections first (whatever reads stored bytes, so a failure names its entry), then the
        # inverse transforms once per layer over all of them (seqkv.format.chunk_run)
        found = []
        used = []
        memo: dict = {}
        for key, s, e, header, payload, data in best:
            try:
                sections = self._decode_found(key, s, e, header, payload, data, best_ns, pos, memo)
                if found and (sections.shape[0], sections.shape[1], sections.shape[3], sections.dtype) != (
                        found[0].shape[0], found[0].shape[1], found[0].shape[3], found[0].dtype):
                    raise self._quarantine(key, "its layers, heads, head size or dtype differ from the previous "
                                           "chunks'", data)
            except _Raced:
                break
            found.append(sections)
            used.append(key)
        if not used:
            return 0, None
        merged = assemble(found)
        n = best[len(used) - 1][2]
        self._touch_chain(used, ids, best_bounds)
        self.counters.add_hit(n)
        try:
            return n, build_cache(merged, device=dev)
        except _NOT_DATA_ERRORS:
            raise
        except Exception as exc:  # the device ran out of memory, ...
            raise ConfigError(f"cannot build the cache on device {str(dev)!r}: {type(exc).__name__}: {exc}") from None

    def _decode_found(self, key, s, e, header, payload, data, ns_digest, pos, memo):
        """The sections (:class:`~seqkv.format.chunk_run.ChunkSections`) of a chunk the walk found, checked;
        _Raced when it was evicted (or written again) since the walk read it, whatever went wrong: only the
        bytes still stored are ever quarantined."""
        parsed = self._parse_payload(key, payload, data)
        if self.layout is not None:
            parsed.layout.check_same_model(self.layout, what="store entry")
        if parsed.base != header["base"]:
            raise self._quarantine(key, "the payload's base differs from the envelope's", data)
        base = None
        if parsed.base is not None:
            try:
                base = self._load(parsed.base, ns_digest, header["tokens_sha256"], 1, memo)[:2]
            except MissingBaseError as exc:
                if self.backend.get(key) != data:
                    # the residual itself was evicted (or replaced) since the walk read it: an evictor drops a
                    # base only after its referrers, so this is a race with gc, not a damaged entry
                    raise _Raced() from None
                self.metadata.remove_ref(header["base"], header["base_ref"])
                raise self._quarantine(key, f"its residual base cannot be used: {exc}", data) from None
        if parsed.tokens != e - s:
            raise self._quarantine(key, f"it decodes to {parsed.tokens} tokens, not {e - s}", data)
        if not torch.equal(parsed.positions, torch.as_tensor(pos[s:e], dtype=torch.int64)):
            raise self._quarantine(key, "its payload's positions differ from its envelope's", data)
        return self._decode_parsed(key, parsed, base, data)

    def tokens_of(self, key: str, dtype: str = "float32") -> list:
        """The token ids an entry carries (following residual bases), decoded from its token section."""
        key = _args.entry_key(key)
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
                try:
                    ids = self._decode_tokens(parsed.token_section(), parsed.token_code, parsed.tokens)
                except SeqKVError:
                    raise
                except _NOT_DATA_ERRORS:
                    raise
                except Exception as exc:
                    raise DecodeError(f"the token section of {key[:16]}… does not decode: "
                                      f"{type(exc).__name__}: {exc}") from None
                if _keys.tokens_digest(ids) != want:
                    raise self._quarantine(key, "its token ids do not match their digest")
                return ids
            key = parsed.base
        raise MissingBaseError(f"residual chain deeper than {MAX_BASE_DEPTH}")

    # -- maintenance --------------------------------------------------------------------------------
    def evict(self, key: str) -> bool:
        """Remove one entry unless a residual still references it; True when removed.  Its own base
        reference (if any) is released."""
        key = _args.entry_key(key)
        # the protocol of seqkv.store.entries: hide, check the references again, then drop or put back
        if self.metadata.refs(key):
            return False
        data = self.backend.get(key)
        token = hide(self.backend, key)
        if token is None:
            return False
        if self.metadata.refs(key):  # a writer took a reference meanwhile: put it back
            unhide(self.backend, key, token)
            return False
        drop_hidden(self.backend, token)
        header = None
        if data is not None:
            try:
                header, _ = unpack_entry(data, key)
            except ValueError:
                header = None
        again = self.backend.get(key)
        if again is not None and again == data:
            # put back meanwhile by a gc that took this evictor for a crashed one (stalled for longer than
            # leftovers_after): the entry is stored, its records are its own
            return False
        if header is not None:
            if header.get("base") is not None:
                self.metadata.remove_ref(header["base"], header["base_ref"])
            if again is None:
                self.metadata.content_delete(header["content"], key)
        if again is None:
            self.metadata.delete_score(key)
        return True

    def drop_stale_refs(self, older_than: float = STALE_REFS_AFTER) -> int:
        """Remove reference records older than ``older_than`` seconds whose referrer is neither stored nor
        held in limbo (a writer that crashed between taking the reference and writing its entry, or an entry
        quarantined since).  Younger records are kept: their writer may still be encoding (and a writer
        slower than that takes a fresh record before it writes)."""
        older_than = _args.seconds(older_than, "older_than", allow_none=False)
        return _leftovers.drop_stale_refs(self.backend, self.metadata, older_than, time.time())

    def gc(self, max_bytes=None, *, stale_refs_after=STALE_REFS_AFTER, leftovers_after=LEFTOVERS_AFTER) -> dict:
        """Reclaim what crashed processes left, then evict entries until the store holds at most
        ``max_bytes`` (default: the store's budget): lowest expected reuse (trie count of the entry's
        prefix) first, least recently used among equals; never a base that a residual still references.
        Evicting a chunk only shortens later matches.

        Crash leftovers (:mod:`seqkv.store.leftovers`): temp files and limbo items older than
        ``leftovers_after`` seconds, reference records older than ``stale_refs_after`` seconds whose
        referrer is not stored (None keeps them all), scores and content-index records of keys not stored.
        The thresholds keep what processes still running need; 0 is safe once no other process uses the
        store."""
        budget = self.max_bytes if max_bytes is None else _args.count(max_bytes, "max_bytes")
        stale_refs_after = _args.seconds(stale_refs_after, "stale_refs_after")
        leftovers_after = _args.seconds(leftovers_after, "leftovers_after", allow_none=False)
        return self._gc(budget, stale_refs_after, leftovers_after, sweep=True)

    def _gc(self, budget, stale_refs_after, leftovers_after, *, sweep: bool) -> dict:
        swept = dict.fromkeys(("temp_files_removed", "limbo_restored", "limbo_dropped", "leftover_bytes_freed",
                               "stale_refs_dropped", "orphan_records_dropped"), 0)
        if sweep:
            self._next_sweep = time.monotonic() + SWEEP_INTERVAL
            swept = _leftovers.reclaim(self.backend, self.metadata, leftovers_after=leftovers_after,
                                       stale_refs_after=stale_refs_after)
        entries = self.backend.list()
        total = sum(size for _, size, _ in entries)
        evicted = freed = 0
        if budget is not None and total > budget:
            remaining = sorted(((self.metadata.score(k), last, k, size) for k, size, last in entries))
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
        self.counters.add(evicted=evicted)
        return {"evicted": evicted, "bytes_freed": freed, "bytes_stored": total, "entries": len(entries) - evicted,
                **swept}

    def stats(self) -> dict:
        """Entries and bytes in the backend, what lies outside them (temp files, limbo and quarantine: count
        and bytes of each), and this store object's counters."""
        report = self.counters.report(self.backend.list(), backend=self.backend.name, max_bytes=self.max_bytes)
        report.update(_leftovers.usage(self.backend))
        return report

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
