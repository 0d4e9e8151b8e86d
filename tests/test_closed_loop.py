"""Closed-loop rate control: the tail probe, token recovery from layer 0, and the measured-KL search."""
from __future__ import annotations

import math

import pytest
import torch

import seqkv
from seqkv.errors import ConfigError, EncodeError
from seqkv.hf_adapter import cache_layers
from seqkv.kl_probe import (
    MIN_PROBE_TOKENS, OpenLoopWarning, TailProbe, probe_length, recover_token_ids,
)
from seqkv.layout import layout_from_model
from seqkv.model_calls import cache_of
from seqkv.rate_control import LOOP_ACCEPT, LOOP_MAX_STEPS, scale_for_measured_kl
from conftest import tiny_model, tiny_profile


@torch.no_grad()
def _prefill(model, tokens: int, seed: int = 3):
    ids = torch.randint(0, 96, (1, tokens), generator=torch.Generator().manual_seed(seed))
    return ids[0], cache_of(model(ids, use_cache=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layer0_keys_identify_the_tokens(dtype):
    model = tiny_model("llama")
    ids, cache = _prefill(model, 80)
    keys = cache.layers[0].keys[0].to(dtype)
    got = recover_token_ids(model, keys, torch.arange(80), layout_from_model(model))
    assert got is not None and torch.equal(got, ids)


def test_keys_of_another_model_identify_nothing():
    ids, cache = _prefill(tiny_model("llama"), 80)
    other = tiny_model("qwen2")   # same shapes, other weights (and k_proj biases)
    assert recover_token_ids(other, cache.layers[0].keys[0], torch.arange(80), layout_from_model(other)) is None


def test_probe_of_an_exact_copy_measures_zero_and_of_noise_more():
    model = tiny_model("llama")
    ids, cache = _prefill(model, 96)
    layers = cache_layers(cache)
    probe = TailProbe(model, layers, torch.arange(96), ids, probe_length(96))
    assert probe.length == 24
    assert probe.mean_kl(layers) == pytest.approx(0.0, abs=1e-7)
    gen = torch.Generator().manual_seed(0)
    noisy = [(k + 0.5 * torch.randn(k.shape, generator=gen), v + 0.5 * torch.randn(v.shape, generator=gen))
             for k, v in layers]
    assert probe.mean_kl(noisy) > 1e-5


def test_short_caches_get_no_probe():
    assert probe_length(4 * MIN_PROBE_TOKENS - 1) == 0
    assert probe_length(4 * MIN_PROBE_TOKENS) == MIN_PROBE_TOKENS
    assert probe_length(100_000) == 256


def _gauss_kl(c: float):
    calls = []

    def measure(scale: float) -> float:
        calls.append(scale)
        return c * scale ** 2
    return measure, calls


@pytest.mark.parametrize("c", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("off", [0.2, 1.0, 5.0])
def test_search_lands_inside_the_accepted_band(c, off):
    """Started within 5x of the answer (the prediction's usual error), it lands in the band."""
    measure, calls = _gauss_kl(c)
    scale, kl, count = scale_for_measured_kl(measure, 0.01, off * math.sqrt(0.009 / c))
    assert LOOP_ACCEPT * 0.01 <= kl <= 0.01
    assert kl == pytest.approx(c * scale ** 2) and count == len(calls) <= LOOP_MAX_STEPS


@pytest.mark.parametrize("start", [1e-5, 1e3])
def test_search_far_off_still_fits_the_goal_stepping_at_most_a_factor_4(start):
    measure, calls = _gauss_kl(30.0)
    _scale, kl, _count = scale_for_measured_kl(measure, 0.01, start)
    assert kl <= 0.01
    steps = [abs(math.log(b / a)) for a, b in zip(calls, calls[1:])]
    assert max(steps) <= math.log(4.0) + 1e-9


def test_search_never_returns_a_kl_above_the_goal_even_when_the_measure_is_erratic():
    gen = torch.Generator().manual_seed(5)
    for _ in range(50):
        wobble = {}

        def measure(scale):
            # KL ~ scale^2 times a factor in [0.5, 2] that changes with the scale, like a probe's noise
            wobble.setdefault(scale, float(torch.empty(()).uniform_(math.log(0.5), math.log(2.0), generator=gen)))
            return 20.0 * scale ** 2 * math.exp(wobble[scale])

        scale, kl, _count = scale_for_measured_kl(measure, 0.01, 0.02)
        assert kl <= 0.01 and kl == measure(scale)


def test_search_refuses_a_goal_no_scale_reaches():
    with pytest.raises(EncodeError, match="finest"):
        scale_for_measured_kl(lambda s: 1.0, 0.01, 0.05)


def test_closed_loop_encode_records_the_kl_it_measured():
    model, profile = tiny_model("llama"), tiny_profile("llama")
    ids, cache = _prefill(model, 160)
    blob = seqkv.encode(cache, model=model, profile=profile, target_kl=0.01)
    rc = seqkv.inspect(blob)["rate_control"]
    assert rc["probe_tokens"] == 80 and 1 <= rc["measurements"]   # the tail (40) and the 40 tokens before it
    assert rc["measured_kl"] <= 0.01
    # the same probe, built here from the known ids, measures the same KL on the decoded cache
    probe = TailProbe(model, cache_layers(cache), torch.arange(160), ids, 40)
    assert probe.mean_kl(cache_layers(seqkv.decode(blob, profile=profile))) == pytest.approx(rc["measured_kl"],
                                                                                              rel=1e-5, abs=1e-9)
    # token_ids given gives the same container (recovery found the same ids)
    assert seqkv.encode(cache, model=model, profile=profile, target_kl=0.01, token_ids=ids) == blob


def test_open_loop_is_the_prediction_alone():
    model, profile = tiny_model("llama"), tiny_profile("llama")
    _ids, cache = _prefill(model, 160)
    rc = seqkv.inspect(seqkv.encode(cache, model=model, profile=profile, target_kl=0.01, closed_loop=False))
    assert "measured_kl" not in rc["rate_control"]
    # a config cannot run: the prediction, without a warning (the caller chose to encode offline)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc = seqkv.inspect(seqkv.encode(cache, config=model.config, profile=profile, target_kl=0.01))
    assert "measured_kl" not in rc["rate_control"]


def test_closed_loop_arguments_are_checked():
    model, profile = tiny_model("llama"), tiny_profile("llama")
    ids, cache = _prefill(model, 160)
    with pytest.raises(ConfigError, match="closed_loop must be"):
        seqkv.encode(cache, model=model, profile=profile, closed_loop="yes")
    with pytest.raises(ConfigError, match="no probe"):
        seqkv.encode(cache, config=model.config, profile=profile, closed_loop=True)
    with pytest.raises(ConfigError, match="targets bits_per_element"):
        seqkv.encode(cache, model=model, profile=profile, bits_per_element=3.0, closed_loop=True)
    with pytest.raises(ConfigError, match="one id each"):
        seqkv.encode(cache, model=model, profile=profile, token_ids=ids[:-1])
    with pytest.raises(ConfigError, match="integers"):
        seqkv.encode(cache, model=model, profile=profile, token_ids=ids.float())
    _short_ids, short = _prefill(model, 40)
    with pytest.raises(ConfigError, match="fewer than"):
        seqkv.encode(short, model=model, profile=profile, closed_loop=True)
    with pytest.warns(OpenLoopWarning, match="fewer than"):
        seqkv.encode(short, model=model, profile=profile)
    with pytest.raises(ConfigError, match="pruned"):
        seqkv.encode(cache, model=model, profile=profile, closed_loop=True,
                     prune=seqkv.pruner("key_norm", ratio=0.5, level="layer"))


@pytest.mark.parametrize("extra", [["--bits-per-element", "3"], ["--max-bytes", "1000"], []])
def test_cli_open_loop_is_for_a_kl_target(tmp_path, capsys, extra):
    from seqkv.cli import main

    assert main(["encode", "--open-loop", *extra, "-o", str(tmp_path / "x.skv")]) == 2
    assert "--open-loop is for --target-kl" in capsys.readouterr().err
    assert not (tmp_path / "x.skv").exists()
