"""Tests of the compiled seqkv_ext package: ANS decoder, CRC-32C, bit packing."""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

constriction = pytest.importorskip("constriction")
ans = pytest.importorskip("seqkv_ext.ans")
from seqkv_ext import ans_encode, bitpack  # noqa: E402
from seqkv_ext.crc32c import crc32c  # noqa: E402

# SEQKV_EXT_EXAMPLES=5000 for a long soak; the default keeps this file at a few seconds
EXAMPLES = int(os.environ.get("SEQKV_EXT_EXAMPLES", "100"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
STRATEGIES = ("auto", "search", "coarse", "fine")


# --------------------------------------------------------------------------- helpers


def make_freqs(rng: np.random.Generator, k: int, skew: str, table_bits: int = 16) -> np.ndarray:
    """K integer frequencies >= 1 summing to 2**table_bits, with the given shape."""
    total = 1 << table_bits
    if skew == "dominant":  # one symbol with almost all the mass
        p = np.full(k, 1e-6)
        p[rng.integers(k)] = 1.0
    elif skew == "geometric":
        p = 0.5 ** np.minimum(np.arange(k), 60.0)
        rng.shuffle(p)
    else:
        p = rng.dirichlet(np.full(k, {"peaky": 0.05, "skewed": 0.3, "flat": 1.0, "even": 20.0}[skew]))
    f = 1 + np.floor(p / p.sum() * (total - k)).astype(np.int64)
    f[np.argmax(f)] += total - int(f.sum())
    return f.astype(np.uint32)


def encode(symbols: np.ndarray, freqs: np.ndarray, table_bits: int = 16) -> np.ndarray:
    """The reference encoder: constriction's AnsCoder with the exact table."""
    model = constriction.stream.model.Categorical(freqs.astype(np.float64) / (1 << table_bits), perfect=True)
    coder = constriction.stream.stack.AnsCoder()
    if len(symbols):
        coder.encode_reverse(symbols.astype(np.int32), model)
    return coder.get_compressed().astype(np.uint32)


def ref_decode(words, freqs, count: int, shift: int = 8):
    """Pure-Python decoder, written from docs/format.md section 7.2."""
    f = [int(x) << shift for x in freqs]
    cdf = [0]
    for x in f:
        cdf.append(cdf[-1] + x)
    w = [int(x) for x in words]
    state = w.pop() if w else 0
    if w:
        state = (state << 32) | w.pop()
    out = []
    for _ in range(count):
        q = state & 0xFFFFFF
        k = next(i for i in range(len(f)) if cdf[i] <= q < cdf[i + 1])
        state = (state >> 24) * f[k] + (q - cdf[k])
        if state >> 32 == 0 and w:
            state = (state << 32) | w.pop()
        out.append(k)
    clean = not w and state == 0 and (len(words) == 0 or int(words[-1]) != 0)
    return out, clean


skews = st.sampled_from(["peaky", "skewed", "flat", "even", "dominant", "geometric"])


@st.composite
def streams(draw, max_k: int = 4000, max_count: int = 5000):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    k = draw(st.integers(2, max_k))
    freqs = make_freqs(rng, k, draw(skews))
    count = draw(st.integers(0, max_count))
    symbols = rng.choice(k, size=count, p=freqs / freqs.sum()).astype(np.int32)
    return freqs, symbols, encode(symbols, freqs)


# --------------------------------------------------------------------------- ANS


# constriction 0.5 output for these symbols, fixed here so that the format cannot drift
KNOWN_FREQS = np.array([16384, 16384, 32768], dtype=np.uint32)
KNOWN_SYMBOLS = np.array(
    [2, 0, 1, 2, 2, 0, 1, 1, 2, 0, 2, 2, 1, 0, 0, 2, 1, 2, 0, 1,
     2, 2, 2, 1, 0, 1, 2, 0, 0, 2, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2], dtype=np.int32)
KNOWN_WORDS = np.array([0x53000000, 0xB2B2C48F, 0x2521D2], dtype=np.uint32)


def test_ans_known_vector():
    assert np.array_equal(encode(KNOWN_SYMBOLS, KNOWN_FREQS), KNOWN_WORDS)
    for strategy in STRATEGIES:
        out, clean = ans._decode_with(KNOWN_WORDS, KNOWN_FREQS, len(KNOWN_SYMBOLS), 8, strategy)
        assert out.dtype == np.int32 and clean
        assert np.array_equal(out, KNOWN_SYMBOLS)
    assert ref_decode(KNOWN_WORDS, KNOWN_FREQS, len(KNOWN_SYMBOLS)) == (KNOWN_SYMBOLS.tolist(), True)
    # one symbol short leaves state behind; extra symbols decode as free 0s from state 0
    assert not ans.decode(KNOWN_WORDS, KNOWN_FREQS, len(KNOWN_SYMBOLS) - 1, 8)[1]
    out, clean = ans.decode(KNOWN_WORDS, KNOWN_FREQS, len(KNOWN_SYMBOLS) + 3, 8)
    assert clean and out[-3:].tolist() == [0, 0, 0]


def test_ans_empty_stream():
    freqs = np.array([65535, 1], dtype=np.uint32)
    out, clean = ans.decode(np.zeros(0, np.uint32), freqs, 0, 8)
    assert out.shape == (0,) and out.dtype == np.int32 and clean
    # symbol 0 from state 0 costs nothing: the empty stream holds any number of them
    out, clean = ans.decode(np.zeros(0, np.uint32), freqs, 1000, 8)
    assert clean and not out.any()


@SETTINGS
@given(streams())
def test_ans_decodes_constriction_streams(case):
    freqs, symbols, words = case
    out, clean = ans.decode(words, freqs, len(symbols), 8)
    assert clean
    assert out.dtype == np.int32 and np.array_equal(out, symbols)


@SETTINGS
@given(streams(max_count=3000), st.sampled_from(STRATEGIES))
def test_ans_every_lookup_strategy(case, strategy):
    freqs, symbols, words = case
    out, clean = ans._decode_with(words, freqs, len(symbols), 8, strategy)
    assert clean and np.array_equal(out, symbols)


@pytest.mark.parametrize("table_bits", [1, 2, 5, 8, 12, 15, 16])
def test_ans_other_table_bits(table_bits):
    rng = np.random.default_rng(table_bits)
    for k in sorted({2, min(3, 1 << table_bits), min(40, 1 << table_bits), min(700, 1 << table_bits)}):
        if k > 1 << table_bits:
            continue
        cuts = np.sort(rng.choice(np.arange(1, 1 << table_bits), k - 1, replace=False))
        freqs = np.diff(np.concatenate([[0], cuts, [1 << table_bits]])).astype(np.uint32)
        symbols = rng.choice(k, size=3000, p=freqs / freqs.sum()).astype(np.int32)
        words = encode(symbols, freqs, table_bits)
        for strategy in STRATEGIES:
            out, clean = ans._decode_with(words, freqs, len(symbols), 24 - table_bits, strategy)
            assert clean and np.array_equal(out, symbols), (k, strategy)


def test_ans_largest_alphabet_and_long_stream():
    rng = np.random.default_rng(1)
    for k, skew, n in [(32768, "flat", 40000), (30, "skewed", 200_000), (4000, "flat", 70_000)]:
        freqs = make_freqs(rng, k, skew)
        symbols = rng.choice(k, size=n, p=freqs / freqs.sum()).astype(np.int32)
        words = encode(symbols, freqs)
        for strategy in STRATEGIES if n <= 70_000 else ("auto", "coarse", "fine"):
            out, clean = ans._decode_with(words, freqs, n, 8, strategy)
            assert clean and np.array_equal(out, symbols), (k, strategy)


@SETTINGS
@given(
    st.integers(0, 2**32 - 1),
    st.integers(2, 300),
    skews,
    st.lists(st.integers(0, 2**32 - 1), max_size=24),
    st.integers(0, 400),
)
def test_ans_garbage_matches_constriction(seed, k, skew, word_list, count):
    """Arbitrary words decode exactly as constriction decodes them (symbols and end state)."""
    freqs = make_freqs(np.random.default_rng(seed), k, skew)
    words = np.array(word_list, dtype=np.uint32)
    if len(words) and words[-1] == 0:
        words[-1] = 1  # constriction refuses streams ending in a zero word
    coder = constriction.stream.stack.AnsCoder(words)
    model = constriction.stream.model.Categorical(freqs / 65536.0, perfect=True)
    expect = coder.decode(model, count) if count else np.zeros(0, np.int32)
    out, clean = ans.decode(words, freqs, count, 8)
    assert np.array_equal(out, expect)
    assert clean == coder.is_empty()
    if count <= 60:
        assert ref_decode(words, freqs, count) == (out.tolist(), clean)


@SETTINGS
@given(
    st.integers(0, 2**32 - 1),
    st.integers(2, 4000),
    skews,
    st.integers(0, 200),
    st.integers(0, 5000),
    st.sampled_from(STRATEGIES),
)
def test_ans_random_garbage_never_crashes(seed, k, skew, n_words, count, strategy):
    rng = np.random.default_rng(seed)
    freqs = make_freqs(rng, k, skew)
    words = rng.integers(0, 2**32, size=n_words, dtype=np.uint64).astype(np.uint32)
    out, clean = ans._decode_with(words, freqs, count, 8, strategy)
    assert out.shape == (count,) and out.dtype == np.int32
    assert isinstance(clean, bool)
    if count:
        assert 0 <= out.min() and out.max() < k
    # all lookup strategies run the same state machine
    ref_out, ref_clean = ans._decode_with(words, freqs, count, 8, "search")
    assert clean == ref_clean and np.array_equal(out, ref_out)


@SETTINGS
@given(streams(max_k=300, max_count=2000))
def test_ans_trailing_zero_word_is_never_clean(case):
    freqs, symbols, words = case
    out, clean = ans.decode(np.append(words, np.uint32(0)), freqs, len(symbols), 8)
    assert not clean


def test_ans_tampered_streams_are_rarely_clean():
    """An extra or missing word is caught by the end-state check in nearly every case.

    (Not in every case: when the words run out early, the state can decay to 0;
    the container's CRC-32C is the real integrity check.)  Seeded, so deterministic.
    """
    rng = np.random.default_rng(1234)
    flagged = {"append_end": 0, "append_start": 0, "drop_last": 0, "drop_first": 0}
    trials = 0
    while trials < 300:
        k = int(rng.integers(2, 300))
        freqs = make_freqs(rng, k, ["peaky", "skewed", "flat", "even"][trials % 4])
        symbols = rng.choice(k, size=int(rng.integers(200, 2000)), p=freqs / freqs.sum()).astype(np.int32)
        words = encode(symbols, freqs)
        if len(words) < 4:
            continue
        trials += 1
        extra = np.array([rng.integers(1, 2**32)], dtype=np.uint32)
        variants = {
            "append_end": np.concatenate([words, extra]),
            "append_start": np.concatenate([extra, words]),
            "drop_last": words[:-1].copy(),
            "drop_first": words[1:].copy(),
        }
        for name, bad in variants.items():
            out, clean = ans.decode(bad, freqs, len(symbols), 8)
            if clean:
                flagged[name] += 1
                assert not np.array_equal(out, symbols)
    assert flagged["append_start"] <= 3 and flagged["drop_first"] <= 3, flagged
    assert flagged["append_end"] <= 15 and flagged["drop_last"] <= 15, flagged  # <= 5%
    # and the untouched streams are clean
    out, clean = ans.decode(words, freqs, len(symbols), 8)
    assert clean and np.array_equal(out, symbols)


def test_ans_does_not_modify_inputs():
    rng = np.random.default_rng(3)
    freqs = make_freqs(rng, 50, "skewed")
    symbols = rng.choice(50, size=5000, p=freqs / freqs.sum()).astype(np.int32)
    words = encode(symbols, freqs)
    w0, f0 = words.copy(), freqs.copy()
    words.flags.writeable = False  # read-only buffers are accepted
    freqs.flags.writeable = False
    out, clean = ans.decode(words, freqs, len(symbols), 8)
    assert clean and np.array_equal(out, symbols)
    assert np.array_equal(words, w0) and np.array_equal(freqs, f0)


def test_ans_accepts_other_integer_freqs():
    f = KNOWN_FREQS
    for freqs in (f.astype(np.int64), f.astype(np.uint16), f[::-1].copy()[::-1], f.tolist(), tuple(f.tolist())):
        out, clean = ans.decode(KNOWN_WORDS, freqs, len(KNOWN_SYMBOLS), 8)
        assert clean and np.array_equal(out, KNOWN_SYMBOLS)


GOOD_WORDS = KNOWN_WORDS
GOOD_FREQS = KNOWN_FREQS


@pytest.mark.parametrize(
    "words, freqs, count, shift",
    [
        (GOOD_WORDS, np.array([65536], np.uint32), 1, 8),  # K = 1
        (GOOD_WORDS, np.ones(32769, np.uint32), 1, 8),  # K > 32768 (and sum wrong)
        (GOOD_WORDS, np.array([0, 65536], np.uint32), 1, 8),  # a zero freq
        (GOOD_WORDS, np.array([1, 65534], np.uint32), 1, 8),  # sum too small
        (GOOD_WORDS, np.array([2, 65535], np.uint32), 1, 8),  # sum too large
        (GOOD_WORDS, np.array([-1, 65537], np.int64), 1, 8),  # negative freq
        (GOOD_WORDS, np.array([2**63, 2**63 + 65536], np.uint64), 1, 8),  # sum wraps
        (GOOD_WORDS, np.array([0.5, 65535.5]), 1, 8),  # float freqs
        (GOOD_WORDS, GOOD_FREQS.reshape(1, 3), 1, 8),  # 2-D freqs
        (GOOD_WORDS, GOOD_FREQS, -1, 8),  # negative count
        (GOOD_WORDS, GOOD_FREQS, 1.5, 8),  # non-integer count
        (GOOD_WORDS, GOOD_FREQS, "3", 8),
        (GOOD_WORDS, GOOD_FREQS, 2**70, 8),  # count overflows
        (GOOD_WORDS, GOOD_FREQS, 1, 7),  # 17 table bits
        (GOOD_WORDS, GOOD_FREQS, 1, 24),  # 0 table bits
        (GOOD_WORDS, GOOD_FREQS, 1, -1),
        (GOOD_WORDS, GOOD_FREQS, 1, 9),  # freqs do not sum to 2**15
        (GOOD_WORDS.astype(np.int64), GOOD_FREQS, 1, 8),  # wrong word dtype
        (GOOD_WORDS.astype(np.uint64), GOOD_FREQS, 1, 8),
        (GOOD_WORDS.astype(np.float32), GOOD_FREQS, 1, 8),
        (GOOD_WORDS.reshape(3, 1), GOOD_FREQS, 1, 8),  # 2-D words
        (np.repeat(GOOD_WORDS, 2)[::2], GOOD_FREQS, 1, 8),  # non-contiguous words
        (GOOD_WORDS.tolist(), GOOD_FREQS, 1, 8),  # a list is not a uint32 array
        (b"\x01\x02\x03\x04", GOOD_FREQS, 1, 8),  # nor are bytes
        (None, GOOD_FREQS, 1, 8),
    ],
)
def test_ans_bad_inputs_raise_value_error(words, freqs, count, shift):
    with pytest.raises(ValueError):
        ans.decode(words, freqs, count, shift)


def test_ans_unknown_strategy():
    with pytest.raises(ValueError):
        ans._decode_with(GOOD_WORDS, GOOD_FREQS, 1, 8, "magic")


# --------------------------------------------------------------------------- ANS encoder


@st.composite
def encoder_cases(draw):
    """A table (K in 2..4096, some shapes with many freq-1 entries) and symbols drawn from it."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    k = draw(st.one_of(st.integers(2, 40), st.integers(2, 4096)))
    freqs = make_freqs(rng, k, draw(skews))
    count = draw(st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 5000), st.just(100_000)))
    if draw(st.booleans()):  # symbols from the table's own distribution
        symbols = rng.choice(k, size=count, p=freqs / freqs.sum())
    else:  # uniform symbols: frequent use of the rare (freq 1) ones
        symbols = rng.integers(0, k, size=count)
    return freqs, symbols.astype(np.int32)


@SETTINGS
@given(encoder_cases())
def test_ans_encoder_matches_constriction(case):
    freqs, symbols = case
    words = ans_encode.encode(symbols, freqs, 8)
    assert words.dtype == np.uint32 and words.ndim == 1
    assert np.array_equal(words, encode(symbols, freqs))
    out, clean = ans.decode(words, freqs, len(symbols), 8)
    assert clean and np.array_equal(out, symbols)


def test_ans_encoder_known_vector_and_short_streams():
    assert np.array_equal(ans_encode.encode(KNOWN_SYMBOLS, KNOWN_FREQS, 8), KNOWN_WORDS)
    freqs = np.array([65535, 1], dtype=np.uint32)
    for symbols in ([], [0], [0, 0, 0], [1], [0, 1], [1, 1], [1] * 7, [1, 0, 1, 1, 0, 1, 1, 1]):
        symbols = np.array(symbols, dtype=np.int32)
        words = ans_encode.encode(symbols, freqs, 8)
        assert np.array_equal(words, encode(symbols, freqs)), symbols
    assert ans_encode.encode(np.zeros(100, np.int32), freqs, 8).size == 0  # symbol 0 from state 0 is free


def test_ans_encoder_renormalises_exactly_at_the_boundary():
    """Symbols whose encoding meets a state with ``state >> 40 == f`` exactly (flush needed).

    The decoder from a chosen state x yields the symbols that encode to x; a table
    with freq[0] == 1 makes such decodes end at state 0 often (clean), and encoding
    one more symbol s with f[s] == x >> 40 then sits on the renormalisation boundary,
    which random inputs practically never hit (an off-by-one there changes the words).
    """
    rng = np.random.default_rng(7)
    hits = 0
    for k in (3, 20, 300):  # flat: decoding from x takes few symbols
        freqs = make_freqs(rng, k, "flat").astype(np.int64)
        freqs[1] += freqs[0] - 1
        freqs[0] = 1
        freqs = freqs.astype(np.uint32)
        for s in rng.choice(np.arange(1, k), size=min(k - 1, 5), replace=False):
            f = int(freqs[s]) << 8
            for low in rng.integers(0, 1 << 40, size=20000, dtype=np.int64):
                x = f << 40 | int(low)
                words = np.array([x & 0xFFFFFFFF, x >> 32], dtype=np.uint32)
                tail, clean = ans.decode(words, freqs, 3000, 8)
                if clean:
                    break
            else:
                pytest.fail(f"no clean decode found for k={k}, s={s}")
            assert np.array_equal(encode(tail, freqs), words)  # tail encodes to state x
            symbols = np.concatenate([[s], tail]).astype(np.int32)
            expect = encode(symbols, freqs)
            assert expect[0] == x & 0xFFFFFFFF  # constriction flushed x's low word first
            assert np.array_equal(ans_encode.encode(symbols, freqs, 8), expect)
            hits += 1
    assert hits >= 10


@pytest.mark.parametrize("table_bits", [1, 5, 12, 16])
def test_ans_encoder_other_table_bits(table_bits):
    rng = np.random.default_rng(table_bits)
    for k in sorted({2, min(40, 1 << table_bits), min(700, 1 << table_bits)}):
        cuts = np.sort(rng.choice(np.arange(1, 1 << table_bits), k - 1, replace=False))
        freqs = np.diff(np.concatenate([[0], cuts, [1 << table_bits]])).astype(np.uint32)
        symbols = rng.integers(0, k, size=3000).astype(np.int32)
        words = ans_encode.encode(symbols, freqs, 24 - table_bits)
        assert np.array_equal(words, encode(symbols, freqs, table_bits)), k


def test_ans_encoder_does_not_modify_inputs_and_accepts_other_dtypes():
    rng = np.random.default_rng(3)
    freqs = make_freqs(rng, 50, "skewed")
    symbols = rng.integers(0, 50, size=1000).astype(np.int32)
    f0, s0 = freqs.copy(), symbols.copy()
    words = ans_encode.encode(symbols, freqs, 8)
    assert np.array_equal(freqs, f0) and np.array_equal(symbols, s0)
    assert np.array_equal(ans_encode.encode(symbols.astype(np.int64), freqs.astype(np.int64), 8), words)
    assert np.array_equal(ans_encode.encode(symbols[::-1].copy()[::-1], freqs, 8), words)
    assert np.array_equal(ans_encode.encode(symbols.tolist(), freqs.tolist(), 8), words)


GOOD_FREQS = np.array([65535, 1], dtype=np.uint32)


@pytest.mark.parametrize(
    "symbols, freqs, shift",
    [
        ([0, 2], GOOD_FREQS, 8),  # symbol out of range
        ([0, -1], GOOD_FREQS, 8),
        ([2**40], GOOD_FREQS, 8),
        (np.zeros((2, 2), np.int32), GOOD_FREQS, 8),
        ([0.5], GOOD_FREQS, 8),
        ([0], [65536], 8),  # one symbol
        ([0], [65535, 0, 1], 8),  # zero freq
        ([0], [65535, 2], 8),  # bad sum
        ([0], [65535.0, 1.0], 8),
        ([0], [-1, 65537], 8),
        ([0], np.ones((2, 2), np.uint32), 8),
        ([0], GOOD_FREQS, 7),
        ([0], GOOD_FREQS, 24),
        ([0], GOOD_FREQS, "8"),
    ],
)
def test_ans_encoder_bad_inputs_raise_value_error(symbols, freqs, shift):
    with pytest.raises(ValueError):
        ans_encode.encode(symbols, freqs, shift)


# --------------------------------------------------------------------------- CRC-32C


def crc32c_ref(data: bytes, value: int = 0) -> int:
    crc = value ^ 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_vectors():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(b"", 0x12345678) == 0x12345678
    # RFC 3720 (iSCSI) appendix B.4
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


@settings(SETTINGS, max_examples=2 * EXAMPLES)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_crc32c_matches_reference_and_continues(a, b):
    assert crc32c(a) == crc32c_ref(a)
    assert crc32c(b, crc32c(a)) == crc32c(a + b) == crc32c_ref(a + b)


@settings(SETTINGS, max_examples=max(10, EXAMPLES // 4))
@given(st.integers(0, 2**32 - 1), st.integers(0, 1 << 17), st.integers(0, 15))
def test_crc32c_long_buffers_and_offsets(seed, n, offset):
    data = np.random.default_rng(seed).integers(0, 256, n + 16, dtype=np.uint8)
    view = memoryview(data)[offset : offset + n]  # unaligned starts too
    whole = crc32c(view)
    cut = n // 3
    assert crc32c(view[cut:], crc32c(view[:cut])) == whole
    if n <= 4096:
        assert whole == crc32c_ref(bytes(view))


def test_crc32c_large_buffer_matches_chunked():
    data = np.random.default_rng(5).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    crc = 0
    for i in range(0, len(data), 1000):
        crc = crc32c(data[i : i + 1000], crc)
    assert crc32c(data) == crc
    assert crc32c(data[:5000]) == crc32c_ref(data[:5000])


def test_crc32c_buffer_types():
    raw = bytes(range(256)) * 3
    expect = crc32c_ref(raw)
    arr = np.frombuffer(raw, dtype=np.uint8)
    for obj in (raw, bytearray(raw), memoryview(raw), arr, arr.view(np.float32), arr.view(np.uint32).reshape(8, 24)):
        assert crc32c(obj) == expect
    # a Fortran-ordered array is checksummed in memory order
    f = np.asfortranarray(arr.reshape(24, 32))
    assert crc32c(f) == crc32c_ref(f.tobytes(order="F"))


def test_crc32c_bad_inputs():
    with pytest.raises(ValueError):
        crc32c(np.arange(10, dtype=np.uint8)[::2])  # not contiguous
    with pytest.raises(ValueError):
        crc32c(b"abc", -1)
    with pytest.raises(ValueError):
        crc32c(b"abc", 2**32)
    with pytest.raises(ValueError):
        crc32c(b"abc", 1.0)
    with pytest.raises(TypeError):
        crc32c("abc")  # str is not bytes-like (as with zlib.crc32)
    with pytest.raises(TypeError):
        crc32c(None)


# --------------------------------------------------------------------------- bit packing


def pack_ref(values: np.ndarray, nbits: int) -> bytes:
    v = values.astype(np.uint64)
    bits = ((v[:, None] >> np.arange(nbits, dtype=np.uint64)) & 1).astype(np.uint8)
    return np.packbits(bits.ravel(), bitorder="little").tobytes()


@settings(SETTINGS, max_examples=2 * EXAMPLES)
@given(
    st.integers(0, 32),
    st.sampled_from([np.uint16, np.uint32]),
    st.integers(0, 2**32 - 1),
    st.integers(0, 300),
)
def test_bitpack_round_trip(nbits, dtype, seed, n):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, np.iinfo(dtype).max, size=n, dtype=dtype, endpoint=True)
    packed = bitpack.pack_low_bits(values, nbits)
    assert packed.dtype == np.uint8 and packed.shape == ((n * nbits + 7) // 8,)
    assert packed.tobytes() == pack_ref(values, nbits)  # LSB-first, unused high bits zero
    low = values.astype(np.uint64) & ((1 << nbits) - 1)
    out = bitpack.unpack_low_bits(packed, nbits, n)
    assert out.dtype == np.uint32 and np.array_equal(out, low)
    # bytes work too, and trailing extra bytes are ignored
    out2 = bitpack.unpack_low_bits(packed.tobytes() + b"\xff" * 9, nbits, n)
    assert np.array_equal(out2, low)


@pytest.mark.parametrize("nbits", [0, 1, 7, 8, 9, 12, 16, 23, 31, 32])
def test_bitpack_large_arrays(nbits):
    rng = np.random.default_rng(nbits)
    values = rng.integers(0, 2**32, size=100_003, dtype=np.uint64).astype(np.uint32)
    packed = bitpack.pack_low_bits(values, nbits)
    whole_bytes = 5000 * nbits // 8  # the bytes that hold only bits of the first 5000 values
    assert packed.tobytes()[:whole_bytes] == pack_ref(values[:5000], nbits)[:whole_bytes]
    mask = np.uint32((1 << nbits) - 1) if nbits < 32 else np.uint32(0xFFFFFFFF)
    assert np.array_equal(bitpack.unpack_low_bits(packed, nbits, len(values)), values & mask)
    # a prefix of the stream decodes a prefix of the values
    assert np.array_equal(bitpack.unpack_low_bits(packed, nbits, 777), values[:777] & mask)


def test_bitpack_known_vector():
    values = np.array([1, 2, 3, 4, 5], dtype=np.uint16)
    assert bitpack.pack_low_bits(values, 3).tobytes() == bytes([0b11010001, 0b01011000])
    assert bitpack.unpack_low_bits(np.array([0b11010001, 0b01011000], np.uint8), 3, 5).tolist() == [1, 2, 3, 4, 5]
    assert bitpack.pack_low_bits(np.array([0x12345678], np.uint32), 32).tobytes() == b"\x78\x56\x34\x12"


def test_bitpack_bad_inputs():
    v = np.arange(10, dtype=np.uint32)
    for bad in (np.arange(10, dtype=np.int32), np.arange(10, dtype=np.uint64), np.arange(10, dtype=np.uint8),
                v.reshape(2, 5), v[::2], list(range(10))):
        with pytest.raises(ValueError):
            bitpack.pack_low_bits(bad, 4)
    for nbits in (-1, 33, 2.0):
        with pytest.raises(ValueError):
            bitpack.pack_low_bits(v, nbits)
    packed = bitpack.pack_low_bits(v, 5)  # 7 bytes
    with pytest.raises(ValueError):
        bitpack.unpack_low_bits(packed[:6], 5, 10)  # truncated
    with pytest.raises(ValueError):
        bitpack.unpack_low_bits(packed, 5, -1)
    with pytest.raises(ValueError):
        bitpack.unpack_low_bits(packed, 33, 1)
    with pytest.raises(ValueError):
        bitpack.unpack_low_bits(packed.astype(np.uint16), 5, 10)
    with pytest.raises(ValueError):
        bitpack.unpack_low_bits(packed.reshape(7, 1), 5, 10)
    with pytest.raises(ValueError):
        bitpack.unpack_low_bits(np.repeat(packed, 2)[::2], 5, 10)
    with pytest.raises(ValueError):
        bitpack.unpack_low_bits(None, 5, 10)
    assert bitpack.unpack_low_bits(b"", 0, 5).tolist() == [0] * 5
    assert bitpack.unpack_low_bits(b"", 7, 0).shape == (0,)


def test_package_does_not_import_seqkv():
    import subprocess
    import sys

    code = "import sys, seqkv_ext; assert 'seqkv' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- quantize: the calibrated quantizer's encoder pass ------------------------------------------------------
def _reference_quantize_rows(z, steps, rounding, pred=None):
    """The same choice written with numpy, one row at a time (what quantize_klt did before the kernel)."""
    def symbols(x):
        v = (x / steps[:, None]).astype(np.float32)
        return (np.sign(v) * np.floor(np.abs(v) + np.float32(rounding))).astype(np.int64)

    def bits(row):
        _, counts = np.unique(row, return_counts=True)
        return float(len(row) * np.log2(len(row)) - (counts * np.log2(counts)).sum())

    q = symbols(z)
    use = np.zeros(len(z), dtype=bool)
    if pred is not None:
        q_res = symbols((z - pred).astype(np.float32))
        use = np.array([bits(r) < bits(p) for r, p in zip(q_res, q)])
        q = np.where(use[:, None], q_res, q)
    recon = (q.astype(np.float32) * steps[:, None]).astype(np.float32)
    if pred is not None:
        recon = np.where(use[:, None], (recon + pred).astype(np.float32), recon)
    err = ((z.astype(np.float64) - recon) ** 2).sum(1)
    return q, recon, (use if pred is not None else None), err


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("predicted", [False, True])
def test_quantize_rows_matches_reference(seed, predicted):
    from seqkv_ext.quantize import quantize_rows

    rng = np.random.default_rng(seed)
    rows, tokens = int(rng.integers(1, 40)), int(rng.integers(1, 300))
    z = (rng.standard_normal((rows, tokens)) * rng.uniform(0.1, 20, (rows, 1))).astype(np.float32)
    steps = rng.uniform(0.05, 3.0, rows).astype(np.float32)
    # half the rows are well predicted, half not: both choices must occur
    noise = rng.standard_normal((rows, tokens)).astype(np.float32) * np.where(np.arange(rows) % 2, 0.1, 30)[:, None]
    pred = (z + noise).astype(np.float32) if predicted else None
    rounding = float(rng.choice([0.5, 0.3]))
    q, recon, use, err = quantize_rows(z, steps, rounding, pred)
    want_q, want_recon, want_use, want_err = _reference_quantize_rows(z, steps, rounding, pred)
    assert q.dtype == np.int32 and recon.dtype == np.float32
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(recon, want_recon)  # bit for bit: the decoder must chain the same floats
    np.testing.assert_allclose(err, want_err, rtol=1e-6, atol=1e-9)  # the kernel subtracts in float32
    if predicted:
        np.testing.assert_array_equal(use, want_use)
        assert use.any() and not use.all()
    else:
        assert use is None


def test_quantize_rows_strided_rows_and_edge_cases():
    from seqkv_ext.quantize import QuantizeError, quantize_rows

    rng = np.random.default_rng(7)
    full = rng.standard_normal((5, 100)).astype(np.float32)
    steps = np.full(5, 0.5, np.float32)
    q_view, *_ = quantize_rows(full[:, 4:], steps, 0.5)          # rows strided: a sinks-dropped view
    q_copy, *_ = quantize_rows(np.ascontiguousarray(full[:, 4:]), steps, 0.5)
    np.testing.assert_array_equal(q_view, q_copy)
    with pytest.raises(ValueError):
        quantize_rows(full[:, ::2], steps, 0.5)                  # elements within a row must be contiguous
    with pytest.raises(ValueError):
        quantize_rows(full, steps[:3], 0.5)
    with pytest.raises(ValueError):
        quantize_rows(full, steps, 0.5, full[:, :10].copy())
    for bad in (np.nan, np.inf, -np.inf):
        z = full.copy()
        z[3, 50] = bad
        with pytest.raises(QuantizeError, match="NaN or Inf"):
            quantize_rows(z, steps, 0.5)
    z = full.copy()
    z[1, 1] = 1e30
    with pytest.raises(QuantizeError, match="too large"):
        quantize_rows(z, steps, 0.5)
    q, recon, use, err = quantize_rows(np.zeros((3, 0), np.float32), steps[:3], 0.5, np.zeros((3, 0), np.float32))
    assert q.shape == recon.shape == (3, 0) and use.tolist() == [False] * 3 and err.tolist() == [0.0] * 3
    # a tie in entropy keeps the plain symbols (no side cost for nothing)
    z = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]], np.float32)
    pred = np.array([[2.0, 4.0, 6.0, 8.0], [0.0, 1.0, 2.0, 3.0]], np.float32)  # residuals: -z (a tie); all 1
    q, _, use, _ = quantize_rows(z, np.ones(2, np.float32), 0.5, pred)
    assert use.tolist() == [False, True] and q.tolist() == [[1, 2, 3, 4], [1, 1, 1, 1]]


# -- the decoder's compiled passes: dequantize_rows, decode_rows, ar_undo, decode_uvarints -------------------
@pytest.mark.parametrize("seed", range(4))
def test_dequantize_rows_inverts_quantize_rows_bit_for_bit(seed):
    """The decoder's reconstruction equals the encoder's, float for float, with and without prediction."""
    from seqkv_ext.quantize import dequantize_rows, quantize_rows

    rng = np.random.default_rng(seed)
    rows, tokens = int(rng.integers(1, 40)), int(rng.integers(1, 300))
    z = (rng.standard_normal((rows, tokens)) * rng.uniform(0.1, 20, (rows, 1))).astype(np.float32)
    steps = rng.uniform(0.05, 3.0, rows).astype(np.float32)
    noise = rng.standard_normal((rows, tokens)).astype(np.float32) * np.where(np.arange(rows) % 2, 0.1, 30)[:, None]
    pred = (z + noise).astype(np.float32)
    q, recon, _, _ = quantize_rows(z, steps, 0.5)
    np.testing.assert_array_equal(dequantize_rows(q, steps), recon)
    q, recon, use, _ = quantize_rows(z, steps, 0.5, pred)
    assert use.any() and not use.all()
    np.testing.assert_array_equal(dequantize_rows(q, steps, pred, use), recon)
    # rows strided (a view), as the coder hands them over
    wide = np.zeros((rows, tokens + 3), np.int32)
    wide[:, 3:] = q
    np.testing.assert_array_equal(dequantize_rows(wide[:, 3:], steps, pred, use), recon)
    with pytest.raises(ValueError):
        dequantize_rows(q, steps[:-1] if rows > 1 else np.zeros(2, np.float32))
    with pytest.raises(ValueError):
        dequantize_rows(q, steps, pred)  # prediction without its flags
    with pytest.raises(ValueError):
        dequantize_rows(wide[:, ::2], steps)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(2, 300), st.integers(0, 9), st.integers(0, 70))
def test_decode_rows_equals_decode_then_scatter(seed, k, n_rows, tokens):
    rng = np.random.default_rng(seed)
    freqs = make_freqs(rng, k, "skewed")
    symbols = rng.choice(k, size=n_rows * tokens, p=freqs / freqs.sum()).astype(np.int32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols, constriction.stream.model.Categorical(freqs / freqs.sum(), perfect=True))
    words = coder.get_compressed().astype(np.uint32)
    total_rows = n_rows + 3
    rows = rng.permutation(total_rows)[:n_rows].astype(np.int64)
    add = rng.integers(-1000, 1000, n_rows).astype(np.int64)
    out = np.full((total_rows, tokens), -7, np.int32)
    assert ans.decode_rows(words, freqs, 8, out, rows, add)
    want = np.full((total_rows, tokens), -7, np.int32)
    want[rows] = symbols.reshape(n_rows, tokens) + add[:, None]
    np.testing.assert_array_equal(out, want)
    if n_rows and tokens:
        # too few symbols: as clean (or not) as decode() of that count
        short = ans.decode_rows(words, freqs, 8, out, rows[:-1], add[:-1])
        assert short == ans.decode(words, freqs, (n_rows - 1) * tokens, 8)[1]
        with pytest.raises(ValueError, match="outside"):
            ans.decode_rows(words, freqs, 8, out, np.append(rows[:-1], total_rows), add)
        with pytest.raises(ValueError, match="overflow"):
            ans.decode_rows(words, freqs, 8, out, rows, np.full(n_rows, 2**31 - 1, np.int64))


def _reference_ar_undo(res, k):
    out = res.astype(np.int64).copy()
    for r in range(len(out)):
        prev = 0
        for t in range(out.shape[1]):
            if k[r]:
                prev = int(out[r, t]) + (int(k[r]) * prev + 2) // 4
                out[r, t] = prev
    return out


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 13])
def test_ar_undo_matches_reference_for_every_row_grouping(rows):
    """Rows are undone four at a time, then one by one: every grouping gives the reference."""
    from seqkv_ext.predict import ar_undo

    rng = np.random.default_rng(rows)
    res = rng.integers(-50, 50, size=(rows, 257)).astype(np.int32)
    k = rng.integers(0, 5, rows).astype(np.uint8)
    back = res.copy()
    ar_undo(back, k)
    np.testing.assert_array_equal(back, _reference_ar_undo(res, k))
    # a residual pushing any one row beyond int32 is caught, whichever group it falls in
    for r in range(rows):
        bad = res.copy()
        bad[r, 100:] = 2**31 - 1
        kk = k.copy()
        kk[r] = 4
        with pytest.raises(ValueError, match="overflow"):
            ar_undo(bad, kk)


@SETTINGS
@given(st.lists(st.integers(0, 2**63 - 1), max_size=40), st.integers(0, 5))
def test_decode_uvarints_matches_the_writer(values, junk):
    from seqkv.wire import write_uvarint
    from seqkv_ext.varint import decode_uvarints

    buf = bytearray(b"\x81" * junk)  # bytes before the start are skipped
    for v in values:
        write_uvarint(buf, v)
    got, status, used = decode_uvarints(bytes(buf), junk, len(buf), len(values))
    assert status == 0 and used == len(buf) - junk and got.tolist() == values
    if values:
        got, status, done = decode_uvarints(bytes(buf), junk, len(buf) - 1, len(values))
        assert status == 1 and done == len(values) - 1  # the last value runs past the end


def test_decode_uvarints_rejects_overlong_values():
    from seqkv_ext.varint import decode_uvarints

    _, status, index = decode_uvarints(b"\x05" + b"\xff" * 9 + b"\x01", 0, 11, 2)
    assert (status, index) == (2, 1)
    with pytest.raises(ValueError):
        decode_uvarints(b"\x05", 0, 2, 1)


@pytest.mark.parametrize("scale", [1.0, 1.3])
@pytest.mark.parametrize("layout", ["heads", "token_rows"])
def test_rotate_heads_equals_the_torch_rotation(monkeypatch, scale, layout):
    """The compiled RoPE pass gives the torch code's floats exactly, from either decoder layout."""
    import torch

    from seqkv.stages import rope

    rng = np.random.default_rng(3)
    heads, tokens, dim = 3, 77, 64
    if layout == "heads":
        x = torch.from_numpy(rng.standard_normal((heads, tokens, dim)).astype(np.float32))
    else:  # the inverse KLT's [T, H*D] rows seen as [H, T, D]
        x = torch.from_numpy(rng.standard_normal((tokens, heads * dim)).astype(np.float32))
        x = x.reshape(tokens, heads, dim).permute(1, 0, 2)
    positions = torch.arange(5, 5 + tokens)
    inv_freq = torch.from_numpy((10000.0 ** -(np.arange(0, dim, 2) / dim)).astype(np.float32))
    fast = rope.apply_rope(x, positions, inv_freq, scale)
    fast_back = rope.remove_rope(fast, positions, inv_freq, scale)
    assert fast.is_contiguous()
    monkeypatch.setattr(rope, "_ext_rope", None)  # now the torch code
    assert torch.equal(fast, rope.apply_rope(x, positions, inv_freq, scale))
    assert torch.equal(fast_back, rope.remove_rope(fast, positions, inv_freq, scale))
    from seqkv_ext.rope import rotate_heads

    cos, sin = rope._cos_sin(positions, inv_freq)
    with pytest.raises(ValueError):
        rotate_heads(x.numpy()[:, :, ::2], cos[:, :16].contiguous().numpy(), sin[:, :16].contiguous().numpy(), 1.0)
    with pytest.raises(ValueError):
        rotate_heads(x.numpy(), cos[:-1].contiguous().numpy(), sin[:-1].contiguous().numpy(), 1.0)


def _reference_ar_encode_k(columns):
    """The lag-1 coefficient choice as first written: float64 sums in token order, k = round(4 rho) in 0..4."""
    ks = []
    for row in columns.astype(np.int64):
        sxx = sxy = 0.0
        for a, b in zip(row[:-1].tolist(), row[1:].tolist()):
            sxx += float(a) * float(a)
            sxy += float(a) * float(b)
        rho = sxy / sxx if sxx > 0 else 0.0
        ks.append(min(4, int(4 * rho + 0.5)) if rho > 0 else 0)
    return np.array(ks)


# small values take the exact int64 sums; values near 2**27 the float64 fallback (their squares are not exact:
# such rows' first residual is the value itself, beyond the entropy histogram, so they are never predicted)
@pytest.mark.parametrize("magnitude,level", [(3, 0), (2**12, 0), (3, 2**27 + 12345)])
def test_ar_encode_coefficients_match_the_float_reference(magnitude, level):
    from seqkv_ext.predict import ar_encode, ar_undo

    rng = np.random.default_rng(magnitude + level)
    steps = rng.integers(-magnitude, magnitude + 1, size=(24, 300))
    walks = np.zeros_like(steps)  # AR(1) rows with coefficients 0.3 .. 1: every k from 1 to 4 occurs
    phi = np.linspace(0.3, 1.0, len(steps))
    for t in range(1, steps.shape[1]):
        walks[:, t] = np.round(phi * walks[:, t - 1]) + steps[:, t]
    rows = (np.concatenate([walks, steps]) + level).clip(-2**30, 2**30).astype(np.int32)
    res, k, _ = ar_encode(np.ascontiguousarray(rows))
    want_k = _reference_ar_encode_k(rows)
    # a row keeps its coefficient only when prediction lowers its entropy: where kept, it is the reference's
    kept = k > 0
    assert kept.any() == (level == 0)
    if level == 0:
        assert set(k[kept].tolist()) >= {2, 3, 4}
    np.testing.assert_array_equal(k[kept], want_k[kept])
    back = res.copy()
    ar_undo(back, k)
    np.testing.assert_array_equal(back, rows)
