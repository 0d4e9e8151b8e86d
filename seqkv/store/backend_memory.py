"""In-memory backend (``memory://name``): dicts in this process, for tests and short-lived stores.

Every backend opened with the same name in one process shares one space (as two clients of one server
would), until :meth:`MemoryBackend.discard` drops it; nothing is shared with other processes.  One lock
per space makes each primitive atomic, so threads may share a space freely.
"""
from __future__ import annotations

import re
import threading
import time
from urllib.parse import urlparse

from ..errors import ConfigError, StorageError
from .backend import AREAS, ASIDE_NAME_RE, ENTRIES, KEY_RE, META_FOLDER_RE, META_NAME_RE, Backend, register_backend

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


class _Space:
    """One named store: items per area (name -> [bytes, last use]) and side records."""

    def __init__(self):
        self.lock = threading.Lock()
        self.areas: dict[str, dict[str, list]] = {area: {} for area in AREAS}
        self.meta: dict[str, bytes] = {}


_SPACES: dict[str, _Space] = {}
_SPACES_LOCK = threading.Lock()


@register_backend("memory")
class MemoryBackend(Backend):
    name = "memory"

    def __init__(self, space: str):
        if not isinstance(space, str) or not _NAME_RE.match(space):
            raise ConfigError(f"a memory store needs a name of letters, digits, '.', '_' or '-', got {space!r}")
        self.space_name = space
        with _SPACES_LOCK:
            self._space = _SPACES.setdefault(space, _Space())

    @classmethod
    def from_url(cls, url: str, *, fsync: bool = False, **options) -> MemoryBackend:
        parsed = urlparse(url)
        if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
            raise ConfigError(f"memory URLs are memory://name, got {url!r}")
        if options:
            raise ConfigError(f"unknown options for the memory backend: {sorted(options)}")
        return cls(parsed.netloc)

    @staticmethod
    def discard(space: str) -> bool:
        """Forget the named space and everything in it; True when it existed."""
        with _SPACES_LOCK:
            return _SPACES.pop(space, None) is not None

    @staticmethod
    def _check(area: str, name: str) -> None:
        pattern = KEY_RE if area == ENTRIES else ASIDE_NAME_RE if area in AREAS else None
        if pattern is None or not pattern.match(name):
            raise StorageError(f"invalid item {name!r} of area {area!r}")

    def get(self, key: str):
        self._check(ENTRIES, key)
        with self._space.lock:
            item = self._space.areas[ENTRIES].get(key)
            return item[0] if item is not None else None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self._check(ENTRIES, key)
        data = bytes(data)  # a snapshot: the caller's buffer may change afterwards
        with self._space.lock:
            entries = self._space.areas[ENTRIES]
            if key in entries:
                return False
            entries[key] = [data, time.time()]
            return True

    def delete(self, name: str, area: str = ENTRIES) -> bool:
        self._check(area, name)
        with self._space.lock:
            return self._space.areas[area].pop(name, None) is not None

    def list(self, area: str = ENTRIES) -> list:
        if area not in AREAS:
            raise StorageError(f"unknown area {area!r}")
        with self._space.lock:
            return [(name, len(data), last) for name, (data, last) in self._space.areas[area].items()]

    def touch(self, key: str, when: float) -> None:
        self._check(ENTRIES, key)
        with self._space.lock:
            item = self._space.areas[ENTRIES].get(key)
            if item is not None:
                item[1] = when

    def move(self, area: str, name: str, to_area: str, to_name: str):
        self._check(area, name)
        self._check(to_area, to_name)
        with self._space.lock:
            src, dst = self._space.areas[area], self._space.areas[to_area]
            if name not in src or to_name in dst:
                return None
            dst[to_name] = src.pop(name)
            if to_area == ENTRIES:
                dst[to_name][1] = time.time()
        return f"memory://{self.space_name}/{to_area}/{to_name}"

    def meta_get(self, name: str):
        self._check_meta(name)
        with self._space.lock:
            return self._space.meta.get(name)

    def meta_set(self, name: str, data: bytes) -> None:
        self._check_meta(name)
        with self._space.lock:
            self._space.meta[name] = bytes(data)

    def meta_delete(self, name: str) -> bool:
        self._check_meta(name)
        with self._space.lock:
            return self._space.meta.pop(name, None) is not None

    def meta_list(self, folder: str) -> list:
        if not META_FOLDER_RE.match(folder):
            raise StorageError(f"invalid side record folder {folder!r}")
        head = folder + "/"
        with self._space.lock:
            names = [n[len(head):] for n in self._space.meta if n.startswith(head)]
        return sorted({n.split("/", 1)[0] for n in names})

    @staticmethod
    def _check_meta(name: str) -> None:
        if not META_NAME_RE.match(name):
            raise StorageError(f"invalid side record name {name!r}")
