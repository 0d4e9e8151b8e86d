"""Redis backend (``redis://host:port/db``, ``rediss://``): entries are string keys, last use a sorted set.

A write is one Lua script (atomic on the server): ``SET key data NX`` and, when it was set, ``ZADD`` of
its last-use time, so that no two writers ever both create an entry.  Setting an entry aside (or putting
it back) is a ``RENAMENX`` and the LRU record's update in one script, and so is a delete.  Each script
checks first that the LRU record is a sorted set (or absent): when it is not, the call fails with a
``StorageError`` and changes nothing.  A key of another type where an entry should be reads as a
damaged entry (the store quarantines it).  Reference records of a base are
one Redis set ``refs:<base>`` (``SADD``/``SREM``, atomic per record); the other side records are plain
keys ``m:<name>``.  Option ``key_prefix`` (default ``seqkv:``) comes before every key.  Needs the ``redis``
package, imported when a backend is opened.
"""
from __future__ import annotations

import time
from urllib.parse import urlparse

from ..errors import ConfigError, StorageError
from .backend import (
    AREAS, ENTRIES, KEY_RE, META_FOLDER_RE, META_NAME_RE, Backend, aside_address, register_backend,
)

# the LRU record is a sorted set: a key of another type there (damage, or another program's key under this
# prefix) is refused BEFORE anything is written, so a failed call leaves nothing behind
_LRU_CHECK = """
local t = redis.call('TYPE', KEYS[2])['ok']
if t ~= 'zset' and t ~= 'none' then
  return redis.error_reply('SEQKV_LRU_TYPE ' .. t)
end
"""

_PUT_SCRIPT = _LRU_CHECK + """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  return 1
end
return 0
"""

# KEYS: source, LRU, destination; ARGV: the entry name leaving the LRU record ('' when the source is not an
# entry), the entry name joining it ('' when the destination is not an entry), its time
_MOVE_SCRIPT = """
local t = redis.call('TYPE', KEYS[2])['ok']
if t ~= 'zset' and t ~= 'none' then
  return redis.error_reply('SEQKV_LRU_TYPE ' .. t)
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if redis.call('RENAMENX', KEYS[1], KEYS[3]) == 0 then
  return 0
end
if ARGV[1] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
end
return 1
"""

_DELETE_SCRIPT = _LRU_CHECK + """
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
"""


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else name


@register_backend("redis", "rediss")
class RedisBackend(Backend):
    name = "redis"

    def __init__(self, url: str, *, key_prefix: str = "seqkv:", socket_timeout: float = 10.0, **options):
        try:
            import redis
        except ImportError as exc:
            raise StorageError("the redis backend needs the 'redis' package (pip install redis)") from exc
        self._redis_errors = (redis.RedisError, OSError)
        self._response_error = redis.ResponseError
        try:
            parsed = urlparse(url)
            where = f"{parsed.hostname}:{parsed.port}"
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid redis URL {url!r}: {exc}") from None
        if parsed.scheme not in ("redis", "rediss"):
            raise ConfigError(f"not a redis URL: {url!r}")
        if parsed.path.strip("/") and not parsed.path.strip("/").isdigit():
            raise ConfigError(f"the path of a redis URL is the database number (redis://host:port/0), got {url!r}")
        if not isinstance(key_prefix, str) or "*" in key_prefix or "?" in key_prefix or "[" in key_prefix:
            raise ConfigError(f"key_prefix must be a string without glob characters (* ? [), got {key_prefix!r}")
        if isinstance(socket_timeout, bool) or not isinstance(socket_timeout, (int, float)) or not socket_timeout > 0:
            raise ConfigError(f"socket_timeout must be a positive number of seconds, got {socket_timeout!r}")
        self.prefix = key_prefix
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=socket_timeout, **options)
        except (TypeError, ValueError) as exc:  # an option redis-py does not know, a malformed URL
            raise ConfigError(f"cannot open redis URL {url!r} with options {sorted(options)}: {exc}") from None
        except self._redis_errors as exc:
            raise StorageError(f"cannot connect to redis at {where}: {exc}") from exc
        try:
            self.client.ping()
            self._put = self.client.register_script(_PUT_SCRIPT)
            self._move = self.client.register_script(_MOVE_SCRIPT)
            self._delete = self.client.register_script(_DELETE_SCRIPT)
        except (TypeError, ValueError) as exc:  # options redis-py accepts but cannot use
            raise ConfigError(f"cannot use redis at {where} with options {sorted(options)}: {exc}") from None
        except self._redis_errors as exc:
            raise StorageError(f"cannot connect to redis at {where}: {exc}") from exc
        self.lru_key = f"{self.prefix}lru"

    @classmethod
    def from_url(cls, url: str, *, fsync: bool = False, **options) -> RedisBackend:
        return cls(url, **options)

    def _k(self, key: str) -> str:
        if not KEY_RE.match(key):
            raise StorageError(f"invalid entry key {key!r}")
        return f"{self.prefix}e:{key}"

    def _head(self, area: str) -> str:
        """The Redis key prefix of an area's items."""
        if area not in AREAS:
            raise StorageError(f"unknown area {area!r}")
        return f"{self.prefix}e:" if area == ENTRIES else f"{self.prefix}{area}:"

    def _item(self, area: str, name: str) -> str:
        return self._k(name) if area == ENTRIES else aside_address(self._head(area), area, name)

    def _call(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except self._redis_errors as exc:
            raise StorageError(f"redis {what} failed: {self._explain(exc)}") from exc

    def _explain(self, exc) -> str:
        text = str(exc)
        if "SEQKV_LRU_TYPE" in text:
            kind = text.split("SEQKV_LRU_TYPE", 1)[1].split()[0] if text.split("SEQKV_LRU_TYPE", 1)[1].split() else "?"
            return (f"the store's LRU record {self.lru_key!r} holds a {kind}, not a sorted set (damaged, or another "
                    "program's key under this key_prefix); nothing was changed: delete that key or use another key_prefix")
        if "WRONGTYPE" in text:
            return (f"{text} (a key under this store's key_prefix {self.prefix!r} has a type this store does not "
                    "write: damaged, or another program's key)")
        return text

    def _scan(self, pattern: str) -> list:
        return [_text(n) for n in self._call("SCAN", lambda: list(self.client.scan_iter(match=pattern, count=1000)))]

    def get(self, key: str):
        try:
            return self.client.get(self._k(key))
        except self._response_error as exc:
            if "WRONGTYPE" in str(exc):
                return b""  # not a string: not an entry this store wrote; the store quarantines it
            raise StorageError(f"redis GET failed: {exc}") from exc
        except self._redis_errors as exc:
            raise StorageError(f"redis GET failed: {exc}") from exc

    def exists(self, key: str) -> bool:
        return bool(self._call("EXISTS", self.client.exists, self._k(key)))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        res = self._call("SET NX", self._put, keys=[self._k(key), self.lru_key], args=[data, repr(time.time()), key])
        return bool(res)

    def delete(self, name: str, area: str = ENTRIES) -> bool:
        if area != ENTRIES:
            return bool(self._call("DEL", self.client.delete, self._item(area, name)))
        return bool(self._call("DEL", self._delete, keys=[self._k(name), self.lru_key], args=[name]))

    def touch(self, key: str, when: float) -> None:
        # only entries that exist (a concurrent eviction must not leave a dangling LRU record)
        if self.exists(key):
            self._call("ZADD", self.client.zadd, self.lru_key, {key: when})

    def list(self, area: str = ENTRIES) -> list:
        head = self._head(area)
        names = self._scan(f"{head}*")
        if not names:
            return []
        pipe = self.client.pipeline(transaction=False)
        for n in names:
            pipe.strlen(n)
            if area == ENTRIES:
                pipe.zscore(self.lru_key, n[len(head):])
        # an item of another type (STRLEN refuses it) or a damaged LRU record reads as size 0 / time 0
        res = self._call("STRLEN", pipe.execute, raise_on_error=False)
        step = 2 if area == ENTRIES else 1
        out = []
        for i, n in enumerate(names):
            size = res[step * i]
            score = res[step * i + 1] if area == ENTRIES else None
            if isinstance(size, int) and size:
                ok = score is not None and not isinstance(score, Exception)
                out.append((n[len(head):], int(size), float(score) if ok else 0.0))
        return out

    def move(self, area: str, name: str, to_area: str, to_name: str):
        src, dst = self._item(area, name), self._item(to_area, to_name)
        # one script: the rename and the LRU record change together, and nothing changes when it fails
        moved = self._call(f"move of {area} item {name} to {to_area}", self._move, keys=[src, self.lru_key, dst],
                           args=[name if area == ENTRIES else "", to_name if to_area == ENTRIES else "",
                                 repr(time.time())])
        return dst if moved else None

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

    def _ref(self, name: str):
        """(set key, member) of a reference record's name, or None for the other side records."""
        self._m(name)  # validates
        parts = name.split("/")
        if parts[0] == "refs" and len(parts) == 3:
            return f"{self.prefix}refs:{parts[1]}", parts[2]
        return None

    def meta_set(self, name: str, data: bytes) -> None:
        ref = self._ref(name)
        if ref is None:
            self._call("SET", self.client.set, self._m(name), data)
        elif data:
            raise StorageError(f"reference records carry no data ({name})")
        else:
            self._call("SADD", self.client.sadd, *ref)

    def meta_get(self, name: str):
        ref = self._ref(name)
        if ref is None:
            return self._call("GET", self.client.get, self._m(name))
        return b"" if self._call("SISMEMBER", self.client.sismember, *ref) else None

    def meta_delete(self, name: str) -> bool:
        ref = self._ref(name)
        if ref is None:
            return bool(self._call("DEL", self.client.delete, self._m(name)))
        return bool(self._call("SREM", self.client.srem, *ref))

    def meta_list(self, folder: str) -> list:
        if not META_FOLDER_RE.match(folder):
            raise StorageError(f"invalid side record folder {folder!r}")
        kind, _, base = folder.partition("/")
        if kind == "refs" and base:
            return sorted(_text(m) for m in self._call("SMEMBERS", self.client.smembers, f"{self.prefix}refs:{base}"))
        if kind == "refs":  # the bases that have records: one set each
            head = f"{self.prefix}refs:"
        else:
            head = f"{self.prefix}m:{folder}/"
        return sorted({n[len(head):].split("/", 1)[0] for n in self._scan(f"{head}*")} - {""})
