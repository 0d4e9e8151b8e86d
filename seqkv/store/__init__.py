"""seqkv.store: an exact-prefix-sharing store of compressed KV caches (directory, Redis or S3)."""
from __future__ import annotations

from .keys import chain_key, chunk_keys, namespace, root_key
from .prefix_store import Backend, CorruptEntryError, PrefixStore, open_backend

__all__ = ["Backend", "CorruptEntryError", "PrefixStore", "chain_key", "chunk_keys", "namespace", "open_backend", "root_key"]
