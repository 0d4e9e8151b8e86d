"""TriAttention's calibration stored in the model profile (profile version 2), on tiny random models."""
import functools
import json
import struct

import pytest
import torch

import seqkv
from seqkv.errors import PruneError
from seqkv.profile import Profile, ProfileError

from conftest import tiny_cache, tiny_model, tiny_profile


@functools.lru_cache(maxsize=None)
def tri_calibration():
    ids = torch.randint(0, 96, (1, 80), generator=torch.Generator().manual_seed(3))
    return seqkv.pruning.calibrate(tiny_model("llama"), [ids])


def extended():
    return tiny_profile().with_triattention(tri_calibration())


def _split(raw: bytes):
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    meta = json.loads(header["__metadata__"]["seqkv_profile"])
    return header, meta


def _rewrite(profile: Profile, mutate_meta=None, mutate_tensors=None) -> bytes:
    """The profile's file with its metadata / tensors edited (then re-serialised, not re-hashed)."""
    from safetensors.torch import load, save

    raw = profile.to_bytes()
    _header, meta = _split(raw)
    tensors = load(raw)
    if mutate_meta:
        mutate_meta(meta)
    if mutate_tensors:
        mutate_tensors(tensors)
    return save(tensors, metadata={"seqkv_profile": json.dumps(meta, sort_keys=True)})


def test_a_profile_without_triattention_stays_version_1_byte_for_byte():
    profile = tiny_profile()
    assert _split(profile.to_bytes())[1]["version"] == 1
    assert profile.codec_hash == profile.hash and profile.ref() == {"sha256": profile.hash, "bytes": profile.nbytes}
    again = Profile.from_bytes(profile.to_bytes())
    again.changed()   # re-serialised from its fields: the same bytes, so old containers keep their reference
    assert again.to_bytes() == profile.to_bytes()


def test_version_2_round_trips_and_keeps_the_codec_identity(tmp_path):
    base, profile = tiny_profile(), extended()
    _header, meta = _split(profile.to_bytes())
    assert meta["version"] == 2 and meta["triattention"]["codec_sha256"] == base.hash
    assert profile.hash != base.hash and profile.codec_hash == base.hash
    path = tmp_path / "p2.safetensors"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded.hash == profile.hash and loaded.codec_hash == base.hash
    cal, want = loaded.triattention, tri_calibration()
    assert cal.digest() == want.digest() and cal.tokens == want.tokens and cal.fingerprint == want.fingerprint
    # containers made with either profile decode with the other, and encoding gives the same bytes
    model, cache = tiny_cache("llama", tokens=60, dtype=torch.float16, seed=5)
    old = seqkv.encode(cache, model=model, profile=base, scale=0.03)
    assert seqkv.encode(cache, model=model, profile=loaded, scale=0.03) == old
    for a, b in zip(seqkv.decode(old, profile=loaded).layers, seqkv.decode(old, profile=base).layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_the_pruner_takes_its_calibration_from_a_profile_or_its_file(tmp_path):
    model, cache = tiny_cache("llama", tokens=60, dtype=torch.float16, seed=5)
    path = tmp_path / "p2.safetensors"
    extended().save(path)
    ref = seqkv.pruner("triattention", ratio=0.5, calibration=tri_calibration()).prune(cache, model=model)
    for source in (extended(), str(path), path):
        p = seqkv.pruner("triattention", ratio=0.5, calibration=source)
        assert p.get_config()["calibration_sha256"] == tri_calibration().digest()
        got = p.prune(cache, model=model)
        for a, b in zip(got.seqkv_pruned.kept, ref.seqkv_pruned.kept):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(PruneError, match="no TriAttention calibration"):
        seqkv.pruner("triattention", ratio=0.5, calibration=tiny_profile())
    with pytest.raises(PruneError, match="must be a TriCalibration"):
        seqkv.pruner("triattention", ratio=0.5, calibration=42)


def _drop(name):
    return lambda t: t.pop(name)


def _scale(name, factor):
    return lambda t: t.__setitem__(name, t[name] * factor)


@pytest.mark.parametrize("case,mutate_meta,mutate_tensors", [
    ("missing tensor", None, _drop("triattention.mean_abs")),
    ("missing metadata", lambda m: m.pop("triattention"), None),
    ("wrong shape", None, lambda t: t.__setitem__("triattention.mean_re", t["triattention.mean_re"][:, :, :3].contiguous())),
    ("NaN", None, lambda t: t["triattention.mean_im"].__setitem__((0, 0, 0), float("nan"))),
    ("negative magnitude", None, _scale("triattention.mean_abs", -1.0)),
    ("codec part edited", None, _scale("layer.0.keys.mean", 2.0)),
    ("codec hash edited", lambda m: m["triattention"].__setitem__("codec_sha256", "0" * 64), None),
    ("bad tokens", lambda m: m["triattention"].__setitem__("tokens", 0), None),
    ("version 1 with the tensors", lambda m: m.update(version=1), None),
    ("unknown version", lambda m: m.update(version=3), None),
])
def test_damaged_version_2_profiles_are_refused(case, mutate_meta, mutate_tensors):
    with pytest.raises(ProfileError):
        Profile.from_bytes(_rewrite(extended(), mutate_meta, mutate_tensors))


def test_a_calibration_of_another_model_is_refused():
    other = seqkv.pruning.calibrate(tiny_model("llama", layers=3), [torch.randint(0, 96, (1, 40))])
    with pytest.raises(ProfileError, match="shape"):
        tiny_profile().with_triattention(other)
    with pytest.raises(ProfileError, match="TriCalibration"):
        tiny_profile().with_triattention("not a calibration")


def test_calibrate_can_store_the_triattention_centres_too():
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, 96, (260,), generator=gen) for _ in range(2)]
    profile = seqkv.calibrate(tiny_model("llama"), seqs, prompt_len=200, continuation_len=32, triattention=True)
    assert profile.triattention is not None and profile.triattention.tokens > 0
    assert _split(profile.to_bytes())[1]["version"] == 2
    assert Profile.from_bytes(profile.to_bytes()).codec_hash == profile.codec_hash
