"""Every golden container of every format version must still decode to its expected tensors."""
import glob
import os

import pytest
import torch
from safetensors.torch import load_file

import seqkv

GOLDEN = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "golden", "*.skv")))


def test_golden_files_exist():
    assert len(GOLDEN) >= 6


@pytest.mark.parametrize("path", GOLDEN, ids=os.path.basename)
def test_golden_decodes(path):
    with open(path, "rb") as f:
        blob = f.read()
    expected = load_file(path.replace(".skv", ".expected.safetensors"))
    info = seqkv.inspect(blob)
    profile = None
    if info.get("profile"):  # calibrated containers (1.1+) ship the profile they need beside them
        profile = seqkv.Profile.load(path.replace(".skv", ".profile.safetensors"))
        assert profile.hash == info["profile"]["sha256"]
    decoded = seqkv.decode(blob, profile=profile)
    assert len(decoded.layers) == info["layers"]
    for i, layer in enumerate(decoded.layers):
        for kind in ("keys", "values"):
            got, want = getattr(layer, kind), expected[f"layer.{i}.{kind}"]
            assert got.dtype == want.dtype and got.shape == want.shape
            if info["preset"] == "lossless":
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            else:  # lossy decode runs float maths (RoPE), which may differ in the last ulp across platforms
                assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-3 * float(want.float().abs().max()))
    state = getattr(decoded, "seqkv_pruned", None)
    assert (state is not None) == (info["pruning"] is not None)
    if state is not None:  # pruned (1.1): the kept positions of every head, and the true next position
        for i, kept in enumerate(state.kept):
            for h, pos in enumerate(kept):
                assert torch.equal(pos, expected[f"layer.{i}.kept.{h}"])
        assert state.next_position == info["positions"]["next"]
