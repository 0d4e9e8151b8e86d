"""The prefix store's side records, kept once for every backend over its ``meta_*`` primitives.

* reference records ``refs/<base>/<referrer key>.<nonce>``: one per residual entry (and writer), so that
  a base is never evicted while a residual needs it; no two writers share a record;
* the near-duplicate index ``content/<content digest>``: the key of a plainly coded entry with those tokens;
* expected-reuse scores ``score/<key>``: a decimal count (the store's token-trie count), read by eviction.

docs/format.md §10.2 describes them.  Each record is one backend write, atomic on every backend (the
Redis backend keeps a base's reference records as one set, ``SADD``/``SREM``).
"""
from __future__ import annotations

from .backend import Backend


class Metadata:
    """Reference records, the content index and reuse scores of the store on ``backend``."""

    def __init__(self, backend: Backend):
        self.backend = backend

    # -- reference records ------------------------------------------------------------------------
    def add_ref(self, base: str, ref_id: str) -> None:
        self.backend.meta_set(f"refs/{base}/{ref_id}", b"")

    def remove_ref(self, base: str, ref_id: str) -> bool:
        return self.backend.meta_delete(f"refs/{base}/{ref_id}")

    def refs(self, base: str) -> list:
        """The reference records of ``base`` (``<referrer key>.<nonce>``), sorted."""
        return self.backend.meta_list(f"refs/{base}")

    def ref_bases(self) -> list:
        """Keys that have (or had: the directory backend keeps empty folders) reference records."""
        return self.backend.meta_list("refs")

    # -- the near-duplicate index -------------------------------------------------------------------
    def content_get(self, digest: str):  # -> str | None
        data = self.backend.meta_get(f"content/{digest}")
        return data.decode("ascii") if data else None

    def content_set(self, digest: str, key: str) -> None:
        self.backend.meta_set(f"content/{digest}", key.encode("ascii"))

    def content_delete(self, digest: str, key: str) -> None:
        """Drop the index record if it still names ``key``."""
        if self.content_get(digest) == key:
            self.backend.meta_delete(f"content/{digest}")

    # -- expected-reuse scores ----------------------------------------------------------------------
    def set_score(self, key: str, score: int) -> None:
        self.backend.meta_set(f"score/{key}", str(int(score)).encode("ascii"))

    def score(self, key: str) -> int:
        data = self.backend.meta_get(f"score/{key}")
        try:
            return int(data) if data else 0
        except ValueError:
            return 0

    def delete_score(self, key: str) -> None:
        self.backend.meta_delete(f"score/{key}")
