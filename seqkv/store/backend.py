"""What a storage backend of the prefix store provides: a few blob primitives, and the URL schemes.

A backend keeps byte strings in three *areas*: ``entries`` (the store's entries, under 64-hex keys),
``quarantine`` (entries that failed their checks, kept for inspection) and ``limbo`` (entries an evictor
holds out of sight while it checks their references), plus small *side records* (``meta_*``) named
``<kind>/<64 hex>`` or ``<kind>/<64 hex>/<64 hex>.<16 hex>``.  Everything above that (reference records,
the content index, reuse scores, quarantine and hide/unhide) is built once over these primitives
(:mod:`seqkv.store.metadata`, :mod:`seqkv.store.entries`); a backend only has to keep the two atomic
guarantees the store relies on:

* ``put_if_absent`` publishes a whole entry at once, and only when the key is absent (no two writers both
  create it, a reader never sees a partial entry);
* ``move`` takes an item out of one area into another at once, and refuses to overwrite an entry.

A backend that writes through temporary files lists them with ``temp_files`` (``gc`` removes old ones: a
writer that crashed left them).

Backends register their URL schemes with :func:`register_backend`; :func:`open_backend` looks them up.
A backend module imports its client library (redis, boto3) only when a backend is opened.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from urllib.parse import urlparse

from ..errors import ConfigError, StorageError

ENTRIES, QUARANTINE, LIMBO = "entries", "quarantine", "limbo"
AREAS = (ENTRIES, QUARANTINE, LIMBO)

KEY_RE = re.compile(r"^[0-9a-f]{64}$")
# an item set aside: ``<key>.<time in ns>.<pid>`` (see seqkv.store.entries.aside_name)
ASIDE_NAME_RE = re.compile(r"^[0-9a-f]{64}\.[0-9]+\.[0-9]+$")
META_NAME_RE = re.compile(r"^(refs|content|score)/[0-9a-f]{64}(/[0-9a-f]{64}\.[0-9a-f]{16})?$")
META_FOLDER_RE = re.compile(r"^(refs|content|score)(/[0-9a-f]{64})?$")


class Backend(ABC):
    """The primitives of a store backend.  Entry keys are 64-char lowercase hex strings.

    Subclasses implement the abstract methods and ``from_url``; ``exists`` and ``close`` have defaults.
    Errors of the storage itself are raised as :class:`seqkv.StorageError`.
    """

    name = "abstract"

    @classmethod
    def from_url(cls, url: str, *, fsync: bool = False, **options) -> Backend:
        """The backend a URL of a registered scheme names (``fsync`` matters to the directory backend only)."""
        raise ConfigError(f"the {cls.name} backend cannot be opened from a URL")

    # -- entries ------------------------------------------------------------------------------
    @abstractmethod
    def get(self, key: str):  # -> bytes | None
        """The entry's bytes, or None when it is not stored."""

    def exists(self, key: str) -> bool:
        return self.get(key) is not None

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Store ``data`` atomically unless ``key`` exists; True when this call created it."""

    @abstractmethod
    def delete(self, name: str, area: str = ENTRIES) -> bool:
        """Remove an entry (or, with ``area``, an item set aside); True when it was there (S3 cannot tell:
        always True)."""

    @abstractmethod
    def list(self, area: str = ENTRIES) -> list:
        """``[(name, size in bytes, last use in seconds since the epoch)]`` of an area.  For the entries the
        last use is what ``touch`` recorded; for items set aside it is best effort (0.0 where not kept)."""

    @abstractmethod
    def touch(self, key: str, when: float) -> None:
        """Record ``when`` as the entry's last use (nothing when the entry is gone)."""

    @abstractmethod
    def move(self, area: str, name: str, to_area: str, to_name: str):  # -> str | None
        """Move ``name`` of ``area`` to ``to_name`` of ``to_area`` atomically; where it went (the backend's own
        name for it: a path, a Redis key, an S3 object key), or None when nothing moved: the source was not
        there, or the destination is an entry that exists (then the source stays where it was)."""

    # -- side records -------------------------------------------------------------------------
    @abstractmethod
    def meta_get(self, name: str):  # -> bytes | None
        """A side record's bytes, or None."""

    @abstractmethod
    def meta_set(self, name: str, data: bytes) -> None:
        """Write a side record (an atomic replace)."""

    @abstractmethod
    def meta_delete(self, name: str) -> bool:
        """Remove a side record; True when it was there (S3: always True)."""

    @abstractmethod
    def meta_list(self, folder: str) -> list:
        """The names directly under ``folder`` (``<kind>`` or ``<kind>/<64 hex>``), last part only, sorted."""

    # -- temporary files ------------------------------------------------------------------------
    def temp_files(self) -> list:
        """``[(name, size in bytes, modification time)]`` of the backend's own temporary files (a write in
        progress, or left by a writer that crashed); backends that write in place have none."""
        return []

    def delete_temp(self, name: str) -> bool:
        """Remove a temporary file ``temp_files`` listed; True when it was there."""
        return False

    def close(self) -> None:
        pass


_SCHEMES: dict[str, type] = {}


def aside_address(head: str, area: str, name: str) -> str:
    """The address of a set-aside item (quarantine, limbo) under its area's ``head`` prefix, for backends that
    keep every area in one key space (Redis, S3); the name is checked first."""
    if not ASIDE_NAME_RE.match(name):
        raise StorageError(f"invalid item {name!r} of area {area!r}")
    return head + name


def register_backend(*schemes: str):
    """Class decorator: open URLs of ``schemes`` with this :class:`Backend` subclass (its ``from_url``)."""

    def register(cls):
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise ConfigError(f"{cls!r} is not a store Backend")
        for scheme in schemes:
            if scheme in _SCHEMES and _SCHEMES[scheme] is not cls:
                raise ConfigError(f"the store URL scheme {scheme!r} is registered twice")
            _SCHEMES[scheme] = cls
        return cls

    return register


def backend_schemes() -> list[str]:
    """The URL schemes backends have registered."""
    return sorted(_SCHEMES)


def open_backend(url: str, *, fsync: bool = False, **options) -> Backend:
    """The backend named by ``url``: file:///path, redis://host:port/db, s3://bucket/prefix, memory://name
    or the scheme of any other registered backend."""
    if not isinstance(url, str):
        raise ConfigError(f"the store URL must be a string, got {type(url).__name__}")
    try:
        scheme = urlparse(url).scheme
    except ValueError as exc:
        raise ConfigError(f"invalid store URL {url!r}: {exc}") from None
    cls = _SCHEMES.get(scheme)
    if cls is None:
        raise ConfigError(f"unsupported store URL {url!r}: use file:///path, redis://host:port/db, s3://bucket/prefix "
                          f"or memory://name (registered schemes: {', '.join(backend_schemes())})")
    return cls.from_url(url, fsync=fsync, **options)
