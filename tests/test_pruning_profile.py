"""Pruning with the calibrated codec (format 1.2): layer-uniform kept positions, cross-layer
prediction across layers that keep different tokens, rate targets, and the refusals."""
import pytest
import torch

import seqkv
from seqkv.errors import ConfigError, DecodeError, UnsupportedVersionError
from seqkv.profile import ProfileMismatchError
from seqkv.pruning import pruned_state, smallest_within
from seqkv.quality import QualityProbe
from seqkv.stages.quantize_klt import aligned_columns

from conftest import assert_layers_decode_alone, tiny_cache, tiny_model, tiny_profile


def setup(tokens=160, seed=5):
    model, cache = tiny_cache("llama", tokens=tokens, dtype=torch.float16, seed=seed)
    return model, cache, tiny_profile()


def layer_pruner(ratio=0.5, level="layer"):
    return seqkv.pruner("key_norm", ratio=ratio, level=level, chunk_size=8)


@pytest.mark.parametrize("level", ["layer", "chunk"])
def test_layer_uniform_pruning_round_trips_with_a_profile(level):
    model, cache, profile = setup()
    p = layer_pruner(level=level)
    pruned = p.prune(cache, model=model)
    blob = seqkv.encode(cache, model=model, profile=profile, prune=p, target_kl=0.01)
    info = seqkv.inspect(blob)
    # pruned and calibrated is 1.2; the calibrated codec's repeat prediction (on by default) makes it 1.4
    assert info["format_version"] == "1.4" and info["pipeline"]["preset"] == "calibrated"
    assert seqkv.inspect(seqkv.encode(cache, model=model, profile=profile, prune=p, target_kl=0.01,
                                      repeat=False))["format_version"] == "1.2"
    assert info["pruning"]["source_tokens"] == 160 and info["profile"]["sha256"] == profile.hash
    assert info["rate_control"]["target"] == {"kl": 0.01}
    decoded = seqkv.decode(blob, profile=profile, model=model)
    want, got = pruned_state(pruned), pruned_state(decoded)
    assert got.next_position == 160 and got.source_tokens == 160
    for a, b in zip(got.kept, want.kept):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for a, b in zip(decoded.layers, pruned.layers):
        assert a.keys.dtype == torch.float16 and a.keys.shape == b.keys.shape
        assert torch.equal(a.keys[:, :, :4], b.keys[:, :, :4])  # the profile's exact sink tokens
        rel = (a.values.float() - b.values.float()).pow(2).mean() / b.values.float().pow(2).mean()
        assert rel < 0.05
    with pytest.raises(ProfileMismatchError, match="profile="):
        seqkv.decode(blob)


def test_a_cache_pruned_before_encodes_with_a_profile_and_is_smaller():
    model, cache, profile = setup()
    pruned = layer_pruner(0.75).prune(cache, model=model)
    small = seqkv.encode(pruned, model=model, profile=profile, scale=0.03)
    full = seqkv.encode(cache, model=model, profile=profile, scale=0.03)
    assert len(small) < 0.6 * len(full)  # a quarter of the tokens; headers and coder tables are fixed costs
    assert pruned_state(seqkv.decode(small, profile=profile)).kept_tokens() == pruned_state(pruned).kept_tokens()


def test_layers_that_keep_different_tokens_still_use_cross_layer_prediction_and_decode_in_any_order():
    model, cache, profile = setup(tokens=200)
    pruned = layer_pruner().prune(cache, model=model)
    kept = pruned_state(pruned).kept
    assert not torch.equal(kept[0][0], kept[1][0])  # the two layers keep different positions
    blob = seqkv.encode(pruned, model=model, profile=profile, scale=0.03)
    off = seqkv.encode(pruned, model=model, profile=profile, scale=0.03, cross_layer=False)
    assert len(blob) <= len(off) * 1.02 + 64
    assert_layers_decode_alone(blob, profile)


def test_aligned_columns_match_positions_and_zero_the_rest():
    columns = torch.arange(12, dtype=torch.float32).reshape(3, 4)   # [H*D, T]: one column per token
    link = (0, columns, torch.tensor([2, 5, 7, 9]))
    out = aligned_columns(link, torch.tensor([1, 5, 9, 10]), 4)
    assert torch.equal(out, torch.stack([torch.zeros(3), columns[:, 1], columns[:, 3], torch.zeros(3)], 1))
    assert aligned_columns(link, torch.tensor([2, 5, 7, 9]), 4) is columns   # same tokens: as they are
    assert aligned_columns(link, torch.tensor([0, 1]), 2) is None            # nothing in common: no prediction
    assert aligned_columns((0, columns), None, 4) is columns                 # unpruned callers give no positions


@pytest.mark.parametrize("head_budget", ["uniform", "adaptive"])
def test_per_head_pruning_with_a_profile_is_a_clear_config_error(head_budget):
    model, cache, profile = setup()
    p = seqkv.pruner("key_norm", ratio=0.5, head_budget=head_budget)
    with pytest.raises(ConfigError, match="every head of a layer must keep the same positions.*level='layer'"):
        seqkv.encode(cache, model=model, profile=profile, prune=p)
    # a preset still takes it
    assert seqkv.inspect(seqkv.encode(cache, model=model, preset="balanced", prune=p))["format_version"] == "1.1"


def test_targets_without_a_profile_are_refused_with_pruning_too():
    model, cache, _ = setup()
    with pytest.raises(ConfigError, match="need a calibrated profile"):
        seqkv.encode(cache, model=model, preset="balanced", prune=layer_pruner(), target_kl=0.01)
    with pytest.raises(ConfigError, match="does not use a profile"):
        seqkv.encode(cache, model=model, preset="balanced", prune=layer_pruner(), profile=tiny_profile())


@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_max_bytes_and_bits_per_element_with_pruning(fraction):
    model, cache, profile = setup()
    p = layer_pruner()
    ref = len(seqkv.encode(cache, model=model, profile=profile, prune=p, scale=0.01))
    budget = int(ref * fraction)
    assert len(seqkv.encode(cache, model=model, profile=profile, prune=p, max_bytes=budget)) <= budget
    # bits per element count every element of the unpruned cache (like the ratio vs fp16)
    blob = seqkv.encode(cache, model=model, profile=profile, prune=p, bits_per_element=2.0)
    info = seqkv.inspect(blob)
    assert info["bits_per_element"] == pytest.approx(2.0, rel=0.05)


def test_readers_refuse_a_wrong_or_newer_minor():
    model, cache, profile = setup(tokens=40)
    blob = bytearray(seqkv.encode(cache, model=model, profile=profile, prune=layer_pruner(), scale=0.03, repeat=False))
    assert blob[9] == 2
    blob[9] = 1  # the minor byte is outside every checksum
    with pytest.raises(DecodeError, match="preamble says format 1.1"):
        seqkv.decode(bytes(blob), profile=profile)
    import seqkv.format.container as container
    old = container.FORMAT_MINOR
    try:
        container.FORMAT_MINOR = 1  # a 1.1 reader
        blob[9] = 2
        with pytest.raises(UnsupportedVersionError):
            seqkv.decode(bytes(blob), profile=profile)
    finally:
        container.FORMAT_MINOR = old


def test_rate_control_over_pruning_searches_the_calibrated_codec():
    model = tiny_model("llama")
    profile = tiny_profile()
    ids = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(11))
    probe = QualityProbe(model, ids, prompt_len=160, continuation_len=16)
    best, tried = smallest_within(probe, model, target_kl=0.05, prune_ratios=(0.0, 0.5), profile=profile,
                                  codec_target_kls=(0.003, 0.03))
    assert {(p.prune_ratio, p.codec_target_kl) for p in tried} == {(0.0, 0.003), (0.0, 0.03), (0.5, 0.003), (0.5, 0.03)}
    assert all(p.step is None for p in tried)
    for p in tried:
        info = seqkv.inspect(p.blob)
        assert info["pipeline"]["preset"] == "calibrated"
        assert (info["pruning"] is not None) == (p.prune_ratio > 0)
    ok = [p for p in tried if p.mean_kl <= 0.05]
    assert best is not None and best.bytes == min(p.bytes for p in ok)
    _, by_scale = smallest_within(probe, model, target_kl=0.05, prune_ratios=(0.5,), profile=profile, scales=(0.01, 0.1))
    assert [p.scale for p in by_scale] == [0.01, 0.1] and by_scale[0].bytes > by_scale[1].bytes
    with pytest.raises(ConfigError):
        smallest_within(probe, model, target_kl=0.05, profile=profile, codec_target_kls=())



def test_analyze_refuses_pruned_containers():
    model, cache, profile = setup(tokens=40)
    blob = seqkv.encode(cache, model=model, profile=profile, prune=layer_pruner(), scale=0.03)
    with pytest.raises(ConfigError, match="unpruned containers only"):
        seqkv.analyze(blob, profile=profile)
