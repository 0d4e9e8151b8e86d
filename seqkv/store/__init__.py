"""seqkv.store: a prefix-sharing, near-duplicate-reusing store of compressed KV caches (directory, Redis, S3
or memory backends)."""
from __future__ import annotations

# each backend module registers its URL scheme(s); none imports its client library (redis, boto3) here
from . import backend_dir, backend_memory, backend_redis, backend_s3  # noqa: F401
from .backend import Backend, open_backend, register_backend
from .keys import chain_key, chain_keys, chunk_keys, namespace, root_key
from .prefix_store import CorruptEntryError, MissingBaseError, PrefixStore, scale_for_kl

__all__ = ["Backend", "CorruptEntryError", "MissingBaseError", "PrefixStore", "chain_key", "chain_keys", "chunk_keys",
           "namespace", "open_backend", "register_backend", "root_key", "scale_for_kl"]
