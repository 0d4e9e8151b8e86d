"""A user's own round-trip tests, written only against seqkv.testing and seqkv's public API: what the README's
testing section shows, and that the assertions fail when a round trip is not what they check."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import seqkv
import seqkv.testing
from seqkv.testing import assert_lossless_roundtrip, assert_within_bound, caches, configs, containers

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(caches(special_values=True))
def test_lossless_round_trip_keeps_every_bit(cache):
    blob = assert_lossless_roundtrip(cache)
    assert seqkv.inspect(blob)["preset"] == "lossless"


@SETTINGS
@given(caches(with_config=True), configs(lossless=False, lloydmax=False))
def test_lossy_round_trip_is_within_half_a_step(cache_and_config, options):
    cache, config = cache_and_config
    blob = assert_within_bound(cache, config=config, **options)
    assert seqkv.inspect(blob)["preset"] == options["preset"]


@SETTINGS
@given(containers())
def test_containers_decode_to_what_they_say(blob):
    info = seqkv.inspect(blob)
    cache = seqkv.decode(blob)
    assert len(cache.layers) == info["layers"]
    assert tuple(cache.layers[0].keys.shape) == (1, info["kv_heads"], info["tokens"], info["head_dim"])
    assert str(cache.layers[0].keys.dtype) == f"torch.{info['dtype']}"


@settings(max_examples=20, deadline=None)
@given(caches(dtypes=[torch.float16]))
def test_caches_draws_what_it_is_asked_for(cache):
    layer = cache.layers[0]
    assert layer.keys.dtype == torch.float16 and layer.keys.shape[0] == 1
    assert 1 <= len(cache.layers) <= 3 and 1 <= layer.keys.shape[2] <= 40
    assert bool(torch.isfinite(layer.keys).all())   # special values only when asked


FEW = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FEW
@given(caches(special_values=True))
def test_assert_lossless_roundtrip_fails_on_one_flipped_bit(cache):
    real_decode = seqkv.testing.decode

    def flipping_decode(data, **kw):
        out = real_decode(data, **kw)
        values = out.layers[-1].values
        values.view(torch.int32 if values.dtype == torch.float32 else torch.int16).view(-1)[-1] ^= 1
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(seqkv.testing, "decode", flipping_decode)
        with pytest.raises(AssertionError, match="not bit-exact"):
            assert_lossless_roundtrip(cache)
    with pytest.raises(ValueError, match="lossless"):
        assert_lossless_roundtrip(cache, preset="balanced")


@FEW
@given(caches(with_config=True, tokens=(40, 40), dtypes=[torch.float32]))
def test_assert_within_bound_fails_past_half_a_step(cache_and_config):
    cache, config = cache_and_config
    assert_within_bound(cache, config=config, preset="balanced")
    # the container of the same cache with every value after the sinks moved by 0.6 steps
    moved = seqkv.decode(seqkv.encode(cache, preset="lossless"))
    for layer in moved.layers:
        rms = layer.values[:, :, 4:].pow(2).mean().sqrt()
        layer.values[:, :, 4:] += 0.6 * 0.25 * rms
    with pytest.raises(AssertionError, match="outside the quantizer's bound"):
        assert_within_bound(cache, config=config, data=seqkv.encode(moved, config=config, preset="balanced"))
    with pytest.raises(ValueError, match="no max-error bound"):
        assert_within_bound(cache, config=config, preset="balanced", quantizer="lloydmax", bits=3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(caches(with_config=True, tokens=(1, 12)), configs())
def test_configs_are_valid_encode_keywords(cache_and_config, options):
    cache, config = cache_and_config
    assert seqkv.inspect(seqkv.encode(cache, config=config, **options))["preset"] == options["preset"]
