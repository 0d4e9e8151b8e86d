"""seqkv.store.PrefixStore over every backend: directory, a real redis-server, moto's S3 server and memory."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import types
import uuid

import pytest
import torch
from conftest import tiny_cache, tiny_model
from servers import redis_server, s3_server  # noqa: F401  (fixtures)

import seqkv
from seqkv.hf_adapter import build_cache, cache_layers
from seqkv.model_calls import cache_of
from seqkv.store import CorruptEntryError, PrefixStore
from seqkv.store import keys as store_keys
from seqkv.store.backend_memory import MemoryBackend
from seqkv.store.entries import quarantined
from seqkv.store.envelope import pack_entry, ref_nonce, unpack_entry

CHUNK = 8


@torch.no_grad()
def make_cache(tokens: int, seed: int = 0, family: str = "llama", dtype=torch.float32):
    """(token ids, cache) of a tiny random model."""
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (1, tokens), generator=gen)
    cache = cache_of(model(ids, use_cache=True))
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


@pytest.fixture(params=["dir", "redis", "s3", "memory"])
def where(request, tmp_path):
    kind = request.param
    tag = uuid.uuid4().hex[:12]
    if kind == "dir":
        yield Where(kind, (tmp_path / "store").as_uri(), {})
    elif kind == "redis":
        base = request.getfixturevalue("redis_server")
        yield Where(kind, f"{base}/0", {"key_prefix": f"t{tag}:"})
    elif kind == "s3":
        _endpoint, bucket, options = request.getfixturevalue("s3_server")
        yield Where(kind, f"s3://{bucket}/t{tag}", dict(options))
    else:
        threads = torch.get_num_threads()
        yield Where(kind, f"memory://t{tag}", {})
        torch.set_num_threads(threads)  # the writers ran as threads of this process, and set it to 1
        for space in (f"t{tag}", f"t{tag}x"):
            MemoryBackend.discard(space)


class _Worker(threading.Thread):
    """A thread with a Process's exitcode: the writers of a memory store share its process."""

    exitcode = None

    def run(self):
        self.exitcode = 1
        super().run()
        self.exitcode = 0


def concurrency(where):
    """Barrier and Process of the workers that write one store at once: forked processes, or threads for
    the memory backend (a memory store lives in one process)."""
    if where.kind == "memory":
        return types.SimpleNamespace(Barrier=threading.Barrier, Process=_Worker)
    return multiprocessing.get_context("fork")


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
    header, payload = unpack_entry(data, key_a)
    assert store_b.backend.put_if_absent(key_b, pack_entry(dict(header, key=key_b), payload))
    with pytest.raises((seqkv.ModelMismatchError, seqkv.StorageError)):
        store_b.longest_prefix(ids)
    # 2) forged to look like B's in the envelope: decoding with model=B checks the container's fingerprint
    store_b.backend.delete(key_b)
    ns_b = hashlib.sha256(store_b.namespace("float32")).hexdigest()
    store_b.backend.put_if_absent(key_b, pack_entry(dict(header, key=key_b, namespace=ns_b), payload))
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
        assert len(quarantined(store.backend)) == 1
        assert store.longest_prefix(ids) == (0, None)
        # a bit flipped inside the container (envelope checksum recomputed): seqkv's own checksums catch it
        header, payload = unpack_entry(store.backend.get(key1), key1)
        bad = bytearray(payload)
        bad[len(bad) - 20] ^= 0x10
        header.update(payload_sha256=hashlib.sha256(bytes(bad)).hexdigest())
        store.backend.delete(key1)
        store.backend.put_if_absent(key1, pack_entry(header, bytes(bad)))
        assert store.put(ids, cache)["chunks_written"] == 1  # chunk 0 rewritten
        with pytest.raises(CorruptEntryError, match="quarantined"):
            store.longest_prefix(ids)
        assert len(quarantined(store.backend)) == 2
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
    ctx = concurrency(where)
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


def test_byte_budget_is_honoured_and_evicts_chain_tails_and_rarely_seen_prefixes_first(where):
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
        # expected reuse: ids was seen twice (put + lookup), ids2 once, so ids2's chunks go first
        n, got = store.longest_prefix(ids)
        assert n == 16
        assert_bit_exact(got, slice_cache(cache, 0, 16))
        assert store.longest_prefix(ids2) == (0, None)


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


# -- near-duplicate reuse, references, eviction by expected reuse, token ids ------------------------------

def _doc_sessions(doc_tokens: int = 48, seed: int = 5, layers: int = 2):
    """Two token sequences holding the same document after different preceding tokens, and their caches."""
    model = tiny_model("llama", layers=layers)
    gen = torch.Generator().manual_seed(seed)
    doc = torch.randint(0, 96, (doc_tokens,), generator=gen).tolist()
    a = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5] + doc
    b = [2, 7, 1, 8] + doc
    with torch.no_grad():
        ca = cache_of(model(torch.tensor([a]), use_cache=True))
        cb = cache_of(model(torch.tensor([b]), use_cache=True))
    return (a, ca), (b, cb)


def _residual_entries(store):
    out = {}
    for key, _, _ in store.backend.list():
        header, _ = unpack_entry(store.backend.get(key), key)
        if header["base"] is not None:
            out[key] = header
    return out


def _put_pair(store, a, ca, b, cb) -> dict:
    """Store a, then b (whose document chunks become residuals against a's); b's residual entries."""
    store.put(a, ca)
    store.put(b, cb)
    return _residual_entries(store)


def test_near_duplicate_chunks_are_residuals_and_round_trip_bit_exact(where):
    (a, ca), (b, cb) = _doc_sessions()
    with where.open(chunking="content") as store:
        assert store.put(a, ca)["chunks_residual"] == 0
        put_b = store.put(b, cb)
        assert put_b["chunks_residual"] >= 2 and put_b["residual_bytes_saved"] > 0
        for ids, cache in ((b, cb), (a, ca)):
            n, got = store.longest_prefix(ids)
            assert n == len(ids)
            assert_bit_exact(got, cache)
        residuals = _residual_entries(store)
        assert len(residuals) == put_b["chunks_residual"]
        for key, header in residuals.items():
            assert store.backend.exists(header["base"])
            assert header["base_ref"] in store.metadata.refs(header["base"])
            assert store.tokens_of(key) == store.tokens_of(header["base"])  # the residual carries no ids of its own


def test_near_duplicate_lossy_is_never_larger_and_as_accurate(where):
    (a, ca), (b, cb) = _doc_sessions()
    url_exact = Where(where.kind, where.url + ("x" if where.kind != "redis" else ""), dict(where.options))
    if where.kind == "redis":
        url_exact.options["key_prefix"] = where.options["key_prefix"] + "x:"
    with where.open(chunking="content", preset="balanced") as near, \
            url_exact.open(chunking="content", preset="balanced", near_duplicates=False) as exact:
        near.put(a, ca)
        exact.put(a, ca)
        nb, eb = near.put(b, cb), exact.put(b, cb)
        assert nb["chunks_residual"] >= 2 and eb["chunks_residual"] == 0
        assert nb["bytes_written"] < eb["bytes_written"]
        _, got_n = near.longest_prefix(b)
        _, got_e = exact.longest_prefix(b)
        for (nk, nv), (ek, ev), (wk, wv) in zip(cache_layers(got_n), cache_layers(got_e), cache_layers(cb)):
            for g, e, w in ((nk, ek, wk), (nv, ev, wv)):
                err_near = float((g - w).pow(2).mean())
                err_plain = float((e - w).pow(2).mean())
                assert err_near <= 1.5 * err_plain + 1e-12  # the same step: the same error, not a worse one


def test_referenced_base_is_never_evicted_and_references_are_released(where):
    (a, ca), (b, cb) = _doc_sessions()
    with where.open(chunking="content") as store:
        residuals = _put_pair(store, a, ca, b, cb)
        bases = {h["base"] for h in residuals.values()}
        assert bases
        for base in bases:
            assert store.evict(base) is False and store.backend.exists(base)
        # b is seen again and again, a only once: a's chunks (the bases among them) have the lowest expected
        # reuse, and the oldest of them is a base; a budget one byte short must evict something else
        for _ in range(3):
            assert store.longest_prefix(b)[0] == len(b)
        total = store.stats()["bytes_stored"]
        assert store.gc(max_bytes=total - 1)["evicted"] >= 1
        left = {k for k, _, _ in store.backend.list()}
        assert bases <= left
        n, got = store.longest_prefix(b)
        assert n == len(b)
        assert_bit_exact(got, cb)
        # gc(0) empties the store: referrers first, then their bases, and every record is released
        store.gc(max_bytes=0)
        assert store.stats()["entries"] == 0
        for base in bases:
            assert store.metadata.refs(base) == []
        assert store.longest_prefix(b) == (0, None)


def test_missing_or_corrupt_base_is_a_clear_error_never_a_wrong_cache(where):
    (a, ca), (b, cb) = _doc_sessions()
    with where.open(chunking="content") as store:
        residuals = _put_pair(store, a, ca, b, cb)
        victim, header = sorted(residuals.items(), key=lambda kv: kv[1]["start"])[0]
        base = header["base"]
        data = store.backend.get(base)
        store.backend.delete(base)  # lost behind the store's back
        with pytest.raises(seqkv.StorageError, match="base"):
            store.longest_prefix(b)
        assert store.backend.get(victim) is None  # the unusable referrer is quarantined
        # a corrupt base: its container is damaged (envelope checksum recomputed so only seqkv's checks see it)
        residuals = _put_pair(store, a, ca, b, cb)
        victim, header = sorted(residuals.items(), key=lambda kv: kv[1]["start"])[0]
        base = header["base"]
        bh, payload = unpack_entry(store.backend.get(base), base)
        bad = bytearray(payload)
        bad[-9] ^= 0x40
        bh.update(payload_sha256=hashlib.sha256(bytes(bad)).hexdigest())
        store.backend.delete(base)
        store.backend.put_if_absent(base, pack_entry(bh, bytes(bad)))
        with pytest.raises(seqkv.StorageError):
            store.longest_prefix(b)
        assert data is not None


def test_forced_content_hash_collision_codes_plainly(where, monkeypatch):
    # every chunk's content digest is the same: the index offers a base with other tokens, which is refused
    monkeypatch.setattr(store_keys, "content_digest", lambda ids, ns: "ab" * 32)
    (a, ca), (b, cb) = _doc_sessions()
    ids_c, cache_c = make_cache(30, seed=11)
    with where.open(chunking="content") as store:
        store.put(a, ca)
        res = store.put(ids_c, cache_c)
        assert res["chunks_residual"] == 0
        n, got = store.longest_prefix(ids_c)
        assert n == 30
        assert_bit_exact(got, cache_c)
        # the real near-duplicate (same tokens) is still found through the one index record it can use
        store.put(b, cb)
        n, got = store.longest_prefix(b)
        assert n == len(b)
        assert_bit_exact(got, cb)


def test_overwritten_entry_of_another_sequence_is_refused(where):
    ids_a, cache_a = make_cache(16, seed=21)
    ids_b, cache_b = make_cache(16, seed=22)
    with where.open() as store:
        store.put(ids_a, cache_a)
        store.put(ids_b, cache_b)
        ka, kb = store.keys_for(ids_a)[1], store.keys_for(ids_b)[1]
        header, payload = unpack_entry(store.backend.get(kb), kb)
        store.backend.delete(ka)  # a concurrent writer's entry for other tokens lands under a's key
        store.backend.put_if_absent(ka, pack_entry(dict(header, key=ka), payload))
        n, got = store.longest_prefix(ids_a)
        assert n == 8
        assert_bit_exact(got, slice_cache(cache_a, 0, 8))


def test_entry_token_ids_are_trie_coded(where):
    from seqkv_ext.trie import TokenTrie

    ids, cache = make_cache(24, seed=7)
    trie = TokenTrie()
    trie.insert(ids[:16])
    with where.open(token_trie=trie, vocab_size=96) as store:
        res = store.put(ids, cache)
        assert res["tokens_coded"] == 24 and res["token_bytes"] > 0
        s = store.stats()
        assert s["token_bits_per_token"] < s["token_bits_per_token_zstd3"]
        for key, (lo, hi) in zip(store.keys_for(ids), store.bounds_for(ids)):
            assert store.tokens_of(key) == ids[lo:hi]
    with where.open() as other:  # no trie: the KV still loads, the ids cannot be read
        assert other.longest_prefix(ids)[0] == 24
        with pytest.raises(seqkv.ConfigError):
            other.tokens_of(other.keys_for(ids)[0])


def _near_writer(where, ids, cache, barrier, out_path):
    torch.set_num_threads(1)
    store = where.open(chunking="content")
    barrier.wait(timeout=60)
    res = store.put(ids, cache)
    store.close()
    with open(out_path, "w") as f:
        json.dump(res, f)


def _evictor(where, barrier, rounds):
    torch.set_num_threads(1)
    store = where.open(chunking="content")
    barrier.wait(timeout=60)
    for _ in range(rounds):
        store.gc(max_bytes=0)
    store.close()


def test_concurrent_residual_writers_and_evictor_lose_no_reference(where, tmp_path):
    (a, ca), _ = _doc_sessions()
    doc = a[11:]
    model = tiny_model("llama")
    jobs = []
    for i in range(3):
        ids = [10 + i, 20 + i, 30 + i] * (i + 1) + doc
        with torch.no_grad():
            jobs.append((ids, cache_of(model(torch.tensor([ids]), use_cache=True))))
    with where.open(chunking="content") as store:
        store.put(a, ca)
    ctx = concurrency(where)
    barrier = ctx.Barrier(len(jobs) + 1)
    procs = [ctx.Process(target=_near_writer, args=(where, ids, cache, barrier, str(tmp_path / f"n{i}.json")))
             for i, (ids, cache) in enumerate(jobs)]
    procs.append(ctx.Process(target=_evictor, args=(where, barrier, 3)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    with where.open(chunking="content") as store:
        present = {k for k, _, _ in store.backend.list()}
        for key, header in _residual_entries(store).items():
            assert header["base"] in present, "a residual lost its base"
            assert header["base_ref"] in store.metadata.refs(header["base"]), "a residual lost its reference"
        for ids, cache in jobs:
            n, got = store.longest_prefix(ids)  # never raises, never a wrong cache
            if n:
                assert_bit_exact(got, slice_cache(cache, 0, n))
        # after the race: every sequence can be stored and read back in full
        for ids, cache in jobs:
            store.put(ids, cache)
            n, got = store.longest_prefix(ids)
            assert n == len(ids)
            assert_bit_exact(got, cache)


def test_store_payload_is_refused_by_plain_decode(where):
    (a, ca), (b, cb) = _doc_sessions()
    with where.open(chunking="content") as store:
        key = next(iter(_put_pair(store, a, ca, b, cb)))
        _, payload = unpack_entry(store.backend.get(key), key)
        with pytest.raises(seqkv.DecodeError):
            seqkv.decode(payload)


def test_boundary_tokens_start_chunks_so_a_whole_message_is_a_near_duplicate(where):
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(8)
    message = [0] + torch.randint(1, 96, (30,), generator=gen).tolist()  # token 0 opens every message
    a = [0, 5, 6, 7, 8, 9] + message
    b = [0, 11, 12, 13] + message
    with torch.no_grad():
        ca, cb = (cache_of(model(torch.tensor([x]), use_cache=True)) for x in (a, b))
    with where.open(chunking="content", boundary_tokens=[0]) as store:
        assert (len(a) - len(message)) in [s for s, _ in store.bounds_for(a)]
        with where.open(chunking="content") as plain:
            assert store.keys_for(a) != plain.keys_for(a)  # part of the namespace
        store.put(a, ca)
        put_b = store.put(b, cb)
        assert put_b["chunks_residual"] == len([1 for s, _ in store.bounds_for(b) if s >= len(b) - len(message)])
        n, got = store.longest_prefix(b)
        assert n == len(b)
        assert_bit_exact(got, cb)
    with pytest.raises(seqkv.ConfigError):
        where.open(boundary_tokens=[0])  # fixed chunks have no boundary tokens


def test_stale_reference_records_are_dropped_young_ones_kept(where):
    (a, ca), (b, cb) = _doc_sessions()
    with where.open(chunking="content") as store:
        residuals = _put_pair(store, a, ca, b, cb)
        base = next(iter(residuals.values()))["base"]
        ghost = "f" * 64  # a writer that took a reference and crashed before writing its entry
        old = f"{ghost}.{(int(ref_nonce()[:11], 16) - 7_200_000):011x}00000"
        young = f"{'e' * 64}.{ref_nonce()}"
        store.metadata.add_ref(base, old)
        store.metadata.add_ref(base, young)
        assert store.drop_stale_refs(older_than=3600) == 1
        refs = store.metadata.refs(base)
        assert old not in refs and young in refs
        assert all(h["base_ref"] in store.metadata.refs(h["base"]) for h in residuals.values())


def test_entry_of_the_previous_envelope_version_is_a_miss_then_rewritten(where):
    ids, cache = make_cache(8, seed=31)
    with where.open() as store:
        (key,) = store.keys_for(ids)
        old = pack_entry({"v": 1, "key": key, "token_ids": ids, "positions": list(range(8))}, b"old container")
        store.backend.put_if_absent(key, old)
        assert store.longest_prefix(ids) == (0, None)
        assert store.put(ids, cache)["chunks_written"] == 1
        n, got = store.longest_prefix(ids)
        assert n == 8
        assert_bit_exact(got, cache)


# -- the calibrated codec (a model profile, one fixed scale) ------------------------------------------------

@pytest.fixture(scope="module")
def profiles():
    from conftest import tiny_profile

    return tiny_profile(), tiny_profile(sensitivity=60.0)


def _open_calibrated(url, profile, scale=0.05, **kw):
    return PrefixStore(url, model=tiny_model("llama"), profile=profile, codec_options={"scale": scale},
                       chunk_tokens=CHUNK, chunking="content", **kw)


def _klt_errors_in_steps(got, want, profile, scale, positions, model=None):
    """max |z - z_hat| / step over every KLT coefficient of every layer and kind (the sinks are exact)."""
    from seqkv.format import Pipeline
    from seqkv.layout import layout_from_model
    from seqkv.presets import calibrated_pipeline_config
    from seqkv.stages.base import CodingState, TensorContext
    from seqkv.stages.quantize_klt import component_steps

    pipeline = Pipeline(calibrated_pipeline_config(profile.sink_tokens))
    layout = layout_from_model(model if model is not None else tiny_model("llama"))
    worst = 0.0
    for i, (gl, wl) in enumerate(zip(cache_layers(got), cache_layers(want))):
        for kind, g, w in (("keys", gl[0], wl[0]), ("values", gl[1], wl[1])):
            ctx = TensorContext(layer=i, kind=kind, positions=positions, layout=layout, state=CodingState(profile=profile))
            steps = component_steps(profile.parts[(i, kind)], scale, w.shape[0], w.shape[2])
            err = (pipeline.transform(g, ctx) - pipeline.transform(w, ctx)).abs() / steps[:, None, :]
            worst = max(worst, float(err.max()))
    return worst


def test_calibrated_store_round_trips_with_klt_residuals_within_half_a_step(tmp_path, profiles, where):
    from seqkv.store.chunk_codec import ParsedChunk

    profile, _ = profiles
    (a, ca), (b, cb) = _doc_sessions()
    with _open_calibrated(where.url, profile, **where.options) as near, \
            _open_calibrated((tmp_path / "exact").as_uri(), profile, near_duplicates=False) as exact:
        near.put(a, ca)
        exact.put(a, ca)
        nb, eb = near.put(b, cb), exact.put(b, cb)
        assert nb["chunks_residual"] >= 2 and eb["chunks_residual"] == 0
        assert nb["residual_bytes_saved"] > 0 and nb["bytes_written"] < eb["bytes_written"]
        residuals = _residual_entries(near)
        assert len(residuals) == nb["chunks_residual"]
        for key in residuals:
            parsed = ParsedChunk(unpack_entry(near.backend.get(key), key)[1])
            assert "r" in parsed.modes
            assert parsed.calibrated == {"profile": profile.ref(), "scale": pytest.approx(0.05)}
        for ids, cache in ((b, cb), (a, ca)):
            for store in (near, exact):
                n, got = store.longest_prefix(ids)
                assert n == len(ids)
                # plain and residual sections alike: every KLT coefficient within half a step (+ float noise)
                assert _klt_errors_in_steps(got, cache, profile, 0.05, torch.arange(len(ids))) <= 0.5 + 1e-3


def test_calibrated_store_keys_and_entries_belong_to_one_profile(tmp_path, profiles):
    from seqkv.profile import ProfileMismatchError
    from seqkv.store.chunk_codec import ParsedChunk

    p1, p2 = profiles
    (a, ca), _ = _doc_sessions()
    url = (tmp_path / "store").as_uri()
    with _open_calibrated(url, p1) as one, _open_calibrated(url, p2) as two, \
            _open_calibrated(url, p1, scale=0.1) as coarser, PrefixStore(url, model=tiny_model("llama"),
                                                                          preset="balanced", chunk_tokens=CHUNK,
                                                                          chunking="content") as preset:
        one.put(a, ca)
        assert one.namespace("float32") != two.namespace("float32")
        assert p1.hash in one.namespace("float32").decode()
        keys = set(one.keys_for(a))
        for other in (two, coarser, preset):
            assert keys.isdisjoint(other.keys_for(a))
            assert other.longest_prefix(a) == (0, None)
        assert one.longest_prefix(a)[0] == len(a)
        key = one.keys_for(a)[0]
        parsed = ParsedChunk(unpack_entry(one.backend.get(key), key)[1])
        with pytest.raises(ProfileMismatchError, match="profile="):
            parsed.decode(None)
        with pytest.raises(ProfileMismatchError):
            parsed.decode(None, p2)
        assert len(parsed.decode(None, p1)) == 2


def test_calibrated_store_options_are_checked(tmp_path, profiles):
    from seqkv.presets import calibrated_pipeline_config

    profile, _ = profiles
    url = (tmp_path / "store").as_uri()
    model = tiny_model("llama")
    with pytest.raises(seqkv.ConfigError, match="scale"):
        PrefixStore(url, model=model, profile=profile)
    with pytest.raises(seqkv.ConfigError, match="scale"):
        PrefixStore(url, model=model, profile=profile, codec_options={"scale": -1.0})
    with pytest.raises(seqkv.ConfigError, match="model"):
        PrefixStore(url, profile=profile, codec_options={"scale": 0.05})
    with pytest.raises(seqkv.ConfigError, match="profile"):
        PrefixStore(url, model=model, pipeline_config=calibrated_pipeline_config(profile.sink_tokens))
    with pytest.raises(seqkv.ModelMismatchError):
        PrefixStore(url, model=tiny_model("llama", layers=3), profile=profile, codec_options={"scale": 0.05})


def test_scale_for_kl_resolves_a_target_once(profiles):
    from seqkv.store import scale_for_kl

    profile, _ = profiles
    (a, ca), _ = _doc_sessions()
    model = tiny_model("llama")
    loose, tight = scale_for_kl(ca, profile, 0.01, model=model), scale_for_kl(ca, profile, 0.001, model=model)
    assert 0 < tight < loose  # a lower KL needs finer steps
    blob = seqkv.encode(ca, profile=profile, model=model, scale=loose)
    assert seqkv.inspect(blob)["rate_control"]["predicted_kl"] == pytest.approx(0.01, rel=0.2)


@pytest.fixture(scope="module")
def three_layers():
    """A 3-layer tiny model and its profile: layer 1's sections are cross-layer predicted from layer 0's."""
    model = tiny_model("llama", layers=3)
    gen = torch.Generator().manual_seed(7)
    return model, seqkv.calibrate(model, [torch.randint(0, 96, (260,), generator=gen) for _ in range(2)],
                                  prompt_len=200, continuation_len=32)


def _layer1_residuals_only(monkeypatch):
    from seqkv.store import chunk_codec

    encode = chunk_codec.encode_klt_residual

    def layer1_only(pipeline, x, base, ctx, bpos):
        if ctx.layer != 1:
            raise ValueError("residuals for layer 1 only")
        return encode(pipeline, x, base, ctx, bpos)

    monkeypatch.setattr(chunk_codec, "encode_klt_residual", layer1_only)


def test_calibrated_residual_leaves_the_encoder_predicting_from_what_the_decoder_holds(three_layers, monkeypatch):
    from seqkv.layout import layout_from_model
    from seqkv.presets import calibrated_pipeline_config
    from seqkv.store import chunk_codec

    model, profile = three_layers
    (a, ca), (b, cb) = _doc_sessions(layers=3)  # the document starts at 11 in a, at 4 in b
    cfg = dict(calibrated_pipeline_config(profile.sink_tokens), sink_tokens=0)
    layout = layout_from_model(model)
    chunk_a = [(k[:, 11:27], v[:, 11:27]) for k, v in cache_layers(ca)]
    chunk_b = [(k[:, 4:20], v[:, 4:20]) for k, v in cache_layers(cb)]
    pos_a, pos_b = torch.arange(11, 27), torch.arange(4, 20)
    base_payload, _ = chunk_codec.encode_chunk(chunk_a, pos_a, cfg, layout, "float32", token_section=b"",
                                               token_code="zstd", profile=profile, scale=0.05)
    base_layers = chunk_codec.ParsedChunk(base_payload).decode(None, profile)
    _layer1_residuals_only(monkeypatch)
    states = []
    make_state = chunk_codec.coding_state_for
    monkeypatch.setattr(chunk_codec, "coding_state_for", lambda *args: states.append(make_state(*args)) or states[-1])
    payload, _ = chunk_codec.encode_chunk(chunk_b, pos_b, cfg, layout, "float32", token_section=None, token_code="base",
                                          base=("0" * 64, base_layers, pos_a), profile=profile, scale=0.05)
    parsed = chunk_codec.ParsedChunk(payload)
    assert parsed.modes[:2] == "pp" and parsed.modes[2:4] != "pp" and parsed.modes[4:] == "pp"
    parsed.decode((base_layers, pos_a), profile)
    encoder, decoder = states[-1].chain, parsed.reader.state.chain
    for kind in ("keys", "values"):  # the last layer's reconstruction, predicted from layer 1's
        assert encoder[kind][0] == decoder[kind][0] == 2
        assert torch.allclose(encoder[kind][1], decoder[kind][1], atol=1e-6)


def test_calibrated_store_with_mixed_section_modes_round_trips_within_half_a_step(tmp_path, three_layers, monkeypatch):
    from seqkv.store import chunk_codec

    model, profile = three_layers
    (a, ca), (b, cb) = _doc_sessions(layers=3)
    _layer1_residuals_only(monkeypatch)
    with PrefixStore((tmp_path / "store").as_uri(), model=model, profile=profile, codec_options={"scale": 0.05},
                     chunk_tokens=CHUNK, chunking="content") as store:
        store.put(a, ca)
        assert store.put(b, cb)["chunks_residual"] >= 2
        modes = {chunk_codec.ParsedChunk(unpack_entry(store.backend.get(k), k)[1]).modes for k in _residual_entries(store)}
        assert modes and all(m[:2] == "pp" and m[2:4] != "pp" and m[4:] == "pp" for m in modes)
        n, got = store.longest_prefix(b)
        assert n == len(b)
        assert _klt_errors_in_steps(got, cb, profile, 0.05, torch.arange(len(b)), model=model) <= 0.5 + 1e-3


def test_calibrated_chunks_survive_section_and_header_mutations(tmp_path, profiles):
    """Corrupted calibrated chunk payloads (plain and residual sections, resealed so that the checksums
    pass) decode or raise a SeqKVError: never a crash, a hang or an unrelated exception."""
    import random

    from test_fuzz import reseal, split

    from seqkv.errors import SeqKVError
    from seqkv.store.chunk_codec import ParsedChunk

    profile, _ = profiles
    (a, ca), (b, cb) = _doc_sessions()
    with _open_calibrated((tmp_path / "s").as_uri(), profile) as store:
        store.put(a, ca)
        store.put(b, cb)
        payloads = {key: unpack_entry(store.backend.get(key), key)[1] for key, _, _ in store.backend.list()}
    residual = {k: p for k, p in payloads.items() if ParsedChunk(p).base is not None}
    assert residual
    rng = random.Random(11)
    tried = refused = 0
    for key, payload in residual.items():
        base = ParsedChunk(payloads[ParsedChunk(payload).base])
        base_arg = (base.decode(None, profile), base.positions)
        header, sections = split(payload)
        for _ in range(60):
            mutated = [bytearray(s) for s in sections]
            h = json.loads(json.dumps(header))
            i = rng.randrange(len(mutated))
            op = rng.choice(["flip", "truncate", "extend", "header"])
            if op == "flip" and mutated[i]:
                j = rng.randrange(len(mutated[i]))
                mutated[i][j] ^= 1 << rng.randrange(8)
            elif op == "truncate":
                del mutated[i][rng.randrange(len(mutated[i]) + 1):]
            elif op == "extend":
                mutated[i] += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32)))
            else:
                field = rng.choice(["modes", "tokens", "positions", "calibrated", "base", "chunk_pipeline", "dtype"])
                h[field] = rng.choice([None, 0, -1, 3, "rrpp", {"start": 5}, [1], 2**40])
            try:
                ParsedChunk(reseal(h, [bytes(m) for m in mutated])).decode(base_arg, profile)
            except SeqKVError:
                refused += 1
            tried += 1
    assert tried >= 60 and refused >= tried // 4  # the mutations do reach the decoder's checks


def test_a_chunk_whose_residuals_never_pay_is_not_written_against_its_base():
    """Coded against a base that shares none of its values, every section is smaller plain; with the token ids
    left to the base there is no valid container to write (found by tests/test_store_refs_machine.py: the
    store then failed with 'store chunk token coding is invalid' instead of coding the chunk plainly)."""
    from seqkv.layout import layout_from_model
    from seqkv.presets import pipeline_config
    from seqkv.store import chunk_codec

    model, cache = tiny_cache("llama", tokens=16, seed=3)
    _, other = tiny_cache("llama", tokens=16, seed=4)
    chunk = [(k[0] if k.dim() == 4 else k, v[0] if v.dim() == 4 else v) for k, v in cache_layers(cache)]
    base = [(k[0] if k.dim() == 4 else k, v[0] if v.dim() == 4 else v) for k, v in cache_layers(other)]
    base = [(k * 1e3 + 7.0, v * -1e3 + 3.0) for k, v in base]   # nothing in common: residuals cost more
    payload, info = chunk_codec.encode_chunk(chunk, torch.arange(16), pipeline_config("lossless"),
                                             layout_from_model(model), "float32", token_section=None,
                                             token_code="base", base=("0" * 64, base, torch.arange(16)))
    assert payload is None and info["residual_sections"] == 0
