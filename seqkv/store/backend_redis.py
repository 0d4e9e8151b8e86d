"""Redis backend (``redis://host:port/db``): entries are string keys, last use a sorted set.

A write is one Lua script (atomic on the server): ``SET key data NX`` and, when it was set, ``ZADD`` of
its last-use time, so that no two writers ever both create an entry.  Reference records of a base are
one Redis set (``SADD``/``SREM``, atomic per record); the content index and scores are plain keys.  An
evictor hides an entry with ``RENAMENX`` (atomic).  Needs the ``redis`` package.
"""
from __future__ import annotations

import re
import time
from urllib.parse import urlparse

from ..errors import StorageError
from .prefix_store import META_FOLDER_RE, META_NAME_RE, Backend

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_PUT_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  return 1
end
return 0
"""


class RedisBackend(Backend):
    name = "redis"

    def __init__(self, url: str, *, key_prefix: str = "seqkv:", socket_timeout: float = 10.0, **options):
        try:
            import redis
        except ImportError as exc:
            raise StorageError("the redis backend needs the 'redis' package (pip install redis)") from exc
        self._redis_errors = (redis.RedisError, OSError)
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss"):
            raise StorageError(f"not a redis URL: {url!r}")
        self.prefix = key_prefix
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=socket_timeout, **options)
            self.client.ping()
            self._put = self.client.register_script(_PUT_SCRIPT)
        except self._redis_errors as exc:
            raise StorageError(f"cannot connect to redis at {parsed.hostname}:{parsed.port}: {exc}") from exc
        self.lru_key = f"{self.prefix}lru"

    def _k(self, key: str) -> str:
        if not _KEY_RE.match(key):
            raise StorageError(f"invalid entry key {key!r}")
        return f"{self.prefix}e:{key}"

    def _call(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except self._redis_errors as exc:
            raise StorageError(f"redis {what} failed: {exc}") from exc

    def get(self, key: str):
        return self._call("GET", self.client.get, self._k(key))

    def exists(self, key: str) -> bool:
        return bool(self._call("EXISTS", self.client.exists, self._k(key)))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        res = self._call("SET NX", self._put, keys=[self._k(key), self.lru_key], args=[data, repr(time.time()), key])
        return bool(res)

    def delete(self, key: str) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._k(key))
        pipe.zrem(self.lru_key, key)
        res = self._call("DEL", pipe.execute)
        return bool(res[0])

    def touch(self, key: str, when: float) -> None:
        # XX: only entries that exist (a concurrent eviction must not leave a dangling LRU record)
        if self.exists(key):
            self._call("ZADD", self.client.zadd, self.lru_key, {key: when})

    def list(self):
        out = []
        pattern = f"{self.prefix}e:*"
        names = [n.decode() if isinstance(n, bytes) else n for n in self._call("SCAN", lambda: list(self.client.scan_iter(match=pattern, count=1000)))]
        if not names:
            return out
        pipe = self.client.pipeline(transaction=False)
        for n in names:
            pipe.strlen(n)
            pipe.zscore(self.lru_key, n[len(self.prefix) + 2:])
        res = self._call("STRLEN", pipe.execute)
        for i, n in enumerate(names):
            size, score = res[2 * i], res[2 * i + 1]
            if size:
                out.append((n[len(self.prefix) + 2:], int(size), float(score) if score is not None else 0.0))
        return out

    def _move_aside(self, key: str, dest: str, what: str) -> bool:
        """Rename the entry to ``dest`` and drop its LRU record, atomically; False when it was not there."""
        pipe = self.client.pipeline(transaction=True)
        pipe.renamenx(self._k(key), dest)
        pipe.zrem(self.lru_key, key)
        try:
            pipe.execute()
        except self._redis_errors as exc:
            if "no such key" in str(exc).lower():
                return False
            raise StorageError(f"cannot {what} entry {key}: {exc}") from exc
        return True

    def quarantine(self, key: str) -> str:
        dest = f"{self.prefix}quarantine:{key}:{time.time_ns()}"
        return dest if self._move_aside(key, dest, "quarantine") else ""

    def quarantined(self) -> list[str]:
        return sorted(n.decode() if isinstance(n, bytes) else n
                      for n in self.client.scan_iter(match=f"{self.prefix}quarantine:*"))

    def close(self) -> None:
        try:
            self.client.close()
        except self._redis_errors:
            pass

    # -- side records ------------------------------------------------------------------------
    def _m(self, name: str) -> str:
        if not META_NAME_RE.match(name):
            raise StorageError(f"invalid side record name {name!r}")
        return f"{self.prefix}m:{name}"

    def meta_set(self, name: str, data: bytes) -> None:
        self._call("SET", self.client.set, self._m(name), data)

    def meta_get(self, name: str):
        return self._call("GET", self.client.get, self._m(name))

    def meta_delete(self, name: str) -> bool:
        return bool(self._call("DEL", self.client.delete, self._m(name)))

    def meta_list(self, folder: str) -> list:
        if not META_FOLDER_RE.match(folder):
            raise StorageError(f"invalid side record folder {folder!r}")
        pattern = f"{self.prefix}m:{folder}/*"
        names = self._call("SCAN", lambda: list(self.client.scan_iter(match=pattern, count=1000)))
        cut = len(self.prefix) + 2 + len(folder) + 1
        return sorted((n.decode() if isinstance(n, bytes) else n)[cut:] for n in names)

    def _refs_key(self, base: str) -> str:
        if not META_FOLDER_RE.match(f"refs/{base}"):
            raise StorageError(f"invalid entry key {base!r}")
        return f"{self.prefix}refs:{base}"

    def add_ref(self, base: str, ref_id: str) -> None:
        self._call("SADD", self.client.sadd, self._refs_key(base), ref_id)

    def remove_ref(self, base: str, ref_id: str) -> bool:
        return bool(self._call("SREM", self.client.srem, self._refs_key(base), ref_id))

    def refs(self, base: str) -> list:
        members = self._call("SMEMBERS", self.client.smembers, self._refs_key(base))
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    def ref_bases(self) -> list:
        pattern = f"{self.prefix}refs:*"
        names = self._call("SCAN", lambda: list(self.client.scan_iter(match=pattern, count=1000)))
        cut = len(self.prefix) + len("refs:")
        return sorted((n.decode() if isinstance(n, bytes) else n)[cut:] for n in names)

    # -- eviction protocol ---------------------------------------------------------------------
    def hide(self, key: str):
        token = f"{self.prefix}limbo:{key}:{time.time_ns()}"
        return token if self._move_aside(key, token, "hide") else None

    def unhide(self, key: str, token) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.renamenx(token, self._k(key))
        pipe.zadd(self.lru_key, {key: time.time()})
        res = self._call("RENAMENX", pipe.execute)
        if not res[0]:  # rewritten meanwhile: the same bytes for the same key
            self._call("DEL", self.client.delete, token)

    def drop_hidden(self, token) -> None:
        self._call("DEL", self.client.delete, token)
