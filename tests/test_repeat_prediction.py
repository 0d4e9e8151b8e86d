"""Repeat prediction (format 1.4, docs/format.md §6.5): tokens that repeat an earlier run of tokens are
predicted from that run's symbols; the map comes from layer 0's symbols, so it costs no side info."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import seqkv
from conftest import tiny_model, tiny_profile
from seqkv.errors import ConfigError, FormatError
from seqkv.model_calls import cache_of
from seqkv.stages.base import CodingState, TensorContext
from seqkv.stages.predict_temporal import RepeatSide, TemporalPredictor
from seqkv.stages.repeat_map import token_ids_from_symbols
from seqkv_ext.repeat import longest_matches, repeat_undo, rows_entropy_bits
from test_format_spec import spec_longest_matches   # the format's definition (§6.5), written from the document

PATTERN = [5, 17, 3, 44, 9, 61, 23, 8, 70, 12, 33, 2]


def repeated_ids(copies: int = 4) -> torch.Tensor:
    """A passage of 12 tokens and a 6-token filler, repeated: most tokens repeat a long earlier run."""
    ids = []
    for c in range(copies):
        ids += PATTERN + [80 + c, 81, 82 + c, 83, 84, 85]
    return torch.tensor([ids])


@torch.no_grad()
def repeated_cache(dtype=torch.float32):
    model = tiny_model("llama")
    cache = cache_of(model(repeated_ids(), use_cache=True))
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
    return model, cache


@pytest.mark.parametrize("seed", range(6))
def test_longest_matches_agrees_with_the_documented_rule(seed):
    rng = np.random.default_rng(seed)
    alphabet = [2, 3, 8, 40][seed % 4]
    ids = rng.integers(0, alphabet, 300).astype(np.int32)
    src, length = longest_matches(ids, 8 if seed % 2 else 64, 32)
    want_src, want_len = spec_longest_matches(ids.tolist(), 8 if seed % 2 else 64, 32)
    assert length.tolist() == want_len
    assert src.tolist() == want_src


def test_longest_matches_rejects_ids_out_of_range():
    with pytest.raises(ValueError):
        longest_matches(np.array([0, 5], np.int32))


def test_token_ids_are_numbered_by_first_occurrence():
    keys = np.array([[[1, 2], [3, 4], [1, 2], [1, 2]]], np.int32)         # [H=1, T=4, D=2]
    values = np.array([[[0, 0], [0, 0], [0, 0], [9, 9]]], np.int32)
    assert token_ids_from_symbols(keys, values).tolist() == [0, 1, 0, 2]


def test_rows_entropy_bits():
    rows = np.array([[0, 0, 1, 1], [3, 3, 3, 3]], np.int32)
    assert rows_entropy_bits(rows).tolist() == [4.0, 0.0]


def test_repeat_undo_checks_the_map():
    cols = np.zeros((1, 3), np.int32)
    with pytest.raises(ValueError):   # token 1 predicted from itself
        repeat_undo(cols, np.zeros(1, np.uint8), np.ones(1, np.uint8), np.array([-1, 1, 0], np.int32),
                    np.array([0, 2, 0], np.int32), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_repeats_code_smaller_and_decode_to_the_same_cache(dtype):
    model, cache = repeated_cache(dtype)
    profile = tiny_profile()
    plain = seqkv.encode(cache, model=model, profile=profile, scale=0.02, repeat=False)
    blob = seqkv.encode(cache, model=model, profile=profile, scale=0.02)
    assert seqkv.inspect(blob)["format_version"] == "1.4"
    assert seqkv.inspect(plain)["format_version"] != "1.4"
    # the predictor is lossless on the quantizer's symbols: the same cache comes back
    a, b = seqkv.decode(plain, profile=profile), seqkv.decode(blob, profile=profile)
    for x, y in zip(a.layers, b.layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
    assert len(blob) < len(plain)


def test_one_layer_decodes_alone():
    model, cache = repeated_cache()
    profile = tiny_profile()
    for options in ({}, {"cross_layer": False}):
        blob = seqkv.encode(cache, model=model, profile=profile, scale=0.02, **options)
        full = seqkv.decode(blob, profile=profile)
        one = seqkv.decode(blob, profile=profile, layers=[1])
        assert torch.equal(one.layers[0].keys, full.layers[1].keys)   # the layers asked for, in order
        assert torch.equal(one.layers[0].values, full.layers[1].values)


def test_a_repeat_section_without_layer_0_is_a_format_error():
    predictor = TemporalPredictor(repeat=True)
    side = RepeatSide(np.zeros(4, np.uint8), np.ones(4, np.uint8), 2)
    ctx = TensorContext(layer=1, kind="keys", positions=torch.arange(3), layout=None, state=CodingState())
    with pytest.raises(FormatError, match="layer 0"):
        predictor.inverse(np.zeros((1, 3, 4), np.int32), side, ctx)


def test_options_are_checked():
    model, cache = repeated_cache()
    with pytest.raises(ConfigError, match="predict=True"):
        seqkv.encode(cache, model=model, profile=tiny_profile(), scale=0.02, predict=False, repeat=True)
    with pytest.raises(ConfigError, match="repeat"):
        seqkv.encode(cache, model=model, profile=tiny_profile(), scale=0.02, repeat="yes")


def test_the_store_codes_chunks_without_repeat(tmp_path):
    with pytest.raises(ConfigError, match="store chunks"):
        seqkv.PrefixStore(str(tmp_path), model=tiny_model("llama"), profile=tiny_profile(),
                          codec_options={"scale": 0.02, "repeat": True})


def test_repeat_needs_the_calibrated_quantizer():
    """A header that asks a preset pipeline for repeat prediction is refused (the profile's shape bounds the match
    finder's work, docs/format.md §6.5)."""
    from seqkv.format.pipeline import Pipeline

    config = seqkv.presets.pipeline_config("balanced")
    config["predictor"] = {"id": "temporal_ar", "repeat": True}
    with pytest.raises(ConfigError, match="klt_uniform"):
        Pipeline(config)


def test_longest_matches_ties_go_to_the_most_recent():
    ids = np.zeros(2000, np.int32)          # every earlier token matches 32 long: the first one examined wins
    src, length = longest_matches(ids, 64, 32)
    assert src[1000] == 999 and length[1000] == 32 and length[5] == 5 and src[5] == 4


def test_cli_no_repeat_is_for_the_calibrated_codec(tmp_path, capsys):
    from seqkv.cli import main

    assert main(["encode", "--no-repeat", "--preset", "balanced", "-o", str(tmp_path / "x.skv")]) == 2
    assert "--no-repeat is for the calibrated codec" in capsys.readouterr().err
    assert not (tmp_path / "x.skv").exists()
