"""The profile shipped for the embedded model (seqkv/data/profiles/): its identity, its compact file, the
lookup by fingerprint, the errors for other models, and (slow) encode/decode out of the box on the real model."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import seqkv
from seqkv import shipped_profiles
from seqkv.errors import ConfigError
from seqkv.profile import COMPACT_MAGIC, Profile, ProfileError, ProfileMismatchError

from conftest import tiny_cache, tiny_model, tiny_profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "seqkv", "data", "profiles")


def entry():
    (only,) = shipped_profiles.shipped_index()
    return only


def test_index_describes_the_shipped_file():
    e = entry()
    path = os.path.join(DATA, e["file"])
    data = open(path, "rb").read()
    assert len(data) == e["file_bytes"] and data[:len(COMPACT_MAGIC)] == COMPACT_MAGIC
    assert len(data) < e["source_bytes"]            # smaller than the float32 profile it came from
    profile = shipped_profiles.load_shipped(e["name"])
    assert profile.ref() == {"sha256": e["codec_sha256"], "bytes": e["codec_bytes"]}
    assert (profile.layout.fingerprint, profile.layout.weights_digest) == (e["fingerprint"], e["weights_digest"])
    assert profile.info["rounded"] == {"basis_mantissa_bits": e["basis_mantissa_bits"],
                                       "cross_mantissa_bits": e["cross_mantissa_bits"],
                                       "from_codec_sha256": e["source_sha256"]}
    # the compact file records the sha256 of the profile file it unpacks to: the codec part (version 1)
    assert data[len(COMPACT_MAGIC):len(COMPACT_MAGIC) + 32].hex() == e["codec_sha256"]
    assert hashlib.sha256(profile.to_bytes()).hexdigest() == e["codec_sha256"]


def test_shipped_profile_loads_to_the_same_bytes_in_another_process():
    code = ("import json, seqkv.shipped_profiles as s; e = s.shipped_index()[0]; p = s.load_shipped(e['name']); "
            "print(json.dumps(p.ref()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert json.loads(out) == {"sha256": entry()["codec_sha256"], "bytes": entry()["codec_bytes"]}
    again = Profile.from_bytes(open(os.path.join(DATA, entry()["file"]), "rb").read())
    assert again.to_bytes() == shipped_profiles.load_shipped(entry()["name"]).to_bytes()


def test_compact_files_round_trip_any_profile(tmp_path):
    profile = tiny_profile("llama")
    plain, compact = tmp_path / "p.safetensors", tmp_path / "p.compact"
    profile.save(plain)
    profile.save(compact, compact=True)
    loaded = Profile.load(compact)
    assert loaded.to_bytes() == plain.read_bytes() and loaded.codec_hash == profile.codec_hash
    rounded = profile.rounded(14, 10)
    rounded.save(tmp_path / "r.compact", compact=True)
    assert os.path.getsize(tmp_path / "r.compact") < 0.7 * os.path.getsize(plain)
    assert Profile.load(tmp_path / "r.compact").codec_hash == rounded.codec_hash


def test_corrupt_compact_files_are_refused(tmp_path):
    profile = tiny_profile("llama")
    profile.save(tmp_path / "p.compact", compact=True)
    good = bytearray((tmp_path / "p.compact").read_bytes())
    for bad, message in [(good[:30], "not a compact"), (good[:-5], "corrupt"),
                         (good[:8] + bytes(32) + good[40:], "SHA-256"),
                         (good[:40] + (1 << 40).to_bytes(8, "little") + good[48:], "cap")]:
        with pytest.raises(ProfileError, match=message):
            Profile.from_bytes(bytes(bad))
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x40
    with pytest.raises(ProfileError):
        Profile.from_bytes(bytes(flipped))


def test_rounded_keeps_the_asked_mantissa_bits_and_names_its_source():
    profile = tiny_profile("llama")
    rounded = profile.rounded(14, 10)
    for key, part in profile.parts.items():
        r = rounded.parts[key]
        low = r.basis.numpy().view(np.uint32) & ((1 << 9) - 1)
        assert not low.any()
        assert torch.allclose(r.basis, part.basis, rtol=2.0 ** -15, atol=0)
        assert not bool(torch.equal(r.basis, part.basis))
        if part.cross is not None:
            assert not (r.cross.numpy().view(np.uint32) & ((1 << 13) - 1)).any()
        assert torch.equal(r.mean, part.mean) and torch.equal(r.weights, part.weights)
    assert rounded.codec_hash != profile.codec_hash
    assert rounded.info["rounded"]["from_codec_sha256"] == profile.codec_hash
    for bad in (0, 24, 14.0, True):
        with pytest.raises(ConfigError):
            profile.rounded(bad, 10)


def test_other_models_get_a_config_error_saying_how_to_calibrate():
    model, cache = tiny_cache("llama", tokens=12)
    for kwargs in [{"model": model, "target_kl": 0.01}, {"model": model, "preset": "calibrated"},
                   {"config": model.config, "bits_per_element": 2.0}]:
        with pytest.raises(ConfigError, match="seqkv calibrate") as info:
            seqkv.encode(cache, **kwargs)
        assert "seqkv.calibrate(model" in str(info.value) and "profile=" in str(info.value)
    with pytest.raises(ConfigError, match="needs the model"):
        seqkv.encode(cache, target_kl=0.01)
    with pytest.raises(ConfigError, match="seqkv calibrate"):
        seqkv.shipped_profile(tiny_model("qwen2"))
    # presets and explicit profiles are untouched
    assert seqkv.inspect(seqkv.encode(cache, model=model))["preset"] == "balanced"


def test_containers_of_other_profiles_still_need_theirs():
    model, cache = tiny_cache("llama", tokens=12)
    profile = tiny_profile("llama")
    blob = seqkv.encode(cache, model=model, profile=profile, target_kl=0.01)
    with pytest.raises(ProfileMismatchError, match="Profile.load"):
        seqkv.decode(blob)
    assert len(seqkv.decode(blob, profile=profile).layers) == len(cache.layers)
    assert shipped_profiles.profile_for_ref(seqkv.inspect(blob)["profile"]["sha256"]) is None


def test_pyproject_ships_the_profile_texts_and_calibration_data():
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    for folder in ("data/profiles/*", "data/texts/*", "data/calibration/*"):
        assert f'"{folder}"' in text
    assert os.path.exists(os.path.join(DATA, "PROVENANCE.md"))


# -- the real model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    from seqkv.embedded_model import load_embedded_model

    return load_embedded_model()


@pytest.mark.slow
def test_embedded_model_encodes_and_decodes_with_no_profile_argument(real):
    from seqkv.quality import QualityProbe

    model, tok = real
    text = open(os.path.join(ROOT, "bench", "texts_heldout", "gpl3.txt"), encoding="utf-8").read()
    probe = QualityProbe(model, tok(text, return_tensors="pt").input_ids, 512, 64)
    assert seqkv.shipped_profile(model) is shipped_profiles.load_shipped(entry()["name"])
    blob = seqkv.encode(probe.cache, model=model, target_kl=0.01)
    info = seqkv.inspect(blob)
    assert info["profile"]["sha256"] == entry()["codec_sha256"] and info["rate_control"]["target"] == {"kl": 0.01}
    decoded = seqkv.decode(blob, model=model)
    explicit = seqkv.decode(blob, profile=seqkv.shipped_profile(model))
    for a, b in zip(decoded.layers, explicit.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # the calibrated codec beats the balanced preset in bytes here, at a measured (not predicted) KL that the
    # teacher-forced continuation gives
    balanced = seqkv.encode(probe.cache, model=model, preset="balanced")
    assert len(blob) < len(balanced)
    report = probe.score(decoded, next_position=info["positions"]["next"])
    assert 0 < report.mean_kl < 0.05 and report.top1_agreement > 0.8


@pytest.mark.slow
def test_same_architecture_other_weights_is_refused(real):
    model, _ = real

    class OtherWeights(torch.nn.Module):   # SmolLM2's config, other embeddings: a fine-tune, as far as seqkv sees
        def __init__(self):
            super().__init__()
            self.config = model.config
            self.embed = torch.nn.Embedding(model.config.vocab_size, model.config.hidden_size)

        def get_input_embeddings(self):
            return self.embed

    with pytest.raises(ConfigError, match="other weights"):
        seqkv.shipped_profile(OtherWeights())
