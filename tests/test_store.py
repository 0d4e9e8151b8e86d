"""seqkv.store.PrefixStore over every backend: directory, a real redis-server and moto's S3 server."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import uuid

import pytest
import torch
from conftest import tiny_model
from servers import redis_server, s3_server  # noqa: F401  (fixtures)

import seqkv
from seqkv.hf_adapter import build_cache, cache_layers
from seqkv.store import CorruptEntryError, PrefixStore
from seqkv.store import keys as store_keys
from seqkv.store.prefix_store import _pack_entry, _unpack_entry

CHUNK = 8


@torch.no_grad()
def make_cache(tokens: int, seed: int = 0, family: str = "llama", dtype=torch.float32):
    """(token ids, cache) of a tiny random model."""
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (1, tokens), generator=gen)
    cache = model(ids, use_cache=True).past_key_values
    if dtype != torch.float32:
        cache = build_cache([(k.to(dtype), v.to(dtype)) for k, v in cache_layers(cache)])
    return ids[0].tolist(), cache


def slice_cache(cache, start: int, end: int):
    return build_cache([(k[:, start:end], v[:, start:end]) for k, v in cache_layers(cache)])


def join_caches(a, b):
    return build_cache([(torch.cat([ka, kb], 1), torch.cat([va, vb], 1))
                        for (ka, va), (kb, vb) in zip(cache_layers(a), cache_layers(b))])


def assert_bit_exact(got, want):
    gl, wl = cache_layers(got), cache_layers(want)
    assert len(gl) == len(wl)
    for (gk, gv), (wk, wv) in zip(gl, wl):
        assert gk.dtype == wk.dtype and gk.shape == wk.shape
        for g, w in ((gk, wk), (gv, wv)):
            bits = torch.int32 if g.dtype == torch.float32 else torch.int16
            assert torch.equal(g.contiguous().view(bits), w.contiguous().view(bits))


class Where:
    """One fresh store location (its URL and backend options) on one backend."""

    def __init__(self, kind: str, url: str, options: dict):
        self.kind, self.url, self.options = kind, url, options

    def open(self, model=None, **kw) -> PrefixStore:
        kw.setdefault("chunk_tokens", CHUNK)
        return PrefixStore(self.url, model=model if model is not None else tiny_model("llama"), **self.options, **kw)


@pytest.fixture(params=["dir", "redis", "s3"])
def where(request, tmp_path):
    kind = request.param
    tag = uuid.uuid4().hex[:12]
    if kind == "dir":
        return Where(kind, (tmp_path / "store").as_uri(), {})
    if kind == "redis":
        base = request.getfixturevalue("redis_server")
        return Where(kind, f"{base}/0", {"key_prefix": f"t{tag}:"})
    _endpoint, bucket, options = request.getfixturevalue("s3_server")
    return Where(kind, f"s3://{bucket}/t{tag}", dict(options))


def test_roundtrip_lossless_bit_exact(where):
    ids, cache = make_cache(21)
    with where.open() as store:
        put = store.put(ids, cache)
        assert put["chunks"] == 3 and put["chunks_written"] == 3 and put["chunks_reused"] == 0
        n, got = store.longest_prefix(ids)
        assert n == 21
        assert_bit_exact(got, cache)
        # whole chunks only: a longer request with new tokens gets the stored full chunks
        n, got = store.longest_prefix(ids[:19] + [1, 2, 3])
        assert n == 16
        assert_bit_exact(got, slice_cache(cache, 0, 16))
        assert store.longest_prefix([95 - t for t in ids]) == (0, None)
        s = store.stats()
        assert s["entries"] == 3 and s["lookups"] == 3 and s["hits"] == 2
        assert s["hit_rate"] == pytest.approx(2 / 3)


def test_roundtrip_bf16_with_nonzero_positions(where):
    ids, cache = make_cache(12, dtype=torch.bfloat16)
    with where.open() as store:
        store.put(ids, cache, positions=100)
        assert store.longest_prefix(ids) == (0, None)  # stored at other positions: never returned for 0..n
        n, got = store.longest_prefix(ids, positions=100, dtype=torch.bfloat16)
        assert n == 12
        assert_bit_exact(got, cache)


def test_shared_prefix_stored_once(where):
    ids, cache = make_cache(40)
    with where.open() as store:
        first = store.put(ids[:20], slice_cache(cache, 0, 20))  # chunks [0,8) [8,16) [16,20)
        assert (first["chunks_written"], first["chunks_reused"]) == (3, 0)
        second = store.put(ids, cache)  # [0,8) [8,16) shared; [16,24) [24,32) [32,40) new
        assert (second["chunks_written"], second["chunks_reused"]) == (3, 2)
        assert second["bytes_reused"] > 0
        again = store.put(ids, cache)
        assert (again["chunks_written"], again["bytes_written"]) == (0, 0)
        s = store.stats()
        assert s["entries"] == 6
        assert s["bytes_saved"] == second["bytes_reused"] + again["bytes_reused"]
        assert s["bytes_stored"] == first["bytes_written"] + second["bytes_written"]
        n, got = store.longest_prefix(ids)
        assert n == 40
        assert_bit_exact(got, cache)
        n, got = store.longest_prefix(ids[:20])
        assert n == 20
        assert_bit_exact(got, slice_cache(cache, 0, 20))


def test_forced_collision_never_returns_a_wrong_cache(where, monkeypatch):
    # every chunk of every prefix gets the same key
    monkeypatch.setattr(store_keys, "chain_key", lambda prev, ids, ns: hashlib.sha256(b"collide" + ns).digest())
    ids_a, cache_a = make_cache(16, seed=1)
    ids_b, cache_b = make_cache(16, seed=2)
    assert ids_a[:8] != ids_b[:8]
    with where.open() as store:
        assert store.put(ids_a, cache_a)["chunks_written"] == 1  # chunk 1 collides with chunk 0
        assert store.longest_prefix(ids_b) == (0, None)
        put_b = store.put(ids_b, cache_b)
        assert put_b["collisions"] == 1 and put_b["chunks_written"] == 0
        n, got = store.longest_prefix(ids_a)
        assert n == 8  # chunk 1's key holds chunk 0: its tokens differ, so the match stops
        assert_bit_exact(got, slice_cache(cache_a, 0, 8))
        # same first chunk, other history: the prefix digest also refuses it
        n, _ = store.longest_prefix(ids_a[:8] + ids_b[8:])
        assert n == 8
        assert store.stats()["collisions"] >= 2


def test_entry_of_another_model_is_refused(where):
    llama, qwen = tiny_model("llama"), tiny_model("qwen2")
    ids, cache = make_cache(8, family="llama")
    store_a = where.open(model=llama)
    store_b = where.open(model=qwen)
    store_a.put(ids, cache)
    (key_a,) = store_a.keys_for(ids)
    (key_b,) = store_b.keys_for(ids)
    assert key_a != key_b  # the fingerprint is in the namespace
    data = store_a.backend.get(key_a)
    # 1) the entry moved under model B's key: its namespace digest differs
    header, payload = _unpack_entry(data, key_a)
    assert store_b.backend.put_if_absent(key_b, _pack_entry(dict(header, key=key_b), payload))
    with pytest.raises((seqkv.ModelMismatchError, seqkv.StorageError)):
        store_b.longest_prefix(ids)
    # 2) forged to look like B's in the envelope: decoding with model=B checks the container's fingerprint
    store_b.backend.delete(key_b)
    ns_b = hashlib.sha256(store_b.namespace("float32")).hexdigest()
    store_b.backend.put_if_absent(key_b, _pack_entry(dict(header, key=key_b, namespace=ns_b), payload))
    with pytest.raises((seqkv.ModelMismatchError, seqkv.StorageError)):
        store_b.longest_prefix(ids)
    store_a.close()
    store_b.close()


def test_truncated_entry_raises_and_is_quarantined(where):
    ids, cache = make_cache(16)
    with where.open() as store:
        store.put(ids, cache)
        key0, key1 = store.keys_for(ids)
        data = store.backend.get(key0)
        store.backend.delete(key0)
        store.backend.put_if_absent(key0, data[: len(data) // 2])
        with pytest.raises(seqkv.StorageError, match="quarantined"):
            store.longest_prefix(ids)
        assert store.backend.get(key0) is None
        assert len(store.backend.quarantined()) == 1
        assert store.longest_prefix(ids) == (0, None)
        # a bit flipped inside the container (envelope checksum recomputed): seqkv's own checksums catch it
        header, payload = _unpack_entry(store.backend.get(key1), key1)
        bad = bytearray(payload)
        bad[len(bad) - 20] ^= 0x10
        header.update(payload_sha256=hashlib.sha256(bytes(bad)).hexdigest())
        store.backend.delete(key1)
        store.backend.put_if_absent(key1, _pack_entry(header, bytes(bad)))
        assert store.put(ids, cache)["chunks_written"] == 1  # chunk 0 rewritten
        with pytest.raises(CorruptEntryError, match="quarantined"):
            store.longest_prefix(ids)
        assert len(store.backend.quarantined()) == 2
        assert store.put(ids, cache)["chunks_written"] == 1
        n, got = store.longest_prefix(ids)
        assert n == 16
        assert_bit_exact(got, cache)
        assert store.stats()["quarantined"] == 2


def _writer(where, ids, cache, barrier, out_path, rounds):
    torch.set_num_threads(1)
    totals = {"chunks_written": 0, "chunks_reused": 0}
    store = where.open()
    barrier.wait(timeout=60)
    for _ in range(rounds):
        res = store.put(ids, cache)
        for k in totals:
            totals[k] += res[k]
    store.close()
    with open(out_path, "w") as f:
        json.dump(totals, f)


def test_concurrent_writers_lose_nothing_and_duplicate_nothing(where, tmp_path):
    ids_x, cache_x = make_cache(32, seed=3)
    ids_z, cache_z = make_cache(32, seed=4)
    ids_y = ids_x[:16] + ids_z[16:]  # shares two chunks with x
    cache_y = join_caches(slice_cache(cache_x, 0, 16), slice_cache(cache_z, 16, 32))
    jobs = [(ids_x, cache_x), (ids_x, cache_x), (ids_y, cache_y), (ids_y, cache_y)]
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(jobs))
    procs = []
    for i, (ids, cache) in enumerate(jobs):
        p = ctx.Process(target=_writer, args=(where, ids, cache, barrier, str(tmp_path / f"w{i}.json"), 2))
        p.start()
        procs.append(p)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(len(jobs))]
    assert sum(r["chunks_written"] for r in results) == 6  # 4 chunks of x + 2 of y's own: each written once
    assert sum(r["chunks_written"] + r["chunks_reused"] for r in results) == 4 * 4 * 2
    with where.open() as store:
        assert store.stats()["entries"] == 6
        for ids, cache in ((ids_x, cache_x), (ids_y, cache_y)):
            n, got = store.longest_prefix(ids)
            assert n == 32
            assert_bit_exact(got, cache)
        if where.kind == "dir":
            assert not os.listdir(store.backend.tmp_dir)


def test_byte_budget_is_honoured_and_evicts_chain_tails_first(where):
    ids, cache = make_cache(40)
    with where.open() as probe:
        entry_bytes = probe.put(ids[:8], slice_cache(cache, 0, 8))["bytes_written"]
        probe.gc(max_bytes=0)
        assert probe.stats()["entries"] == 0
    budget = int(entry_bytes * 2.5)
    with where.open(max_bytes=budget) as store:
        res = store.put(ids, cache)
        assert res["chunks_written"] == 5 and res["evicted"] == 3
        s = store.stats()
        assert s["bytes_stored"] <= budget and s["entries"] == 2
        n, got = store.longest_prefix(ids)
        assert n == 16  # the head of the chain survives
        assert_bit_exact(got, slice_cache(cache, 0, 16))
        ids2, cache2 = make_cache(24, seed=9)
        store.put(ids2, cache2)
        assert store.stats()["bytes_stored"] <= budget
        n, got = store.longest_prefix(ids2)
        assert n == 16 and store.longest_prefix(ids)[0] in (0, 8, 16)
        assert_bit_exact(got, slice_cache(cache2, 0, 16))


def test_keys_deterministic_across_processes():
    from seqkv import layout_from_model

    fp = layout_from_model(tiny_model("llama")).fingerprint
    ids = list(range(90, 0, -3)) + [2**31 - 1, 0]
    ns = store_keys.namespace(fingerprint=fp, dtype="float16", preset="lossless", chunk_tokens=CHUNK)
    mine = store_keys.chunk_keys(ids, ns, CHUNK)
    code = ("import json, sys; from seqkv.store import keys; a = json.load(sys.stdin); "
            "ns = keys.namespace(fingerprint=a['fp'], dtype='float16', preset='lossless', chunk_tokens=a['c']); "
            "print(json.dumps(keys.chunk_keys(a['ids'], ns, a['c'])))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps({"fp": fp, "ids": ids, "c": CHUNK}),
                         capture_output=True, text=True, env=env, check=True, timeout=120)
    assert json.loads(out.stdout) == mine
    # the documented chain, spelled out
    prev = hashlib.sha256(ns).digest()
    for i, key in enumerate(mine):
        chunk = ids[i * CHUNK:(i + 1) * CHUNK]
        prev = hashlib.sha256(prev + b"".join(int(t).to_bytes(4, "little", signed=True) for t in chunk) + ns).digest()
        assert key == prev.hex()
    assert len(mine) == 4  # 32 ids: 4 chunks of 8


def test_bad_arguments():
    with pytest.raises(seqkv.ConfigError):
        PrefixStore("ftp://example.org/x")
    with pytest.raises(seqkv.ConfigError):
        PrefixStore("file:///tmp/x", preset="balanced")  # lossy needs the model
    with pytest.raises(seqkv.ConfigError):
        PrefixStore("file:///tmp/x", chunk_tokens=0)


def test_lossy_preset_round_trip(where):
    ids, cache = make_cache(20)
    with where.open(preset="balanced") as store:
        assert store.put(ids, cache)["chunks_written"] == 3
        n, got = store.longest_prefix(ids)
        assert n == 20
        for (gk, gv), (wk, wv) in zip(cache_layers(got), cache_layers(cache)):
            assert gk.shape == wk.shape
            assert float((gk - wk).abs().max()) < 0.25 * float(wk.abs().max())
            assert float((gv - wv).abs().max()) < 0.25 * float(wv.abs().max())
