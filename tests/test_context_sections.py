"""The compiled context_ans section decoder (seqkv_ext.context_sections) against its reference, the Python
reader (seqkv.stages.context_ans.decode_section): the same symbols and end position for every section the
encoder writes, and the same verdict (the same symbols, or a refusal) for damaged and hand-made ones."""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqkv.ans_coding import TABLE_BITS, encode_symbols, table_from_counts, write_table
from seqkv.bitpacking import pack_low_bits
from seqkv.errors import FormatError
from seqkv.format.reader import DECODE_FAILURES
from seqkv.stages import context_ans
from seqkv.stages.context_ans import MAX_CLASSES, ContextANS
from seqkv.wire import Reader, write_uvarint, zigzag

context_sections = pytest.importorskip("seqkv_ext.context_sections")

SETTINGS = settings(max_examples=int(os.environ.get("SEQKV_EXT_EXAMPLES", "100")), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def verdicts(data: bytes, channels: int, tokens: int):
    """(reference, compiled): each ``(symbols [channels, tokens], end position)``, or None when refused."""
    reader = Reader(data, what="section")
    try:
        ref = context_ans.decode_section(reader, channels, tokens), reader.pos
    except (FormatError, *DECODE_FAILURES):  # what the container reader reports as a FormatError
        ref = None
    try:
        got = context_sections.decode_section(data, 0, len(data), channels, tokens, MAX_CLASSES)
    except context_sections.StreamError:
        got = None
    return ref, got


def assert_same_verdict(data: bytes, channels: int, tokens: int):
    """Both refuse, or both decode to the same symbols and stop at the same byte; returns the symbols (or None)."""
    ref, got = verdicts(data, channels, tokens)
    assert (ref is None) == (got is None), (ref, got)
    if ref is None:
        return None
    assert got[0].dtype == np.int32 and got[0].shape == (channels, tokens)
    assert np.array_equal(ref[0], got[0]) and ref[1] == got[1]
    return got[0]


def random_q(seed: int, shape, spread: float) -> np.ndarray:
    """int32 [H, T, D]: Laplace channels of varied spread (up to alphabets that need low bits) and offsets."""
    rng = np.random.default_rng(seed)
    q = (rng.laplace(0, 1, shape) * spread * rng.random((shape[0], 1, shape[2]))).astype(np.int64)
    q += rng.integers(-100, 100, (shape[0], 1, shape[2]))
    return np.clip(q, -(2**30), 2**30).astype(np.int32)


def columns_of(q: np.ndarray) -> np.ndarray:
    heads, tokens, dim = q.shape
    return q.transpose(0, 2, 1).reshape(heads * dim, tokens)


SHAPES = st.tuples(st.integers(1, 3), st.sampled_from([0, 1, 7, 64, 130, 256]), st.integers(1, 12))
SPREADS = st.sampled_from([0.0, 0.3, 1, 10, 1000, 2**14, 2**20, 2**29])


@SETTINGS
@given(SHAPES, st.integers(0, 2**31 - 1), SPREADS, st.integers(1, 8))
def test_compiled_decoder_equals_reference_on_encoded_sections(shape, seed, spread, classes_per_octave):
    q = random_q(seed, shape, spread)
    data = ContextANS(classes_per_octave=classes_per_octave).encode(q) + b"next"  # more bytes may follow
    got = assert_same_verdict(data, shape[0] * shape[2], shape[1])
    assert got is not None and np.array_equal(got, columns_of(q))
    assert context_sections.decode_section(data, 0, len(data), shape[0] * shape[2], shape[1])[1] == len(data) - 4


@pytest.mark.parametrize("spread", [0.5, 3.0, 40.0, 900.0, "flat"])
def test_many_classes_and_long_streams(spread):
    """Every path of the compiled decoder: streams paired on the coarse lookup (an odd one alone), low bits,
    and ("flat": one class of 49152 symbols over 3000 values) a stream long and flat enough for the full slot
    table; and ContextANS.decode gives q back either way."""
    rng = np.random.default_rng(7)
    heads, tokens, dim = 3, 256, 64
    if spread == "flat":
        q = rng.integers(0, 3000, (heads, tokens, dim)).astype(np.int32)
    else:
        q = np.round(rng.standard_normal((heads, tokens, dim)) * rng.uniform(0.1, 2, (heads, 1, dim)) * spread)
        q = (q + rng.integers(-9, 9, (heads, 1, dim))).astype(np.int32)
    data = ContextANS(classes_per_octave=6).encode(q)
    assert np.array_equal(assert_same_verdict(data, heads * dim, tokens), columns_of(q))
    coder = ContextANS(classes_per_octave=6)
    compiled = coder.decode(Reader(data), (heads, tokens, dim))
    saved, context_ans._ext_sections = context_ans._ext_sections, None
    try:
        fallback = coder.decode(Reader(data), (heads, tokens, dim))
    finally:
        context_ans._ext_sections = saved
    assert np.array_equal(compiled, q) and np.array_equal(fallback, q)


MUTATIONS = st.sampled_from(["flip", "set", "truncate", "insert", "delete", "tokens", "channels"])


@SETTINGS
@given(SHAPES, st.integers(0, 2**31 - 1), SPREADS, MUTATIONS, st.integers(0, 2**31 - 1), st.integers(0, 255))
def test_damaged_sections_get_the_same_verdict(shape, seed, spread, mutation, where, value):
    """Whatever the damage, the compiled decoder refuses what the reference refuses (with a StreamError, never
    another exception) and decodes the rest to the same symbols."""
    q = random_q(seed, shape, spread)
    data = bytearray(ContextANS().encode(q))
    channels, tokens = shape[0] * shape[2], shape[1]
    i = where % max(len(data), 1)
    if mutation == "flip" and data:
        data[i] ^= 1 << (value % 8)
    elif mutation == "set" and data:
        data[i] = value
    elif mutation == "truncate":
        data = data[:i]
    elif mutation == "insert":
        data[i:i] = bytes([value])
    elif mutation == "delete" and data:
        del data[i]
    elif mutation == "tokens":  # a token count that does not match the section
        tokens = max(0, tokens + (1 if value % 2 else -1))
    elif mutation == "channels":
        channels = max(0, channels + (1 if value % 2 else -1))
    assert_same_verdict(bytes(data), channels, tokens)


def hand_section(offsets, classes, streams) -> bytes:
    """A coder part from its pieces; ``streams``: per used class (in order) ``(shift, table, words, low)``."""
    out = bytearray()
    for off in offsets:
        write_uvarint(out, zigzag(off))
    out += bytes(classes)
    for shift, table, words, low in streams:
        out.append(shift)
        write_table(out, table)
        write_uvarint(out, len(words))
        out += np.asarray(words, dtype="<u4").tobytes()
        out += low
    return bytes(out)


@SETTINGS
@given(st.lists(st.integers(0, 40), min_size=2, max_size=9), st.integers(0, 8), st.integers(0, 8), st.integers(1, 3),
       st.integers(-5, 5))
def test_table_must_be_the_histogram_of_its_symbols(counts, give, take, amount, lo):
    """Tables that sum right but are not the §7.3 quantisation of the decoded histogram (a unit moved between
    two symbols, ties included) are refused by both; the true table is accepted by both."""
    counts[0] = counts[0] or 1
    counts[-1] = counts[-1] or (0 if len(counts) == 2 else 1)
    symbols = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(sum(counts)).shuffle(symbols)
    table = table_from_counts(lo, np.array(counts))
    freqs = table.freqs.astype(np.int64)
    give, take = give % len(counts), take % len(counts)
    if freqs[take] > amount:
        freqs[give] += amount
        freqs[take] -= amount
    changed = not np.array_equal(freqs, table.freqs)
    table = type(table)(lo, freqs.astype(np.uint32))
    words = encode_symbols(symbols + lo, table)
    data = hand_section([0], [0], [(0, table, words, b"")])
    got = assert_same_verdict(data, 1, len(symbols))
    assert (got is None) == changed
    if got is not None:
        assert np.array_equal(got[0], symbols + lo)


def test_ties_go_to_the_lower_index():
    """[1, 1, 1]: one unit short, three equal fractional parts: the first symbol gets it, no other may."""
    symbols = np.array([0, 1, 2])
    table = table_from_counts(0, np.array([1, 1, 1]))
    assert table.freqs.tolist() == [21846, 21845, 21845]
    for k in range(3):
        freqs = np.full(3, table.freqs.min(), np.uint32)
        freqs[k] += 1
        t = type(table)(0, freqs)
        got = assert_same_verdict(hand_section([0], [0], [(0, t, encode_symbols(symbols, t), b"")]), 1, 3)
        assert (got is not None) == (k == 0)


EDGES = [-(2**40), -(2**40) + 1, -(2**31) - 1, -(2**31), -(2**31) + 1, -2, 0, 2**31 - 3, 2**31 - 2, 2**31 - 1,
         2**31, 2**40 - 2, 2**40]


@SETTINGS
@given(st.one_of(st.sampled_from(EDGES), st.integers(-(2**40), 2**40)), st.integers(0, 31),
       st.one_of(st.sampled_from([-(2**31), -(2**31) + 1, 0, 2**31 - 2, 2**31]), st.integers(-(2**31), 2**31)),
       st.integers(1, 5))
def test_int32_room_is_checked_alike(lo, shift, offset, tokens):
    """One channel whose symbols all equal ``lo`` (low bits 0) at ``shift`` with ``offset``: refused exactly
    where ``[lo << shift, (lo + 2) << shift) + offset`` leaves int32, else decoded to ``lo << shift + offset``."""
    table = table_from_counts(lo, np.array([tokens, 0]))
    words = encode_symbols(np.full(tokens, lo), table)
    low = pack_low_bits(np.zeros(tokens, np.uint32), shift)
    got = assert_same_verdict(hand_section([offset], [3], [(shift, table, words, low)]), 1, tokens)
    fits = (lo << shift) + offset >= -(2**31) and ((lo + 2) << shift) + offset <= 2**31
    assert (got is not None) == fits
    if fits:
        assert got.tolist() == [[(lo << shift) + offset] * tokens]


def test_hand_made_edges():
    symbols = np.array([0, 1, 1, 0, 1])
    table = table_from_counts(0, np.array([2, 3]))
    words = encode_symbols(symbols, table)
    good = hand_section([5], [0], [(0, table, words, b"")])
    assert assert_same_verdict(good, 1, 5).tolist() == [(symbols + 5).tolist()]
    # varints padded with zero groups: 10 bytes for a value, 9 for an offset or a table entry, are read alike
    padded = bytearray(b"\x8a" + b"\x80" * 7 + b"\x00")  # offset 5 (zigzag 10) in 9 bytes
    padded += b"\x00\x00" + b"\x80" * 9 + b"\x00"       # class 0; shift 0; lo 0 in 10 bytes
    padded += b"\x82\x00"                               # K = 2
    for i, f in enumerate(table.freqs.tolist()):        # freqs - 1, the first padded to 9 bytes
        buf = bytearray()
        write_uvarint(buf, f - 1)
        padded += buf if i else bytes([b | 0x80 for b in buf]) + b"\x80" * (8 - len(buf)) + b"\x00"
    padded += bytes([len(words)]) + words.astype("<u4").tobytes()
    assert np.array_equal(assert_same_verdict(bytes(padded), 1, 5), [symbols + 5])
    refused = [
        b"\x8a" + b"\x80" * 8 + b"\x00" + good[1:],       # a 10-byte offset varint
        hand_section([2**31 + 1], [0], [(0, table, words, b"")]),  # an offset beyond 2**31
        hand_section([0], [MAX_CLASSES], [(0, table, words, b"")]),  # a class beyond the last
        hand_section([0], [0], [(32, table, words, b"")]),  # a shift beyond 31
        good[:-1], good[:3],                              # truncated
        hand_section([0], [0], [(0, table, np.append(words, 0), b"")]),  # a trailing zero word
    ]
    for data in refused:
        assert assert_same_verdict(data, 1, 5) is None
    with pytest.raises(FormatError, match="class 0"):
        ContextANS().decode(Reader(good[:-1], what="layer.0.keys"), (1, 5, 1))
    assert context_sections.decode_section(b"", 0, 0, 0, 9)[1] == 0  # no channels: nothing to read


def test_arguments_are_checked():
    assert context_sections.TABLE_BITS == TABLE_BITS
    for args in [(b"ab", -1, 2, 1, 1), (b"ab", 0, 3, 1, 1), (b"ab", 2, 1, 1, 1), (b"ab", 0, 2, -1, 1),
                 (b"ab", 0, 2, 1, -1)]:
        with pytest.raises(ValueError):
            context_sections.decode_section(*args)
    with pytest.raises(ValueError):
        context_sections.decode_section(b"ab", 0, 2, 1, 1, 0)
