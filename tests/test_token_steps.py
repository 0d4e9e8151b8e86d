"""Soft pruning: per-token step codes in klt_uniform (docs/format.md §5.4) and the codes' choice from attention."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import seqkv
from seqkv.codec import encode_with_token_steps
from seqkv.errors import ConfigError, FormatError, SeqKVError
from seqkv.format.reader import open_container
from seqkv.hf_adapter import cache_layers
from seqkv.model_calls import cache_of
from seqkv.stages.base import TensorContext
from seqkv.stages.quantize_klt import (
    MAX_TOKEN_CODE, read_token_codes, token_multipliers, write_token_codes,
)
from seqkv.token_importance import (
    DEFAULT_MIN_TOKENS, MAX_SOFT_CODE, RECENT_TOKENS, REFERENCE_QUANTILE, expected_attention, reader_attention,
    token_step_codes, uniform_weights,
)
from seqkv.wire import Reader
from conftest import tiny_model, tiny_profile


def encode_with_codes(model, profile, cache, codes, scale=0.05):
    """A calibrated container at a fixed scale with the given step codes (None: uniform steps)."""
    return encode_with_token_steps(cache, profile, None if codes is None else uniform_weights(codes), scale=scale,
                                   model=model)


@torch.no_grad()
def _cache(model, tokens=64, seed=5):
    ids = torch.randint(0, 96, (1, tokens), generator=torch.Generator().manual_seed(seed))
    return ids[0], cache_of(model(ids, use_cache=True))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, MAX_TOKEN_CODE), min_size=0, max_size=300))
def test_token_codes_round_trip(codes):
    codes = np.array(codes, dtype=np.uint8)
    out = bytearray()
    write_token_codes(out, codes)
    got = read_token_codes(Reader(bytes(out), what="t"))
    if codes.size and codes.any():
        assert np.array_equal(got, codes)
    else:
        assert got is None and bytes(out) == b"\x00"


@pytest.mark.parametrize("blob", [b"\x02", b"\x01", b"\x01\x05", b"\x01\x03\x00\x29\x01"])
def test_bad_token_code_blocks_are_format_errors(blob):
    with pytest.raises(FormatError):
        read_token_codes(Reader(blob, what="t"))


def test_multipliers_are_quarter_octaves():
    assert np.allclose(token_multipliers(np.array([0, 4, 8, 2], np.uint8)), [1, 2, 4, 2 ** 0.5])


def test_token_steps_round_trip_and_coarser_where_coded():
    model = tiny_model("llama")
    profile = tiny_profile("llama")
    _ids, cache = _cache(model)
    layers = cache_layers(cache)
    codes = np.zeros(64, np.uint8)
    codes[10:40] = 12                                   # 8x coarser steps on tokens 10..39
    table = {(i, kind): codes for i in range(len(layers)) for kind in ("keys", "values")}
    plain = encode_with_codes(model, profile, cache, None)
    soft = encode_with_codes(model, profile, cache, table)
    assert len(soft) < len(plain)
    header = seqkv.inspect(soft)
    assert header["pipeline"]["quantizer"]["token_steps"] is True
    assert "token_steps" not in seqkv.inspect(plain)["pipeline"]["quantizer"]   # old bytes unchanged
    a, b = seqkv.decode(plain, profile=profile), seqkv.decode(soft, profile=profile)
    for (k, v), lp, ls in zip(layers, a.layers, b.layers):
        for x, yp, ys in ((k, lp.keys[0], ls.keys[0]), (v, lp.values[0], ls.values[0])):
            err_plain, err_soft = (yp - x).pow(2).mean((0, 2)), (ys - x).pow(2).mean((0, 2))
            assert err_soft[10:40].mean() > 4 * err_plain[10:40].mean()     # coarse where coded
            assert torch.allclose(err_soft[40:], err_plain[40:], rtol=0.5, atol=1e-9) or \
                err_soft[40:].mean() < 2 * err_plain[40:].mean() + 1e-12     # elsewhere about as before
    # the decoder reproduces the encoder's reconstruction: a second decode is bit-identical
    again = seqkv.decode(soft, profile=profile)
    assert all(torch.equal(x.keys, y.keys) for x, y in zip(again.layers, b.layers))


def test_a_section_whose_code_count_differs_from_its_tokens_is_refused():
    model = tiny_model("llama")
    profile = tiny_profile("llama")
    _ids, cache = _cache(model)
    codes = np.zeros(64, np.uint8)
    codes[5:20] = 4
    table = {(i, kind): codes for i in range(len(cache.layers)) for kind in ("keys", "values")}
    blob = encode_with_codes(model, profile, cache, table)
    reader = open_container(blob)
    reader.use_profile(profile)
    h = reader.header
    ctx = TensorContext(layer=0, kind="keys", positions=torch.arange(h.tokens), layout=h.layout, state=reader.state)
    parts = reader.pipeline.read_symbols(reader.section("layer.0.keys"), ctx, h.dtype, (h.kv_heads, h.tokens, h.head_dim))
    assert parts.side.codes is not None and parts.side.codes.size == parts.symbols.shape[1]
    with pytest.raises(FormatError, match="token step codes"):
        reader.pipeline.quantizer.dequantize(torch.from_numpy(parts.symbols[:, 1:]), parts.side, ctx)


def test_encode_soft_prunes_by_default_where_the_probe_observes_queries():
    model = tiny_model("llama")
    profile = tiny_profile("llama")
    ids, cache = _cache(model, tokens=DEFAULT_MIN_TOKENS)
    soft = seqkv.encode(cache, model=model, profile=profile, target_kl=0.05, token_ids=ids, token_steps=True)
    assert seqkv.inspect(soft)["pipeline"]["quantizer"].get("token_steps") is True
    default = seqkv.encode(cache, model=model, profile=profile, target_kl=0.05, token_ids=ids)
    assert default == soft
    # a shorter cache (the probe's windows not full): uniform steps by default, soft pruning when asked
    short_ids, short = _cache(model, tokens=96)
    assert "token_steps" not in seqkv.inspect(seqkv.encode(short, model=model, profile=profile, target_kl=0.05,
                                                           token_ids=short_ids))["pipeline"]["quantizer"]
    asked = seqkv.encode(short, model=model, profile=profile, target_kl=0.05, token_ids=short_ids, token_steps=True)
    assert seqkv.inspect(asked)["pipeline"]["quantizer"].get("token_steps") is True
    # off when asked, without a closed loop, and with the measured start (its sensitivities are uniform steps')
    for kwargs in (dict(token_ids=ids, token_steps=False), dict(closed_loop=False),
                   dict(token_ids=ids, loop_start="measured")):
        plain = seqkv.encode(cache, model=model, profile=profile, target_kl=0.05, **kwargs)
        assert "token_steps" not in seqkv.inspect(plain)["pipeline"]["quantizer"]
    seqkv.decode(soft, profile=profile)


@pytest.mark.parametrize("kwargs", [dict(closed_loop=False, token_steps=True), dict(scale=0.05, token_steps=True),
                                    dict(target_kl=0.05, token_steps="yes"),
                                    dict(target_kl=0.05, token_steps=True, loop_start="measured")])
def test_token_steps_needs_the_probe(kwargs):
    model = tiny_model("llama")
    ids, cache = _cache(model, tokens=96)
    kwargs.setdefault("target_kl", None) if "scale" in kwargs else kwargs.setdefault("target_kl", 0.05)
    with pytest.raises(ConfigError):
        seqkv.encode(cache, model=model, profile=tiny_profile("llama"), token_ids=ids,
                     **{k: v for k, v in kwargs.items() if v is not None})


def test_codes_follow_attention_and_spare_sinks_and_important_tokens():
    tokens = 300
    rng = np.random.default_rng(0)
    a = rng.lognormal(size=tokens)
    all_codes = token_step_codes([a, a], sink_tokens=4, beta=0.5, recent_tokens=0)
    # layer 0 keeps its steps: repeat prediction reads which token repeats which off its symbols
    assert not all_codes[(0, "keys")].any() and not all_codes[(0, "values")].any()
    codes = all_codes[(1, "keys")]
    assert (codes == all_codes[(1, "values")]).all()
    body = slice(4, tokens)
    assert (codes[:4] == 0).all()
    order = np.argsort(a[body])
    assert (np.diff(codes[body][order].astype(int)) <= 0).all()       # less attention -> coarser (not finer)
    assert (codes[body][a[body] >= np.quantile(a[body], REFERENCE_QUANTILE)] == 0).all()
    assert codes.max() > 0
    with pytest.raises(ConfigError):
        token_step_codes([a], 4, beta=-1)
    # the encoder's codes stop at MAX_SOFT_CODE (4x steps); the cap binds on the least attended tokens
    spread = np.exp(np.linspace(0, -20, tokens))
    capped = token_step_codes([spread, spread], 4)[(1, "keys")]
    uncapped = token_step_codes([spread, spread], 4, max_code=MAX_TOKEN_CODE)[(1, "keys")]
    assert capped.max() == MAX_SOFT_CODE < uncapped.max()
    assert np.array_equal(capped, np.minimum(uncapped, MAX_SOFT_CODE))
    for bad in (-1, MAX_TOKEN_CODE + 1, 2.5):
        with pytest.raises(ConfigError):
            token_step_codes([a], 4, max_code=bad)


def test_the_recent_tokens_the_probe_cannot_measure_keep_full_precision():
    """The probe re-reads its tail after the tokens before it, never the tail's own decoded KV; the continuation
    reads the last tokens most.  The encoder's codes spare them, whatever the readers expect of them."""
    tokens = 300
    fading = np.exp(np.linspace(0, -20, tokens))        # the later the token, the less attention expected
    spared = token_step_codes([fading, fading], 4)[(1, "keys")]
    readers = token_step_codes([fading, fading], 4, recent_tokens=0)[(1, "keys")]
    assert (readers[-RECENT_TOKENS:] == MAX_SOFT_CODE).all()
    assert (spared[-RECENT_TOKENS:] == 0).all()
    assert np.array_equal(spared[:-RECENT_TOKENS], readers[:-RECENT_TOKENS])
    # a cache shorter than the sinks plus the recent tokens: everything at code 0, nothing out of range
    short = token_step_codes([fading[:40], fading[:40]], 4)[(1, "values")]
    assert short.shape == (40,) and not short.any()
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError):
            token_step_codes([fading], 4, recent_tokens=bad)


def test_the_probe_observes_the_tail_and_the_window_before_it():
    model = tiny_model("llama")
    ids, cache = _cache(model, tokens=80)
    layers = cache_layers(cache)
    from seqkv.kl_probe import TailProbe
    from seqkv.layout import layout_from_model
    probe = TailProbe(model, layers, torch.arange(80), ids, 20)
    assert len(probe.queries) == len(layers) and probe.queries[0].shape[1] == 40
    att = expected_attention(probe.queries, layers, 80, layout_from_model(model))
    assert len(att) == len(layers) and att[0].shape == (80,)
    assert all(np.isfinite(x).all() and (x >= 0).all() and x.sum() == pytest.approx(1.0) for x in att)
    # the reference the probe measures against is the same with or without the observation
    tail_only = TailProbe(model, layers, torch.arange(80), ids[-20:], 20)
    assert torch.allclose(probe.windows[0].reference, tail_only.windows[0].reference)
    assert len(probe.windows) == 2 and len(tail_only.windows) == 1 and probe.tokens == 40
    # only the tail's ids: the probe works, but observes nothing (token_steps=True then refuses)
    assert tail_only.queries == {}


def test_codes_serve_the_window_before_the_tail_too():
    """The loop measures the window before the tail: the attention its reader pays a token (renormalised) is a
    floor under the token's importance, next to the continuation's."""
    model = tiny_model("llama")
    ids, cache = _cache(model, tokens=80)
    layers = cache_layers(cache)
    from seqkv.kl_probe import TailProbe
    from seqkv.layout import layout_from_model
    layout = layout_from_model(model)
    probe = TailProbe(model, layers, torch.arange(80), ids, 20)
    cut = probe.windows[1].start
    both = reader_attention(probe, layers, torch.arange(80), layout)
    later = expected_attention(probe.queries, layers, 80, layout)
    earlier = expected_attention(probe.queries, [(k[:, :cut], v[:, :cut]) for k, v in layers], cut, layout)
    for b, a, e in zip(both, later, earlier):
        assert b.shape == (80,) and b.sum() == pytest.approx(1.0) and (b >= 0).all()
        unnormalised = b * np.maximum(a, np.concatenate([e, np.zeros(80 - cut)])).sum()
        assert np.allclose(unnormalised[:cut], np.maximum(a[:cut], e)) and np.allclose(unnormalised[cut:], a[cut:])
        assert (e > a[:cut]).any()   # the window's reader does weigh some tokens more than the continuation's
    # a probe of its tail alone has one reader: the continuation's
    tail_only = TailProbe(model, layers, torch.arange(80), ids, 20)
    tail_only.windows = tail_only.windows[:1]
    assert all(np.allclose(x, y) for x, y in zip(reader_attention(tail_only, layers, torch.arange(80), layout), later))


@pytest.mark.parametrize("flags, message", [(["--no-soft-prune"], "--no-soft-prune is for --target-kl"),
                                            (["--no-soft-prune", "--bits-per-element", "3"], "--no-soft-prune is for"),
                                            (["--soft-prune", "--no-soft-prune", "--target-kl", "0.01"], "contradict")])
def test_cli_soft_prune_flags_are_checked(tmp_path, capsys, flags, message):
    from seqkv.cli import main

    assert main(["encode", *flags, "-o", str(tmp_path / "x.skv")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.skv").exists()

