"""The prefix store under hostile input and crashes (issue 16, the store's half).

* a put is all or nothing, and never writes an entry that does not decode;
* a stored payload with hostile positions is quarantined, and the next lookup returns the shorter prefix;
* a reader that loses a race with eviction gets the shorter prefix, never a quarantine of valid data;
* only seqkv errors leave the public API, whatever the arguments or the stored metadata (a table of bad
  arguments, a fuzz of junk values, damaged side records, Redis keys of the wrong type);
* gc reclaims what crashed processes leave (temp files, limbo, stale references, orphan records), and a
  kill -9 torture (forked writers and evictors killed at random points) finds no wrong cache, no lost
  entry and, after a final gc, no leftover and the budget held;
* concurrent writers reuse stored chunks as sequential ones do.

The torture's trial count is ``SEQKV_TORTURE_TRIALS`` (default 3 per backend); ``SEQKV_TORTURE_BACKENDS``
(default "dir,redis") picks the backends ("s3" too, slower).
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import contextlib
import os
import random
import signal
import time
import uuid

import numpy as np
import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import redis_server, s3_server  # noqa: F401  (fixtures)
from test_store import CHUNK, Where, assert_bit_exact, make_cache, slice_cache, where  # noqa: F401

import seqkv
from seqkv.checksum import crc32c
from seqkv.format.container import PREAMBLE
from seqkv.hf_adapter import build_cache, cache_layers
from seqkv.model_calls import cache_of
from seqkv.store import PrefixStore
from seqkv.store import chunk_codec
from seqkv.store import keys as store_keys
from seqkv.store import prefix_store as prefix_store_module
from seqkv.store.backend_memory import MemoryBackend
from seqkv.store.entries import hide, quarantined
from seqkv.store.envelope import pack_entry, ref_nonce, unpack_entry


def _shared_pair():
    """Two sequences sharing 16 tokens under different 8-token prefixes (chunk_tokens=8): the second's last
    two chunks are residuals on the first's."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(5)
    shared = torch.randint(0, 96, (16,), generator=gen).tolist()
    a, b = [1] * 8 + shared, [2] * 8 + shared
    with torch.no_grad():
        ca, cb = (cache_of(model(torch.tensor([x]), use_cache=True)) for x in (a, b))
    return (a, ca), (b, cb)


def _with_value(cache, token: int, value: float):
    layers = [(k.clone(), v.clone()) for k, v in cache_layers(cache)]
    layers[0][1][0, token, 0] = value
    return build_cache(layers)


# -- (3) a put is all or nothing, and never writes what does not decode ---------------------------------------

@pytest.mark.parametrize("value, token", [(float("nan"), 20), (float("inf"), 17), (1e30, 12), (3e19, 9)])
def test_a_put_of_values_the_codec_cannot_carry_writes_nothing(where, value, token):
    ids, cache = make_cache(24)
    with where.open(preset="balanced") as store:
        with pytest.raises(seqkv.EncodeError):
            store.put(ids, _with_value(cache, token, value))  # chunk 0 (and 1) are fine: nothing is written all the same
        assert store.stats()["entries"] == 0 and store.stats()["puts"] == 0
        assert store.longest_prefix(ids) == (0, None)
        assert store.put(ids, cache)["chunks_written"] == 3  # the store still works
        assert store.longest_prefix(ids)[0] == 24
        assert quarantined(store.backend) == []
    with where.open(preset="lossless") as lossless:  # the lossless codec carries every value, bit-exact
        odd = _with_value(cache, token, value)
        lossless.put(ids, odd)
        n, got = lossless.longest_prefix(ids)
        assert n == 24
        assert_bit_exact(got, odd)


def _corrupting(real, when):
    """encode_chunk, with the last byte of the payload flipped where ``when(kwargs)`` says (a payload that
    does not decode: its last section fails its checksum)."""
    def encode_chunk(*args, **kw):
        payload, info = real(*args, **kw)
        if when(args, kw):
            payload = payload[:-1] + bytes([payload[-1] ^ 0x55])
        return payload, info
    return encode_chunk


def test_a_payload_that_does_not_decode_is_never_written(where, monkeypatch):
    """Whatever the encoder does (another layer's bug, a value it should have refused), an entry that does
    not decode is never written: every new chunk is decoded back first, and the put fails as a whole."""
    ids, cache = make_cache(24)
    real = chunk_codec.encode_chunk
    monkeypatch.setattr(prefix_store_module, "encode_chunk",
                        _corrupting(real, lambda args, kw: int(args[1][0]) >= 16))  # chunk 2 only
    with where.open() as store:
        with pytest.raises(seqkv.EncodeError, match="does not decode"):
            store.put(ids, cache)
        assert store.stats()["entries"] == 0
        assert store.longest_prefix(ids) == (0, None)
        monkeypatch.setattr(prefix_store_module, "encode_chunk", real)
        assert store.put(ids, cache)["chunks_written"] == 3
        n, got = store.longest_prefix(ids)
        assert n == 24
        assert_bit_exact(got, cache)


def test_a_residual_that_does_not_decode_is_coded_plainly(where, monkeypatch):
    (a, ca), (b, cb) = _shared_pair()
    real = chunk_codec.encode_chunk
    monkeypatch.setattr(prefix_store_module, "encode_chunk", _corrupting(real, lambda args, kw: kw.get("base") is not None))
    with where.open() as store:
        store.put(a, ca)
        res = store.put(b, cb)
        assert res["chunks_written"] == 3 and res["chunks_residual"] == 0
        n, got = store.longest_prefix(b)
        assert n == 24
        assert_bit_exact(got, cb)
        assert all(store.metadata.refs(k) == [] for k in store.keys_for(a))  # no reference left behind


def test_a_failed_write_midway_takes_back_what_the_put_wrote(where):
    ids, cache = make_cache(24)
    with where.open() as store:
        real = store.backend.put_if_absent
        calls = []

        def failing(key, data):
            calls.append(key)
            if len(calls) == 3:
                raise seqkv.StorageError("disk full (simulated)")
            return real(key, data)

        store.backend.put_if_absent = failing
        with pytest.raises(seqkv.StorageError, match="simulated"):
            store.put(ids, cache)
        store.backend.put_if_absent = real
        assert store.stats()["entries"] == 0  # chunks 0 and 1 were written, then evicted again
        assert store.longest_prefix(ids) == (0, None)


# -- (2) hostile positions in a stored payload ----------------------------------------------------------------

def _rewrite_payload_header(store, key, change):
    """Rewrite the JSON header of the entry's chunk container (checksums recomputed, so only the store's
    and the reader's semantic checks can catch it)."""
    header, payload = unpack_entry(store.backend.get(key), key)
    magic, major, minor, flags, n, _ = PREAMBLE.unpack_from(payload, 0)
    chunk_header = json.loads(bytes(payload[PREAMBLE.size:PREAMBLE.size + n]))
    change(chunk_header)
    head = json.dumps(chunk_header, separators=(",", ":"), sort_keys=True).encode()
    new = PREAMBLE.pack(magic, major, minor, flags, len(head), crc32c(head)) + head + bytes(payload[PREAMBLE.size + n:])
    header.update(payload_bytes=len(new), payload_sha256=hashlib.sha256(new).hexdigest())
    store.backend.delete(key)
    store.backend.put_if_absent(key, pack_entry(header, new))


@pytest.mark.parametrize("start", [2**63 - 8, 2**63 - 25, (1 << 62) - 1 - 8, 1 << 40])
def test_hostile_positions_in_a_stored_payload_are_quarantined(where, start):
    ids, cache = make_cache(24)
    with where.open() as store:
        store.put(ids, cache)
        key = store.keys_for(ids)[1]
        _rewrite_payload_header(store, key, lambda h: h["positions"].update(start=start))
        with pytest.raises(seqkv.store.CorruptEntryError, match="quarantined"):
            store.longest_prefix(ids)
        assert store.backend.get(key) is None and len(quarantined(store.backend)) == 1
        n, got = store.longest_prefix(ids)  # the shorter prefix, whole
        assert n == 8
        assert_bit_exact(got, slice_cache(cache, 0, 8))
        res = store.put(ids, cache)
        assert (res["chunks_written"], res["chunks_reused"]) == (1, 2)  # chunk 1 rewritten; chunk 2 was never lost
        n, got = store.longest_prefix(ids)
        assert n == 24
        assert_bit_exact(got, cache)


def test_whatever_the_decoder_raises_on_stored_bytes_quarantines(where, monkeypatch):
    """A reader bug met by hostile bytes (a RuntimeError, an OverflowError, ...) is the entry's problem: it is
    quarantined as corrupt, never an exception of another type from longest_prefix."""
    ids, cache = make_cache(16)
    with where.open() as store:
        store.put(ids, cache)
        real_sections = chunk_codec.ParsedChunk.sections

        def sections(self, *args, **kwargs):   # the step of a hit that reads the stored bytes
            if int(self.positions[0]) == 8:
                raise RuntimeError("value cannot be converted to type int64_t without overflow")
            return real_sections(self, *args, **kwargs)

        monkeypatch.setattr(chunk_codec.ParsedChunk, "sections", sections)
        with pytest.raises(seqkv.store.CorruptEntryError, match="RuntimeError"):
            store.longest_prefix(ids)
        assert len(quarantined(store.backend)) == 1
        n, got = store.longest_prefix(ids)
        assert n == 8
        assert_bit_exact(got, slice_cache(cache, 0, 8))


# -- (4) a reader racing eviction -------------------------------------------------------------------------------

@pytest.mark.parametrize("evict", ["all", "residuals"])
def test_a_reader_racing_eviction_gets_the_shorter_prefix(where, evict):
    """gc(max_bytes=0) from a second store object right after the reader's walk: the reader holds the
    bytes of every chunk, the residuals' bases are gone.  It returns the prefix before the first residual
    (whole, bit-exact) and quarantines nothing."""
    (a, ca), (b, cb) = _shared_pair()
    with where.open() as writer:
        writer.put(a, ca)
        assert writer.put(b, cb)["chunks_residual"] == 2
    reader, evictor = where.open(), where.open()
    real_walk = reader._walk
    walks = []

    def walk_then_evict(*args, **kw):
        found = real_walk(*args, **kw)
        walks.append(len(found))
        if len(walks) > 1:  # the lookup walks every dtype: the eviction comes after the first walk
            pass
        elif evict == "all":
            evictor.gc(max_bytes=0)
        else:  # the residuals, then their bases: what gc does first, one by one
            for key in reversed(evictor.keys_for(b)[1:]):
                assert evictor.evict(key)
            for key in evictor.keys_for(a)[1:]:
                assert evictor.evict(key)
        return found

    reader._walk = walk_then_evict
    n, got = reader.longest_prefix(b)
    assert walks[0] == 3  # the walk found all three chunks
    assert n == 8
    assert_bit_exact(got, slice_cache(cb, 0, 8))
    assert quarantined(reader.backend) == [] and reader.stats()["quarantined"] == 0
    reader._walk = real_walk
    reader.put(b, cb)
    n, got = reader.longest_prefix(b)
    assert n == 24
    assert_bit_exact(got, cb)
    reader.close()
    evictor.close()


def test_a_residual_whose_base_is_really_missing_is_still_quarantined(where):
    (a, ca), (b, cb) = _shared_pair()
    with where.open() as store:
        store.put(a, ca)
        store.put(b, cb)
        store.backend.delete(store.keys_for(a)[1])  # lost behind the store's back: the residual stays
        with pytest.raises(seqkv.store.CorruptEntryError, match="base"):
            store.longest_prefix(b)
        assert len(quarantined(store.backend)) == 1


# -- (5) only seqkv errors, for every argument ------------------------------------------------------------------

def _filled():
    """A memory store holding one 16-token cache (and the ids and cache)."""
    ids, cache = make_cache(16)
    url = f"memory://hostile{uuid.uuid4().hex[:8]}"
    store = PrefixStore(url, model=tiny_model("llama"), chunk_tokens=CHUNK)
    store.put(ids, cache)
    yield url, store, ids, cache
    store.close()
    MemoryBackend.discard(url[len("memory://"):])


filled = pytest.fixture(_filled)
junk_target = pytest.fixture(scope="module")(_filled)  # the fuzz may evict: a store of its own


def _meta_cache(cache):
    return build_cache([(k.to("meta"), v.to("meta")) for k, v in cache_layers(cache)])


def _bad_cache_cases(ids, cache):
    layers = cache_layers(cache)
    return {
        "cache None": lambda s: s.put(ids, None),
        "cache str": lambda s: s.put(ids, "cache"),
        "cache on meta": lambda s: s.put(ids, _meta_cache(cache)),
        "cache int8": lambda s: s.put(ids, build_cache([(k.to(torch.int8), v.to(torch.int8)) for k, v in layers])),
        "cache of another shape": lambda s: s.put(ids, build_cache([(k[:1], v[:1]) for k, v in layers])),
        "cache length differs": lambda s: s.put(ids[:8], cache),
    }


BAD_CALLS = {
    # token ids
    "negative id (put)": lambda s, ids, c: s.put([-1] + ids[1:], c),
    "negative id (lookup)": lambda s, ids, c: s.longest_prefix([-1] + ids[1:]),
    "id 2**31": lambda s, ids, c: s.longest_prefix([2**31] + ids[1:]),
    "id 2**63": lambda s, ids, c: s.longest_prefix([2**63] + ids[1:]),
    "id 2**64": lambda s, ids, c: s.put([2**64] + ids[1:], c),
    "float ids": lambda s, ids, c: s.longest_prefix([0.5] * 16),
    "str ids": lambda s, ids, c: s.longest_prefix("hello"),
    "None ids": lambda s, ids, c: s.put(None, c),
    "2-D ids": lambda s, ids, c: s.longest_prefix([ids, ids]),
    "object ids": lambda s, ids, c: s.longest_prefix([object()] * 3),
    "ids on meta": lambda s, ids, c: s.longest_prefix(torch.tensor(ids, device="meta")),
    "keys_for negative": lambda s, ids, c: s.keys_for([-5]),
    "bounds_for str": lambda s, ids, c: s.bounds_for("x"),
    # positions
    "positions str": lambda s, ids, c: s.longest_prefix(ids, positions="x"),
    "positions str (put)": lambda s, ids, c: s.put(ids, c, positions="x"),
    "positions float": lambda s, ids, c: s.put(ids, c, positions=1.5),
    "positions bool": lambda s, ids, c: s.put(ids, c, positions=True),
    "positions negative": lambda s, ids, c: s.put(ids, c, positions=-1),
    "positions 2**63-4": lambda s, ids, c: s.put(ids, c, positions=2**63 - 4),
    "positions 2**62": lambda s, ids, c: s.longest_prefix(ids, positions=2**62),
    "positions list too short": lambda s, ids, c: s.put(ids, c, positions=[0, 1]),
    "positions decreasing": lambda s, ids, c: s.put(ids, c, positions=list(range(16, 0, -1))),
    "positions floats": lambda s, ids, c: s.put(ids, c, positions=[0.5 + i for i in range(16)]),
    "positions huge list": lambda s, ids, c: s.longest_prefix(ids, positions=[2**70 + i for i in range(16)]),
    "positions uint64": lambda s, ids, c: s.longest_prefix(ids, positions=np.arange(2**63, 2**63 + 16, dtype=np.uint64)),
    "positions dict": lambda s, ids, c: s.longest_prefix(ids, positions={"start": 0}),
    # dtype and device
    "dtype []": lambda s, ids, c: s.longest_prefix(ids, dtype=[]),
    "dtype int8": lambda s, ids, c: s.longest_prefix(ids, dtype=torch.int8),
    "dtype name": lambda s, ids, c: s.longest_prefix(ids, dtype="float64"),
    "keys_for dtype": lambda s, ids, c: s.keys_for(ids, dtype={}),
    "namespace dtype": lambda s, ids, c: s.namespace(None),
    "device meta": lambda s, ids, c: s.longest_prefix(ids, device="meta"),
    "device junk": lambda s, ids, c: s.longest_prefix(ids, device=3.5),
    "device name": lambda s, ids, c: s.longest_prefix(ids, device="gpu0"),
    "device cuda:99": lambda s, ids, c: s.longest_prefix(ids, device="cuda:99"),
    # gc, evict, tokens_of, drop_stale_refs
    "gc max_bytes str": lambda s, ids, c: s.gc(max_bytes="100"),
    "gc max_bytes nan": lambda s, ids, c: s.gc(max_bytes=float("nan")),
    "gc max_bytes inf": lambda s, ids, c: s.gc(max_bytes=float("inf")),
    "gc max_bytes float": lambda s, ids, c: s.gc(max_bytes=100.0),
    "gc max_bytes negative": lambda s, ids, c: s.gc(max_bytes=-1),
    "gc max_bytes bool": lambda s, ids, c: s.gc(max_bytes=True),
    "gc stale_refs_after str": lambda s, ids, c: s.gc(stale_refs_after="x"),
    "gc stale_refs_after nan": lambda s, ids, c: s.gc(stale_refs_after=float("nan")),
    "gc leftovers_after None": lambda s, ids, c: s.gc(leftovers_after=None),
    "gc leftovers_after list": lambda s, ids, c: s.gc(leftovers_after=[1]),
    "drop_stale_refs str": lambda s, ids, c: s.drop_stale_refs("x"),
    "evict bad key": lambda s, ids, c: s.evict("zz"),
    "evict int": lambda s, ids, c: s.evict(5),
    "evict upper-case key": lambda s, ids, c: s.evict("A" * 64),
    "tokens_of bad key": lambda s, ids, c: s.tokens_of("../../etc/passwd"),
    "tokens_of missing": lambda s, ids, c: s.tokens_of("0" * 64),
}


def test_bad_calls_raise_seqkv_errors_only(filled):
    url, store, ids, cache = filled
    before = sorted(store.backend.list())
    failures = []
    cases = dict(BAD_CALLS)
    cases.update({name: (lambda f: lambda s, i, c: f(s))(f) for name, f in _bad_cache_cases(ids, cache).items()})
    for name, call in cases.items():
        try:
            call(store, ids, cache)
        except seqkv.SeqKVError as exc:
            if not str(exc):
                failures.append(f"{name}: {type(exc).__name__} without a message")
        except Exception as exc:  # noqa: BLE001  (the point of the test)
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{name}: no error")
    assert failures == []
    assert sorted(store.backend.list()) == before  # no bad call wrote or removed anything
    n, got = store.longest_prefix(ids)
    assert n == 16
    assert_bit_exact(got, cache)


BAD_OPTIONS = {
    "url None": dict(url=None),
    "url int": dict(url=5),
    "url scheme": dict(url="ftp://example.org/x"),
    "url NUL": dict(url="file:///tmp/a\x00b"),
    "url empty path": dict(url="file://"),
    "url bad IPv6": dict(url="redis://[::1/0"),
    "url bad port": dict(url="redis://127.0.0.1:notaport/0"),
    "url s3 without bucket": dict(url="s3:///x"),
    "memory bad name": dict(url="memory://a b"),
    "memory option": dict(url="memory://x", bogus=1),
    "dir option": dict(url="file:///tmp/seqkv-hostile", bogus=1),
    "preset unknown": dict(preset="best"),
    "preset list": dict(preset=["lossless"]),
    "lossy without model": dict(model=None, preset="balanced"),
    "model int": dict(model=5),
    "chunk_tokens 0": dict(chunk_tokens=0),
    "chunk_tokens str": dict(chunk_tokens="8"),
    "chunk_tokens float": dict(chunk_tokens=8.0),
    "chunk_tokens huge": dict(chunk_tokens=10**20),
    "chunk_tokens huge (content)": dict(chunk_tokens=2**20, chunking="content"),
    "max_bytes nan": dict(max_bytes=float("nan")),
    "max_bytes negative": dict(max_bytes=-5),
    "max_bytes str": dict(max_bytes="1e6"),
    "fsync str": dict(fsync="yes"),
    "chunking list": dict(chunking=[]),
    "chunking unknown": dict(chunking="rolling"),
    "near_duplicates str": dict(near_duplicates="no"),
    "boundary_tokens int": dict(chunking="content", boundary_tokens=5),
    "boundary_tokens str": dict(chunking="content", boundary_tokens="ab"),
    "boundary_tokens negative": dict(chunking="content", boundary_tokens=[-1]),
    "boundary_tokens huge": dict(chunking="content", boundary_tokens=[2**40]),
    "boundary_tokens fixed": dict(boundary_tokens=[0]),
    "token_trie object": dict(token_trie=object(), vocab_size=96),
    "token_trie without vocab": dict(token_trie="trie"),
    "vocab_size str": dict(vocab_size="96"),
    "vocab_size 1": dict(vocab_size=1),
    "codec_options list": dict(preset="balanced", codec_options=["step"]),
    "codec_options unknown": dict(preset="balanced", codec_options={"nope": 1}),
    "codec_options object": dict(preset="balanced", codec_options={"step": object()}),
    "codec_options int keys": dict(preset="balanced", codec_options={1: 2}),
    "codec_options on lossless": dict(codec_options={"step": 0.1}),
    "pipeline_config int": dict(pipeline_config=5),
    "pipeline_config junk": dict(pipeline_config={"mode": "lossy", "coder": object()}),
    "profile int": dict(profile=5, codec_options={"scale": 1.0}),
}


def test_bad_options_raise_seqkv_errors_only(tmp_path):
    failures = []
    for name, options in BAD_OPTIONS.items():
        options = dict(options)
        url = options.pop("url", (tmp_path / "s").as_uri())
        options.setdefault("model", tiny_model("llama"))
        try:
            PrefixStore(url, **options).close()
        except seqkv.SeqKVError as exc:
            if not str(exc):
                failures.append(f"{name}: {type(exc).__name__} without a message")
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{name}: no error")
    assert failures == []


def test_bad_redis_and_s3_options_raise_seqkv_errors_only(redis_server, s3_server):  # noqa: F811
    _endpoint, bucket, s3_options = s3_server
    cases = {
        "redis unknown option": (f"{redis_server}/0", {"bogus": 1}),
        "redis key_prefix glob": (f"{redis_server}/0", {"key_prefix": "a*"}),
        "redis key_prefix int": (f"{redis_server}/0", {"key_prefix": 5}),
        "redis socket_timeout str": (f"{redis_server}/0", {"socket_timeout": "1"}),
        "redis db junk": (f"{redis_server}/zz", {}),
        "redis nobody listens": ("redis://127.0.0.1:1/0", {"socket_timeout": 0.5}),
        "s3 unknown option": (f"s3://{bucket}/x", dict(s3_options, bogus=1)),
        "s3 bad endpoint": (f"s3://{bucket}/x", dict(s3_options, endpoint_url="not a url")),
    }
    failures = []
    for name, (url, options) in cases.items():
        try:
            PrefixStore(url, model=tiny_model("llama"), **options).close()
        except seqkv.SeqKVError:
            pass
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{name}: no error")
    assert failures == []


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=5),
                  st.binary(max_size=5), st.lists(st.integers(-5, 2**40), max_size=20),
                  st.lists(st.floats(), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
                  st.sampled_from([object(), torch.float64, torch.int8, "float16", "cpu", "meta", "cuda", [],
                                   torch.zeros(2, 2), np.zeros(3, dtype=np.uint64), Ellipsis]))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(junk=_JUNK, which=st.sampled_from(["ids", "positions", "dtype", "device", "max_bytes", "stale", "leftovers",
                                         "key", "cache"]))
def test_junk_arguments_raise_seqkv_errors_only(junk_target, junk, which):
    url, store, ids, cache = junk_target
    calls = {
        "ids": lambda: store.longest_prefix(junk),
        "positions": lambda: store.longest_prefix(ids, positions=junk),
        "dtype": lambda: store.longest_prefix(ids, dtype=junk),
        "device": lambda: store.longest_prefix(ids, device=junk),
        "max_bytes": lambda: store.gc(max_bytes=junk if junk is not None else -1),
        "stale": lambda: store.gc(max_bytes=10**12, stale_refs_after=junk),
        "leftovers": lambda: store.gc(max_bytes=10**12, leftovers_after=junk),
        "key": lambda: store.evict(junk),
        "cache": lambda: store.put(ids, junk),
    }
    try:
        calls[which]()
    except seqkv.SeqKVError:
        pass


def test_damaged_side_records_cost_reuse_never_an_exception(where):
    (a, ca), (b, cb) = _shared_pair()
    with where.open() as store:
        ns = store.namespace("float32")
        for s in range(0, 24, 8):
            for ids in (a, b):
                store.backend.meta_set(f"content/{store_keys.content_digest(ids[s:s + 8], ns)}", b"\xff\xfe")
        for key in store.keys_for(a):
            store.backend.meta_set(f"score/{key}", b"\xff not a number")
        store.put(a, ca)  # the damaged index records are replaced
        assert store.put(b, cb)["chunks_residual"] == 2
        for ids, cache in ((a, ca), (b, cb)):
            n, got = store.longest_prefix(ids)
            assert n == 24
            assert_bit_exact(got, cache)
        store.backend.meta_set(f"content/{'ab' * 32}", b"not a key")
        assert store.gc(max_bytes=10**9)["orphan_records_dropped"] >= 1
        assert store.metadata.content_get("ab" * 32) is None
        assert store.gc(max_bytes=0)["entries"] == 0


def test_a_damaged_envelope_header_is_quarantined(where):
    ids, cache = make_cache(16)
    with where.open() as store:
        store.put(ids, cache)
        key = store.keys_for(ids)[1]
        for head in (b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe", b'{"v": 2, "index": ' + b"9" * 5000 + b"}"):
            data = b"SKVSTORE\x01" + len(head).to_bytes(4, "little") + head
            store.backend.delete(key)
            store.backend.put_if_absent(key, data)
            with pytest.raises(seqkv.store.CorruptEntryError):
                store.longest_prefix(ids)
            n, got = store.longest_prefix(ids)
            assert n == 8
            assert_bit_exact(got, slice_cache(cache, 0, 8))
            store.put(ids, cache)


def test_redis_keys_of_the_wrong_type(redis_server):  # noqa: F811
    import redis

    ids, cache = make_cache(16)
    prefix = f"w{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(f"{redis_server}/0")
    store = PrefixStore(f"{redis_server}/0", model=tiny_model("llama"), chunk_tokens=CHUNK, key_prefix=prefix)
    client.set(f"{prefix}lru", b"not a sorted set")
    with pytest.raises(seqkv.StorageError, match="LRU record"):
        store.put(ids, cache)
    assert client.keys(f"{prefix}e:*") == []  # refused BEFORE anything was written
    client.delete(f"{prefix}lru")
    store.put(ids, cache)
    client.set(f"{prefix}lru", b"x")
    with pytest.raises(seqkv.StorageError, match="LRU record"):
        store.gc(max_bytes=0)
    assert store.stats()["entries"] == 2  # nothing was moved aside either
    client.delete(f"{prefix}lru")
    key = store.keys_for(ids)[1]
    client.delete(f"{prefix}e:{key}")
    client.hset(f"{prefix}e:{key}", "a", "b")  # an entry key of another type: read as a damaged entry
    with pytest.raises(seqkv.store.CorruptEntryError):
        store.longest_prefix(ids)
    assert store.longest_prefix(ids)[0] == 8
    store.put(ids, cache)
    n, got = store.longest_prefix(ids)
    assert n == 16
    assert_bit_exact(got, cache)
    store.close()


# -- (6) crash leftovers ------------------------------------------------------------------------------------------

def _old_ref(referrer: str, seconds: float) -> str:
    return f"{referrer}.{(int(ref_nonce()[:11], 16) - int(seconds * 1000)):011x}00000"


def test_gc_reclaims_crash_leftovers_and_then_holds_the_budget(where):
    (a, ca), (b, cb) = _shared_pair()
    with where.open() as store:
        store.put(a, ca)
        store.put(b, cb)
        keys_a, keys_b = store.keys_for(a), store.keys_for(b)
        # a writer killed after taking its reference (10 minutes ago), before writing its residual
        store.metadata.add_ref(keys_a[2], _old_ref("c" * 64, 600))
        # a writer killed a moment ago: its record is young and must stay
        young = f"{'d' * 64}.{ref_nonce()}"
        store.metadata.add_ref(keys_a[1], young)
        # an evictor killed between hiding b's head and dropping it
        assert hide(store.backend, keys_b[0]) is not None
        # a reader that touched an entry evicted meanwhile
        store.metadata.set_score("e" * 64, 3)
        if where.kind == "dir":  # a writer killed between its temp file and the link
            with open(os.path.join(store.backend.tmp_dir, "0123456789abcdef.tmp1"), "wb") as f:
                f.write(b"x" * 5000)
        s = store.stats()
        assert s["limbo_entries"] == 1 and s["limbo_bytes"] > 0
        assert s["temp_files"] == (1 if where.kind == "dir" else 0)
        # defaults: the young limbo item and temp file are a live process's, the 10-minute-old record is stale
        res = store.gc(max_bytes=0)
        assert res["stale_refs_dropped"] == 1 and res["orphan_records_dropped"] >= 1
        assert res["limbo_restored"] == 0 and res["temp_files_removed"] == 0
        assert young in store.metadata.refs(keys_a[1])
        left = {k for k, _, _ in store.backend.list()}
        assert left == {keys_a[1]}  # everything but the base the young record pins
        assert store.stats()["limbo_entries"] == 1
        # once no other process runs, every leftover goes
        res = store.gc(max_bytes=0, stale_refs_after=-1, leftovers_after=-1)
        assert res["limbo_restored"] == 1 and res["temp_files_removed"] == (1 if where.kind == "dir" else 0)
        s = store.stats()
        assert (s["entries"], s["bytes_stored"], s["temp_files"], s["limbo_entries"]) == (0, 0, 0, 0)
        assert all(store.metadata.refs(k) == [] for k in store.metadata.ref_bases())
        assert store.metadata.scored_keys() == [] and store.metadata.content_digests() == []


@contextlib.contextmanager
def _after_planning(store, action):
    """Run ``action`` (another process's gc) between a put's coding of its chunks and its writes."""
    real_plan = store._plan

    def plan_then_act(*args, **kw):
        planned = real_plan(*args, **kw)
        action()
        return planned

    store._plan = plan_then_act
    try:
        yield
    finally:
        store._plan = real_plan


def test_a_put_slower_than_the_stale_threshold_keeps_its_base(where):
    """gc drops the reference records of a put still coding (threshold -1: every record is 'old'); the put
    notices before it writes, takes a fresh record and checks its base, so no residual lacks its base."""
    (a, ca), (b, cb) = _shared_pair()
    with where.open() as store:
        store.put(a, ca)
        other = where.open()
        # drops the put's (young) records: the put looks crashed
        with _after_planning(store, lambda: other.gc(stale_refs_after=-1)):
            assert store.put(b, cb)["chunks_residual"] == 2
        for key in store.keys_for(b)[1:]:
            header, _ = unpack_entry(store.backend.get(key), key)
            assert header["base_ref"] in store.metadata.refs(header["base"])
        store.gc(max_bytes=0, stale_refs_after=-1)  # evicts b's residuals first, then a's chunks
        assert store.stats()["entries"] == 0
        other.close()


def test_a_put_whose_base_was_evicted_while_it_coded_writes_plainly(where):
    (a, ca), (b, cb) = _shared_pair()
    with where.open() as store:
        store.put(a, ca)
        other = where.open()
        with _after_planning(store, lambda: other.gc(max_bytes=0, stale_refs_after=-1)):
            res = store.put(b, cb)
        assert res["chunks_written"] == 3 and res["chunks_residual"] == 0
        n, got = store.longest_prefix(b)
        assert n == 24
        assert_bit_exact(got, cb)
        other.close()


# the kill -9 torture ----------------------------------------------------------------------------------------------

TORTURE_TRIALS = int(os.environ.get("SEQKV_TORTURE_TRIALS", "3"))
TORTURE_BACKENDS = [b for b in os.environ.get("SEQKV_TORTURE_BACKENDS", "dir,redis").split(",") if b]
TORTURE_BUDGET = 24_000
TORTURE_OPS = 40
_PRIMITIVES = ("get", "put_if_absent", "delete", "touch", "move", "meta_set", "meta_delete", "meta_get", "meta_list",
               "list")


def _torture_sequences():
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, 96, (24,), generator=gen).tolist() for _ in range(2)]
    seqs = [[p] * (3 + p) + d for p in range(1, 5) for d in docs]
    with torch.no_grad():
        return seqs, [cache_of(model(torch.tensor([s]), use_cache=True)) for s in seqs]


def _same(got, want, n: int) -> bool:
    for (gk, gv), (wk, wv) in zip(cache_layers(got), cache_layers(want)):
        if not (torch.equal(gk, wk[:, :n]) and torch.equal(gv, wv[:, :n])):
            return False
    return True


def _torture_child(where, seqs, caches, seed: int, evictor: bool, report: str):
    """Puts, lookups (checked) and gc's; kills itself with SIGKILL at a random primitive call (inside one for
    the directory backend's publish: after the temp file, before the link)."""
    torch.set_num_threads(1)
    rnd = random.Random(seed)
    store = where.open(chunking="content")
    backend = store.backend
    die_at = rnd.randint(1, 120)
    calls = [0]

    def dying(fn):
        def call(*args, **kw):
            calls[0] += 1
            if calls[0] == die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kw)
        return call

    for name in _PRIMITIVES:
        setattr(backend, name, dying(getattr(backend, name)))
    if hasattr(backend, "_publish"):
        backend._publish = dying(backend._publish)
    def note(event: dict) -> None:
        with open(report, "a") as f:
            f.write(json.dumps(event) + "\n")

    try:
        for _ in range(TORTURE_OPS):
            i = rnd.randrange(len(seqs))
            if evictor and rnd.random() < 0.5:
                # stale_refs_after as low as -1: the records of puts still running are dropped too, which
                # those puts must notice before they write (their bases are then checked again)
                store.gc(max_bytes=rnd.choice([0, TORTURE_BUDGET // 2, TORTURE_BUDGET]),
                         stale_refs_after=rnd.choice([-1.0, 0.05, 300.0]))
            elif rnd.random() < 0.3:
                try:
                    n, got = store.longest_prefix(seqs[i])
                except seqkv.store.CorruptEntryError as exc:
                    note({"lost": str(exc)})
                    continue
                if n and not _same(got, caches[i], n):
                    note({"wrong": i, "n": n})
            else:
                store.put(seqs[i], caches[i])
    except BaseException as exc:  # noqa: BLE001  (reported to the parent, which fails)
        note({"error": f"{type(exc).__name__}: {exc}"})
        os._exit(3)
    os._exit(0)


def _torture_where(kind, request, tmp_path) -> Where:
    tag = uuid.uuid4().hex[:12]
    if kind == "dir":
        return Where(kind, (tmp_path / "store").as_uri(), {})
    if kind == "redis":
        return Where(kind, f"{request.getfixturevalue('redis_server')}/0", {"key_prefix": f"k{tag}:"})
    _endpoint, bucket, options = request.getfixturevalue("s3_server")
    return Where(kind, f"s3://{bucket}/k{tag}", dict(options))


@pytest.mark.parametrize("kind", TORTURE_BACKENDS)
def test_kill9_torture(kind, request, tmp_path):
    where = _torture_where(kind, request, tmp_path)
    seqs, caches = _torture_sequences()
    report = str(tmp_path / "report.jsonl")
    ctx = multiprocessing.get_context("fork")
    rnd = random.Random(1234)
    deadline = time.monotonic() + 60 + 30 * TORTURE_TRIALS
    killed = 0
    for trial in range(TORTURE_TRIALS):
        procs = [ctx.Process(target=_torture_child, args=(where, seqs, caches, trial * 10 + j, j == 0, report))
                 for j in range(3)]
        for p in procs:
            p.start()
        time.sleep(rnd.uniform(0.2, 2.0))
        victim = rnd.choice(procs)  # and one more kill -9 from outside, at a random moment
        if victim.is_alive():
            os.kill(victim.pid, signal.SIGKILL)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join()
            killed += p.exitcode == -signal.SIGKILL
    assert time.monotonic() < deadline, "the torture ran out of time"
    events = [json.loads(line) for line in open(report)] if os.path.exists(report) else []
    with where.open(chunking="content") as store:
        before = store.stats()
        # every sequence: never a wrong cache, never an exception
        wrong = sum(1 for e in events if "wrong" in e)
        lost = [e for e in events if "lost" in e]
        for ids, cache in zip(seqs, caches):
            n, got = store.longest_prefix(ids)
            wrong += bool(n) and not _same(got, cache, n)
        # once nothing else runs, every leftover goes and the budget holds
        res = store.gc(max_bytes=TORTURE_BUDGET, stale_refs_after=-1, leftovers_after=-1)
        after = store.stats()
        present = {k for k, _, _ in store.backend.list()}
        dangling = []
        for key in present:
            header, _ = unpack_entry(store.backend.get(key), key)
            if header["base"] is not None and (header["base"] not in present
                                               or header["base_ref"] not in store.metadata.refs(header["base"])):
                dangling.append(key)
        stale = [(b, r) for b in store.metadata.ref_bases() for r in store.metadata.refs(b) if r[:64] not in present]
        orphans = [k for k in store.metadata.scored_keys() if k not in present]
        print(f"\ntorture {kind}: trials={TORTURE_TRIALS} processes={3 * TORTURE_TRIALS} killed={killed} "
              f"wrong={wrong} lost={len(lost) + after['quarantine_entries']} dangling={len(dangling)} "
              f"leftovers before gc: temp={before['temp_files']} ({before['temp_bytes']} B) "
              f"limbo={before['limbo_entries']} ({before['limbo_bytes']} B) entries={before['bytes_stored']} B; "
              f"gc: {res}; after: {after['bytes_stored']} B + {after['temp_bytes'] + after['limbo_bytes']} B "
              f"leftovers, budget {TORTURE_BUDGET}")
        assert [e for e in events if "error" in e] == []
        assert wrong == 0
        assert lost == [] and after["quarantine_entries"] == 0 and dangling == []
        assert (after["temp_files"], after["limbo_entries"], stale, orphans) == (0, 0, [], [])
        assert after["bytes_stored"] + after["temp_bytes"] + after["limbo_bytes"] <= TORTURE_BUDGET
        assert killed >= 1
        # and the store still works: every sequence goes in and comes back whole
        for ids, cache in zip(seqs, caches):
            store.put(ids, cache)
            n, got = store.longest_prefix(ids)
            assert n == len(ids) and _same(got, cache, n)


# -- (7) concurrent writers reuse as sequential ones do -----------------------------------------------------------

def test_a_writer_overtaken_while_coding_still_codes_residuals(where):
    """Writer A codes its chunks while nothing holds its document; writer B stores the same document
    (under another prefix) before A writes.  A's chunks become residuals on B's, as if A had come second."""
    (a, ca), (b, cb) = _shared_pair()
    with where.open() as first, where.open() as second:
        real_write = first._write

        def overtaken(*args, **kw):
            assert second.put(b, cb)["chunks_residual"] == 0
            return real_write(*args, **kw)

        first._write = overtaken
        res = first.put(a, ca)
        assert res["chunks_written"] == 3 and res["chunks_residual"] == 2
        for ids, cache in ((a, ca), (b, cb)):
            n, got = first.longest_prefix(ids)
            assert n == 24
            assert_bit_exact(got, cache)


def _concurrent_writer(where, ids, cache, barrier, out_path, preset):
    torch.set_num_threads(1)
    store = where.open(chunking="content", chunk_tokens=16, preset=preset)
    barrier.wait(timeout=60)
    res = store.put(ids, cache)
    store.close()
    with open(out_path, "w") as f:
        json.dump(res, f)


def _reuse_sessions(n: int):
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(11)
    doc = torch.randint(1, 96, (64,), generator=gen).tolist()
    seqs = [torch.randint(1, 96, (3 + 2 * i,), generator=gen).tolist() + doc for i in range(n)]
    with torch.no_grad():
        return seqs, [cache_of(model(torch.tensor([s]), use_cache=True)) for s in seqs]


def _layer_mse(store, seqs, caches):
    out = []
    for ids, cache in zip(seqs, caches):
        n, got = store.longest_prefix(ids)
        assert n == len(ids)
        for (gk, gv), (wk, wv) in zip(cache_layers(got), cache_layers(cache)):
            out += [float((gk - wk).pow(2).mean()), float((gv - wv).pow(2).mean())]
    return out


@pytest.mark.parametrize("kind", ["dir"])
def test_concurrent_writers_reuse_near_duplicates(kind, tmp_path):
    """8 writers put the same document under 8 prefixes at once.  Reported: residual chunks and bytes against
    the same puts one at a time, and the worst per-layer MSE against a plain (exact-prefix only) store."""
    n_writers = 8
    seqs, caches = _reuse_sessions(n_writers)
    model = tiny_model("llama")
    results = {}
    for mode in ("sequential", "concurrent", "plain"):
        where = Where(kind, (tmp_path / mode).as_uri(), {})
        if mode == "concurrent":
            ctx = multiprocessing.get_context("fork")
            barrier = ctx.Barrier(n_writers)
            procs = [ctx.Process(target=_concurrent_writer, args=(where, ids, cache, barrier,
                                                                  str(tmp_path / f"c{i}.json"), "balanced"))
                     for i, (ids, cache) in enumerate(zip(seqs, caches))]
            for p in procs:
                p.start()
            for p in procs:
                p.join(timeout=180)
                assert p.exitcode == 0
        store = PrefixStore(where.url, model=model, chunking="content", chunk_tokens=16, preset="balanced",
                            near_duplicates=mode != "plain")
        if mode != "concurrent":
            for ids, cache in zip(seqs, caches):
                store.put(ids, cache)
        residual = plain = 0
        for key, _, _ in store.backend.list():
            header, _ = unpack_entry(store.backend.get(key), key)
            residual += header["base"] is not None
            plain += header["base"] is None
        results[mode] = {"residual": residual, "plain": plain, "bytes": store.stats()["bytes_stored"],
                         "mse": _layer_mse(store, seqs, caches)}
        store.close()
    ratio = max(c / max(p, 1e-30) for c, p in zip(results["concurrent"]["mse"], results["plain"]["mse"]))
    seq_ratio = max(c / max(p, 1e-30) for c, p in zip(results["sequential"]["mse"], results["plain"]["mse"]))
    print(f"\nreuse with {n_writers} writers: sequential {results['sequential']['residual']} residual / "
          f"{results['sequential']['plain']} plain chunks, {results['sequential']['bytes']} B; concurrent "
          f"{results['concurrent']['residual']} / {results['concurrent']['plain']}, {results['concurrent']['bytes']} B; "
          f"plain store {results['plain']['bytes']} B; worst per-layer MSE vs the plain store: sequential "
          f"{seq_ratio:.3f}x, concurrent {ratio:.3f}x")
    assert results["sequential"]["residual"] > 0
    # the chunks two writers code at the very same moment may both stay plain: allow one writer's worth
    doc_chunks = results["sequential"]["residual"] // (n_writers - 1)
    assert results["concurrent"]["residual"] >= results["sequential"]["residual"] - 2 * doc_chunks
    assert math.isfinite(ratio) and ratio <= 1.5
