"""Encode/decode throughput of every preset on the real-model cache, side by side with zstd-3.

Run:  python -m pytest bench/bench_codec.py --benchmark-only
Every benchmark records in extra_info: MB of fp16 cache per second, the ratio vs fp16,
bits/element, and its speed relative to zstd-3 on the same fp16 bytes in the same run.
"""
import pytest

import seqkv
from seqkv.baselines import cache_bits, shuffle_bytes, zstd_compress, zstd_decompress
from seqkv.hf_adapter import cache_layers

PRESETS = ["lossless", "near_lossless", "balanced", "small"]
_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="module")
def fp16_bytes(real_cache):
    return cache_bits(cache_layers(real_cache))


@pytest.fixture(scope="module")
def blobs(real_cache, real_model):
    return {p: seqkv.encode(real_cache, preset=p, model=real_model[0]) for p in PRESETS}


def _record(benchmark, key, raw_bytes, out_bytes, elements):
    secs = benchmark.stats.stats.median
    _SECONDS[key] = secs
    info = benchmark.extra_info
    info["mb_per_s_fp16"] = raw_bytes / secs / 1e6
    info["ratio_vs_fp16"] = raw_bytes / out_bytes
    info["bits_per_element"] = 8 * out_bytes / elements
    base = "zstd3_" + ("decode" if key.startswith("decode") else "encode")
    if base in _SECONDS and not key.startswith("zstd3"):
        info["speed_vs_zstd3"] = _SECONDS[base] / secs


def test_zstd3_compress(benchmark, fp16_bytes):
    blob = benchmark(zstd_compress, fp16_bytes)
    _record(benchmark, "zstd3_encode", fp16_bytes.size, len(blob), fp16_bytes.size // 2)


def test_zstd3_decompress(benchmark, fp16_bytes):
    blob = zstd_compress(fp16_bytes)
    benchmark(zstd_decompress, blob)
    _record(benchmark, "zstd3_decode", fp16_bytes.size, len(blob), fp16_bytes.size // 2)


def test_shuffle_zstd3_compress(benchmark, fp16_bytes):
    blob = benchmark(lambda: zstd_compress(shuffle_bytes(fp16_bytes, 2)))
    _record(benchmark, "shufflezstd3_encode", fp16_bytes.size, len(blob), fp16_bytes.size // 2)


@pytest.mark.parametrize("preset", PRESETS)
def test_encode(benchmark, real_cache, real_model, fp16_bytes, preset):
    blob = benchmark.pedantic(seqkv.encode, args=(real_cache,), kwargs={"preset": preset, "model": real_model[0]},
                              rounds=3, iterations=1)
    _record(benchmark, f"encode_{preset}", fp16_bytes.size, len(blob), fp16_bytes.size // 2)
    benchmark.extra_info["preset"] = preset


@pytest.mark.parametrize("preset", PRESETS)
def test_decode(benchmark, blobs, fp16_bytes, preset):
    benchmark.pedantic(seqkv.decode, args=(blobs[preset],), rounds=5, iterations=1)
    _record(benchmark, f"decode_{preset}", fp16_bytes.size, len(blobs[preset]), fp16_bytes.size // 2)
    benchmark.extra_info["preset"] = preset


# (target_kl, cross-layer prediction, repeat prediction): the default codec at two targets, at 0.01 without
# the cross-layer predictor, whose matrix product per tensor is half the decoder's floor (docs/bench.md), and
# at 0.01 without repeat prediction (format 1.4's addition: the decoder's baseline for issue 13's 0.7x bound)
# (the baseline first: the others are timed against it)
CALIBRATED = [(0.01, True, False), (0.01, True, True), (0.001, True, True), (0.01, False, True)]
CALIBRATED_IDS = ["0.01-no-repeat", "0.01", "0.001", "0.01-no-cross-layer"]
# The codec core's published one-core figures (docs/bench.md at commit 46774f9, balanced preset): the
# issue's "within 2x of the codec core's figures" reads against these as well as against this run.
CODEC_CORE_MB_S = {"encode": 92.1, "decode": 203.7}


@pytest.fixture(scope="module")
def calibrated_blobs(real_cache, real_profile):
    return {c: seqkv.encode(real_cache, profile=real_profile, target_kl=c[0], cross_layer=c[1], repeat=c[2])
            for c in CALIBRATED}


def _record_calibrated(benchmark, direction, case, fp16_bytes, blob_len):
    key = f"{direction}_calibrated_{CALIBRATED_IDS[CALIBRATED.index(case)]}"
    _record(benchmark, key, fp16_bytes.size, blob_len, fp16_bytes.size // 2)
    info = benchmark.extra_info
    info["target_kl"], info["cross_layer"], info["repeat"] = case
    if f"{direction}_balanced" in _SECONDS:
        info["speed_vs_balanced"] = _SECONDS[f"{direction}_balanced"] / _SECONDS[key]
    baseline = f"{direction}_calibrated_0.01-no-repeat"
    if baseline in _SECONDS and key != baseline:
        info["speed_vs_no_repeat"] = _SECONDS[baseline] / _SECONDS[key]
    info["speed_vs_codec_core_figure"] = info["mb_per_s_fp16"] / CODEC_CORE_MB_S[direction]


@pytest.mark.parametrize("case", CALIBRATED, ids=CALIBRATED_IDS)
def test_encode_calibrated(benchmark, real_cache, real_profile, fp16_bytes, case):
    """The calibrated codec incl. rate control to target_kl; compare with encode[balanced] of the same run."""
    blob = benchmark.pedantic(seqkv.encode, args=(real_cache,),
                              kwargs={"profile": real_profile, "target_kl": case[0], "cross_layer": case[1],
                                      "repeat": case[2]},
                              rounds=3, iterations=1)
    _record_calibrated(benchmark, "encode", case, fp16_bytes, len(blob))


@pytest.mark.parametrize("case", CALIBRATED, ids=CALIBRATED_IDS)
def test_decode_calibrated(benchmark, calibrated_blobs, real_profile, fp16_bytes, case):
    blob = calibrated_blobs[case]
    benchmark.pedantic(seqkv.decode, args=(blob,), kwargs={"profile": real_profile}, rounds=5, iterations=1)
    _record_calibrated(benchmark, "decode", case, fp16_bytes, len(blob))


def test_prefill_baseline(benchmark, real_model, fp16_bytes):
    """What decoding saves: re-running prefill of the same 2048 tokens (one thread, like the codec rows)."""
    import os

    from conftest import BENCH_TEXT, TEXTS
    from seqkv.quality import prefill

    model, tok = real_model
    with open(os.path.join(TEXTS, BENCH_TEXT), encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids
    benchmark.pedantic(prefill, args=(model, ids, 2048), rounds=2, iterations=1)
    secs = benchmark.stats.stats.median
    benchmark.extra_info["mb_per_s_fp16"] = fp16_bytes.size / secs / 1e6
    if "decode_balanced" in _SECONDS:
        benchmark.extra_info["balanced_decode_speedup_vs_prefill"] = secs / _SECONDS["decode_balanced"]
