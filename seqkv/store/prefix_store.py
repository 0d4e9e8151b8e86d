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

The layers below: a :class:`~seqkv.store.backend.Backend` (blob primitives, picked by URL scheme), the side
records over it (:mod:`seqkv.store.metadata`), entries set aside (:mod:`seqkv.store.entries`) and the
counters of :meth:`PrefixStore.stats` (:mod:`seqkv.store.stats`).
"""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import torch
import zstandard

from ..codec import encode, inspect
from ..errors import ConfigError, DecodeError, ModelMismatchError, StorageError
from ..format.pipeline import Pipeline
from ..hf_adapter import SUPPORTED_DTYPES, build_cache, cache_layers
from ..layout import ModelLayout, layout_from_model
from ..positions import positions_of
from ..presets import PRESETS, calibrated_pipeline_config, pipeline_config as make_pipeline_config
from ..profile import Profile
from ..rate_control import parse_target
from ..token_coding import decode_tokens, encode_tokens
from . import keys as _keys
from .backend import open_backend
from .chunk_codec import ParsedChunk, encode_chunk
from .chunking import CHUNKINGS, chunk_bounds
from .entries import drop_hidden, hide, quarantine, unhide
from .envelope import ENVELOPE_VERSION, envelope_version, pack_entry, ref_age, ref_nonce, unpack_entry
from .metadata import Metadata
from .stats import StoreStats

MAX_BASE_DEPTH = 4
DTYPE_NAMES = ("float32", "float16", "bfloat16")


class CorruptEntryError(StorageError):
    """A stored entry failed its checks or did not decode; it has been quarantined."""


class MissingBaseError(StorageError):
    """A residual entry's base is missing, corrupt or not what the residual was coded against."""


def scale_for_kl(cache, profile, target_kl: float = 0.01, *, model=None) -> float:
    """The calibrated quantizer's ``scale`` that rate control picks for ``cache`` at ``target_kl``
    (predicted mean KL): resolve a KL target once, on a representative cache, into the fixed scale a
    ``PrefixStore(profile=..., codec_options={"scale": s})`` codes every chunk with."""
    return float(inspect(encode(cache, profile=profile, model=model, target_kl=target_kl))["rate_control"]["scale"])


class PrefixStore:
    """A KV store with exact-prefix sharing and near-duplicate reuse.  See the module docstring.

    ``url``: ``file:///path`` (local directory), ``redis://host:port/db`` (option ``key_prefix``),
    ``s3://bucket/prefix`` (options ``endpoint_url``, ``aws_access_key_id``, ``aws_secret_access_key``,
    ``region_name``), ``memory://name`` (this process only) or any scheme a backend registered
    (:func:`seqkv.store.register_backend`).  ``model`` gives the fingerprint mixed into every key and is
    checked on decode; lossy presets need it.

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
        from seqkv_ext.trie import TokenTrie  # the compiled extension: needed once a store is opened

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
        self.metadata = Metadata(self.backend)
        self.counters = StoreStats()
        self.reuse_trie = TokenTrie()
        self._last_dtype = None

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
        cfg = calibrated_pipeline_config(profile.sink_tokens, **options)
        return cfg, dict(options, scale=self.scale, profile=profile.hash)

    # -- keys ---------------------------------------------------------------------------------
    def namespace(self, dtype: str) -> bytes:
        return _keys.namespace(fingerprint=self.fingerprint, weights_digest=self.weights_digest, dtype=dtype,
                               preset=self.preset, chunk_tokens=self.chunk_tokens, chunking=self.chunking,
                               codec_options=self.codec_options, boundary_tokens=self.boundary_tokens)

    def bounds_for(self, token_ids) -> list:
        return chunk_bounds(_keys.token_array(token_ids), self.chunk_tokens, self.chunking, self.boundary_tokens)

    def keys_for(self, token_ids, dtype: str = "float32") -> list:
        """The hex key of every chunk of ``token_ids`` (deterministic across processes and machines)."""
        return _keys.chain_keys(token_ids, self.namespace(dtype), self.bounds_for(token_ids))

    # -- helpers --------------------------------------------------------------------------------
    def _quarantine(self, key: str, reason: str):
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

    def _parse_payload(self, key: str, payload):
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
        ids = _keys.token_array(token_ids)
        layers = cache_layers(cache)
        n = layers[0][0].shape[1]
        if len(ids) != n:
            raise ConfigError(f"{len(ids)} token ids for a cache of {n} tokens")
        if self.layout is not None:
            heads, _, dim = layers[0][0].shape
            if (self.layout.layers, self.layout.kv_heads, self.layout.head_dim) != (len(layers), heads, dim):
                raise ModelMismatchError("the cache's shape is not the store model's")
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
            pd = _keys.positions_digest(pos[s:e])
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
                    self.metadata.remove_ref(info["base"], info["base_ref"])
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
        self.counters.add_put(out)
        if self.max_bytes is not None:
            out["evicted"] = self.gc()["evicted"]
        return out

    def _index_content(self, content: str, key: str) -> None:
        current = self.metadata.content_get(content)
        if current is None or (current != key and not self.backend.exists(current)):
            self.metadata.content_set(content, key)

    def _encode_entry(self, key, prev, i, s, e, ids, pos_t, pd, layers, layout, dtype, ns, ns_digest):
        chunk_ids = ids[s:e]
        tok_sha = _keys.tokens_digest(chunk_ids)
        content = _keys.content_digest(chunk_ids, ns)
        base = ref_id = None
        base_data = None
        if self.near_duplicates:
            candidate = self.metadata.content_get(content)
            if candidate is not None and candidate != key:
                ref_id = f"{key}.{ref_nonce()}"
                # the reference record goes first: an evictor that hides the base afterwards sees it
                self.metadata.add_ref(candidate, ref_id)
                try:
                    blayers, bpos = self._load(candidate, ns_digest, tok_sha, 1, {})
                    base, base_data = candidate, (candidate, blayers, bpos)
                except (MissingBaseError, CorruptEntryError, ModelMismatchError, DecodeError):
                    self.metadata.remove_ref(candidate, ref_id)
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
            self.metadata.remove_ref(base, ref_id)
            base = ref_id = None
            token_blob, token_code = self._code_tokens(chunk_ids)
            payload, info = encode_chunk(chunk, pos_t[s:e], cfg, layout, dtype, token_section=token_blob,
                                         token_code=token_code, base=None, profile=self.profile, scale=self.scale)
        header = {"v": ENVELOPE_VERSION, "key": key, "parent": prev, "index": i, "start": s, "end": e,
                  "namespace": ns_digest, "tokens_sha256": tok_sha, "prefix_sha256": _keys.prefix_digest(ids[:e]),
                  "positions_sha256": pd, "content": content, "base": base, "base_ref": ref_id,
                  "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}
        blob = pack_entry(header, payload)
        saved = info["plain_section_bytes"] - info["section_bytes"]
        zstd_bytes = 0
        if token_blob is not None:  # what zstd-3 makes of the same ids, for the stats
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
            found.append((key, s, e, header, payload))
        return found, ns_digest, bounds

    def longest_prefix(self, token_ids, *, dtype=None, positions=None, device=None):
        """(n_tokens, DynamicCache or None): the longest stored prefix of ``token_ids`` (whole chunks).

        ``dtype`` ("float32"/"float16"/"bfloat16" or a torch dtype) picks the namespace; by default
        every dtype is tried and the longest match wins.  ``positions`` (default 0, 1, 2, ...) must
        match the stored positions.
        """
        ids = _keys.token_array(token_ids)
        self.counters.add_lookup(len(ids))
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
                    self.metadata.remove_ref(header["base"], header["base_ref"])
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
        self.counters.add_hit(n)
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
        if header is not None:
            if header.get("base") is not None:
                self.metadata.remove_ref(header["base"], header["base_ref"])
            self.metadata.content_delete(header["content"], key)
        self.metadata.delete_score(key)
        return True

    def drop_stale_refs(self, older_than: float = 3600.0) -> int:
        """Remove reference records older than ``older_than`` seconds whose referrer is not stored (a writer
        that crashed between taking the reference and writing its entry, or an entry quarantined since).
        Younger records are kept: their writer may still be encoding."""
        now, dropped = time.time(), 0
        for base in self.metadata.ref_bases():
            for ref_id in self.metadata.refs(base):
                try:
                    if ref_age(ref_id, now) <= older_than:
                        continue
                except (ValueError, IndexError):
                    pass  # not a name this version writes: judge it by its referrer alone
                referrer = ref_id.split(".", 1)[0]
                data = self.backend.get(referrer)
                alive = False
                if data is not None:
                    try:
                        header, _ = unpack_entry(data, referrer)
                        alive = header.get("base") == base and header.get("base_ref") == ref_id
                    except ValueError:
                        alive = True  # let the read path quarantine it first
                if not alive and self.metadata.remove_ref(base, ref_id):
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
                "stale_refs_dropped": stale}

    def stats(self) -> dict:
        """Entries and bytes in the backend, and this store object's counters."""
        return self.counters.report(self.backend.list(), backend=self.backend.name, max_bytes=self.max_bytes)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
