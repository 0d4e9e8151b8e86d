"""Tests of the lossless float coder (seqkv.stages.lossless_float)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from seqkv.errors import ConfigError, DecodeError, EncodeError
from seqkv.stages.base import stage_from_config
from seqkv.stages.lossless_float import FORMATS, MODE_CODED, MODE_RAW, LosslessFloatCoder

FMT_NAMES = sorted(FORMATS)
UINT = {"float16": np.uint16, "bfloat16": np.uint16, "float32": np.uint32}

# special bit patterns per format: +-0, +-inf, quiet / signalling NaNs with payloads, subnormals, extremes
SPECIALS = {
    "float16": [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0x7D55, 0xFFFF, 0x0001, 0x8001,
                0x03FF, 0x83FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0xBC00],
    "bfloat16": [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0x7FAB, 0xFFFF, 0x0001, 0x8001,
                 0x007F, 0x807F, 0x0080, 0x7F7F, 0xFF7F, 0x3F80, 0xBF80],
    "float32": [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001,
                0x7FABCDEF, 0xFFFFFFFF, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00800000,
                0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000, 0xBF800000],
}


def _to_bits(x: np.ndarray, fmt: str) -> np.ndarray:
    """float32 values -> bit patterns of ``fmt`` (bfloat16 by truncation: fine for test data)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if fmt == "float16":
        return x.astype(np.float16).view(np.uint16)
    if fmt == "bfloat16":
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    return x.view(np.uint32)


def kv_like(rng: np.random.Generator, heads: int, tokens: int, dim: int, fmt: str,
            repeat_frac: float = 0.3, noise: float = 1e-3) -> np.ndarray:
    """Cache-like data: channels with different scales and offsets, smooth over time, repeated
    tokens (exact and near-exact repeats of earlier rows)."""
    scale = np.exp(rng.normal(0, 1, size=(heads, 1, dim)))
    offset = rng.normal(0, 2, size=(heads, 1, dim)) * (rng.random((heads, 1, dim)) < 0.2)
    walk = np.cumsum(rng.normal(0, 0.3, size=(heads, tokens, dim)), axis=1)
    x = (offset + scale * (rng.normal(size=(heads, tokens, dim)) + 0.3 * walk)).astype(np.float32)
    for t in range(1, tokens):
        if rng.random() < repeat_frac:
            src = int(rng.integers(0, t))
            x[:, t] = x[:, src]
            if rng.random() < 0.5:
                x[:, t] *= 1 + noise * rng.normal(size=(heads, dim)).astype(np.float32)
    return _to_bits(x, fmt)


def roundtrip(coder: LosslessFloatCoder, bits: np.ndarray, fmt: str) -> bytes:
    data = coder.encode(bits, fmt)
    out = coder.decode(data, fmt, bits.shape)
    assert out.dtype == bits.dtype and out.shape == bits.shape
    np.testing.assert_array_equal(out, bits)
    # memoryview input works too
    np.testing.assert_array_equal(coder.decode(memoryview(data), fmt, bits.shape), bits)
    return data


# -- round trips ------------------------------------------------------------------------------

configs = st.fixed_dictionaries({}, optional={
    "mantissa_bits": st.integers(0, 4),
    "max_classes": st.integers(1, 16),
    "escape_depth": st.integers(1, 40),
    "neighbour_buckets": st.integers(1, 8),
    "mantissa_contexts": st.integers(1, 8),
    "residual_buckets": st.integers(1, 8),
    "table_scale_bits": st.integers(4, 16),
    "match_window": st.integers(0, 64),
    "dedup": st.booleans(),
})


@st.composite
def bit_arrays(draw):
    fmt = draw(st.sampled_from(FMT_NAMES))
    heads = draw(st.integers(1, 3))
    tokens = draw(st.integers(0, 24))
    dim = draw(st.integers(1, 9))
    nbits = 8 * np.dtype(UINT[fmt]).itemsize
    elements = st.one_of(st.sampled_from(SPECIALS[fmt]), st.integers(0, (1 << nbits) - 1))
    bits = draw(hnp.arrays(UINT[fmt], (heads, tokens, dim), elements=elements))
    if tokens > 1 and draw(st.booleans()):  # repeated rows
        src = draw(st.lists(st.integers(0, tokens - 1), min_size=tokens, max_size=tokens))
        bits = bits[:, [min(s, t) for t, s in enumerate(src)]]
    return fmt, np.ascontiguousarray(bits)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bit_arrays(), configs)
def test_roundtrip_arbitrary_bits(case, config):
    fmt, bits = case
    roundtrip(LosslessFloatCoder(**config), bits, fmt)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(FMT_NAMES), st.integers(1, 3), st.integers(0, 80), st.integers(1, 16),
       st.integers(0, 2**32 - 1), st.floats(0.0, 0.9), configs)
def test_roundtrip_cache_like(fmt, heads, tokens, dim, seed, repeat_frac, config):
    rng = np.random.default_rng(seed)
    bits = kv_like(rng, heads, tokens, dim, fmt, repeat_frac=repeat_frac)
    # sprinkle special values
    if bits.size:
        idx = rng.integers(0, bits.size, size=max(1, bits.size // 50))
        bits.ravel()[idx] = rng.choice(np.array(SPECIALS[fmt], dtype=bits.dtype), size=idx.size)
    roundtrip(LosslessFloatCoder(**config), bits, fmt)


@pytest.mark.parametrize("fmt", FMT_NAMES)
def test_zero_tokens_and_one_token(fmt):
    coder = LosslessFloatCoder()
    for shape in [(1, 0, 1), (4, 0, 64), (2, 1, 3), (1, 1, 1)]:
        bits = np.arange(np.prod(shape), dtype=UINT[fmt]).reshape(shape)
        data = roundtrip(coder, bits, fmt)
        if shape[1] == 0:
            assert data == bytes([MODE_RAW])


@pytest.mark.parametrize("fmt", FMT_NAMES)
def test_special_values_exact(fmt):
    specials = np.array(SPECIALS[fmt], dtype=UINT[fmt])
    bits = np.tile(specials, (2, 7, 1))                       # [2, 7, len(specials)]
    bits[1] = bits[1][:, ::-1]
    roundtrip(LosslessFloatCoder(), np.ascontiguousarray(bits), fmt)
    # constant tensors, all-NaN, all -0.0
    for value in specials[[0, 1, 4, 7]]:
        roundtrip(LosslessFloatCoder(), np.full((3, 20, 5), value, dtype=UINT[fmt]), fmt)


@pytest.mark.parametrize("fmt", FMT_NAMES)
def test_coded_paths_are_used_and_compress(fmt):
    """Cache-like data with repeated tokens uses the coded mode with duplicate and matched rows."""
    rng = np.random.default_rng(7)
    bits = kv_like(rng, 2, 400, 32, fmt, repeat_frac=0.4)
    data = roundtrip(LosslessFloatCoder(), bits, fmt)
    assert data[0] == MODE_CODED
    assert data[1] == 1                                          # some exact duplicate rows
    assert len(data) < 0.9 * bits.nbytes
    # matching off still round-trips, and costs more
    plain = roundtrip(LosslessFloatCoder(match_window=0, dedup=False), bits, fmt)
    assert len(plain) > len(data)


def test_random_bits_fall_back_to_raw():
    bits = np.random.default_rng(1).integers(0, 2**16, size=(2, 50, 8), dtype=np.uint16)
    data = roundtrip(LosslessFloatCoder(), bits, "float16")
    assert len(data) <= bits.nbytes + 1


# -- corrupted input ----------------------------------------------------------------------------

def _corruptions(data: bytes, rng: np.random.Generator, n: int):
    yield b""
    for cut in sorted(set(rng.integers(0, len(data), size=n // 2).tolist()) | {1, 2, len(data) - 1}):
        yield data[:cut]
    yield data + b"\x00"
    for _ in range(n):
        buf = bytearray(data)
        kind = rng.integers(0, 3)
        pos = int(rng.integers(1, len(buf)))
        if kind == 0:
            buf[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            buf[pos] = int(rng.integers(0, 256))
        else:
            del buf[pos:pos + int(rng.integers(1, 4))]
        yield bytes(buf)


@pytest.mark.parametrize("fmt", FMT_NAMES)
def test_corrupted_input_raises_only_decode_errors(fmt):
    rng = np.random.default_rng(3)
    coder = LosslessFloatCoder()
    bits = kv_like(rng, 2, 120, 16, fmt, repeat_frac=0.4)
    data = coder.encode(bits, fmt)
    assert data[0] == MODE_CODED
    detected = 0
    total = 0
    for bad in _corruptions(data, rng, 300):
        total += 1
        try:
            out = coder.decode(bad, fmt, bits.shape)
        except DecodeError:
            detected += 1
            continue
        # undetectable corruptions (e.g. in the raw mantissa bits) must still decode to the right shape
        assert out.shape == bits.shape and out.dtype == bits.dtype
    assert detected > total // 2


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(FMT_NAMES), st.integers(1, 3), st.integers(0, 20),
       st.integers(1, 8))
def test_garbage_input_raises_only_decode_errors(data, fmt, heads, tokens, dim):
    coder = LosslessFloatCoder()
    for blob in (data, bytes([MODE_CODED]) + data, bytes([MODE_CODED, 0, 0]) + data):
        try:
            out = coder.decode(blob, fmt, (heads, tokens, dim))
        except DecodeError:
            continue
        assert out.shape == (heads, tokens, dim)


def test_wrong_shape_for_data_is_detected():
    rng = np.random.default_rng(5)
    bits = kv_like(rng, 2, 50, 8, "float16")
    data = LosslessFloatCoder().encode(bits, "float16")
    for shape in [(2, 49, 8), (2, 51, 8), (1, 50, 8), (2, 50, 9)]:
        with pytest.raises(DecodeError):
            LosslessFloatCoder().decode(data, "float16", shape)


# -- configs and argument checks -----------------------------------------------------------------

def test_config_roundtrip():
    coder = LosslessFloatCoder(mantissa_bits=3, max_classes=4, escape_depth=9, match_window=0, dedup=False)
    cfg = coder.get_config()
    assert cfg["id"] == "lossless_float"
    assert json.loads(json.dumps(cfg)) == cfg
    again = LosslessFloatCoder.from_config(cfg)
    assert again.get_config() == cfg
    assert stage_from_config(cfg).get_config() == cfg
    assert LosslessFloatCoder.from_config({"id": "lossless_float"}).get_config() == LosslessFloatCoder().get_config()


@pytest.mark.parametrize("cfg", [
    {"id": "lossless_float", "nope": 1},
    {"id": "other"},
    {"id": "lossless_float", "mantissa_bits": 5},
    {"id": "lossless_float", "mantissa_bits": -1},
    {"id": "lossless_float", "mantissa_bits": "2"},
    {"id": "lossless_float", "mantissa_bits": 2.0},
    {"id": "lossless_float", "max_classes": 0},
    {"id": "lossless_float", "max_classes": True},
    {"id": "lossless_float", "escape_depth": 0},
    {"id": "lossless_float", "escape_depth": 256},
    {"id": "lossless_float", "table_scale_bits": 17},
    {"id": "lossless_float", "match_window": -1},
    {"id": "lossless_float", "dedup": 1},
    {"id": "lossless_float", "dedup": "yes"},
    {"id": "lossless_float", "neighbour_buckets": 9},
])
def test_bad_config_raises(cfg):
    with pytest.raises(ConfigError):
        LosslessFloatCoder.from_config(cfg)


def test_from_config_rejects_non_dict():
    with pytest.raises(ConfigError):
        LosslessFloatCoder.from_config(["lossless_float"])


def test_encode_checks_its_input():
    coder = LosslessFloatCoder()
    with pytest.raises(EncodeError):
        coder.encode(np.zeros((1, 2, 3), dtype=np.uint32), "float16")
    with pytest.raises(EncodeError):
        coder.encode(np.zeros((2, 3), dtype=np.uint16), "float16")
    with pytest.raises(EncodeError):
        coder.encode(np.zeros((0, 2, 3), dtype=np.uint16), "float16")
    with pytest.raises(ConfigError):
        coder.encode(np.zeros((1, 2, 3), dtype=np.uint16), "float8")


def test_decode_checks_its_arguments():
    coder = LosslessFloatCoder()
    data = coder.encode(np.zeros((1, 2, 3), dtype=np.uint16), "float16")
    with pytest.raises(ConfigError):
        coder.decode(data, "float64", (1, 2, 3))
    with pytest.raises(ConfigError):
        coder.decode(data, "float16", (0, 2, 3))
    with pytest.raises(ConfigError):
        coder.decode(data, "float16", (1, 2))
