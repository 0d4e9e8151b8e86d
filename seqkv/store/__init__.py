"""seqkv.store: a prefix-sharing, near-duplicate-reusing store of compressed KV caches (directory, Redis or S3)."""
from __future__ import annotations

from .keys import chain_key, chain_keys, chunk_keys, namespace, root_key
from .prefix_store import Backend, CorruptEntryError, MissingBaseError, PrefixStore, open_backend, scale_for_kl

__all__ = ["Backend", "CorruptEntryError", "MissingBaseError", "PrefixStore", "chain_key", "chain_keys", "chunk_keys",
           "namespace", "open_backend", "root_key", "scale_for_kl"]
