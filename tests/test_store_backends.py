"""The store's layers below PrefixStore: the backend primitives on every backend (directory, a real
redis-server, moto's S3 server, memory), the side records and set-aside entries built once over them,
the URL-scheme registry, and the memory backend's sharing and thread safety."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import pytest
from servers import redis_server, s3_server  # noqa: F401  (fixtures)

import seqkv
from seqkv.store import Backend, PrefixStore, open_backend, register_backend
from seqkv.store.backend import LIMBO, QUARANTINE, backend_schemes
from seqkv.store.backend_memory import MemoryBackend
from seqkv.store.entries import drop_hidden, hide, quarantine, quarantined, unhide
from seqkv.store.metadata import Metadata
from seqkv.store.stats import COUNTERS

A, B, C = "a" * 64, "b" * 64, "c" * 64


@pytest.fixture(params=["dir", "redis", "s3", "memory"])
def backend(request, tmp_path):
    kind, tag = request.param, uuid.uuid4().hex[:12]
    if kind == "dir":
        b = open_backend((tmp_path / "store").as_uri())
    elif kind == "redis":
        b = open_backend(f"{request.getfixturevalue('redis_server')}/0", key_prefix=f"b{tag}:")
    elif kind == "s3":
        _endpoint, bucket, options = request.getfixturevalue("s3_server")
        b = open_backend(f"s3://{bucket}/b{tag}", **options)
    else:
        b = open_backend(f"memory://b{tag}")
    yield b
    b.close()
    if kind == "memory":
        MemoryBackend.discard(f"b{tag}")


def test_put_if_absent_get_delete_list_touch(backend):
    assert backend.get(A) is None and not backend.exists(A)
    assert backend.put_if_absent(A, b"first")
    assert not backend.put_if_absent(A, b"second")  # the first write stays
    assert backend.get(A) == b"first" and backend.exists(A)
    assert backend.put_if_absent(B, b"other!")
    listed = {name: (size, last) for name, size, last in backend.list()}
    assert {n: s for n, (s, _) in listed.items()} == {A: 5, B: 6}
    backend.touch(A, 1_000_000.0)
    backend.touch(C, 5.0)  # not stored: nothing happens
    assert {name: last for name, _, last in backend.list()}[A] == pytest.approx(1_000_000.0)
    assert backend.delete(B) and backend.get(B) is None
    assert not backend.exists(B) and [n for n, _, _ in backend.list()] == [A]
    with pytest.raises(seqkv.StorageError):
        backend.get("not-a-key")
    with pytest.raises(seqkv.StorageError):
        backend.put_if_absent("../escape", b"x")


def test_move_sets_aside_and_back_and_never_overwrites_an_entry(backend):
    backend.put_if_absent(A, b"entry a")
    name = f"{A}.{time.time_ns()}.1"
    assert backend.move("entries", A, LIMBO, name)
    assert backend.get(A) is None and [n for n, _, _ in backend.list()] == []
    assert [(n, s) for n, s, _ in backend.list(LIMBO)] == [(name, 7)]
    assert backend.move("entries", A, LIMBO, f"{A}.1.1") is None  # the source is gone: nothing moves
    backend.put_if_absent(A, b"entry a")  # written again meanwhile
    assert backend.move(LIMBO, name, "entries", A) is None  # refused: the entry exists
    assert [n for n, _, _ in backend.list(LIMBO)] == [name]  # and the source stays
    assert backend.delete(A)
    assert backend.move(LIMBO, name, "entries", A)
    assert backend.get(A) == b"entry a" and backend.list(LIMBO) == []
    assert [n for n, _, _ in backend.list()] == [A]
    with pytest.raises(seqkv.StorageError):
        backend.move("entries", A, LIMBO, "../../escape")


def test_side_records(backend):
    backend.meta_set(f"content/{A}", b"x" * 3)
    backend.meta_set(f"content/{A}", B.encode())  # replaced
    assert backend.meta_get(f"content/{A}") == B.encode()
    assert backend.meta_get(f"content/{C}") is None
    for ref in (f"{B}.0123456789abcdef", f"{C}.fedcba9876543210"):
        backend.meta_set(f"refs/{A}/{ref}", b"")
    assert backend.meta_list(f"refs/{A}") == [f"{B}.0123456789abcdef", f"{C}.fedcba9876543210"]
    assert backend.meta_get(f"refs/{A}/{B}.0123456789abcdef") == b""
    assert backend.meta_list("refs") == [A] and backend.meta_list("content") == [A]
    assert backend.meta_delete(f"refs/{A}/{B}.0123456789abcdef")
    assert backend.meta_delete(f"refs/{A}/{B}.0123456789abcdef") is (backend.name == "s3")  # S3 cannot tell
    assert backend.meta_list(f"refs/{A}") == [f"{C}.fedcba9876543210"]
    assert backend.meta_list(f"refs/{B}") == []
    for bad in ("refs/../x", f"other/{A}", f"refs/{A}/nonce"):
        with pytest.raises(seqkv.StorageError):
            backend.meta_set(bad, b"")
    with pytest.raises(seqkv.StorageError):
        backend.meta_list("refs/..")


def test_metadata_over_the_primitives(backend):
    meta = Metadata(backend)
    ref = f"{B}.0123456789abcdef"
    meta.add_ref(A, ref)
    assert meta.refs(A) == [ref] and A in meta.ref_bases()
    assert meta.remove_ref(A, ref) and meta.refs(A) == []
    meta.content_set(C, A)
    assert meta.content_get(C) == A
    meta.content_delete(C, B)  # names another entry: kept
    assert meta.content_get(C) == A
    meta.content_delete(C, A)
    assert meta.content_get(C) is None
    assert meta.score(A) == 0
    meta.set_score(A, 7)
    assert meta.score(A) == 7
    meta.delete_score(A)
    assert meta.score(A) == 0


def test_quarantine_hide_unhide_drop(backend):
    backend.put_if_absent(A, b"corrupt")
    assert quarantine(backend, A)
    assert quarantine(backend, A) == ""  # already gone
    assert len(quarantined(backend)) == 1 and backend.get(A) is None
    backend.put_if_absent(B, b"base")
    token = hide(backend, B)
    assert token is not None and backend.get(B) is None
    assert hide(backend, B) is None
    unhide(backend, B, token)
    assert backend.get(B) == b"base" and backend.list(LIMBO) == []
    token = hide(backend, B)
    backend.put_if_absent(B, b"base")  # rewritten while hidden: unhide keeps it and drops the hidden copy
    unhide(backend, B, token)
    assert backend.get(B) == b"base" and backend.list(LIMBO) == []
    token = hide(backend, B)
    drop_hidden(backend, token)
    assert backend.get(B) is None and backend.list(LIMBO) == [] and len(backend.list(QUARANTINE)) == 1


# -- the memory backend ---------------------------------------------------------------------------------

def test_memory_spaces_are_shared_by_name_until_discarded():
    name = f"m{uuid.uuid4().hex[:8]}"
    one, two = open_backend(f"memory://{name}"), open_backend(f"memory://{name}")
    other = open_backend(f"memory://{name}x")
    assert one.put_if_absent(A, b"x") and two.get(A) == b"x" and other.get(A) is None
    assert MemoryBackend.discard(name) and not MemoryBackend.discard(name)
    assert open_backend(f"memory://{name}").get(A) is None
    for bad in ("memory://", "memory://a/b", "memory://a?x=1", "memory://a b"):
        with pytest.raises(seqkv.ConfigError):
            open_backend(bad)
    with pytest.raises(seqkv.ConfigError):
        open_backend("memory://ok", key_prefix="x")


def test_memory_backend_is_thread_safe():
    backend = MemoryBackend(f"m{uuid.uuid4().hex[:8]}")
    keys = [f"{i:064x}" for i in range(200)]
    created, barrier = [], threading.Barrier(8)

    def writer():
        barrier.wait()
        mine = sum(backend.put_if_absent(k, b"v") for k in keys)
        barrier.wait()  # every put done: a key moved aside is not written again
        for k in keys[::2]:  # racing moves: each entry goes aside exactly once
            if backend.move("entries", k, LIMBO, f"{k}.{time.time_ns()}.{threading.get_ident()}"):
                mine += 1000
        created.append(mine)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(c % 1000 for c in created) == len(keys)  # every key created exactly once
    assert sum(c // 1000 for c in created) == len(keys) // 2
    assert len(backend.list()) == len(keys) // 2 and len(backend.list(LIMBO)) == len(keys) // 2
    MemoryBackend.discard(backend.space_name)


# -- the URL-scheme registry ----------------------------------------------------------------------------

def test_schemes_are_registered_and_unknown_ones_refused():
    assert {"file", "redis", "rediss", "s3", "memory"} <= set(backend_schemes())
    with pytest.raises(seqkv.ConfigError, match="unsupported store URL"):
        open_backend("ftp://example.org/x")
    with pytest.raises(seqkv.ConfigError):
        open_backend(42)
    with pytest.raises(seqkv.ConfigError):
        register_backend("memory")(type("Other", (MemoryBackend,), {}))  # a scheme has one backend
    with pytest.raises(seqkv.ConfigError):
        register_backend("plain-class")(object)


class _CountingMemory(MemoryBackend):
    """A third-party backend: memory that counts its writes."""

    name = "counting"
    writes = 0

    @classmethod
    def from_url(cls, url, *, fsync=False, **options):
        return cls(url.split("://", 1)[1])

    def put_if_absent(self, key, data):
        type(self).writes += 1
        return super().put_if_absent(key, data)


register_backend("seqkv-test-counting")(_CountingMemory)


def test_a_registered_backend_serves_a_prefix_store():
    from conftest import tiny_model
    from test_store import make_cache

    ids, cache = make_cache(12)
    with PrefixStore(f"seqkv-test-counting://c{uuid.uuid4().hex[:8]}", model=tiny_model("llama"), chunk_tokens=8) as store:
        assert isinstance(store.backend, _CountingMemory) and isinstance(store.backend, Backend)
        before = _CountingMemory.writes
        assert store.put(ids, cache)["chunks_written"] == 2
        assert _CountingMemory.writes - before == 2
        n, _ = store.longest_prefix(ids)
        assert n == 12 and store.stats()["backend"] == "counting"
    MemoryBackend.discard(store.backend.space_name)


def test_stats_keep_their_keys():
    from conftest import tiny_model
    from test_store import make_cache

    ids, cache = make_cache(12)
    with PrefixStore(f"memory://s{uuid.uuid4().hex[:8]}", model=tiny_model("llama"), chunk_tokens=8) as store:
        put = store.put(ids, cache)
        store.put(ids, cache)
        store.longest_prefix(ids)
        store.longest_prefix([95 - t for t in ids])
        s = store.stats()
    leftovers = {"temp_files", "temp_bytes", "limbo_entries", "limbo_bytes", "quarantine_entries", "quarantine_bytes"}
    assert set(s) == set(COUNTERS) | {"entries", "bytes_stored", "hit_rate", "token_hit_rate", "token_bits_per_token",
                                      "token_bits_per_token_zstd3", "backend", "max_bytes"} | leftovers
    assert all(s[k] == 0 for k in leftovers)
    assert (s["puts"], s["lookups"], s["hits"], s["tokens_requested"], s["tokens_hit"]) == (2, 2, 1, 24, 12)
    assert s["bytes_written"] == put["bytes_written"] == s["bytes_stored"] == s["bytes_saved"]
    assert (s["chunks_written"], s["chunks_reused"], s["entries"], s["backend"]) == (2, 2, 2, "memory")
    assert s["hit_rate"] == 0.5 and s["token_hit_rate"] == 0.5


def test_import_seqkv_needs_neither_redis_nor_boto3():
    code = "import sys, seqkv, seqkv.store; print(sorted(m for m in ('redis', 'boto3', 'botocore') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_concurrent_lookups_share_one_memory_store():
    """Threads with their own PrefixStore objects over one memory space: puts of the same cache store
    each chunk once, and every lookup gets the whole cache back."""
    from conftest import tiny_model
    from test_store import assert_bit_exact, make_cache

    ids, cache = make_cache(24)
    url, model = f"memory://t{uuid.uuid4().hex[:8]}", tiny_model("llama")
    written, barrier, errors = [], threading.Barrier(4), []

    def worker():
        try:
            with PrefixStore(url, model=model, chunk_tokens=8) as store:
                barrier.wait(timeout=60)
                written.append(store.put(ids, cache)["chunks_written"])
                n, got = store.longest_prefix(ids)
                assert n == 24
                assert_bit_exact(got, cache)
        except BaseException as exc:  # reported below: an assertion in a thread does not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sum(written) == 3
