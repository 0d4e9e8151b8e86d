"""seqkv.token_coding: trie-model entropy coding of token ids."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqkv.errors import ConfigError, DecodeError, EncodeError, FormatError
from seqkv.token_coding import MAGIC, decode_tokens, encode_tokens
from seqkv_ext.trie import TokenTrie

V = 64  # small vocabulary: seen and unseen tokens both common


def _trie(seqs, vocab=V):
    t = TokenTrie()
    for s in seqs:
        if len(s):
            t.insert(np.asarray(s, dtype=np.int64))
    return t


tokens = st.lists(st.integers(0, V - 1), max_size=60)
# tries built from other lists; tokens up to V + 8 so some children are outside the vocabulary
trie_seqs = st.lists(st.lists(st.integers(0, V + 8), min_size=1, max_size=30), max_size=8)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trie_seqs, tokens, st.sampled_from("ACD"), st.booleans())
def test_round_trip(seqs, toks, escape, share_prefix):
    if share_prefix and seqs:  # make the sequence start inside the trie
        toks = [t for t in seqs[0] if t < V] + toks
    trie = _trie(seqs)
    data = encode_tokens(toks, trie, V, escape=escape)
    assert data.startswith(MAGIC)
    assert decode_tokens(data, trie, V) == toks
    k = len(toks) // 2
    assert decode_tokens(data, trie, V, count=k) == toks[:k]


def test_empty_list_and_empty_trie():
    trie = TokenTrie()
    for toks in ([], [0], [V - 1] * 50, list(range(V))):
        assert decode_tokens(encode_tokens(toks, trie, V), trie, V) == toks


def test_numpy_input_and_large_vocab():
    trie = _trie([[5, 6, 7, 8], [5, 6, 9]])
    toks = np.array([5, 6, 7, 8, 40000, 49151, 0], dtype=np.int64)
    data = encode_tokens(toks, trie, 49152)
    assert decode_tokens(data, trie, 49152) == toks.tolist()


def test_known_prefix_is_cheap():
    rng = np.random.default_rng(1)
    seq = rng.integers(0, 1000, size=400).tolist()
    trie = _trie([seq])
    warm = encode_tokens(seq, trie, 1000)
    cold = encode_tokens(seq, TokenTrie(), 1000)
    assert len(warm) < len(cold) // 4


def test_bad_inputs_on_encode():
    trie = TokenTrie()
    with pytest.raises(EncodeError):
        encode_tokens([V], trie, V)
    with pytest.raises(EncodeError):
        encode_tokens([-1], trie, V)
    with pytest.raises(EncodeError):
        encode_tokens([1.5], trie, V)
    with pytest.raises(ConfigError):
        encode_tokens([1], trie, V, escape="B")
    with pytest.raises(ConfigError):
        encode_tokens([1], trie, 1)


def test_trie_mismatch_refused():
    trie = _trie([[1, 2, 3]])
    data = encode_tokens([1, 2, 3, 4], trie, V)
    other = _trie([[1, 2, 3], [4]])
    with pytest.raises(FormatError, match="different token trie"):
        decode_tokens(data, other, V)
    with pytest.raises(FormatError, match="vocab_size"):
        decode_tokens(data, trie, V + 1)
    # same contents inserted in another order: same bytes, accepted
    same = _trie([[1, 2], [1, 2, 3]])
    t2 = _trie([[1, 2, 3], [1, 2]])
    assert decode_tokens(encode_tokens([1, 2, 5], same, V), t2, V) == [1, 2, 5]


def test_max_count_bound():
    trie = TokenTrie()
    data = encode_tokens(list(range(20)), trie, V)
    with pytest.raises(FormatError):
        decode_tokens(data, trie, V, max_count=19)
    assert decode_tokens(data, trie, V, max_count=20) == list(range(20))
    # a forged huge count is refused before decoding
    head = bytearray(data[:24]) + bytes([V]) + bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x7F])
    with pytest.raises(FormatError):
        decode_tokens(bytes(head), trie, V)


def test_truncations_raise_decode_error():
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, V, size=20).tolist() for _ in range(5)]
    trie = _trie(seqs)
    toks = seqs[0][:10] + rng.integers(0, V, size=40).tolist()
    data = encode_tokens(toks, trie, V)
    for cut in range(len(data)):
        try:
            out = decode_tokens(data[:cut], trie, V)
        except DecodeError:
            continue
        assert len(out) == len(toks)  # the impossible case would be an out-of-tree exception
    with pytest.raises(FormatError):
        decode_tokens("not bytes", trie, V)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_corruption_raises_only_decode_errors(data):
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, V, size=25).tolist() for _ in range(4)]
    trie = _trie(seqs)
    toks = seqs[1][:12] + rng.integers(0, V, size=30).tolist()
    blob = bytearray(encode_tokens(toks, trie, V))
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= data.draw(st.integers(1, 255))
    extra = data.draw(st.binary(max_size=6))
    try:
        out = decode_tokens(bytes(blob) + extra, trie, V)
    except DecodeError:
        return
    assert all(0 <= t < V for t in out)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_raises_only_decode_errors(junk):
    trie = _trie([[1, 2, 3]])
    try:
        decode_tokens(junk, trie, V)
    except DecodeError:
        pass
    # garbage words behind a valid header
    head = encode_tokens([], trie, V)
    try:
        out = decode_tokens(head[:-1] + bytes([min(len(junk), 100)]) + junk, trie, V)
    except DecodeError:
        return
    assert all(0 <= t < V for t in out)
