"""Local-directory backend (the default, embedded one): one file per entry.

Layout under the root: ``entries/<k[:2]>/<key>`` (the entries), ``tmp/`` (files being written),
``quarantine/`` (entries that failed to decode), ``meta/<kind>/<hex>[/<ref id>]`` (reference records,
the content index and reuse scores: one small file each, written by temp file + rename) and ``limbo/``
(entries hidden by an evictor while it checks their references).  A write goes to a temp file in ``tmp/`` (fsync'ed when
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
from .prefix_store import META_FOLDER_RE, META_NAME_RE, Backend

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


class DirBackend(Backend):
    name = "dir"

    def __init__(self, root: str, *, fsync: bool = False):
        self.root = os.path.abspath(root)
        self.fsync = fsync
        self.entries_dir = os.path.join(self.root, "entries")
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.quarantine_dir = os.path.join(self.root, "quarantine")
        self.meta_dir = os.path.join(self.root, "meta")
        self.limbo_dir = os.path.join(self.root, "limbo")
        try:
            for d in (self.entries_dir, self.tmp_dir, self.quarantine_dir, self.meta_dir, self.limbo_dir):
                os.makedirs(d, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the store directory {self.root}: {exc}") from exc

    def _path(self, key: str) -> str:
        if not _KEY_RE.match(key):
            raise StorageError(f"invalid entry key {key!r}")
        return os.path.join(self.entries_dir, key[:2], key)

    @staticmethod
    def _read(path: str, what: str):
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {what}: {exc}") from exc

    @staticmethod
    def _unlink(path: str, what: str) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot delete {what}: {exc}") from exc

    def get(self, key: str):
        return self._read(self._path(key), f"entry {key}")

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        if os.path.exists(path):
            return False
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = self._write_tmp(data, key[:16] + ".")
            try:
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

    def _write_tmp(self, data: bytes, prefix: str) -> str:
        """A new file in tmp/ holding ``data`` (fsync'ed when asked); its path."""
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=prefix)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        return tmp

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
        return self._unlink(self._path(key), f"entry {key}")

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

    def _move_aside(self, key: str, dest: str, what: str) -> bool:
        """Rename the entry to ``dest`` (atomic); False when it was not there."""
        try:
            os.rename(self._path(key), dest)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot {what} entry {key}: {exc}") from exc
        return True

    def quarantine(self, key: str) -> str:
        dest = os.path.join(self.quarantine_dir, f"{key}.{time.time_ns()}.{os.getpid()}")
        return dest if self._move_aside(key, dest, "quarantine") else ""

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

    # -- side records ------------------------------------------------------------------------
    def _meta_path(self, name: str) -> str:
        if not META_NAME_RE.match(name):
            raise StorageError(f"invalid side record name {name!r}")
        return os.path.join(self.meta_dir, *name.split("/"))

    def meta_set(self, name: str, data: bytes) -> None:
        path = self._meta_path(name)
        for _ in range(5):  # a concurrent remove_ref may rmdir the folder between makedirs and mkstemp
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = self._write_tmp(data, "meta.")
                try:
                    os.replace(tmp, path)
                    return
                except FileNotFoundError:
                    os.unlink(tmp)
            except OSError as exc:
                raise StorageError(f"cannot write side record {name}: {exc}") from exc
        raise StorageError(f"cannot write side record {name}: its folder keeps disappearing")

    def meta_get(self, name: str):
        return self._read(self._meta_path(name), f"side record {name}")

    def meta_delete(self, name: str) -> bool:
        return self._unlink(self._meta_path(name), f"side record {name}")

    def meta_list(self, folder: str) -> list:
        if not META_FOLDER_RE.match(folder):
            raise StorageError(f"invalid side record folder {folder!r}")
        try:
            return sorted(os.listdir(os.path.join(self.meta_dir, *folder.split("/"))))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StorageError(f"cannot list side records {folder}: {exc}") from exc

    def ref_bases(self) -> list:
        try:
            return sorted(n for n in os.listdir(os.path.join(self.meta_dir, "refs")) if _KEY_RE.match(n))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list reference records: {exc}") from exc

    # -- eviction protocol ---------------------------------------------------------------------
    def hide(self, key: str):
        token = os.path.join(self.limbo_dir, f"{key}.{time.time_ns()}.{os.getpid()}")
        return token if self._move_aside(key, token, "hide") else None

    def unhide(self, key: str, token) -> None:
        try:
            try:
                os.link(token, self._path(key))
            except FileExistsError:
                pass  # rewritten meanwhile: the same bytes for the same key
            os.unlink(token)
        except OSError as exc:
            raise StorageError(f"cannot restore entry {key}: {exc}") from exc

    def drop_hidden(self, token) -> None:
        self._unlink(token, f"hidden entry {token}")
