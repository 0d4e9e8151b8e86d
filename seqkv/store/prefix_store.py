"""PrefixStore: an exact-prefix-sharing store of compressed KV caches.

A cache of tokens ``t_0 .. t_{n-1}`` is cut into chunks of ``chunk_tokens`` tokens (the last one may be
partial); chunk ``i`` holds the KV of its tokens for every layer, encoded as its own seqkv container
with its true positions, and is stored under ``key_i`` of a sha256 hash chain over the token ids
(:mod:`seqkv.store.keys`).  Two caches that share a prefix share the entries of its whole chunks, so an
exact prefix is stored once.  ``longest_prefix`` walks the chain and returns the longest stored prefix
(whole chunks only) as one ``DynamicCache``.

Every entry is an envelope ``MAGIC | u32 header length | JSON header | container``.  The JSON header
carries the chunk's own token ids, a sha256 of the whole token prefix up to the chunk's end (computed
independently of the key chain), the positions, the namespace digest and a sha256 of the container, and
all of them are compared on every read: a key collision gives a shorter match, never a wrong cache.
"""
from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from urllib.parse import unquote, urlparse

import torch

from ..errors import ConfigError, DecodeError, ModelMismatchError, StorageError
from . import keys as _keys

MAGIC = b"SKVSTORE\x01"
ENVELOPE_VERSION = 1
MAX_HEADER_BYTES = 1 << 24
DTYPE_NAMES = ("float32", "float16", "bfloat16")


class CorruptEntryError(StorageError):
    """A stored entry failed its checks or did not decode; it has been quarantined."""


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
    for field in ("token_ids", "positions"):
        value = header.get(field)
        if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise ValueError(f"envelope field {field!r} is invalid")
    return header, payload


class PrefixStore:
    """An exact-prefix-sharing KV store.  See the module docstring.

    ``url``: ``file:///path`` (local directory), ``redis://host:port/db`` (option ``key_prefix``) or
    ``s3://bucket/prefix`` (options ``endpoint_url``, ``aws_access_key_id``, ``aws_secret_access_key``,
    ``region_name``).  ``model`` gives the fingerprint mixed into every key and is checked on decode;
    lossy presets need it.  ``max_bytes`` bounds the stored bytes (LRU eviction after each put and in
    ``gc()``).  ``fsync`` makes the directory backend fsync every entry.
    """

    def __init__(self, url: str, *, model=None, preset: str = "lossless", chunk_tokens: int = 256,
                 max_bytes=None, fsync: bool = False, **backend_options):
        from ..layout import layout_from_model
        from ..presets import PRESETS

        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; one of {sorted(PRESETS)}")
        if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
        if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0):
            raise ConfigError(f"max_bytes must be None or a non-negative integer, got {max_bytes!r}")
        if model is None and preset != "lossless":
            raise ConfigError("lossy presets need the model (RoPE parameters): pass model=, or use preset='lossless'")
        self.url = url
        self.model = model
        self.preset = preset
        self.chunk_tokens = chunk_tokens
        self.max_bytes = max_bytes
        layout = layout_from_model(model) if model is not None else None
        self.fingerprint = layout.fingerprint if layout is not None else ""
        self.weights_digest = layout.weights_digest if layout is not None else ""
        self.backend = open_backend(url, fsync=fsync, **backend_options)
        self._lock = threading.Lock()
        self._counters = {"lookups": 0, "hits": 0, "tokens_requested": 0, "tokens_hit": 0, "bytes_saved": 0,
                          "puts": 0, "chunks_written": 0, "chunks_reused": 0, "bytes_written": 0,
                          "evicted": 0, "quarantined": 0, "collisions": 0}
        self._last_dtype = None

    # -- keys ---------------------------------------------------------------------------------
    def namespace(self, dtype: str) -> bytes:
        return _keys.namespace(fingerprint=self.fingerprint, weights_digest=self.weights_digest, dtype=dtype,
                               preset=self.preset, chunk_tokens=self.chunk_tokens)

    def keys_for(self, token_ids, dtype: str = "float32") -> list:
        """The hex key of every chunk of ``token_ids`` (deterministic across processes and machines)."""
        return _keys.chunk_keys(token_ids, self.namespace(dtype), self.chunk_tokens)

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

    def _check(self, data: bytes, key: str, ns_digest: str, ids, start: int, end: int, positions):
        """'ok', 'mismatch' (a collision: another prefix under this key) or raise."""
        try:
            header, payload = _unpack_entry(data, key)
        except ValueError as exc:
            raise self._quarantine(key, str(exc)) from None
        if header.get("namespace") != ns_digest:
            raise ModelMismatchError(
                f"store entry {key[:16]}… was written for another model, dtype, preset or chunk size "
                "(namespace digest differs); refusing it")
        if (header["token_ids"] != [int(x) for x in ids[start:end]]
                or header.get("prefix_sha256") != _keys.prefix_digest(ids[:end])
                or header.get("index") != start // self.chunk_tokens
                or header["positions"] != [int(x) for x in positions[start:end]]):
            return "mismatch", None
        return "ok", payload

    def _touch_chain(self, chain) -> None:
        # deeper chunks get older times: LRU evicts the tail of a chain before its head
        base = time.time()
        for j, key in enumerate(reversed(chain)):
            self.backend.touch(key, base + j * 1e-6)

    # -- put ------------------------------------------------------------------------------------
    def put(self, token_ids, cache, *, positions=None) -> dict:
        """Store ``cache`` (a batch-1 DynamicCache of ``token_ids``); only missing chunks are written."""
        from ..codec import _positions_of, encode
        from ..hf_adapter import SUPPORTED_DTYPES, build_cache, cache_layers

        ids = _keys.token_array(token_ids)
        layers = cache_layers(cache)
        n = layers[0][0].shape[1]
        if len(ids) != n:
            raise ConfigError(f"{len(ids)} token ids for a cache of {n} tokens")
        pos = [int(x) for x in _positions_of(positions, n).tolist()]
        dtype = SUPPORTED_DTYPES[layers[0][0].dtype]
        ns = self.namespace(dtype)
        ns_digest = hashlib.sha256(ns).hexdigest()
        chain = _keys.chunk_keys(ids, ns, self.chunk_tokens)
        out = {"tokens": n, "chunks": len(chain), "chunks_written": 0, "chunks_reused": 0, "bytes_written": 0,
               "bytes_reused": 0, "collisions": 0}
        prev = _keys.root_key(ns).hex()
        done = []
        for i, ((s, e), key) in enumerate(zip(_keys.chunk_bounds(n, self.chunk_tokens), chain)):
            existing = self.backend.get(key)
            if existing is not None:
                try:
                    verdict, _ = self._check(existing, key, ns_digest, ids, s, e, pos)
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
            chunk = build_cache([(k[:, s:e], v[:, s:e]) for k, v in layers])
            payload = encode(chunk, preset=self.preset, model=self.model, positions=pos[s:e])
            header = {"v": ENVELOPE_VERSION, "key": key, "parent": prev, "index": i, "namespace": ns_digest,
                      "token_ids": [int(x) for x in ids[s:e]], "prefix_sha256": _keys.prefix_digest(ids[:e]),
                      "positions": pos[s:e], "payload_bytes": len(payload),
                      "payload_sha256": hashlib.sha256(payload).hexdigest()}
            blob = _pack_entry(header, payload)
            if self.backend.put_if_absent(key, blob):
                out["chunks_written"] += 1
                out["bytes_written"] += len(blob)
            else:  # a concurrent writer stored it first
                again = self.backend.get(key)
                verdict = "ok"
                if again is not None:
                    verdict, _ = self._check(again, key, ns_digest, ids, s, e, pos)
                if verdict != "ok":
                    out["collisions"] += 1
                    break
                out["chunks_reused"] += 1
                out["bytes_reused"] += len(again) if again is not None else 0
            done.append(key)
            prev = key
        self._touch_chain(done)
        self._last_dtype = dtype
        self._count(puts=1, chunks_written=out["chunks_written"], chunks_reused=out["chunks_reused"],
                    bytes_written=out["bytes_written"], bytes_saved=out["bytes_reused"], collisions=out["collisions"])
        if self.max_bytes is not None:
            out["evicted"] = self.gc()["evicted"]
        return out

    # -- lookup -----------------------------------------------------------------------------------
    def _walk(self, ids, dtype: str, pos):
        ns = self.namespace(dtype)
        ns_digest = hashlib.sha256(ns).hexdigest()
        found = []
        for (s, e), key in zip(_keys.chunk_bounds(len(ids), self.chunk_tokens), _keys.chunk_keys(ids, ns, self.chunk_tokens)):
            data = self.backend.get(key)
            if data is None:
                break
            verdict, payload = self._check(data, key, ns_digest, ids, s, e, pos)
            if verdict != "ok":
                self._count(collisions=1)
                break
            found.append((key, s, e, payload))
        return found

    def longest_prefix(self, token_ids, *, dtype=None, positions=None, device=None):
        """(n_tokens, DynamicCache or None): the longest stored prefix of ``token_ids`` (whole chunks).

        ``dtype`` ("float32"/"float16"/"bfloat16" or a torch dtype) picks the namespace; by default
        every dtype is tried and the longest match wins.  ``positions`` (default 0, 1, 2, ...) must
        match the stored positions.
        """
        from ..codec import _positions_of, decode
        from ..hf_adapter import SUPPORTED_DTYPES, build_cache, cache_layers

        ids = _keys.token_array(token_ids)
        self._count(lookups=1, tokens_requested=len(ids))
        if len(ids) == 0:
            return 0, None
        pos = [int(x) for x in _positions_of(positions, len(ids)).tolist()]
        if dtype is None:
            dtypes = ([self._last_dtype] if self._last_dtype else []) + [d for d in DTYPE_NAMES if d != self._last_dtype]
        else:
            name = SUPPORTED_DTYPES.get(dtype, dtype)
            if name not in DTYPE_NAMES:
                raise ConfigError(f"dtype must be one of {DTYPE_NAMES}, got {dtype!r}")
            dtypes = [name]
        best = []
        for d in dtypes:
            found = self._walk(ids, d, pos)
            if len(found) > len(best):
                best = found
        if not best:
            return 0, None
        per_layer = None
        for key, s, e, payload in best:
            try:
                chunk = decode(payload, model=self.model)
            except DecodeError as exc:
                raise self._quarantine(key, f"{type(exc).__name__}: {exc}") from None
            layers = cache_layers(chunk)
            if layers[0][0].shape[1] != e - s:
                raise self._quarantine(key, f"it decodes to {layers[0][0].shape[1]} tokens, not {e - s}")
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
        self._touch_chain([k for k, _, _, _ in best])
        self._count(hits=1, tokens_hit=n)
        return n, build_cache(merged, device=device)

    # -- maintenance --------------------------------------------------------------------------------
    def gc(self, max_bytes=None) -> dict:
        """Evict least-recently-used entries until the store holds at most ``max_bytes`` (default: the
        store's budget).  Evicting a chunk only shortens later matches: every read checks its tokens."""
        budget = self.max_bytes if max_bytes is None else max_bytes
        entries = self.backend.list()
        total = sum(size for _, size, _ in entries)
        evicted = freed = 0
        if budget is not None and total > budget:
            for key, size, _ in sorted(entries, key=lambda t: (t[2], t[0])):
                if total <= budget:
                    break
                if self.backend.delete(key):
                    evicted += 1
                    freed += size
                total -= size
        self._count(evicted=evicted)
        return {"evicted": evicted, "bytes_freed": freed, "bytes_stored": total, "entries": len(entries) - evicted}

    def stats(self) -> dict:
        """Entries and bytes in the backend, and this store object's counters."""
        entries = self.backend.list()
        with self._lock:
            c = dict(self._counters)
        c.update(entries=len(entries), bytes_stored=sum(size for _, size, _ in entries),
                 hit_rate=(c["hits"] / c["lookups"]) if c["lookups"] else 0.0,
                 token_hit_rate=(c["tokens_hit"] / c["tokens_requested"]) if c["tokens_requested"] else 0.0,
                 backend=self.backend.name, max_bytes=self.max_bytes)
        return c

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
