"""The statistics of a PrefixStore object: a thread-safe tally of what its calls did, and the report.

The store hands over each call's outcome (the dict ``put`` returns, a lookup's requested and matched
tokens, the collisions met, ``gc``'s evictions, a quarantine) and :meth:`StoreStats.report` adds what the
backend holds (entries, bytes stored) and the derived rates.  The tally is fed by outcomes rather than by
watching backend calls: a backend read cannot tell a reused chunk from a collision, nor a residual's
saving from a plain write.
"""
from __future__ import annotations

import threading

COUNTERS = ("lookups", "hits", "tokens_requested", "tokens_hit", "bytes_saved", "puts", "chunks_written",
            "chunks_reused", "bytes_written", "chunks_residual", "residual_bytes_saved", "token_bytes", "tokens_coded",
            "token_bytes_zstd3", "evicted", "quarantined", "collisions")

# put()'s result field -> counter, for the counters a put adds to
_PUT_FIELDS = {"chunks_written": "chunks_written", "chunks_reused": "chunks_reused", "bytes_written": "bytes_written",
               "bytes_reused": "bytes_saved", "collisions": "collisions", "chunks_residual": "chunks_residual",
               "residual_bytes_saved": "residual_bytes_saved", "token_bytes": "token_bytes",
               "tokens_coded": "tokens_coded", "token_bytes_zstd3": "token_bytes_zstd3"}


class StoreStats:
    def __init__(self):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                self._counts[name] += n

    def add_put(self, result: dict) -> None:
        """One put, from the dict it returned."""
        self.add(puts=1, **{counter: result[field] for field, counter in _PUT_FIELDS.items()})

    def add_lookup(self, tokens_requested: int) -> None:
        self.add(lookups=1, tokens_requested=tokens_requested)

    def add_hit(self, tokens_hit: int) -> None:
        self.add(hits=1, tokens_hit=tokens_hit)

    def counts(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def report(self, entries: list, *, backend: str, max_bytes) -> dict:
        """The counters, the backend's ``entries`` (``[(key, size, last use)]``) and bytes, and the rates."""
        c = self.counts()
        c.update(entries=len(entries), bytes_stored=sum(size for _, size, _ in entries),
                 hit_rate=(c["hits"] / c["lookups"]) if c["lookups"] else 0.0,
                 token_hit_rate=(c["tokens_hit"] / c["tokens_requested"]) if c["tokens_requested"] else 0.0,
                 token_bits_per_token=(8 * c["token_bytes"] / c["tokens_coded"]) if c["tokens_coded"] else 0.0,
                 token_bits_per_token_zstd3=(8 * c["token_bytes_zstd3"] / c["tokens_coded"]) if c["tokens_coded"] else 0.0,
                 backend=backend, max_bytes=max_bytes)
        return c
