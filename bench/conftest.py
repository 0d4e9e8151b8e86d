"""Shared fixtures for the benchmarks: one real SmolLM2 cache (P=2048, fp16) per session."""
import os

import pytest
import torch

TEXTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "texts")
BENCH_TEXT = os.environ.get("SEQKV_BENCH_TEXT", "python_reference.txt")


@pytest.fixture(scope="session")
def real_model():
    from seqkv.embedded_model import load_embedded_model

    return load_embedded_model()


@pytest.fixture(scope="session")
def real_cache(real_model):
    """The bench cache: 2048 tokens of a real text, stored as fp16 (what a server keeps)."""
    from seqkv.quality import clone_cache, prefill

    model, tok = real_model
    with open(os.path.join(TEXTS, BENCH_TEXT), encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids
    return clone_cache(prefill(model, ids, 2048), torch.float16)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Per-core figures: one intra-op thread for torch and for numpy's BLAS (the calibrated codec's matrix
    products run there), so the two cores' other load matters less."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_profile():
    """The calibrated profile of the embedded model: $SEQKV_PROFILE, else calibrated once on
    bench/calibration/ (a few minutes) and kept in build/smollm2.profile.safetensors."""
    import seqkv

    path = os.environ.get("SEQKV_PROFILE") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "smollm2.profile.safetensors")
    if not os.path.exists(path):
        from seqkv.cli import main

        os.makedirs(os.path.dirname(path), exist_ok=True)
        if main(["calibrate", "-o", path]) != 0:  # the documented command, so the profile is the same one
            raise RuntimeError("seqkv calibrate failed")
    return seqkv.Profile.load(path)
