"""Calibrated profiles, the calibrated codec, rate control and analyze(), on tiny random models."""
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqkv
from seqkv.analyze import conditional_entropy_bits, gauss_rate, column_entropy_bits
from seqkv.errors import ConfigError, EncodeError, FormatError, ModelMismatchError
from seqkv.profile import Profile, ProfileError, ProfileMismatchError
from seqkv.rate_control import BPE_TOLERANCE, KL_TOLERANCE, MAX_BYTES_SLACK

from conftest import assert_layers_decode_alone, tiny_cache, tiny_profile


def fp16_cache(tokens=96, seed=3):
    return tiny_cache("llama", tokens=tokens, dtype=torch.float16, seed=seed)


def test_calibrate_builds_an_orthonormal_klt_and_positive_sensitivities():
    profile = tiny_profile(sensitivity=None)
    layout = profile.layout
    n = layout.kv_heads * layout.head_dim
    assert len(profile.parts) == 2 * layout.layers
    for part in profile.parts.values():
        assert part.basis.shape == (n, n)
        assert torch.allclose(part.basis.T @ part.basis, torch.eye(n), atol=1e-4)
        assert bool((part.eigvals[:-1] >= part.eigvals[1:] - 1e-6).all())  # sorted by variance
        assert part.sensitivity > 0
        assert abs(float(part.weights.mean()) - 1.0) < 1e-3
    assert profile.kl_gain > 0 and len(profile.info["kl_gain_samples"]) == 4


def test_profile_save_load_round_trip_and_hash(tmp_path):
    profile = tiny_profile()
    path = tmp_path / "p.safetensors"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded.hash == profile.hash and loaded.nbytes == path.stat().st_size
    for key, part in profile.parts.items():
        assert torch.equal(loaded.parts[key].basis, part.basis)
        assert loaded.parts[key].sensitivity == part.sensitivity
    assert loaded.kl_gain == profile.kl_gain


def test_profile_hash_follows_changes():
    import hashlib

    profile = Profile.from_bytes(tiny_profile().to_bytes())
    before = profile.hash
    assert before == hashlib.sha256(profile.to_bytes()).hexdigest()
    next(iter(profile.parts.values())).sensitivity *= 2
    profile.changed()
    assert profile.hash != before and profile.hash == hashlib.sha256(profile.to_bytes()).hexdigest()


def test_calibrated_decode_gives_contiguous_tensors_and_encoder_reconstruction():
    """The decoder chains the encoder's own floats: decoding reproduces what the encoder reconstructed
    (up to the fp32 -> dtype rounding), and hands over [H, T, D] contiguous tensors like any cache."""
    import seqkv
    from seqkv.format import Pipeline
    from seqkv.stages.base import CodingState, TensorContext

    profile = tiny_profile()
    model, cache = tiny_cache("llama", tokens=60, dtype=torch.float32)
    blob = seqkv.encode(cache, profile=profile, scale=0.05)
    out = seqkv.decode(blob, profile=profile)
    assert seqkv.encode(cache, profile=profile, scale=0.05) == blob  # deterministic
    info = seqkv.inspect(blob)
    pipeline = Pipeline(info["pipeline"])
    positions = torch.arange(60)
    state = CodingState(profile=profile, chain={}, scale=info["rate_control"]["scale"])
    chain = state.chain
    for i, layer in enumerate(out.layers):
        for kind in ("keys", "values"):
            got = getattr(layer, kind)
            assert got.is_contiguous() and got.shape == (1, 2, 60, 16)
            ctx = TensorContext(layer=i, kind=kind, positions=positions, layout=profile.layout,
                                state=state)
            x = getattr(cache.layers[i], kind)[0]
            pipeline.code(x, pipeline.transform(x, ctx), ctx)  # the encoder's pass, which fills the chain
            recon = chain[kind][1]  # [H*D, T - sinks], what the encoder predicts the next layer from
            y = torch.cat([pipeline.transform(got[0], ctx)[:, :4].transpose(1, 2).reshape(32, 4), recon], 1)
            assert torch.allclose(pipeline.transform(got[0], ctx).transpose(1, 2).reshape(32, 60), y, atol=1e-4)


def _resave(profile: Profile, mutate_meta=None, mutate_tensors=None) -> bytes:
    from safetensors.torch import save

    raw = profile.to_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    meta = json.loads(header["__metadata__"]["seqkv_profile"])
    tensors = {}
    for (layer, kind), p in profile.parts.items():
        for name in ("mean", "basis", "eigvals", "weights", "cross"):
            if getattr(p, name) is not None:
                tensors[f"layer.{layer}.{kind}.{name}"] = getattr(p, name).clone()
    if mutate_meta:
        mutate_meta(meta)
    if mutate_tensors:
        mutate_tensors(tensors)
    return save(tensors, metadata={"seqkv_profile": json.dumps(meta)})


@pytest.mark.parametrize("damage", [
    lambda b: b[:4],
    lambda b: b[: len(b) // 2],
    lambda b: b"\xff" * 8 + b[8:],
    lambda b: b"not a profile at all",
])
def test_damaged_profile_files_are_refused(tmp_path, damage):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(damage(tiny_profile().to_bytes()))
    with pytest.raises(ProfileError):
        Profile.load(path)


@pytest.mark.parametrize("case,mutate_meta,mutate_tensors", [
    ("version", lambda m: m.update(version=99), None),
    ("format", lambda m: m.update(format="other"), None),
    ("gain", lambda m: m.update(kl_gain=-1.0), None),
    ("sensitivity", lambda m: m["sensitivity"].update({"0.keys": 0.0}), None),
    ("missing", lambda m: m["sensitivity"].pop("1.values"), None),
    ("basis", None, lambda t: t["layer.0.keys.basis"].mul_(2.0)),
    ("nan", None, lambda t: t["layer.1.values.mean"].fill_(float("nan"))),
    ("shape", None, lambda t: t.update({"layer.0.values.weights": torch.ones(3)})),
    ("no-cross", None, lambda t: t.pop("layer.1.keys.cross")),
    ("bad-cross", None, lambda t: t["layer.1.values.cross"].fill_(float("inf"))),
])
def test_inconsistent_profiles_are_refused(case, mutate_meta, mutate_tensors):
    with pytest.raises(ProfileError):
        Profile.from_bytes(_resave(tiny_profile(), mutate_meta, mutate_tensors))


def test_missing_profile_file_is_a_profile_error(tmp_path):
    with pytest.raises(ProfileError):
        Profile.load(tmp_path / "nope.safetensors")


def test_calibrated_round_trip_needs_the_same_profile():
    model, cache = fp16_cache()
    profile = tiny_profile()
    # open loop: the random tiny model's KL barely reacts to noise, so a measured target would allow any step
    blob = seqkv.encode(cache, profile=profile, model=model, target_kl=0.01, closed_loop=False)
    info = seqkv.inspect(blob)
    assert info["profile"] == {"sha256": profile.hash, "bytes": profile.nbytes}
    assert info["pipeline"]["preset"] == "calibrated"
    decoded = seqkv.decode(blob, profile=profile, model=model)
    for a, b in zip(decoded.layers, cache.layers):
        assert a.keys.dtype == torch.float16 and a.keys.shape == b.keys.shape
        assert torch.equal(a.keys[:, :, :4], b.keys[:, :, :4])  # exact sinks
        rel = (a.values.float() - b.values.float()).pow(2).mean() / b.values.float().pow(2).mean()
        assert rel < 0.05
    with pytest.raises(ProfileMismatchError, match="profile="):
        seqkv.decode(blob)
    other = tiny_profile(sensitivity=60.0)
    with pytest.raises(ProfileMismatchError):
        seqkv.decode(blob, profile=other)


def test_profile_from_another_model_is_refused():
    profile = tiny_profile()
    model, cache = tiny_cache("qwen2", tokens=40, dtype=torch.float16)
    with pytest.raises(ModelMismatchError):
        seqkv.encode(cache, profile=profile, model=model)


def test_targets_need_a_profile_and_exactly_one_target():
    model, cache = fp16_cache()
    with pytest.raises(ConfigError, match="profile"):
        seqkv.encode(cache, model=model, target_kl=0.01)
    with pytest.raises(ConfigError, match="one rate target"):
        seqkv.encode(cache, model=model, profile=tiny_profile(), target_kl=0.01, max_bytes=1000)
    for bad in (0.0, -1.0, float("nan"), True, "0.1"):
        with pytest.raises(ConfigError):
            seqkv.encode(cache, model=model, profile=tiny_profile(), target_kl=bad)
    with pytest.raises(ConfigError, match="does not use a profile"):
        seqkv.encode(cache, model=model, profile=tiny_profile(), preset="balanced")
    with pytest.raises(ConfigError, match="unknown option"):
        seqkv.encode(cache, model=model, profile=tiny_profile(), step=0.3)


def test_lossless_ignores_the_profile():
    model, cache = fp16_cache()
    blob = seqkv.encode(cache, preset="lossless", model=model, profile=tiny_profile())
    assert "profile" not in seqkv.inspect(blob) or seqkv.inspect(blob)["profile"] is None
    out = seqkv.decode(blob)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(out.layers, cache.layers))


@pytest.mark.parametrize("target", [0.002, 0.01, 0.05])
def test_target_kl_lands_just_under_the_target(target):
    model, cache = fp16_cache(tokens=160)
    rc = seqkv.inspect(seqkv.encode(cache, model=model, profile=tiny_profile(), target_kl=target, closed_loop=False))["rate_control"]
    # bisection runs on a token subsample; the header's figure is the whole cache's
    assert target * (1 - 0.15) <= rc["predicted_kl"] <= target * 1.15
    assert rc["target"] == {"kl": target}


def test_lower_kl_targets_cost_more_bytes():
    model, cache = fp16_cache(tokens=160)
    sizes = [len(seqkv.encode(cache, model=model, profile=tiny_profile(), target_kl=t, closed_loop=False)) for t in (0.05, 0.01, 0.002)]
    assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize("bpe", [1.5, 3.0])
def test_bits_per_element_target_within_tolerance(bpe):
    model, cache = fp16_cache(tokens=160)
    info = seqkv.inspect(seqkv.encode(cache, model=model, profile=tiny_profile(), bits_per_element=bpe))
    assert abs(info["bits_per_element"] - bpe) <= max(BPE_TOLERANCE * bpe, 0.05)


@pytest.mark.parametrize("fraction", [0.12, 0.2, 0.3])
def test_max_bytes_is_never_exceeded(fraction):
    model, cache = fp16_cache(tokens=160)
    raw = sum(l.keys.numel() + l.values.numel() for l in cache.layers) * 2
    budget = int(raw * fraction)
    blob = seqkv.encode(cache, model=model, profile=tiny_profile(), max_bytes=budget)
    assert len(blob) <= budget
    assert len(blob) >= budget * (1 - 3 * MAX_BYTES_SLACK)


def test_impossible_byte_budget_is_an_encode_error():
    model, cache = fp16_cache(tokens=160)
    with pytest.raises(EncodeError, match="max_bytes"):
        seqkv.encode(cache, model=model, profile=tiny_profile(), max_bytes=100)


def test_prediction_flag_round_trips_and_is_recorded():
    model, cache = fp16_cache(tokens=120)
    for predict in (True, False):
        blob = seqkv.encode(cache, model=model, profile=tiny_profile(), scale=0.02, predict=predict)
        assert ("predictor" in seqkv.inspect(blob)["pipeline"]) == predict
        out = seqkv.decode(blob, profile=tiny_profile())
        assert out.layers[0].keys.shape == cache.layers[0].keys.shape


def test_calibrated_is_much_better_than_per_tensor_steps_at_equal_mse_on_correlated_data():
    """The KLT must pay for itself on data whose heads are correlated (a tiny model's are)."""
    model, cache = fp16_cache(tokens=200)
    profile = tiny_profile()
    blob = seqkv.encode(cache, model=model, profile=profile, scale=0.05)
    out = seqkv.decode(blob, profile=profile)
    mse = np.mean([(a.values.float() - b.values.float()).pow(2).mean().item() for a, b in zip(out.layers, cache.layers)])
    assert np.isfinite(mse) and len(blob) < sum(l.keys.numel() * 4 for l in cache.layers)


def test_analyze_reports_bits_entropies_and_bounds():
    model, cache = fp16_cache(tokens=200)
    profile = tiny_profile()
    result = seqkv.analyze(cache, profile=profile, model=model, scale=0.03)
    t = result.totals()
    info_bpe = result.bits_per_element
    assert len(result.tensors) == 2 * profile.layout.layers
    assert np.mean([a.coded for a in result.tensors]) < info_bpe  # sections only; the header is on top
    for a in result.tensors:
        assert a.coded >= a.symbol_bits + a.sink - 1e-9
        assert a.h_coded_symbols <= a.h_iid + 1e-6 or a.h_coded_symbols >= 0  # both finite, non-negative
        assert a.h_cond_prev_token <= a.h_iid + 1e-6
        assert a.gauss_rd is not None and a.gauss_rd >= 0
        assert a.gauss_rd_prev_token <= a.gauss_rd + 1e-6
    assert "| all |" in result.markdown()
    assert t["coder_overhead_vs_entropy"] > -0.05
    # a container alone (no original): no Gaussian columns, same coded figures
    again = seqkv.analyze(seqkv.encode(cache, model=model, profile=profile, scale=0.03), profile=profile)
    assert again.tensors[0].gauss_rd is None
    assert again.tensors[3].coded == result.tensors[3].coded


def test_analyze_refuses_lossless():
    model, cache = fp16_cache()
    with pytest.raises(ConfigError):
        seqkv.analyze(seqkv.encode(cache, preset="lossless", model=model))


def test_gauss_rate_matches_the_formula():
    var = torch.tensor([4.0, 1.0, 0.25])
    dist = torch.tensor([1.0, 1.0, 1.0])
    assert gauss_rate(var, dist) == pytest.approx(0.5 * np.log2(4.0))


def test_entropy_estimates_on_known_sources():
    rng = np.random.default_rng(0)
    uniform4 = rng.integers(0, 4, size=(3, 20000))
    assert column_entropy_bits(uniform4) / 20000 == pytest.approx([2.0, 2.0, 2.0], abs=0.01)
    # a deterministic sequence given the previous symbol: H(x_t | x_t-1) ~ 0
    walk = np.tile(np.arange(8), 500)[None]
    assert conditional_entropy_bits(walk) / walk.shape[1] < 0.01
    assert column_entropy_bits(walk)[0] / walk.shape[1] == pytest.approx(3.0, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 300), st.integers(0, 2**31 - 1), st.sampled_from([1, 50, 2**20]))
def test_temporal_prediction_round_trips_exactly(rows, tokens, seed, spread):
    from seqkv_ext.predict import ar_encode, ar_undo

    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.integers(-spread, spread + 1, size=(rows, tokens)), axis=1)
    noise = rng.integers(-spread, spread + 1, size=(rows, tokens))
    columns = np.where(rng.random((rows, 1)) < 0.5, walk, noise).clip(-2**30, 2**30).astype(np.int32)
    res, k, saved = ar_encode(np.ascontiguousarray(columns))
    assert saved >= 0 and k.max(initial=0) <= 4
    # rows left alone are copied; predicted rows must save bits by the estimate
    assert np.array_equal(res[k == 0], columns[k == 0])
    back = res.copy()
    ar_undo(back, k)
    assert np.array_equal(back, columns)


def test_temporal_prediction_picks_the_random_walks():
    from seqkv_ext.predict import ar_encode

    rng = np.random.default_rng(1)
    walk = np.cumsum(rng.integers(-2, 3, size=(4, 2000)), axis=1)
    iid = rng.integers(-2, 3, size=(4, 2000))
    _, k, saved = ar_encode(np.ascontiguousarray(np.concatenate([walk, iid]).astype(np.int32)))
    assert list(k[:4]) == [4, 4, 4, 4] and list(k[4:]) == [0, 0, 0, 0] and saved > 0


def test_corrupt_prediction_side_info_is_a_format_error():
    model, cache = fp16_cache(tokens=120)
    from seqkv.stages.predict_temporal import TemporalPredictor
    from seqkv.wire import Reader

    with pytest.raises(FormatError):
        TemporalPredictor().read_side(Reader(bytes([2]) + bytes(64)), 2, 16)
    with pytest.raises(FormatError):
        TemporalPredictor().read_side(Reader(bytes([1]) + bytes([9]) * 32), 2, 16)


def test_cross_layer_sections_decode_alone_in_any_order():
    model, cache = tiny_cache("llama", tokens=160, dtype=torch.float16, seed=5, layers=2)
    profile = tiny_profile()
    blob = seqkv.encode(cache, model=model, profile=profile, scale=0.03)
    assert seqkv.inspect(blob)["pipeline"]["quantizer"]["cross_layer"] is True
    assert_layers_decode_alone(blob, profile)


def test_cross_layer_prediction_is_used_and_never_much_worse():
    """On correlated layers the encoder picks residual coding for some components; the choice is
    made by empirical entropy per component, so switching it off must not be smaller by more than
    the mask bytes."""

    model, cache = fp16_cache(tokens=200)
    profile = tiny_profile()
    on = seqkv.encode(cache, model=model, profile=profile, scale=0.03)
    off = seqkv.encode(cache, model=model, profile=profile, scale=0.03, cross_layer=False)
    reader = seqkv.format.open_container(on, profile=profile)
    used = 0
    for kind in ("keys", "values"):
        use = reader.section_symbols(1, kind).side.use
        used += 0 if use is None else int(use.sum())
    assert used > 0
    assert len(on) <= len(off) * 1.02 + 64


def test_analyze_sees_the_temporal_residuals_not_the_symbols():
    """Slowly drifting KV (a random walk over tokens) makes the temporal predictor pay; the analysis must
    report the entropy of what the coder coded (the residuals), below that of the symbols."""
    from transformers import DynamicCache

    model, cache = fp16_cache(tokens=400)
    gen = torch.Generator().manual_seed(2)
    drifting = DynamicCache()
    for i, layer in enumerate(cache.layers):
        walk = lambda x: (torch.randn(x.shape, generator=gen) * 0.3).cumsum(2).to(x.dtype)  # noqa: E731
        drifting.update(walk(layer.keys), walk(layer.values), i)
    result = seqkv.analyze(drifting, profile=tiny_profile(), model=model, scale=1.0, cross_layer=False)
    assert max(a.h_iid - a.h_coded_symbols for a in result.tensors) > 0.1
    assert all(a.h_coded_symbols <= a.h_iid + 1e-9 for a in result.tensors)


@pytest.mark.filterwarnings("ignore:target_kl=.* is the profile's prediction")   # too short for a closed loop
@pytest.mark.parametrize("options", [{"target_kl": 0.01}, {"scale": 0.05}, {"bits_per_element": 2.0}])
def test_caches_of_sink_tokens_only_round_trip(options):
    """A cache no longer than the profile's sink tokens has an empty quantized body (issue 15): it encodes
    and decodes, its tokens bit-exact; one token past the sinks quantizes as usual; no token at all is
    refused as an empty cache."""
    from transformers import DynamicCache

    profile = tiny_profile()
    model = tiny_cache("llama", tokens=1)[0]
    empty = DynamicCache()
    for i in range(profile.layout.layers):
        empty.update(torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16), i)
    with pytest.raises(EncodeError, match="empty"):
        seqkv.encode(empty, model=model, profile=profile, **options)
    for tokens in range(1, profile.sink_tokens + 2):
        _, cache = tiny_cache("llama", tokens=tokens, dtype=torch.float16)
        blob = seqkv.encode(cache, model=model, profile=profile, **options)
        out = seqkv.decode(blob, profile=profile)
        assert seqkv.inspect(blob)["tokens"] == tokens
        for layer, original in zip(out.layers, cache.layers):
            for kind in ("keys", "values"):
                got, want = getattr(layer, kind), getattr(original, kind)
                assert got.shape == want.shape and got.dtype == want.dtype
                sinks = min(tokens, profile.sink_tokens)
                assert torch.equal(got[:, :, :sinks], want[:, :, :sinks])
