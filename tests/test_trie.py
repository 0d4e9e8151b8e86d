"""Tests of seqkv_ext.trie.TokenTrie against a pure-Python model (a dict: prefix tuple -> count)."""
from __future__ import annotations

import os
import random
import struct
import zlib
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

trie_mod = pytest.importorskip("seqkv_ext.trie")
TokenTrie = trie_mod.TokenTrie

# SEQKV_EXT_EXAMPLES=5000 for a long soak; the default keeps this file at a few seconds
EXAMPLES = int(os.environ.get("SEQKV_EXT_EXAMPLES", "100"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
BIG = 2**31 - 1  # the largest token id
# a small alphabet so that prefixes collide, plus the largest id
TOKENS = st.sampled_from([0, 1, 2, 3, BIG])
SEQS = st.lists(TOKENS, max_size=7)
KINDS = ("list", "tuple", "int32", "int64", "uint32", "uint64")


def as_kind(seq, kind):
    if kind == "list":
        return list(seq)
    if kind == "tuple":
        return tuple(seq)
    return np.array(seq, dtype=kind)


# --------------------------------------------------------------------------- reference model


class Model:
    """prefix tuple -> count; () is the root."""

    def __init__(self):
        self.counts: dict[tuple, int] = {(): 0}
        self.total_tokens = 0

    def insert(self, seq, count):
        new = 0
        self.counts[()] += count
        for i in range(1, len(seq) + 1):
            p = tuple(seq[:i])
            if p not in self.counts:
                self.counts[p] = 0
                new += 1
            self.counts[p] += count
        self.total_tokens += len(seq) * count
        return new

    def longest_prefix(self, seq):
        m = 0
        while m < len(seq) and tuple(seq[: m + 1]) in self.counts:
            m += 1
        return m

    def count(self, seq):
        return self.counts.get(tuple(seq), 0)

    def children(self, seq):
        p = tuple(seq)
        return sorted((k[-1], c) for k, c in self.counts.items() if len(k) == len(p) + 1 and k[:-1] == p)

    def probs(self, prefix, vocab, escape="C"):
        """The documented formula, in exact rational arithmetic."""
        u = tuple(prefix[: self.longest_prefix(prefix)])
        kids = [(t, c) for t, c in self.children(u) if t < vocab]
        root = {t: c for t, c in self.children(()) if t < vocab}
        R = sum(root.values())
        C, n = sum(c for _, c in kids), len(kids)
        if n == 0:
            e, seen = Fraction(1), {}
        elif escape == "A":
            e, seen = Fraction(1, C + 1), {t: Fraction(c, C + 1) for t, c in kids}
        elif escape == "C":
            e, seen = Fraction(n, C + n), {t: Fraction(c, C + n) for t, c in kids}
        else:
            e, seen = Fraction(n, 2 * C), {t: Fraction(2 * c - 1, 2 * C) for t, c in kids}
        return [seen.get(t, 0) + e * Fraction(root.get(t, 0) + 1, R + vocab) for t in range(vocab)]

    def terminal_counts(self):
        """(sequence, count) pairs whose insertion (in any order) rebuilds exactly this model."""
        out = []
        for p, c in self.counts.items():
            rest = c - sum(cc for _, cc in self.children(p))
            if rest:
                out.append((p, rest))
        return out


def assert_matches(trie, model, extra_queries=()):
    assert len(trie) == len(model.counts) - 1
    assert trie.total_tokens == model.total_tokens
    assert trie.count([]) == model.counts[()]
    for p in list(model.counts) + list(extra_queries):
        assert trie.count(p) == model.count(p)
        assert trie.children(p) == model.children(p)
        assert trie.longest_prefix(p) == model.longest_prefix(p)
        assert trie.longest_prefix(list(p) + [4]) == model.longest_prefix(list(p) + [4])


def build(seqs_counts):
    trie, model = TokenTrie(), Model()
    for seq, c in seqs_counts:
        assert trie.insert(seq, c) == model.insert(seq, c)
    return trie, model


def reseal(blob: bytes | bytearray) -> bytes:
    body = bytes(blob[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


# --------------------------------------------------------------------------- state machine


class TrieMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.trie = TokenTrie()
        self.model = Model()

    @rule(seq=SEQS, count=st.integers(1, 3), kind=st.sampled_from(KINDS))
    def insert(self, seq, count, kind):
        assert self.trie.insert(as_kind(seq, kind), count) == self.model.insert(seq, count)

    @rule(q=SEQS, kind=st.sampled_from(KINDS))
    def longest_prefix(self, q, kind):
        assert self.trie.longest_prefix(as_kind(q, kind)) == self.model.longest_prefix(q)

    @rule(q=SEQS)
    def count(self, q):
        assert self.trie.count(q) == self.model.count(q)

    @rule(q=SEQS)
    def children(self, q):
        assert self.trie.children(q) == self.model.children(q)

    @precondition(lambda self: len(self.model.counts) > 1)
    @rule(data=st.data())
    def existing_prefix(self, data):
        p = data.draw(st.sampled_from(sorted(self.model.counts)))
        assert self.trie.count(p) == self.model.count(p) > 0
        assert self.trie.children(p) == self.model.children(p)
        assert self.trie.longest_prefix(p) == len(p)

    @rule()
    def round_trip(self):
        blob = self.trie.tobytes()
        again = TokenTrie.frombytes(blob)
        assert_matches(again, self.model)
        assert again.tobytes() == blob
        self.trie = again  # later inserts go into the loaded trie (rebuilt hash table)

    @rule(seed=st.integers(0, 2**16))
    def canonical_bytes(self, seed):
        parts = self.model.terminal_counts()
        random.Random(seed).shuffle(parts)
        other, _ = build(parts)
        assert other.tobytes() == self.trie.tobytes()

    @invariant()
    def sizes(self):
        assert len(self.trie) == len(self.model.counts) - 1
        assert self.trie.total_tokens == self.model.total_tokens
        assert self.trie.count(()) == self.model.counts[()]
        assert self.trie.nbytes > 0


TrieMachine.TestCase.settings = settings(
    max_examples=max(EXAMPLES // 2, 10), stateful_step_count=30, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestTrieMachine = TrieMachine.TestCase


# --------------------------------------------------------------------------- unit tests


def test_small_example():
    trie = TokenTrie()
    assert len(trie) == 0 and trie.total_tokens == 0 and trie.count([]) == 0
    assert trie.insert([1, 2, 3]) == 3
    assert trie.insert(np.array([1, 2, 4]), count=2) == 1
    assert trie.insert([]) == 0
    assert trie.insert(np.array([5], dtype=np.uint8)) == 1
    assert len(trie) == 5 and trie.total_tokens == 3 + 6 + 1
    assert trie.count([]) == 5 and trie.count([1]) == 3 and trie.count([1, 2, 4]) == 2
    assert trie.count([1, 2, 4, 0]) == 0 and trie.count([7]) == 0
    assert trie.children([]) == [(1, 3), (5, 1)]
    assert trie.children([1, 2]) == [(3, 1), (4, 2)]
    assert trie.children([9]) == []
    assert trie.longest_prefix([1, 2, 9, 3]) == 2 and trie.longest_prefix([]) == 0
    assert "nodes=5" in repr(trie)


def test_big_ids_and_long_sequence():
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 2**31, size=50_000, dtype=np.int64)
    trie = TokenTrie()
    assert trie.insert(seq) == 50_000
    assert trie.insert(seq[:1000], 3) == 0
    assert trie.longest_prefix(seq) == 50_000 and trie.count(seq[:1000]) == 4 and trie.count(seq) == 1
    again = TokenTrie.frombytes(trie.tobytes())
    assert again.longest_prefix(seq) == 50_000 and again.count(seq[:999]) == 4
    assert again.total_tokens == trie.total_tokens == 53_000
    # flat arrays: 24 bytes per node + the hash table (+ growth slack)
    assert trie.nbytes / len(trie) < 64


def test_wide_fanout():
    trie = TokenTrie()
    for t in range(20_000):
        trie.insert([t * 7919 % 50_000, 1])
    assert len(trie) == 40_000 and len(trie.children([])) == 20_000
    assert [t for t, _ in trie.children([])] == sorted({t * 7919 % 50_000 for t in range(20_000)})
    assert all(trie.longest_prefix([t * 7919 % 50_000, 1]) == 2 for t in range(0, 20_000, 97))
    again = TokenTrie.frombytes(trie.tobytes())
    assert again.tobytes() == trie.tobytes()
    # the loaded trie's hash table takes more wide fan-out
    for t in range(50_000, 60_000):
        assert again.insert([t, 2]) == 2
    assert len(again.children([])) == 30_000 and again.longest_prefix([59_999, 2]) == 2
    assert again.longest_prefix([7919, 1]) == 2 and again.longest_prefix([7919, 2]) == 1


@pytest.mark.parametrize(
    "bad",
    [[-1], [2**31], [[1, 2]], [1.0, 2.0], ["a"], [2**70], np.array([-3], dtype=np.int8), 5, "abc"],
)
def test_bad_token_ids(bad):
    trie = TokenTrie()
    trie.insert([1, 2])
    before = trie.tobytes()
    for call in (trie.insert, trie.longest_prefix, trie.count, trie.children):
        with pytest.raises(ValueError):
            call(bad)
    with pytest.raises(ValueError):
        trie.next_token_probs(bad, 10)
    assert trie.tobytes() == before


def test_id_input_kinds():
    trie = TokenTrie()
    trie.insert([5, 6, 7, 8])
    base = np.array([5, 6, 7, 8])
    inputs = [
        base.astype(">i4"),  # byte-swapped
        np.array([5, 0, 6, 0, 7, 0, 8], dtype=np.int32)[::2],  # strided
        np.frombuffer(b"\0" + base.astype("<i4").tobytes(), dtype="<i4", offset=1),  # unaligned
        base.astype(np.int8), base.astype(np.uint16), base.astype(np.uint64), base.astype(">i8"),
        [np.int64(5), 6, np.uint8(7), 8],  # numpy scalars in a list
        range(5, 9),
        memoryview(base.astype(np.int32)),
    ]
    for ids in inputs:
        assert trie.longest_prefix(ids) == 4 and trie.count(ids) == 1, ids
    for bad in (np.array([2**63], dtype=np.uint64), np.array([-1], dtype=">i4"), [True, False],
                np.array([5, 6], dtype=np.float32), [5, 2**64]):
        with pytest.raises(ValueError):
            trie.longest_prefix(bad)


def test_empty_inputs_of_any_dtype():
    trie = TokenTrie()
    assert trie.insert(np.zeros(0, dtype=np.float64)) == 0 and trie.count([]) == 1
    assert trie.longest_prefix([]) == 0 and trie.children(np.zeros(0)) == []


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", None])
def test_bad_count(bad):
    trie = TokenTrie()
    with pytest.raises(ValueError):
        trie.insert([1], bad)
    assert len(trie) == 0 and trie.count([]) == 0


def test_count_overflow_is_refused_and_atomic():
    trie = TokenTrie()
    assert trie.insert([1, 2], 2**63 - 2) == 2
    before = trie.tobytes()
    with pytest.raises(ValueError, match="overflow"):
        trie.insert([3, 4, 5], 2)
    assert trie.tobytes() == before
    assert trie.insert([3], 1) == 1 and trie.count([]) == 2**63 - 1
    again = TokenTrie.frombytes(trie.tobytes())
    assert again.count([]) == 2**63 - 1 and again.total_tokens == 2 * (2**63 - 2) + 1


def test_no_pickle_support():
    with pytest.raises(TypeError):
        TokenTrie().__reduce_ex__(2)


# --------------------------------------------------------------------------- next_token_probs


def test_probs_hand_example():
    trie = TokenTrie()
    trie.insert([1, 2, 3])
    trie.insert([1, 2, 4], 2)
    trie.insert([5])
    # node [1, 2]: children 3 (1), 4 (2): C = 3, n = 2; root children 1 (3), 5 (1): R = 4; V = 8
    # method C: P(t) = c_t / 5 + (2/5) * (r_t + 1) / 12
    p = trie.next_token_probs([1, 2], 8)
    e = 2 / 5
    expected = [e * (r + 1) / 12 for r in [0, 3, 0, 0, 0, 1, 0, 0]]
    expected[3] += 1 / 5
    expected[4] += 2 / 5
    assert p.dtype == np.float64 and p.shape == (8,)
    np.testing.assert_allclose(p, expected, rtol=1e-12, atol=0)
    # the walk stops at the deepest match: [1, 2, 9] uses node [1, 2]
    np.testing.assert_array_equal(trie.next_token_probs([1, 2, 9, 9], 8), p)
    # a leaf (no children): P = B
    np.testing.assert_allclose(trie.next_token_probs([1, 2, 3], 8),
                               [(r + 1) / 12 for r in [0, 3, 0, 0, 0, 1, 0, 0]], rtol=1e-12)
    # method A and D at [1, 2]
    pa = trie.next_token_probs([1, 2], 8, escape="A")
    np.testing.assert_allclose(pa[[0, 3, 4]], [1 / 4 / 12, 1 / 4 + 1 / 4 / 12, 2 / 4 + 1 / 4 / 12], rtol=1e-12)
    pd = trie.next_token_probs([1, 2], 8, escape="D")
    np.testing.assert_allclose(pd[[0, 3, 4]], [1 / 3 / 12, 0.5 / 3 + 1 / 3 / 12, 1.5 / 3 + 1 / 3 / 12], rtol=1e-12)
    # children >= vocab_size are ignored: V = 4 drops root child 5 and child 4 of [1, 2]
    np.testing.assert_allclose(trie.next_token_probs([1, 2], 4),
                               [0.5 * 1 / 7, 0.5 * 4 / 7, 0.5 * 1 / 7, 0.5 + 0.5 * 1 / 7], rtol=1e-12)


def test_probs_empty_trie_is_uniform():
    np.testing.assert_allclose(TokenTrie().next_token_probs([3], 5), np.full(5, 0.2), rtol=1e-15)


@pytest.mark.parametrize("kw", [{"vocab_size": 0}, {"vocab_size": 2**31 + 1}, {"vocab_size": 2.0},
                                {"vocab_size": 4, "escape": "B"}, {"vocab_size": 4, "escape": None}])
def test_probs_bad_arguments(kw):
    with pytest.raises(ValueError):
        TokenTrie().next_token_probs([], **kw)


@SETTINGS
@given(st.lists(st.tuples(SEQS, st.integers(1, 5)), max_size=12), SEQS,
       st.integers(1, 12), st.sampled_from("ACD"))
def test_probs_match_the_formula(parts, prefix, vocab, escape):
    parts = [([t if t != BIG else 9 for t in s], c) for s, c in parts]  # keep ids near the vocab
    prefix = [t if t != BIG else 9 for t in prefix]
    trie, model = build(parts)
    p = trie.next_token_probs(prefix, vocab, escape=escape)
    assert p.shape == (vocab,) and (p > 0).all()
    assert abs(p.sum() - 1.0) < 1e-9
    np.testing.assert_allclose(p, [float(x) for x in model.probs(prefix, vocab, escape)], rtol=1e-12, atol=0)


def test_probs_huge_counts_stay_positive():
    trie = TokenTrie()
    trie.insert([0, 1], 2**62)
    trie.insert([0, 2], 2**62 - 5)
    p = trie.next_token_probs([0], 50_000)
    assert (p > 0).all() and abs(p.sum() - 1) < 1e-9


# --------------------------------------------------------------------------- format


def sample_blob():
    trie, _ = build([([1, 2, 3], 1), ([1, 2, 4], 2), ([5], 1), ([], 1)])
    return trie.tobytes()


def test_format_layout():
    blob = sample_blob()
    magic, version, flags, n = struct.unpack_from("<8sHHQ", blob)
    assert (magic, version, flags, n) == (b"SKVTRIE\0", 1, 0, 6)
    assert len(blob) == 24 + 16 * n
    records = [struct.unpack_from("<IIQ", blob, 20 + 16 * i) for i in range(n)]
    # root, then breadth-first with siblings by token
    assert records == [(0xFFFFFFFF, 0xFFFFFFFF, 5), (0, 1, 3), (0, 5, 1), (1, 2, 3), (3, 3, 1), (3, 4, 2)]
    assert struct.unpack_from("<I", blob, len(blob) - 4)[0] == zlib.crc32(blob[:-4])


def test_frombytes_accepts_bytes_likes():
    blob = sample_blob()
    for data in (bytearray(blob), memoryview(blob), np.frombuffer(blob, dtype=np.uint8),
                 np.frombuffer(blob, dtype=np.uint8).copy()[::-1][::-1]):
        assert TokenTrie.frombytes(data).tobytes() == blob


def test_unknown_version():
    blob = bytearray(sample_blob())
    blob[8:10] = struct.pack("<H", 2)
    with pytest.raises(ValueError, match="version"):
        TokenTrie.frombytes(reseal(blob))
    with pytest.raises(ValueError, match="version"):
        TokenTrie.frombytes(bytes(blob))  # the version is checked before the checksum


def _records(*recs, root=5):
    body = struct.pack("<8sHHQ", b"SKVTRIE\0", 1, 0, len(recs) + 1)
    body += struct.pack("<IIQ", 0xFFFFFFFF, 0xFFFFFFFF, root)
    for r in recs:
        body += struct.pack("<IIQ", *r)
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "too short"),
        (b"SKVTRIE\0\x01\x00\x00", "too short"),
        (b"XKVTRIE\0" + bytes(16), "magic"),
        (reseal(sample_blob()[:10] + b"\x01\x00" + sample_blob()[12:]), "flag"),
        (_records()[:-1], "bytes"),
        (_records() + b"\0", "bytes"),
        (reseal(struct.pack("<8sHHQ", b"SKVTRIE\0", 1, 0, 0) + bytes(4)), "node count"),
        (reseal(struct.pack("<8sHHQ", b"SKVTRIE\0", 1, 0, 2**64 - 1) + bytes(4)), "node count"),
        (reseal(struct.pack("<8sHHQ", b"SKVTRIE\0", 1, 0, 1000) + bytes(20)), "bytes"),
        (sample_blob()[:-1] + bytes([sample_blob()[-1] ^ 1]), "checksum"),
        (reseal(b"SKVTRIE\0\x01\x00\x00\x00\x01" + bytes(7) + struct.pack("<IIQ", 0, 0xFFFFFFFF, 0) + bytes(4)),
         "root"),
        (_records(root=2**63), "root count"),
        (_records((1, 1, 1)), "parent"),
        (_records((0, 1, 1), (2, 1, 1)), "parent"),
        (_records((0, 2**31, 1)), "token"),
        (_records((0, 2, 1), (0, 1, 1)), "order"),
        (_records((0, 1, 1), (0, 1, 1)), "order"),
        (_records((0, 1, 1), (1, 1, 1), (0, 2, 1)), "order"),  # not breadth-first
        (_records((0, 1, 0)), "count"),
        (_records((0, 1, 2**63), root=2**63 - 1), "count"),
        (_records((0, 1, 3), (0, 2, 3)), "exceed"),
        (_records((0, 1, 2), (1, 1, 3)), "exceed"),
    ],
)
def test_frombytes_rejects(data, match):
    with pytest.raises(ValueError, match=match):
        TokenTrie.frombytes(data)


def test_frombytes_bad_type():
    for bad in ("SKVTRIE", 12, None, [1, 2]):
        with pytest.raises(ValueError):
            TokenTrie.frombytes(bad)


@st.composite
def blobs(draw):
    parts = draw(st.lists(st.tuples(SEQS, st.integers(1, 4)), min_size=1, max_size=8))
    return build(parts)[0].tobytes()


@SETTINGS
@given(blobs(), st.data())
def test_frombytes_truncated(blob, data):
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(ValueError):
        TokenTrie.frombytes(blob[:cut])


@SETTINGS
@given(blobs(), st.data())
def test_frombytes_bit_flip(blob, data):
    bit = data.draw(st.integers(0, 8 * len(blob) - 1))
    bad = bytearray(blob)
    bad[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ValueError):
        TokenTrie.frombytes(bytes(bad))


def _accepted_is_canonical(data: bytes):
    """frombytes either raises ValueError or returns a trie whose bytes are exactly data."""
    try:
        trie = TokenTrie.frombytes(data)
    except ValueError:
        return False
    assert trie.tobytes() == data
    assert len(trie) == (len(data) - 24) // 16 - 1
    for tok, c in trie.children([]):
        assert 0 < c <= trie.count([]) and trie.count([tok]) == c
    return True


@SETTINGS
@given(blobs(), st.data())
def test_frombytes_resealed_mutations(blob, data):
    """Mutated records with a valid checksum exercise the structural checks."""
    bad = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(20, len(bad) - 5))
        bad[pos] = data.draw(st.integers(0, 255))
    _accepted_is_canonical(reseal(bad))


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3), st.integers(0, 4)), max_size=8),
       st.integers(0, 12))
def test_frombytes_random_records(recs, root):
    _accepted_is_canonical(_records(*recs, root=root))


@SETTINGS
@given(st.binary(max_size=200), st.booleans())
def test_frombytes_random_data(data, with_header):
    if with_header:
        n = max(1, (len(data) - 4) // 16)
        data = reseal(struct.pack("<8sHHQ", b"SKVTRIE\0", 1, 0, n) + data)
    _accepted_is_canonical(data)
