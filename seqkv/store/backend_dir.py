"""Local-directory backend (the default, embedded one): one file per entry.

Layout under the root: ``entries/<k[:2]>/<key>`` (the entries), ``tmp/`` (files being written),
``quarantine/`` (entries that failed to decode).  A write goes to a temp file in ``tmp/`` (fsync'ed when
asked) and is published with ``os.link`` (atomic and exclusive: it fails if the entry exists) or, where
the file system has no hard links, ``os.replace`` after an existence check.  The entry's mtime is its
last-use time for LRU eviction.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
import time

from ..errors import StorageError
from .prefix_store import Backend

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


class DirBackend(Backend):
    name = "dir"

    def __init__(self, root: str, *, fsync: bool = False):
        self.root = os.path.abspath(root)
        self.fsync = fsync
        self.entries_dir = os.path.join(self.root, "entries")
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.quarantine_dir = os.path.join(self.root, "quarantine")
        try:
            for d in (self.entries_dir, self.tmp_dir, self.quarantine_dir):
                os.makedirs(d, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the store directory {self.root}: {exc}") from exc

    def _path(self, key: str) -> str:
        if not _KEY_RE.match(key):
            raise StorageError(f"invalid entry key {key!r}")
        return os.path.join(self.entries_dir, key[:2], key)

    def get(self, key: str):
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read entry {key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        if os.path.exists(path):
            return False
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=key[:16] + ".")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
                try:
                    os.link(tmp, path)  # atomic, and refuses to overwrite
                    created = True
                except FileExistsError:
                    created = False
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                        raise
                    created = not os.path.exists(path)
                    if created:
                        os.replace(tmp, path)  # no hard links here: same bytes for the same key
            finally:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            if created and self.fsync:
                self._fsync_dir(os.path.dirname(path))
            return created
        except OSError as exc:
            raise StorageError(f"cannot write entry {key}: {exc}") from exc

    @staticmethod
    def _fsync_dir(path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def delete(self, key: str) -> bool:
        try:
            os.unlink(self._path(key))
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot delete entry {key}: {exc}") from exc

    def touch(self, key: str, when: float) -> None:
        try:
            os.utime(self._path(key), ns=(int(when * 1e9), int(when * 1e9)))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot update entry {key}: {exc}") from exc

    def list(self):
        out = []
        try:
            shards = os.listdir(self.entries_dir)
        except OSError as exc:
            raise StorageError(f"cannot list {self.entries_dir}: {exc}") from exc
        for shard in shards:
            d = os.path.join(self.entries_dir, shard)
            try:
                names = os.listdir(d)
            except (NotADirectoryError, FileNotFoundError):
                continue
            for name in names:
                if not _KEY_RE.match(name):
                    continue
                try:
                    st = os.stat(os.path.join(d, name))
                except FileNotFoundError:
                    continue
                out.append((name, st.st_size, st.st_mtime_ns / 1e9))
        return out

    def quarantine(self, key: str) -> str:
        dest = os.path.join(self.quarantine_dir, f"{key}.{time.time_ns()}.{os.getpid()}")
        try:
            os.replace(self._path(key), dest)
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise StorageError(f"cannot quarantine entry {key}: {exc}") from exc
        return dest

    def quarantined(self) -> list[str]:
        return sorted(os.listdir(self.quarantine_dir))

    def cleanup_tmp(self, older_than: float = 3600.0) -> int:
        """Remove temp files left by crashed writers."""
        removed, now = 0, time.time()
        for name in os.listdir(self.tmp_dir):
            p = os.path.join(self.tmp_dir, name)
            try:
                if now - os.stat(p).st_mtime > older_than:
                    os.unlink(p)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
