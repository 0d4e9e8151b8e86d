"""The prefix store's side records, kept once for every backend over its ``meta_*`` primitives.

* reference records ``refs/<base>/<referrer key>.<nonce>``: one per residual entry (and writer), so that
  a base is never evicted while a residual needs it; no two writers share a record;
* the near-duplicate index ``content/<content digest>``: the key of a plainly coded entry with those tokens;
* expected-reuse scores ``score/<key>``: a decimal count (the store's token-trie count), read by eviction.

docs/format.md §10.2 describes them.  Each record is one backend write, atomic on every backend (the
Redis backend keeps a base's reference records as one set, ``SADD``/``SREM``).

Records are read defensively: a content record that is not a key, a score that is not a number, or a
reference record of a name this version does not write reads as absent (and cannot pin a base), so damaged
metadata costs reuse, never an exception.
"""
from __future__ import annotations

import re

from .backend import KEY_RE, Backend

REF_ID_RE = re.compile(r"^[0-9a-f]{64}\.[0-9a-f]{16}$")


class Metadata:
    """Reference records, the content index and reuse scores of the store on ``backend``."""

    def __init__(self, backend: Backend):
        self.backend = backend

    # -- reference records ------------------------------------------------------------------------
    def add_ref(self, base: str, ref_id: str) -> None:
        self.backend.meta_set(f"refs/{base}/{ref_id}", b"")

    def remove_ref(self, base: str, ref_id: str) -> bool:
        return self.backend.meta_delete(f"refs/{base}/{ref_id}")

    def has_ref(self, base: str, ref_id: str) -> bool:
        return self.backend.meta_get(f"refs/{base}/{ref_id}") is not None

    def refs(self, base: str) -> list:
        """The reference records of ``base`` (``<referrer key>.<nonce>``), sorted; names of another form are
        ignored (no writer of this format makes them, and the backends cannot remove them)."""
        return [r for r in self.backend.meta_list(f"refs/{base}") if REF_ID_RE.match(r)]

    def ref_bases(self) -> list:
        """Keys that have (or had, for a moment) reference records."""
        return [k for k in self.backend.meta_list("refs") if KEY_RE.match(k)]

    # -- the near-duplicate index -------------------------------------------------------------------
    def content_get(self, digest: str):  # -> str | None
        """The key the index names for ``digest``, or None (also when the record is damaged)."""
        data = self.backend.meta_get(f"content/{digest}")
        try:
            key = bytes(data).decode("ascii") if data else None
        except (UnicodeDecodeError, TypeError):
            return None
        return key if key is not None and KEY_RE.match(key) else None

    def content_digests(self) -> list:
        return [d for d in self.backend.meta_list("content") if KEY_RE.match(d)]

    def content_set(self, digest: str, key: str) -> None:
        self.backend.meta_set(f"content/{digest}", key.encode("ascii"))

    def content_delete(self, digest: str, key: str) -> bool:
        """Drop the index record if it still names ``key``; True when it did."""
        if self.content_get(digest) == key:
            return self.backend.meta_delete(f"content/{digest}")
        return False

    def content_drop_damaged(self, digest: str) -> bool:
        """Drop the index record if it is there but names no key (damaged); True when it did."""
        data = self.backend.meta_get(f"content/{digest}")
        if data is not None and self.content_get(digest) is None:
            return self.backend.meta_delete(f"content/{digest}")
        return False

    # -- expected-reuse scores ----------------------------------------------------------------------
    def set_score(self, key: str, score: int) -> None:
        self.backend.meta_set(f"score/{key}", str(int(score)).encode("ascii"))

    def score(self, key: str) -> int:
        data = self.backend.meta_get(f"score/{key}")
        try:
            return int(data) if data else 0
        except (ValueError, TypeError):
            return 0

    def scored_keys(self) -> list:
        return [k for k in self.backend.meta_list("score") if KEY_RE.match(k)]

    def delete_score(self, key: str) -> None:
        self.backend.meta_delete(f"score/{key}")
