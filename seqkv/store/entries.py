"""Entries set aside, kept once for every backend over its atomic ``move``: quarantine and limbo.

* quarantine: an entry that failed its checks is moved out of the store's namespace (kept for inspection;
  the next put writes the key again);
* the eviction protocol: an evictor *hides* an entry (moves it to limbo), then checks its reference records,
  then drops it, or *unhides* it when a writer took a reference meanwhile.  A writer adds its reference
  record BEFORE it reads the base, so either it finds the base gone (and codes plainly) or the evictor
  sees the record (and puts the base back).
"""
from __future__ import annotations

import os
import time

from .backend import ENTRIES, LIMBO, QUARANTINE, Backend


def aside_name(key: str) -> str:
    """A name for ``key`` set aside, unique across moves (time in ns) and processes (pid)."""
    return f"{key}.{time.time_ns()}.{os.getpid()}"


def quarantine(backend: Backend, key: str) -> str:
    """Move the entry out of the store's namespace; where it went, or "" when it was not there."""
    return backend.move(ENTRIES, key, QUARANTINE, aside_name(key)) or ""


def quarantined(backend: Backend) -> list:
    """Names of the quarantined entries, sorted."""
    return sorted(name for name, _, _ in backend.list(QUARANTINE))


def hide(backend: Backend, key: str):  # -> str | None
    """Move the entry out of sight (atomic); the token to unhide or drop it with, None when it was not there."""
    token = aside_name(key)
    return token if backend.move(ENTRIES, key, LIMBO, token) is not None else None


def unhide(backend: Backend, key: str, token: str) -> None:
    """Put a hidden entry back, unless the key was written again meanwhile (the same bytes for the same key)."""
    if backend.move(LIMBO, token, ENTRIES, key) is None:
        backend.delete(token, LIMBO)


def drop_hidden(backend: Backend, token: str) -> None:
    backend.delete(token, LIMBO)
