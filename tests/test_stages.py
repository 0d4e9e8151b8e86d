"""Property tests for each stage on its own."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from seqkv.ans_coding import TABLE_TOTAL, decode_symbols, encode_symbols, read_table, table_from_symbols, write_table
from seqkv.errors import ConfigError, FormatError, NonFiniteError
from seqkv.layout import ModelLayout
from seqkv.stages import registered_stages, stage_from_config
from seqkv.stages.base import TensorContext
from seqkv.stages.context_ans import ContextANS
from seqkv.stages.hadamard import HadamardRotation
from seqkv.stages.quantize_lloydmax import LloydMaxQuantizer, lloyd_max_levels
from seqkv.stages.quantize_uniform import UniformQuantizer
from seqkv.stages.rope import PreRope
from seqkv.wire import Reader

SETTINGS = settings(max_examples=40, deadline=None)
shapes = st.tuples(st.integers(1, 3), st.integers(0, 40), st.sampled_from([2, 4, 8, 16]))


def layout_for(dim, theta=10000.0):
    inv = tuple((1.0 / theta ** (np.arange(0, dim, 2) / dim)).astype(np.float32).tolist())
    return ModelLayout(layers=1, kv_heads=1, head_dim=dim, rope_inv_freq=inv)


def tensor(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    if shape[1] > 2:  # a few large-norm outliers, like attention sinks and outlier channels
        x[:, 0] *= 30
        x[..., 0] += 5
    return x


def ctx(kind, tokens, dim, start=0):
    return TensorContext(layer=0, kind=kind, positions=torch.arange(start, start + tokens), layout=layout_for(dim))


@SETTINGS
@given(shapes, st.integers(0, 2**31 - 1), st.integers(0, 10000))
def test_prerope_inverts(shape, seed, start):
    x = tensor(shape, seed)
    stage = PreRope()
    c = ctx("keys", shape[1], shape[2], start)
    y = stage.forward(x, c)
    assert torch.allclose(stage.inverse(y, c), x, atol=1e-3, rtol=1e-4)
    assert torch.equal(stage.forward(x, ctx("values", shape[1], shape[2])), x)  # values pass through
    if shape[1] > 1 and start == 0:  # position 0 is the identity rotation
        assert torch.allclose(y[:, 0], x[:, 0], atol=1e-5)


@SETTINGS
@given(shapes, st.integers(0, 2**31 - 1), st.integers(0, 1000))
def test_hadamard_orthogonal_and_inverts(shape, seed, rot_seed):
    x = tensor(shape, seed)
    stage = HadamardRotation(seed=rot_seed)
    c = ctx("values", shape[1], shape[2])
    y = stage.forward(x, c)
    assert torch.allclose(stage.inverse(y, c), x, atol=1e-3, rtol=1e-4)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-3, rtol=1e-4)


@SETTINGS
@given(shapes, st.integers(0, 2**31 - 1), st.floats(0.01, 2.0), st.floats(0.2, 0.5), st.sampled_from(["keys", "values"]),
       st.floats(0.0, 1.0))
def test_uniform_error_bound(shape, seed, step, rounding, kind, gamma):
    x = tensor(shape, seed)
    q = UniformQuantizer(step=step, rounding=rounding, key_channel_gamma=gamma)
    c = ctx(kind, shape[1], shape[2])
    symbols, side = q.quantize(x, c)
    steps = q.read_side(Reader(side), shape[0], shape[2])
    xhat = q.dequantize(torch.from_numpy(symbols), steps, c)
    bound = q.max_abs_error(steps)[:, None, :] * (1 + 1e-5) + 1e-6
    assert symbols.dtype == np.int32 and symbols.shape == shape
    assert bool(((xhat - x).abs() <= bound).all())


def test_uniform_rejects_non_finite_and_bad_config():
    x = torch.zeros(1, 4, 4)
    x[0, 1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="lossless"):
        UniformQuantizer().quantize(x, ctx("values", 4, 4))
    for bad in [{"step": 0}, {"step": float("nan")}, {"rounding": 0.9}, {"key_channel_gamma": -1}, {"nope": 1}, {"step": "x"}]:
        with pytest.raises(ConfigError):
            UniformQuantizer(**bad)


@SETTINGS
@given(shapes, st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_lloydmax_levels_and_bound(shape, seed, bits):
    x = tensor(shape, seed)
    q = LloydMaxQuantizer(bits=bits)
    c = ctx("values", shape[1], shape[2])
    symbols, side = q.quantize(x, c)
    parsed = q.read_side(Reader(side), shape[0], shape[2])
    xhat = q.dequantize(torch.from_numpy(symbols), parsed, c)
    levels = torch.from_numpy(lloyd_max_levels(bits))
    assert symbols.min(initial=0) >= -(1 << (bits - 1)) and symbols.max(initial=0) < 1 << (bits - 1)
    # every value lands on its nearest level
    scale = parsed[0][:, None, :]
    nearest = ((x / scale)[..., None] - levels).abs().min(-1).values * scale
    assert bool(((xhat - x).abs() <= nearest * 1.0001 + 1e-5).all())
    assert torch.allclose(levels, -levels.flip(0), atol=1e-5)  # symmetric


def test_lloydmax_known_levels():
    # the 1-bit Lloyd-Max quantizer of N(0,1) has levels +-sqrt(2/pi)
    assert np.allclose(lloyd_max_levels(1), [-0.79788, 0.79788], atol=1e-3)
    assert np.allclose(lloyd_max_levels(2), [-1.510, -0.4528, 0.4528, 1.510], atol=2e-3)


@SETTINGS
@given(arrays(np.int64, st.integers(0, 2000), elements=st.integers(-10000, 10000)))
def test_ans_round_trip(symbols):
    table = table_from_symbols(symbols)
    assert int(table.freqs.sum()) == TABLE_TOTAL and table.freqs.min() >= 1
    words = encode_symbols(symbols, table)
    buf = bytearray()
    write_table(buf, table)
    back = read_table(Reader(bytes(buf)))
    assert back.lo == table.lo and np.array_equal(back.freqs, table.freqs)
    out = decode_symbols(words, back, symbols.size)
    assert np.array_equal(out, symbols)
    ref = decode_symbols(words, back, symbols.size, use_ext=False)
    assert np.array_equal(ref, symbols)


def test_ans_detects_wrong_count_and_garbage():
    rng = np.random.default_rng(0)
    symbols = rng.integers(-5, 5, 1000)
    table = table_from_symbols(symbols)
    words = encode_symbols(symbols, table)
    for use_ext in (True, False):
        with pytest.raises(FormatError):
            decode_symbols(words, table, 999, use_ext=use_ext)
        with pytest.raises(FormatError):
            decode_symbols(np.concatenate([words, [12345]]).astype(np.uint32), table, 1000, use_ext=use_ext)


@SETTINGS
@given(st.tuples(st.integers(1, 3), st.integers(0, 50), st.integers(1, 8)), st.integers(0, 2**31 - 1),
       st.sampled_from([1, 10, 1000, 2**20, 2**29]), st.integers(1, 8))
def test_context_ans_round_trip(shape, seed, spread, classes):
    rng = np.random.default_rng(seed)
    q = (rng.laplace(0, 1, shape) * spread * rng.random((shape[0], 1, shape[2]))).astype(np.int64)
    q += rng.integers(-100, 100, (shape[0], 1, shape[2]))  # per-channel offsets
    q = np.clip(q, -(2**30), 2**30).astype(np.int32)
    coder = ContextANS(classes_per_octave=classes)
    data = coder.encode(q)
    reader = Reader(data)
    out = coder.decode(reader, shape)
    reader.expect_end()
    assert np.array_equal(out, q)


def test_registry_builds_every_stage_from_its_config():
    for sid in registered_stages():
        stage = stage_from_config({"id": sid})
        assert stage_from_config(stage.get_config()).get_config() == stage.get_config()
    for bad in [None, {}, {"id": 3}, {"id": "nope"}, {"id": "uniform", "step": -1}]:
        with pytest.raises(ConfigError):
            stage_from_config(bad)


def test_rope_angles_follow_position_content_not_identity():
    x = tensor((1, 4, 8), 3)
    inv = torch.tensor(layout_for(8).inv_freq_array())
    from seqkv.stages.rope import apply_rope

    a = apply_rope(x, torch.tensor([0, 1, 2, 9]), inv, 1.0)
    b = apply_rope(x, torch.tensor([0, 5, 6, 9]), inv, 1.0)  # same count and endpoints, other middle
    assert not torch.allclose(a[:, 1:3], b[:, 1:3])
    assert torch.allclose(a[:, [0, 3]], b[:, [0, 3]])
