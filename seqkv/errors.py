"""The seqkv exception tree.

Every error seqkv raises on purpose derives from :class:`SeqKVError`, and each
also subclasses the matching built-in so that ``except ValueError`` keeps
working for callers that do not know seqkv.  Decoding any byte string raises
only :class:`DecodeError` subclasses.
"""
from __future__ import annotations


class SeqKVError(Exception):
    """Root of every error seqkv raises on purpose."""


class ConfigError(SeqKVError, ValueError):
    """A preset, option or pipeline configuration is invalid."""


class EncodeError(SeqKVError, ValueError):
    """The cache given to ``encode`` cannot be encoded as asked."""


class UnsupportedCacheError(EncodeError, TypeError):
    """The cache class or layout is one seqkv does not handle (sliding window, quantized, batch > 1, ...)."""


class NonFiniteError(EncodeError):
    """A lossy preset met NaN or Inf values; only lossless mode keeps them."""


class ValueRangeError(NonFiniteError):
    """A lossy preset met finite values too large to carry within its error bound (magnitude above
    ``seqkv.format.pipeline.MAX_LOSSY_MAGNITUDE``, or symbols beyond the quantizer's range); lossless keeps
    them.  A :class:`NonFiniteError` subclass: these were reported as one before."""


class CompressionBoundError(EncodeError):
    """The container would decode to more elements per byte than the format allows (docs/format.md §3, the
    expansion bound): a nearly constant cache with very many tokens.  Nothing is written."""


class DecodeError(SeqKVError, ValueError):
    """The bytes given to ``decode``/``inspect`` are not a valid seqkv container."""


class FormatError(DecodeError):
    """The container is truncated, malformed or violates a format bound."""


class UnsupportedVersionError(DecodeError):
    """The container's major version (or a required feature) is unknown to this reader."""


class ChecksumError(DecodeError):
    """A header or section checksum does not match its bytes."""


class ModelMismatchError(SeqKVError, ValueError):
    """A container (or profile) was made for a different model than the one given."""


class StorageError(SeqKVError, OSError):
    """A storage backend failed."""


class PruneError(ConfigError):
    """A pruner is misconfigured or cannot prune this cache (budget, ratio, missing model or queries)."""


class AlreadyPrunedError(PruneError):
    """The cache (or container) was pruned already; pruning it again would lose its position record."""
