"""Local-directory backend (``file:///path``, the default, embedded one): one file per entry.

Layout under the root: ``entries/<k[:2]>/<key>`` (the entries), ``tmp/`` (files being written),
``quarantine/`` and ``limbo/`` (entries set aside), ``meta/<kind>/<hex>[/<ref id>]`` (side records: one
small file each, written by temp file + rename).  A write goes to a temp file in ``tmp/`` (fsync'ed when
asked) and is published with ``os.link`` (atomic and exclusive: it fails if the entry exists) or, where
the file system has no hard links, ``os.replace`` after an existence check.  Setting an entry aside is an
``os.rename``; putting it back an ``os.link`` again.  The entry's mtime is its last-use time for LRU eviction.
A temp file left by a writer that crashed is listed by ``temp_files`` (``gc`` removes it once old); a base's
reference-record folder goes with its last record (``meta_set`` retries when that races a new record).
"""
from __future__ import annotations

import errno
import os
import tempfile
import time
from urllib.parse import unquote, urlparse

from ..errors import ConfigError, StorageError
from .backend import AREAS, ASIDE_NAME_RE, ENTRIES, KEY_RE, META_FOLDER_RE, META_NAME_RE, Backend, register_backend

# errors of os.link where the file system has no hard links
_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


@register_backend("file")
class DirBackend(Backend):
    name = "dir"

    def __init__(self, root: str, *, fsync: bool = False):
        self.root = os.path.abspath(root)
        self.fsync = fsync
        self.area_dirs = {area: os.path.join(self.root, area) for area in AREAS}
        self.entries_dir = self.area_dirs[ENTRIES]
        self.quarantine_dir = self.area_dirs["quarantine"]
        self.limbo_dir = self.area_dirs["limbo"]
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.meta_dir = os.path.join(self.root, "meta")
        try:
            for d in (*self.area_dirs.values(), self.tmp_dir, self.meta_dir):
                os.makedirs(d, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the store directory {self.root}: {exc}") from exc

    @classmethod
    def from_url(cls, url: str, *, fsync: bool = False, **options) -> DirBackend:
        try:
            parsed = urlparse(url)
            path = unquote(parsed.path)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid file URL {url!r}: {exc}") from None
        if parsed.netloc not in ("", "localhost") or not path:
            raise ConfigError(f"file URLs must be file:///absolute/path, got {url!r}")
        if "\x00" in path:
            raise ConfigError("the store path holds a NUL character")
        if options:
            raise ConfigError(f"unknown options for the directory backend: {sorted(options)}")
        return cls(path, fsync=bool(fsync))

    def _path(self, key: str) -> str:
        if not KEY_RE.match(key):
            raise StorageError(f"invalid entry key {key!r}")
        return os.path.join(self.entries_dir, key[:2], key)

    def _item_path(self, area: str, name: str) -> str:
        if area == ENTRIES:
            return self._path(name)
        if area not in self.area_dirs or not ASIDE_NAME_RE.match(name):
            raise StorageError(f"invalid item {name!r} of area {area!r}")
        return os.path.join(self.area_dirs[area], name)

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

    @staticmethod
    def _publish(src: str, dst: str) -> bool:
        """Make the file ``src`` appear at ``dst`` unless ``dst`` exists; True when it did.  ``src`` may be
        gone afterwards (moved, where the file system has no hard links)."""
        try:
            os.link(src, dst)  # atomic, and refuses to overwrite
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
        if os.path.exists(dst):
            return False
        os.replace(src, dst)  # no hard links here: same bytes for the same key
        return True

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
                created = self._publish(tmp, path)
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

    def delete(self, name: str, area: str = ENTRIES) -> bool:
        return self._unlink(self._item_path(area, name), f"{area} item {name}")

    def touch(self, key: str, when: float) -> None:
        try:
            os.utime(self._path(key), ns=(int(when * 1e9), int(when * 1e9)))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot update entry {key}: {exc}") from exc

    def list(self, area: str = ENTRIES) -> list:
        if area not in self.area_dirs:
            raise StorageError(f"unknown area {area!r}")
        if area != ENTRIES:
            return self._list_files(self.area_dirs[area], None)
        try:
            shards = os.listdir(self.entries_dir)
        except OSError as exc:
            raise StorageError(f"cannot list {self.entries_dir}: {exc}") from exc
        out = []
        for shard in shards:
            out += self._list_files(os.path.join(self.entries_dir, shard), KEY_RE)
        return out

    @staticmethod
    def _list_files(folder: str, pattern) -> list:
        try:
            names = os.listdir(folder)
        except (NotADirectoryError, FileNotFoundError):
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {folder}: {exc}") from exc
        out = []
        for name in names:
            if pattern is not None and not pattern.match(name):
                continue
            try:
                st = os.stat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            out.append((name, st.st_size, st.st_mtime_ns / 1e9))
        return out

    def move(self, area: str, name: str, to_area: str, to_name: str):
        src, dst = self._item_path(area, name), self._item_path(to_area, to_name)
        try:
            if to_area == ENTRIES:  # back among the entries: exclusive, like a put
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                if not self._publish(src, dst):
                    return None
                try:
                    os.unlink(src)
                except FileNotFoundError:
                    pass
            else:
                os.rename(src, dst)  # set aside under a unique name: nothing to overwrite
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot move {area} item {name} to {to_area}: {exc}") from exc
        return dst

    def temp_files(self) -> list:
        return self._list_files(self.tmp_dir, None)

    def delete_temp(self, name: str) -> bool:
        if not isinstance(name, str) or not name or "/" in name or name in (".", "..") or "\x00" in name:
            raise StorageError(f"invalid temporary file name {name!r}")
        return self._unlink(os.path.join(self.tmp_dir, name), f"temporary file {name}")

    def cleanup_tmp(self, older_than: float = 3600.0) -> int:
        """Remove temp files older than ``older_than`` seconds (left by crashed writers)."""
        removed, now = 0, time.time()
        for name, _, mtime in self.temp_files():
            if now - mtime > older_than and self.delete_temp(name):
                removed += 1
        return removed

    # -- side records ------------------------------------------------------------------------
    def _meta_path(self, name: str) -> str:
        if not META_NAME_RE.match(name):
            raise StorageError(f"invalid side record name {name!r}")
        return os.path.join(self.meta_dir, *name.split("/"))

    def meta_set(self, name: str, data: bytes) -> None:
        path = self._meta_path(name)
        for _ in range(5):  # another process may remove the folder between makedirs and the rename
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
        path = self._meta_path(name)
        removed = self._unlink(path, f"side record {name}")
        if name.startswith("refs/"):
            try:  # a base's last reference record: its folder goes too (meta_set retries if it races)
                os.rmdir(os.path.dirname(path))
            except OSError:
                pass
        return removed

    def meta_list(self, folder: str) -> list:
        if not META_FOLDER_RE.match(folder):
            raise StorageError(f"invalid side record folder {folder!r}")
        try:
            names = os.listdir(os.path.join(self.meta_dir, *folder.split("/")))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StorageError(f"cannot list side records {folder}: {exc}") from exc
        if "/" not in folder:  # a kind's folder: only names this store writes
            names = [n for n in names if KEY_RE.match(n)]
        return sorted(names)
