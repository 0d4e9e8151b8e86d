"""Calibration's held-out check of its KL model (issue 12, item 2), on tiny random models."""
import functools
import importlib
import json
import struct
import warnings

import pytest
import torch

import seqkv
from seqkv.calibrate import GAIN_PROBE_KL, container_weighted_mse
from seqkv.kl_prediction_check import CalibrationWarning, KLPredictionCheck, leave_one_text_out
from seqkv.profile import Profile, ProfileError

from conftest import tiny_cache, tiny_model, tiny_profile

calibrate_module = importlib.import_module("seqkv.calibrate")   # the module (seqkv.calibrate is the function)


def token_texts(count: int, length: int = 260, seed: int = 7) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (length,), generator=gen) for _ in range(count)]


def calibrated(texts) -> tuple:
    """(profile, warnings raised) of a calibration of the tiny Llama on ``texts``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        profile = seqkv.calibrate(tiny_model(), texts, prompt_len=200, continuation_len=32)
    return profile, [w for w in caught if issubclass(w.category, CalibrationWarning)]


@functools.lru_cache(maxsize=None)
def three_text_profile() -> Profile:
    return calibrated(token_texts(3))[0]


def synthetic_measurements(gain: float = 1.5):
    """Three texts whose KL the linear model predicts exactly: sensitivities alike, KL = gain * sum s * mse."""
    sens = [{"a": 1.0, "b": 2.0}] * 3
    mse = [[{"a": 0.01 * (j + 1), "b": 0.002 * (i + 1)} for i in range(2)] for j in range(3)]
    kl = [[gain * sum(sens[j][k] * mse[j][i][k] for k in "ab") for i in range(2)] for j in range(3)]
    return sens, mse, kl


def test_leave_one_text_out_of_an_exact_model_finds_no_error():
    sens, mse, kl = synthetic_measurements()
    check = leave_one_text_out(sens, mse, kl, (0.003, 0.01))
    assert check.texts == 3 and check.targets == (0.003, 0.01)
    assert all(r == pytest.approx(1.0) for row in check.ratios for r in row)
    assert check.factor == pytest.approx(1.0)


def test_leave_one_text_out_sees_a_text_the_others_do_not_predict():
    sens, mse, kl = synthetic_measurements()
    kl[2] = [3 * v for v in kl[2]]   # text 2 reacts three times as strongly as the model of the others says
    check = leave_one_text_out(sens, mse, kl, (0.003, 0.01))
    # held out, text 2 is under-predicted 3x; the other folds take their gain from text 2: over-predicted 3x
    assert check.ratios[2] == pytest.approx((3.0, 3.0))
    assert check.ratios[0] == pytest.approx((1 / 3, 1 / 3)) and check.ratios[1] == pytest.approx((1 / 3, 1 / 3))
    assert check.high == pytest.approx(3.0) and check.low == pytest.approx(1 / 3) and check.factor == pytest.approx(3.0)
    assert check.predicted_range(0.01) == pytest.approx((0.01 / 3, 0.03))
    rows = check.per_target()
    assert [r["target_kl"] for r in rows] == [0.003, 0.01]
    assert rows[0]["geomean"] == pytest.approx((1 / 3 * 1 / 3 * 3) ** (1 / 3))


def test_leave_one_text_out_needs_two_texts():
    sens, mse, kl = synthetic_measurements()
    assert leave_one_text_out(sens[:1], mse[:1], kl[:1], (0.003, 0.01)) is None


def test_the_check_reads_the_containers_error_as_the_encoder_does():
    """The weighted MSE calibration reads back from a decoded container is what the encoder's own prediction
    summed: the held-out predictions use the same numbers rate control does."""
    profile = tiny_profile()
    model, cache = tiny_cache("llama", tokens=96, dtype=torch.float16, seed=3)
    for scale in (0.05, 0.2):
        blob = seqkv.encode(cache, model=model, profile=profile, scale=scale)
        mse = container_weighted_mse(profile, cache, seqkv.decode(blob, profile=profile))
        assert set(mse) == set(profile.parts)
        assert profile.predicted_kl(mse) == pytest.approx(seqkv.inspect(blob)["rate_control"]["predicted_kl"], rel=1e-3)


def test_calibration_records_its_held_out_error_and_the_profile_keeps_it(tmp_path):
    profile = three_text_profile()
    check = profile.kl_check
    assert check is not None and check.texts == 3 and check.targets == GAIN_PROBE_KL
    assert all(len(row) == len(GAIN_PROBE_KL) and all(r > 0 for r in row) for row in check.ratios)
    path = tmp_path / "p.profile"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded.kl_check == check and loaded.hash == profile.hash
    # carried into the shipped form and into a profile extended with TriAttention
    assert profile.rounded().kl_check == check
    assert json.loads(_metadata(profile.rounded().to_bytes()))["kl_prediction_check"] == check.to_json()


def _metadata(raw: bytes) -> str:
    (hlen,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + hlen])["__metadata__"]["seqkv_profile"]


def test_a_profile_without_the_check_is_written_as_before_and_loads():
    profile = Profile.from_bytes(three_text_profile().to_bytes())
    profile.kl_check = None
    profile.changed()
    raw = profile.to_bytes()
    assert "kl_prediction_check" not in json.loads(_metadata(raw))
    assert Profile.from_bytes(raw).kl_check is None


def _with_check(check_json) -> bytes:
    """The three-text profile's file with its kl_prediction_check metadata replaced."""
    from safetensors.torch import load, save

    raw = three_text_profile().to_bytes()
    meta = json.loads(_metadata(raw))
    meta["kl_prediction_check"] = check_json
    return save(load(raw), metadata={"seqkv_profile": json.dumps(meta)})


@pytest.mark.parametrize("bad", [
    "ratios",
    {"method": "k-fold", "targets": [0.01], "ratios": [[1.0], [1.0]]},
    {"method": "leave-one-text-out", "targets": [], "ratios": []},
    {"method": "leave-one-text-out", "targets": [0.01], "ratios": [[1.0]]},            # one text: no check
    {"method": "leave-one-text-out", "targets": [0.01], "ratios": [[1.0], [1.0, 2.0]]},
    {"method": "leave-one-text-out", "targets": [0.01], "ratios": [[1.0], [0.0]]},
    {"method": "leave-one-text-out", "targets": [0.01], "ratios": [[1.0], [float("inf")]]},
    {"method": "leave-one-text-out", "targets": [0.01], "ratios": [[1.0], [True]]},
    {"method": "leave-one-text-out", "targets": [-0.01], "ratios": [[1.0], [1.0]]},
])
def test_a_malformed_check_is_a_profile_error(bad):
    with pytest.raises(ProfileError, match="kl_prediction_check"):
        Profile.from_bytes(_with_check(bad))


def test_one_text_warns_that_the_prediction_cannot_be_checked():
    profile, caught = calibrated(token_texts(1))
    assert profile.kl_check is None
    assert len(caught) == 1 and "cannot be checked on held-out text" in str(caught[0].message)


def test_the_same_text_twice_is_one_text():
    text = token_texts(1)[0]
    profile, caught = calibrated([text, text.clone()])
    assert profile.kl_check is None and len(caught) == 1 and "1 distinct text" in str(caught[0].message)


def test_a_held_out_error_above_the_limit_warns_with_the_measured_factor(monkeypatch):
    factor = three_text_profile().kl_check.factor
    monkeypatch.setattr(calibrate_module, "KL_PREDICTION_FACTOR_LIMIT", factor * 0.99)
    profile, caught = calibrated(token_texts(3))
    assert profile.kl_check == three_text_profile().kl_check   # the same measurements
    assert len(caught) == 1 and f"off by up to {factor:.2f}x" in str(caught[0].message)
    monkeypatch.setattr(calibrate_module, "KL_PREDICTION_FACTOR_LIMIT", factor * 1.01)
    assert calibrated(token_texts(3))[1] == []


def test_too_few_tokens_are_refused():
    with pytest.raises(seqkv.ConfigError, match="needs at least .* tokens after the sink tokens"):
        seqkv.calibrate(tiny_model(), token_texts(1, length=40), prompt_len=200, continuation_len=32)


def test_inspect_reports_the_predicted_kl_with_the_error_bar():
    profile = three_text_profile()
    model, cache = tiny_cache("llama", tokens=96, dtype=torch.float16, seed=3)
    blob = seqkv.encode(cache, model=model, profile=profile, scale=0.05)
    rc = seqkv.inspect(blob, profile=profile)["rate_control"]
    check = profile.kl_check
    assert rc["predicted_kl_range"] == pytest.approx([rc["predicted_kl"] * check.low, rc["predicted_kl"] * check.high])
    assert rc["predicted_kl_check"]["texts"] == 3 and "held-out" in rc["predicted_kl_note"]
    # without the profile at hand (not a shipped one): the prediction, no error bar, and why
    rc = seqkv.inspect(blob)["rate_control"]
    assert rc["predicted_kl_range"] is None and rc["predicted_kl_note"].startswith("no error bar: the container's profile")
    # another profile, or not a profile at all, is refused as decode() refuses it
    with pytest.raises(seqkv.ProfileMismatchError):
        seqkv.inspect(blob, profile=tiny_profile())
    with pytest.raises(seqkv.ConfigError, match="profile"):
        seqkv.inspect(blob, profile="p.profile")
    # preset containers have no rate control to annotate
    assert seqkv.inspect(seqkv.encode(cache, model=model))["rate_control"] is None


def test_inspect_of_a_container_made_with_the_shipped_profile_says_no_error_bar():
    """The shipped profile predates the check: inspect() finds it by the container's reference and says so."""
    from seqkv.shipped_profiles import load_shipped, shipped_index

    profile = load_shipped(shipped_index()[0]["name"])
    assert profile.kl_check is None
    layout = profile.layout
    gen = torch.Generator().manual_seed(0)
    shape = (1, layout.kv_heads, 12, layout.head_dim)
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(layout.layers):
        cache.update(torch.randn(shape, generator=gen).half(), torch.randn(shape, generator=gen).half(), i)
    rc = seqkv.inspect(seqkv.encode(cache, profile=profile, scale=0.05))["rate_control"]
    assert rc["predicted_kl_range"] is None and rc["predicted_kl_check"] is None
    assert rc["predicted_kl_note"].startswith("no error bar: its profile") and "records no held-out check" in rc["predicted_kl_note"]


def test_cli_inspect_shows_the_error_bar(tmp_path, capsys):
    from seqkv.cli import main

    profile = three_text_profile()
    model, cache = tiny_cache("llama", tokens=96, dtype=torch.float16, seed=3)
    (tmp_path / "c.skv").write_bytes(seqkv.encode(cache, model=model, profile=profile, scale=0.05))
    profile.save(tmp_path / "p.profile")
    assert main(["inspect", str(tmp_path / "c.skv"), "--profile", str(tmp_path / "p.profile")]) == 0
    out = capsys.readouterr().out
    assert "predicted KL" in out and "held-out range" in out
    assert main(["inspect", str(tmp_path / "c.skv")]) == 0
    assert "no error bar" in capsys.readouterr().out
