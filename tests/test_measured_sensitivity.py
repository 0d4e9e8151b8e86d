"""Sensitivities measured through the model on the closed-loop probe (seqkv.measured_sensitivity)."""
from __future__ import annotations

import pytest
import torch

import seqkv
from seqkv.errors import ConfigError
from seqkv.hf_adapter import cache_layers
from seqkv.kl_probe import TailProbe
from seqkv.layout import layout_from_model
from seqkv.measured_sensitivity import measured_sensitivities
from seqkv.model_calls import cache_of
from seqkv.stages.klt import from_rows
from seqkv.stages.rope import keys_to_post_rope, keys_to_pre_rope
from conftest import tiny_model, tiny_profile

TOKENS, WINDOW = 160, 40


@pytest.fixture(scope="module")
def setup():
    model, profile = tiny_model("llama"), tiny_profile("llama")
    ids = torch.randint(0, 96, (1, TOKENS), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        layers = cache_layers(cache_of(model(ids, use_cache=True)))
    probe = TailProbe(model, layers, torch.arange(TOKENS), ids[0], WINDOW)
    return model, profile, layers, probe, layout_from_model(model)


def _weighted_noise(layers, profile, layout, power: float, only=None, seed: int = 0):
    """``layers`` plus Gaussian noise of weighted power ``power`` per element in the profile's metric (KLT
    component c's variance power / weight_c) on every body token; ``only``: the one section to perturb."""
    gen = torch.Generator().manual_seed(seed)
    positions, sinks = torch.arange(TOKENS), profile.sink_tokens
    out = []
    for i, pair in enumerate(layers):
        noisy = []
        for kind, x in zip(("keys", "values"), pair):
            if only not in (None, (i, kind)):
                noisy.append(x)
                continue
            part = profile.parts[(i, kind)]
            heads, tokens, dim = x.shape
            z = torch.randn(tokens - sinks, heads * dim, generator=gen) * (power / part.weights).sqrt()
            pre = keys_to_pre_rope(x, kind, positions, layout).clone()
            pre[:, sinks:] += from_rows(z @ part.basis.T, heads, dim)
            noisy.append(keys_to_post_rope(pre, kind, positions, layout))
        out.append(tuple(noisy))
    return out


def _mean_window_kl(probe, layers) -> float:
    kls = probe.window_kls(layers)
    return sum(kls) / len(kls)


def test_sensitivities_predict_the_kl_of_small_noise(setup):
    """Second order: small noise of weighted power p costs KL ~ p * sum of the sensitivities (no gain factor:
    the gain only corrects the codec's large, dead-zone errors)."""
    model, profile, layers, probe, layout = setup
    measured = measured_sensitivities(probe, layers, layout, profile, samples=16)
    assert set(measured) == set(profile.parts) and all(v > 0 for v in measured.values())
    power = 1e-4 / sum(measured.values())            # predicted KL 1e-4: well inside the quadratic regime
    kls = [_mean_window_kl(probe, _weighted_noise(layers, profile, layout, power, seed=s)) for s in range(4)]
    assert 0.6 < (sum(kls) / len(kls)) / 1e-4 < 1.6


def test_the_most_and_least_sensitive_sections_are_told_apart(setup):
    model, profile, layers, probe, layout = setup
    measured = measured_sensitivities(probe, layers, layout, profile, samples=16)
    ranked = sorted(measured, key=measured.get)
    low, high = ranked[0], ranked[-1]
    assert measured[high] > 4 * measured[low]
    power = 1e-4 / measured[high]
    kl_high = _mean_window_kl(probe, _weighted_noise(layers, profile, layout, power, only=high))
    kl_low = _mean_window_kl(probe, _weighted_noise(layers, profile, layout, power, only=low))
    assert kl_high > 2 * kl_low


def test_deterministic_for_a_seed(setup):
    model, profile, layers, probe, layout = setup
    a = measured_sensitivities(probe, layers, layout, profile, seed=3)
    assert a == measured_sensitivities(probe, layers, layout, profile, seed=3)
    assert a != measured_sensitivities(probe, layers, layout, profile, seed=4)


def test_both_loop_starts_meet_the_measured_target():
    model, profile = tiny_model("llama"), tiny_profile("llama")
    ids = torch.randint(0, 96, (1, TOKENS), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = cache_of(model(ids, use_cache=True))
    for start in ("measured", "profile"):
        rc = seqkv.inspect(seqkv.encode(cache, model=model, profile=profile, target_kl=0.01, token_ids=ids[0],
                                        loop_start=start))["rate_control"]
        assert rc["measured_kl"] <= 0.01 and rc["measurements"] >= 1
    with pytest.raises(ConfigError, match="loop_start"):
        seqkv.encode(cache, model=model, profile=profile, target_kl=0.01, loop_start="guess")
    with pytest.raises(ConfigError, match="pruned"):
        seqkv.encode(cache, model=model, profile=profile, target_kl=0.01, loop_start="profile",
                     prune=seqkv.pruner("key_norm", ratio=0.5, level="layer"))
