"""Deterministic keys of the prefix store: a sha256 hash chain over token-id chunks.

``key_{-1} = sha256(namespace)`` and ``key_i = sha256(key_{i-1} || ids_i as little-endian int32 || namespace)``,
where ``namespace`` is the canonical JSON of the model fingerprint (and weights digest), dtype, preset and
chunk size.  Nothing here depends on the process (no ``hash()``, no randomised seeds), so every process and
machine computes the same keys.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from ..errors import ConfigError

NAMESPACE_VERSION = 1
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1


def namespace(*, fingerprint: str, dtype: str, preset: str, chunk_tokens: int, weights_digest: str = "",
              chunking: str = "fixed", codec_options=None, boundary_tokens=()) -> bytes:
    """The canonical namespace bytes mixed into every key.  ``chunking``, ``codec_options`` (the encode
    options on top of the preset) and ``boundary_tokens`` appear only when they differ from the defaults,
    so the keys of fixed-chunk default-preset stores are unchanged."""
    fields = {"v": NAMESPACE_VERSION, "model": fingerprint, "weights": weights_digest, "dtype": dtype,
              "preset": preset, "chunk_tokens": int(chunk_tokens)}
    if chunking != "fixed":
        fields["chunking"] = chunking
    if codec_options:
        fields["codec"] = codec_options
    if len(boundary_tokens):
        fields["boundary_tokens"] = sorted(int(t) for t in boundary_tokens)
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")


def token_array(token_ids) -> np.ndarray:
    """Token ids as a flat int64 array, validated to fit in int32."""
    if hasattr(token_ids, "detach"):
        token_ids = token_ids.detach().cpu().numpy()
    try:
        arr = np.asarray(token_ids)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"token_ids must be a sequence of integers: {exc}") from None
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ConfigError(f"token_ids must be 1-D (or [1, n]), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"token_ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (int(arr.min()) < _INT32_MIN or int(arr.max()) > _INT32_MAX):
        raise ConfigError("token ids must fit in int32")
    return arr


def token_bytes(ids) -> bytes:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).astype("<i4")).tobytes()


def root_key(ns: bytes) -> bytes:
    return hashlib.sha256(ns).digest()


def chain_key(prev: bytes, chunk_ids, ns: bytes) -> bytes:
    """key_i from key_{i-1}, the chunk's token ids and the namespace (32 raw bytes)."""
    return hashlib.sha256(prev + token_bytes(chunk_ids) + ns).digest()


def chunk_bounds(n_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """[start, end) of every chunk, the last partial one included."""
    return [(s, min(s + chunk_tokens, n_tokens)) for s in range(0, n_tokens, chunk_tokens)]


def chunk_keys(token_ids, ns: bytes, chunk_tokens: int) -> list[str]:
    """Hex key of every chunk of ``token_ids`` (the last partial chunk included)."""
    ids = token_array(token_ids)
    keys, prev = [], root_key(ns)
    for s, e in chunk_bounds(len(ids), chunk_tokens):
        prev = chain_key(prev, ids[s:e], ns)  # a module global: tests monkeypatch it to force collisions
        keys.append(prev.hex())
    return keys


def prefix_digest(ids) -> str:
    """sha256 of the whole token prefix, independent of the key chain (checked on every read)."""
    return hashlib.sha256(b"seqkv-prefix\x00" + token_bytes(ids)).hexdigest()



def chain_keys(token_ids, ns: bytes, bounds) -> list[str]:
    """Hex key of every chunk [start, end) in ``bounds`` (consecutive, from 0)."""
    ids = token_array(token_ids)
    keys, prev = [], root_key(ns)
    for s, e in bounds:
        prev = chain_key(prev, ids[s:e], ns)
        keys.append(prev.hex())
    return keys


def content_digest(ids, ns: bytes) -> str:
    """sha256 of a chunk's tokens alone (and the namespace): the near-duplicate index key, the same for
    the same tokens under any preceding prefix."""
    return hashlib.sha256(b"seqkv-content\x00" + ns + b"\x00" + token_bytes(ids)).hexdigest()


def tokens_digest(ids) -> str:
    """sha256 of a chunk's own tokens (checked on every read; the entry may not carry the ids)."""
    return hashlib.sha256(b"seqkv-tokens\x00" + token_bytes(ids)).hexdigest()


def positions_digest(pos) -> str:
    """sha256 of a chunk's positions (checked on every read: a cache stored at other positions is another one)."""
    return hashlib.sha256(b"seqkv-positions\x00" + np.asarray(pos, dtype="<i8").tobytes()).hexdigest()
