"""What crashed writers, evictors and readers leave behind, and how ``gc`` reclaims it while others run.

A process killed at any point leaves only items that no live process needs once they are old enough:

* temporary files (directory backend): a writer killed between writing its temp file and publishing it.
  Removed once older than ``leftovers_after`` seconds (a live writer publishes within milliseconds);
* limbo items: an evictor killed between hiding an entry and dropping (or unhiding) it.  Once older than
  ``leftovers_after`` the entry is put back among the entries (dropped instead when its key was written
  again meanwhile); the budget pass that follows evicts it again if it must.  The entry was whole when it
  was hidden, and its reference records were kept while it was held (below), so putting it back is safe;
* stale reference records: a writer killed after taking its reference and before writing its residual.
  Dropped once older than ``stale_refs_after`` seconds when the referrer is neither stored (naming that
  record) nor held in limbo.  A writer whose put outlives the threshold notices that its record is gone
  before it writes, and takes a fresh one (see ``PrefixStore.put``), so no age is unsafe, only wasteful;
* orphan side records: scores and content-index records of keys that are neither stored nor in limbo (a
  reader touching a chunk that was evicted meanwhile, an evictor killed before its clean-up).

The age of a limbo item is read from its name (``<key>.<time in ns>.<pid>``, :func:`seqkv.store.entries.aside_name`),
that of a reference record from its nonce (:func:`seqkv.store.envelope.ref_age`), that of a temp file from
its modification time: the same rules hold on every backend.
"""
from __future__ import annotations

import time

from .backend import ENTRIES, LIMBO, QUARANTINE, Backend
from .envelope import ref_age, unpack_entry
from .metadata import Metadata

LEFTOVERS_AFTER = 300.0    # seconds: temp files and limbo items older than this are a crashed process's
STALE_REFS_AFTER = 300.0   # seconds: reference records older than this, of referrers not stored, are stale


def aside_parts(name: str):
    """(key, seconds since the epoch) of an item set aside, or None for a name of another form."""
    parts = name.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]) / 1e9


def limbo_keys(backend: Backend) -> set:
    """The keys of the entries held in limbo now."""
    return {p[0] for p in (aside_parts(name) for name, _, _ in backend.list(LIMBO)) if p is not None}


def usage(backend: Backend) -> dict:
    """Items outside the entries: temp files, limbo and quarantine (count and bytes of each)."""
    temp, limbo, quarantine = backend.temp_files(), backend.list(LIMBO), backend.list(QUARANTINE)
    return {"temp_files": len(temp), "temp_bytes": sum(size for _, size, _ in temp),
            "limbo_entries": len(limbo), "limbo_bytes": sum(size for _, size, _ in limbo),
            "quarantine_entries": len(quarantine), "quarantine_bytes": sum(size for _, size, _ in quarantine)}


def reclaim_temp(backend: Backend, older_than: float, now: float) -> tuple:
    """(files removed, bytes freed): temp files older than ``older_than`` seconds."""
    removed = freed = 0
    for name, size, mtime in backend.temp_files():
        if now - mtime > older_than and backend.delete_temp(name):
            removed += 1
            freed += size
    return removed, freed


def reclaim_limbo(backend: Backend, older_than: float, now: float) -> tuple:
    """(entries put back, items dropped, bytes freed): limbo items older than ``older_than`` seconds."""
    restored = dropped = freed = 0
    for name, size, _ in backend.list(LIMBO):
        parts = aside_parts(name)
        if parts is None or now - parts[1] <= older_than:
            continue
        if backend.move(LIMBO, name, ENTRIES, parts[0]) is not None:
            restored += 1
        elif backend.delete(name, LIMBO):  # the key holds a newer entry (or another gc took the item first)
            dropped += 1
            freed += size
    return restored, dropped, freed


def _names_record(backend: Backend, referrer: str, base: str, ref_id: str) -> bool:
    """Whether the stored entry ``referrer`` is a residual holding the reference record ``ref_id`` of ``base``."""
    data = backend.get(referrer)
    if data is None:
        return False
    try:
        header, _ = unpack_entry(data, referrer)
    except ValueError:
        return True  # damaged: the read path quarantines it first (then the record goes)
    return header.get("base") == base and header.get("base_ref") == ref_id


def drop_stale_refs(backend: Backend, metadata: Metadata, older_than: float, now: float) -> int:
    """Remove reference records older than ``older_than`` seconds whose referrer is neither stored (naming
    the record) nor held in limbo; how many were removed."""
    suspects = []
    for base in metadata.ref_bases():
        for ref_id in metadata.refs(base):
            if ref_age(ref_id, now) <= older_than:
                continue
            referrer = ref_id.split(".", 1)[0]
            if not _names_record(backend, referrer, base, ref_id):
                suspects.append((base, ref_id, referrer))
    if not suspects:
        return 0
    # an entry being evicted is out of sight for a moment (and may be put back): the limbo listing comes
    # after the reads above, and a second read after it catches an entry put back in between
    held = limbo_keys(backend)
    dropped = 0
    for base, ref_id, referrer in suspects:
        if referrer in held or _names_record(backend, referrer, base, ref_id):
            continue
        if metadata.remove_ref(base, ref_id):
            dropped += 1
    return dropped


def drop_orphans(backend: Backend, metadata: Metadata) -> int:
    """Remove scores and content-index records of keys that are neither stored nor in limbo (and damaged
    content records); how many were removed.  Records are read before the entries are listed: a record
    naming a key is only written once that key is stored, so a key written after the listing is never
    judged from it."""
    scored = metadata.scored_keys()
    index = {digest: metadata.content_get(digest) for digest in metadata.content_digests()}
    present = {key for key, _, _ in backend.list()} | limbo_keys(backend)
    dropped = 0
    for key in scored:
        if key not in present:
            metadata.delete_score(key)
            dropped += 1
    for digest, key in index.items():
        if key is None:
            if metadata.content_drop_damaged(digest):
                dropped += 1
        elif key not in present and metadata.content_delete(digest, key):
            dropped += 1
    return dropped


def reclaim(backend: Backend, metadata: Metadata, *, leftovers_after: float, stale_refs_after) -> dict:
    """Everything above, in this order (limbo entries put back before the reference records are judged)."""
    now = time.time()
    temp_removed, temp_freed = reclaim_temp(backend, leftovers_after, now)
    restored, dropped, limbo_freed = reclaim_limbo(backend, leftovers_after, now)
    stale = drop_stale_refs(backend, metadata, stale_refs_after, now) if stale_refs_after is not None else 0
    orphans = drop_orphans(backend, metadata)
    return {"temp_files_removed": temp_removed, "limbo_restored": restored, "limbo_dropped": dropped,
            "leftover_bytes_freed": temp_freed + limbo_freed, "stale_refs_dropped": stale,
            "orphan_records_dropped": orphans}
