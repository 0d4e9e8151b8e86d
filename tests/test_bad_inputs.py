"""Bad inputs to every public entry point: each raises a SeqKVError subclass (the most specific one expected),
never a bare TypeError / ValueError / RuntimeError / OverflowError from deeper down, and every message says
what was wrong.

One table, one row per case: (case id, the call, the expected exception class).  The call is a function
of ``S``, a namespace of lazily built samples (tiny models, caches, containers), so that collecting the
table builds nothing.  Bytes-level damage (truncation, flips, resealed edits) is tests/test_fuzz.py's;
the header edits here are the named ones of issue 16.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

import seqkv
from seqkv.checksum import crc32c
from seqkv.errors import (
    AlreadyPrunedError, ChecksumError, CompressionBoundError, ConfigError, DecodeError, EncodeError, FormatError,
    ModelMismatchError, NonFiniteError, PruneError, SeqKVError, UnsupportedCacheError, UnsupportedVersionError,
    ValueRangeError,
)
analyze_api = seqkv.analyze
from seqkv.format import open_container
from seqkv.format.container import MAGIC, PREAMBLE, Container
from seqkv.profile import ProfileMismatchError

from conftest import tiny_cache, tiny_model, tiny_profile


# -- samples ---------------------------------------------------------------------------------------------

class Samples:
    """Everything a case needs, built on first use and shared by every case."""

    @functools.cached_property
    def model(self):
        return tiny_model("llama")

    def cache(self, dtype=torch.float32, tokens=12, family="llama", **kw):
        return tiny_cache(family, tokens=tokens, dtype=dtype, **kw)[1]

    @functools.cached_property
    def qwen(self):
        return tiny_model("qwen2", layers=3, kv_heads=2, heads=4, head_dim=8)

    @functools.cached_property
    def model12(self):  # head_dim 12: no Hadamard rotation
        return tiny_model("llama", head_dim=12)

    @functools.cached_property
    def profile(self):
        return tiny_profile()

    @functools.cached_property
    def other_profile(self):
        return tiny_profile("qwen2")

    @functools.cached_property
    def balanced(self) -> bytes:
        return seqkv.encode(self.cache(torch.float16), preset="balanced", model=self.model)

    @functools.cached_property
    def lossless(self) -> bytes:
        return seqkv.encode(self.cache(torch.float16), preset="lossless", model=self.model)

    @functools.cached_property
    def lloydmax(self) -> bytes:
        return seqkv.encode(self.cache(), preset="balanced", model=self.model, rotation="hadamard",
                            quantizer="lloydmax", bits=3)

    @functools.cached_property
    def calibrated(self) -> bytes:
        return seqkv.encode(self.cache(torch.float16, tokens=40), model=self.model, profile=self.profile, scale=0.03)

    @functools.cached_property
    def pruned(self) -> bytes:
        return seqkv.encode(self.cache(torch.float16, tokens=40), preset="balanced", model=self.model,
                            prune=seqkv.pruner("key_norm", ratio=0.5, head_budget="adaptive"))

    def pruned_cache(self):
        return seqkv.pruner("key_norm", ratio=0.5).prune(self.cache(tokens=20), model=self.model)

    @functools.cached_property
    def chunk(self) -> bytes:
        from seqkv.store.chunk_codec import encode_chunk

        cache = self.cache(torch.float16)
        layers = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        config = seqkv.format.header.Header  # noqa: F841  (the format layer is imported)
        from seqkv.presets import pipeline_config
        payload, _ = encode_chunk(layers, torch.arange(12), pipeline_config("balanced"),
                                  seqkv.layout_from_model(self.model), "float16", token_section=b"\x00" * 4,
                                  token_code="zstd")
        return payload

    def cache_with(self, value, *, dtype=torch.float32, token=7, kind="keys", tokens=12):
        cache = self.cache(dtype, tokens=tokens)
        getattr(cache.layers[0], kind)[0, 0, token, 3] = value
        return cache

    def cache_changed(self, fn):
        cache = self.cache()
        fn(cache)
        return cache


S = Samples()


def split(blob: bytes):
    c = Container(blob)
    return json.loads(json.dumps(c.header)), [bytes(c.section(e["name"])) for e in c.header["sections"]]


def reseal(header: dict, sections: list[bytes], like: bytes) -> bytes:
    """The container with ``header`` (a mutated copy of ``like``'s), its section table and checksums redone."""
    table, offset = [], 0
    for entry, payload in zip(header["sections"], sections):
        table.append(dict(entry, offset=offset, length=len(payload), crc32c=crc32c(payload)))
        offset += len(payload)
    hb = json.dumps(dict(header, sections=table)).encode()
    _, _, minor, flags, _, _ = PREAMBLE.unpack_from(like, 0)
    return PREAMBLE.pack(MAGIC, 1, minor, flags, len(hb), crc32c(hb)) + hb + b"".join(sections)


def edited(blob_name: str, edit) -> bytes:
    """``blob_name``'s container with ``edit(header)`` applied and resealed."""
    blob = getattr(S, blob_name)
    header, sections = split(blob)
    edit(header)
    return reseal(header, sections, blob)


def raw_header(header_bytes: bytes, minor: int = 0, flags: int = 0) -> bytes:
    return PREAMBLE.pack(MAGIC, 1, minor, flags, len(header_bytes), crc32c(header_bytes)) + header_bytes


def set_path(header: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    target = header
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


def decode_edit(blob_name: str, path: str, value, **kw):
    blob = edited(blob_name, lambda h: set_path(h, path, value))
    profile = S.profile if blob_name == "calibrated" else None
    return seqkv.decode(blob, profile=profile, **kw)


def double_tokens(h: dict) -> None:
    h["tokens"] *= 2
    h["positions"]["next"] = h["positions"]["start"] + h["tokens"]


def _cache_on_meta():
    cache = S.cache()
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.to("meta"), layer.values.to("meta")
    return cache


def _layer_fn(fn):
    def change(cache):
        fn(cache.layers[1])
    return change


# -- the table ---------------------------------------------------------------------------------------------

E = EncodeError
CASES = [
    # encode: the cache
    ("encode-cache-none", lambda: seqkv.encode(None, preset="lossless"), UnsupportedCacheError),
    ("encode-cache-str", lambda: seqkv.encode("cache", preset="lossless"), UnsupportedCacheError),
    ("encode-cache-tensor", lambda: seqkv.encode(torch.zeros(1, 2, 3, 4), preset="lossless"), UnsupportedCacheError),
    ("encode-cache-legacy-tuple", lambda: seqkv.encode(((torch.zeros(1, 2, 3, 4),) * 2,), preset="lossless"),
     UnsupportedCacheError),
    ("encode-cache-dict", lambda: seqkv.encode({"layers": []}, preset="lossless"), UnsupportedCacheError),
    ("encode-cache-empty", lambda: seqkv.encode(__import__("transformers").DynamicCache(), preset="lossless"), E),
    ("encode-cache-meta-device", lambda: seqkv.encode(_cache_on_meta(), preset="lossless"), E),
    ("encode-cache-meta-device-lossy", lambda: seqkv.encode(_cache_on_meta(), preset="balanced", model=S.model), E),
    ("encode-cache-int8", lambda: seqkv.encode(S.cache_changed(_layer_fn(lambda l: setattr(l, "keys", l.keys.to(torch.int8)))),
                                               preset="lossless"), E),
    ("encode-cache-float64", lambda: seqkv.encode(S.cache_changed(lambda c: [setattr(l, k, getattr(l, k).double())
                                                                             for l in c.layers for k in ("keys", "values")]),
                                                  preset="lossless"), E),
    ("encode-cache-complex", lambda: seqkv.encode(S.cache_changed(lambda c: [setattr(l, k, getattr(l, k).to(torch.complex64))
                                                                             for l in c.layers for k in ("keys", "values")]),
                                                  preset="lossless"), E),
    ("encode-cache-mixed-dtypes", lambda: seqkv.encode(S.cache_changed(_layer_fn(lambda l: setattr(l, "values", l.values.half()))),
                                                       preset="lossless"), E),
    ("encode-cache-layer-dtype-differs", lambda: seqkv.encode(S.cache_changed(_layer_fn(
        lambda l: (setattr(l, "keys", l.keys.half()), setattr(l, "values", l.values.half())))), preset="lossless"), E),
    ("encode-cache-batch-2", lambda: seqkv.encode(S.cache_changed(lambda c: [setattr(l, k, getattr(l, k).expand(2, -1, -1, -1))
                                                                             for l in c.layers for k in ("keys", "values")]),
                                                  preset="lossless"), UnsupportedCacheError),
    ("encode-cache-3d", lambda: seqkv.encode(S.cache_changed(_layer_fn(lambda l: (setattr(l, "keys", l.keys[0]),
                                                                                   setattr(l, "values", l.values[0])))),
                                             preset="lossless"), E),
    ("encode-cache-kv-shapes-differ", lambda: seqkv.encode(S.cache_changed(_layer_fn(lambda l: setattr(l, "values", l.values[:, :, :5]))),
                                                           preset="lossless"), E),
    ("encode-cache-layers-differ", lambda: seqkv.encode(S.cache_changed(_layer_fn(lambda l: (setattr(l, "keys", l.keys[:, :, :5]),
                                                                                              setattr(l, "values", l.values[:, :, :5])))),
                                                        preset="lossless"), E),
    ("encode-cache-zero-tokens", lambda: seqkv.encode(S.cache_changed(lambda c: [setattr(l, k, getattr(l, k)[:, :, :0])
                                                                                 for l in c.layers for k in ("keys", "values")]),
                                                      preset="lossless"), E),
    ("encode-cache-no-tensors", lambda: seqkv.encode(S.cache_changed(_layer_fn(lambda l: setattr(l, "keys", None))),
                                                     preset="lossless"), E),
    ("encode-cache-list-keys", lambda: seqkv.encode(S.cache_changed(_layer_fn(lambda l: setattr(l, "keys", [[1.0]]))),
                                                    preset="lossless"), E),
    # encode: preset and model
    ("encode-preset-int", lambda: seqkv.encode(S.cache(), preset=3, model=S.model), ConfigError),
    ("encode-preset-unknown", lambda: seqkv.encode(S.cache(), preset="tiny", model=S.model), ConfigError),
    ("encode-preset-empty", lambda: seqkv.encode(S.cache(), preset="", model=S.model), ConfigError),
    ("encode-preset-list", lambda: seqkv.encode(S.cache(), preset=["balanced"], model=S.model), ConfigError),
    ("encode-lossy-without-model", lambda: seqkv.encode(S.cache(), preset="balanced"), ConfigError),
    ("encode-model-str", lambda: seqkv.encode(S.cache(), preset="balanced", model="llama"), ConfigError),
    ("encode-model-int", lambda: seqkv.encode(S.cache(), preset="balanced", model=42), ConfigError),
    ("encode-model-dict", lambda: seqkv.encode(S.cache(), preset="balanced", model={"num_hidden_layers": 2}), ConfigError),
    ("encode-config-object", lambda: seqkv.encode(S.cache(), preset="balanced", config=object()), ConfigError),
    ("encode-wrong-model", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.qwen), ModelMismatchError),
    ("encode-wrong-model-lossless", lambda: seqkv.encode(S.cache(), preset="lossless", model=S.qwen), ModelMismatchError),
    ("encode-wrong-layout", lambda: seqkv.encode(S.cache(), preset="balanced",
                                                 model=seqkv.ModelLayout(layers=2, kv_heads=2, head_dim=8)), ModelMismatchError),
    ("encode-layout-rope-1e39", lambda: seqkv.encode(S.cache(), preset="balanced", model=seqkv.ModelLayout(
        layers=2, kv_heads=2, head_dim=16, rope_inv_freq=(1e39,) * 8)), ConfigError),
    ("encode-layout-rope-nan", lambda: seqkv.encode(S.cache(), preset="balanced", model=seqkv.ModelLayout(
        layers=2, kv_heads=2, head_dim=16, rope_inv_freq=(float("nan"),) * 8)), ConfigError),
    ("encode-layout-scaling-zero", lambda: seqkv.encode(S.cache(), preset="lossless", model=seqkv.ModelLayout(
        layers=2, kv_heads=2, head_dim=16, rope_attention_scaling=0.0)), ConfigError),
    # encode: positions
    ("encode-positions-str", lambda: seqkv.encode(S.cache(), preset="lossless", positions="0"), ConfigError),
    ("encode-positions-negative", lambda: seqkv.encode(S.cache(), preset="lossless", positions=-1), ConfigError),
    ("encode-positions-bool", lambda: seqkv.encode(S.cache(), preset="lossless", positions=True), ConfigError),
    ("encode-positions-float-start", lambda: seqkv.encode(S.cache(), preset="lossless", positions=2.5), ConfigError),
    ("encode-positions-huge-start", lambda: seqkv.encode(S.cache(), preset="lossless", positions=2**70), ConfigError),
    ("encode-positions-start-past-max", lambda: seqkv.encode(S.cache(), preset="lossless", positions=2**62 - 5), ConfigError),
    ("encode-positions-wrong-length", lambda: seqkv.encode(S.cache(), preset="lossless", positions=list(range(5))), ConfigError),
    ("encode-positions-not-increasing", lambda: seqkv.encode(S.cache(), preset="lossless", positions=[0] * 12), ConfigError),
    ("encode-positions-decreasing", lambda: seqkv.encode(S.cache(), preset="lossless", positions=list(range(12, 0, -1))),
     ConfigError),
    ("encode-positions-negative-list", lambda: seqkv.encode(S.cache(), preset="lossless", positions=list(range(-1, 11))),
     ConfigError),
    ("encode-positions-floats", lambda: seqkv.encode(S.cache(), preset="lossless", positions=[i + 0.5 for i in range(12)]),
     ConfigError),
    ("encode-positions-nan", lambda: seqkv.encode(S.cache(), preset="lossless", positions=[float("nan")] * 12), ConfigError),
    ("encode-positions-huge-list", lambda: seqkv.encode(S.cache(), preset="lossless", positions=[2**63 + i for i in range(12)]),
     ConfigError),
    ("encode-positions-past-max-list", lambda: seqkv.encode(S.cache(), preset="lossless",
                                                            positions=[2**62 + i for i in range(12)]), ConfigError),
    ("encode-positions-object", lambda: seqkv.encode(S.cache(), preset="lossless", positions=object()), ConfigError),
    ("encode-positions-strings", lambda: seqkv.encode(S.cache(), preset="lossless", positions=["a"] * 12), ConfigError),
    ("encode-positions-2d", lambda: seqkv.encode(S.cache(), preset="lossless", positions=[[0, 1]] * 6), ConfigError),
    # encode: options
    ("encode-option-unknown", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, quality=3), ConfigError),
    ("encode-option-lossless-step", lambda: seqkv.encode(S.cache(), preset="lossless", step=0.1), ConfigError),
    ("encode-step-str", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, step="0.25"), ConfigError),
    ("encode-step-bool", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, step=True), ConfigError),
    ("encode-step-zero", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, step=0), ConfigError),
    ("encode-step-huge", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, step=1e9), ConfigError),
    ("encode-step-nan", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, step=float("nan")), ConfigError),
    ("encode-step-inf", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, step=float("inf")), ConfigError),
    ("encode-step-bigint", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, step=10**400), ConfigError),
    ("encode-step-none", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, step=None), ConfigError),
    ("encode-step-tensor", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, step=torch.tensor(0.3)),
     ConfigError),
    ("encode-sinks-negative", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, sink_tokens=-1), ConfigError),
    ("encode-sinks-str", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, sink_tokens="4"), ConfigError),
    ("encode-sinks-bool", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, sink_tokens=True), ConfigError),
    ("encode-sinks-float", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, sink_tokens=4.0), ConfigError),
    ("encode-sinks-huge", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, sink_tokens=2**40), ConfigError),
    ("encode-rotation-unknown", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, rotation="fft"), ConfigError),
    ("encode-rotation-int", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, rotation=1), ConfigError),
    ("encode-hadamard-head-dim-12", lambda: seqkv.encode(S.cache(head_dim=12), preset="balanced", model=S.model12,
                                                         rotation="hadamard"), ConfigError),
    ("encode-seed-str", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, rotation="hadamard", seed="1"),
     ConfigError),
    ("encode-seed-float", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, rotation="hadamard", seed=1.5),
     ConfigError),
    ("encode-seed-huge", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, rotation="hadamard", seed=2**70),
     ConfigError),
    ("encode-seed-very-negative", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, rotation="hadamard",
                                                       seed=-2**70), ConfigError),
    ("encode-quantizer-unknown", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, quantizer="kmeans"),
     ConfigError),
    ("encode-bits-without-lloydmax", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, bits=4), ConfigError),
    ("encode-bits-zero", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, quantizer="lloydmax", bits=0),
     ConfigError),
    ("encode-bits-nine", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, quantizer="lloydmax", bits=9),
     ConfigError),
    ("encode-bits-str", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, quantizer="lloydmax", bits="4"),
     ConfigError),
    ("encode-bits-float", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, quantizer="lloydmax", bits=4.0),
     ConfigError),
    ("encode-bits-bool", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, quantizer="lloydmax", bits=True),
     ConfigError),
    ("encode-rounding-zero", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, rounding=0), ConfigError),
    ("encode-rounding-above-half", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, rounding=0.7),
     ConfigError),
    ("encode-gamma-negative", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, key_channel_gamma=-1),
     ConfigError),
    ("encode-gamma-with-lloydmax", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, quantizer="lloydmax",
                                                        key_channel_gamma=0.5), ConfigError),
    # encode: values the lossy presets cannot carry (issue 16, finding 3)
    ("encode-nan-values", lambda: seqkv.encode(S.cache_with(float("nan"), kind="values"), preset="balanced", model=S.model),
     NonFiniteError),
    ("encode-inf-keys", lambda: seqkv.encode(S.cache_with(float("inf")), preset="small", model=S.model), NonFiniteError),
    ("encode-nan-in-sink-balanced", lambda: seqkv.encode(S.cache_with(float("nan"), token=1), preset="balanced",
                                                         model=S.model), NonFiniteError),
    ("encode-inf-in-sink-small", lambda: seqkv.encode(S.cache_with(float("inf"), token=0, kind="values"), preset="small",
                                                      model=S.model), NonFiniteError),
    ("encode-inf-in-sink-near-lossless", lambda: seqkv.encode(S.cache_with(-float("inf"), token=3, dtype=torch.float16),
                                                              preset="near_lossless", model=S.model), NonFiniteError),
    ("encode-nan-lloydmax", lambda: seqkv.encode(S.cache_with(float("nan")), preset="balanced", model=S.model,
                                                 quantizer="lloydmax"), NonFiniteError),
    ("encode-nan-calibrated", lambda: seqkv.encode(S.cache_with(float("nan"), token=20, tokens=40), model=S.model, profile=S.profile,
                                                   scale=0.03), NonFiniteError),
    ("encode-nan-in-sink-calibrated", lambda: seqkv.encode(S.cache_with(float("nan"), token=0), model=S.model,
                                                           profile=S.profile, scale=0.03), NonFiniteError),
    ("encode-nan-pruned", lambda: seqkv.encode(S.cache_with(float("nan"), token=0), model=S.model, preset="balanced",
                                               prune=seqkv.pruner("sinks_window", ratio=0.5)), NonFiniteError),
    ("encode-1e20-fp32", lambda: seqkv.encode(S.cache_with(1e20), preset="balanced", model=S.model), ValueRangeError),
    ("encode-1e20-fp32-values", lambda: seqkv.encode(S.cache_with(-1e20, kind="values"), preset="small", model=S.model),
     ValueRangeError),
    ("encode-3e38-bf16", lambda: seqkv.encode(S.cache_with(3e38, dtype=torch.bfloat16), preset="balanced", model=S.model),
     ValueRangeError),
    ("encode-1e20-in-sink", lambda: seqkv.encode(S.cache_with(1e20, token=0), preset="balanced", model=S.model),
     ValueRangeError),
    ("encode-1e20-lloydmax", lambda: seqkv.encode(S.cache_with(1e20), preset="balanced", model=S.model,
                                                  quantizer="lloydmax"), ValueRangeError),
    ("encode-1e20-calibrated", lambda: seqkv.encode(S.cache_with(1e20, token=20, tokens=40), model=S.model, profile=S.profile,
                                                    scale=0.03), ValueRangeError),
    ("encode-1e20-target-calibrated", lambda: seqkv.encode(S.cache_with(1e20, token=30, tokens=40), model=S.model,
                                                           profile=S.profile, target_kl=0.01), ValueRangeError),
    # encode: pruning
    ("encode-prune-str", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, prune="snapkv"), ConfigError),
    ("encode-prune-int", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, prune=0.5), ConfigError),
    ("encode-prune-twice", lambda: seqkv.encode(S.pruned_cache(), preset="balanced", model=S.model,
                                                prune=seqkv.pruner("key_norm", ratio=0.5)), AlreadyPrunedError),
    ("encode-pruned-with-positions", lambda: seqkv.encode(S.pruned_cache(), preset="balanced", model=S.model,
                                                          positions=0), EncodeError),
    ("encode-prune-calibrated-per-head", lambda: seqkv.encode(S.cache(tokens=40), model=S.model, profile=S.profile,
                                                              scale=0.03, prune=seqkv.pruner("key_norm", ratio=0.5,
                                                                                             head_budget="adaptive")),
     ConfigError),
    ("encode-prune-budget-too-big", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model,
                                                         prune=seqkv.pruner("key_norm", budget=100)), PruneError),
    # encode: the calibrated codec
    ("encode-profile-str", lambda: seqkv.encode(S.cache(), model=S.model, profile="profile.safetensors"), ConfigError),
    ("encode-profile-with-preset", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, profile=S.profile),
     ConfigError),
    ("encode-profile-other-model", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.other_profile, scale=0.03),
     ModelMismatchError),
    ("encode-target-without-profile", lambda: seqkv.encode(S.cache(), preset="balanced", model=S.model, target_kl=0.01),
     ConfigError),
    ("encode-two-targets", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, target_kl=0.01,
                                                bits_per_element=2.0), ConfigError),
    ("encode-target-kl-str", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, target_kl="0.01"), ConfigError),
    ("encode-target-kl-negative", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, target_kl=-1), ConfigError),
    ("encode-target-kl-nan", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, target_kl=float("nan")),
     ConfigError),
    ("encode-bpe-zero", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, bits_per_element=0), ConfigError),
    ("encode-max-bytes-zero", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, max_bytes=0), ConfigError),
    ("encode-max-bytes-bool", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, max_bytes=True), ConfigError),
    ("encode-scale-negative", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, scale=-1), ConfigError),
    ("encode-scale-str", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, scale="0.1"), ConfigError),
    ("encode-kl-margin-str", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, kl_margin="1"), ConfigError),
    ("encode-kl-margin-zero", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, kl_margin=0), ConfigError),
    ("encode-predict-str", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, scale=0.03, predict="yes"),
     ConfigError),
    ("encode-cross-layer-int", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, scale=0.03, cross_layer=1),
     ConfigError),
    ("encode-calibrated-rounding-str", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, scale=0.03,
                                                            rounding="0.5"), ConfigError),
    ("encode-calibrated-unknown-option", lambda: seqkv.encode(S.cache(), model=S.model, profile=S.profile, step=0.1),
     ConfigError),
    ("encode-calibrated-wrong-cache", lambda: seqkv.encode(S.cache(family="qwen2", layers=3, kv_heads=2, heads=4, head_dim=8),
                                                           profile=S.profile, scale=0.03), ModelMismatchError),

    # decode: the data
    ("decode-none", lambda: seqkv.decode(None), FormatError),
    ("decode-int", lambda: seqkv.decode(1234), FormatError),
    ("decode-str", lambda: seqkv.decode("\x89SEQKV\r\n"), FormatError),
    ("decode-list", lambda: seqkv.decode(list(S.balanced)), FormatError),
    ("decode-ndarray", lambda: seqkv.decode(np.frombuffer(S.balanced, np.uint8)), FormatError),
    ("decode-empty", lambda: seqkv.decode(b""), FormatError),
    ("decode-19-bytes", lambda: seqkv.decode(S.balanced[:19]), FormatError),
    ("decode-preamble-only", lambda: seqkv.decode(S.balanced[:20]), FormatError),
    ("decode-noncontiguous-memoryview", lambda: seqkv.decode(memoryview(S.balanced)[::2]), FormatError),
    ("decode-2d-memoryview", lambda: seqkv.decode(memoryview(np.zeros((8, 8), np.uint8)[:, ::2])), FormatError),
    ("decode-bad-magic", lambda: seqkv.decode(b"\x00" * 8 + S.balanced[8:]), FormatError),
    ("decode-major-2", lambda: seqkv.decode(S.balanced[:8] + b"\x02" + S.balanced[9:]), UnsupportedVersionError),
    ("decode-minor-9", lambda: seqkv.decode(S.balanced[:9] + b"\x09" + S.balanced[10:]), UnsupportedVersionError),
    ("decode-minor-1-for-1.0", lambda: seqkv.decode(S.balanced[:9] + b"\x01" + S.balanced[10:]), FormatError),
    ("decode-reserved-flag", lambda: seqkv.decode(S.balanced[:10] + b"\x02\x00" + S.balanced[12:]), FormatError),
    ("decode-header-length-huge", lambda: seqkv.decode(S.balanced[:12] + b"\xff\xff\xff\x7f" + S.balanced[16:]), FormatError),
    ("decode-header-crc", lambda: seqkv.decode(S.balanced[:16] + b"\x00\x00\x00\x00" + S.balanced[20:]), ChecksumError),
    ("decode-trailing-byte", lambda: seqkv.decode(S.balanced + b"\x00"), FormatError),
    ("decode-truncated-section", lambda: seqkv.decode(S.balanced[:-1]), FormatError),
    ("decode-section-crc", lambda: seqkv.decode(S.balanced[:-1] + bytes([S.balanced[-1] ^ 1])), ChecksumError),
    ("decode-header-not-json", lambda: seqkv.decode(raw_header(b"{not json")), FormatError),
    ("decode-header-not-utf8", lambda: seqkv.decode(raw_header(b'{"a": "\xff"}')), FormatError),
    ("decode-header-array", lambda: seqkv.decode(raw_header(b"[1, 2]")), FormatError),
    ("decode-header-nan-literal", lambda: seqkv.decode(raw_header(b'{"a": NaN, "sections": []}')), FormatError),
    ("decode-header-infinity-literal", lambda: seqkv.decode(raw_header(b'{"a": -Infinity, "sections": []}')), FormatError),
    ("decode-header-1e400", lambda: seqkv.decode(raw_header(b'{"a": 1e400, "sections": []}')), FormatError),
    ("decode-header-deep-nesting", lambda: seqkv.decode(raw_header(b'{"a": ' + b"[" * 200000 + b"]" * 200000 + b"}")),
     FormatError),
    ("decode-header-huge-int", lambda: seqkv.decode(raw_header(b'{"tokens": 1' + b"0" * 5000 + b', "sections": []}')),
     FormatError),
    ("decode-empty-header-object", lambda: seqkv.decode(raw_header(b"{}")), FormatError),
    # decode: resealed header edits (issue 16, findings 1 and 2)
    ("decode-balanced-tokens-doubled", lambda: seqkv.decode(edited("balanced", double_tokens)), FormatError),
    ("decode-lossless-tokens-doubled", lambda: seqkv.decode(edited("lossless", double_tokens)), FormatError),
    ("decode-lloydmax-tokens-doubled", lambda: seqkv.decode(edited("lloydmax", double_tokens)), FormatError),
    ("decode-calibrated-tokens-doubled", lambda: seqkv.decode(edited("calibrated", double_tokens), profile=S.profile),
     FormatError),
    ("decode-tokens-x1000", lambda: seqkv.decode(edited("balanced", lambda h: (set_path(h, "tokens", 12000),
                                                                               set_path(h, "positions.next", 12000)))),
     FormatError),
    ("decode-tokens-2-26", lambda: seqkv.decode(edited("balanced", lambda h: (set_path(h, "tokens", 2**26),
                                                                              set_path(h, "positions.next", 2**26)))),
     FormatError),
    ("decode-tokens-halved", lambda: seqkv.decode(edited("balanced", lambda h: (set_path(h, "tokens", 6),
                                                                                set_path(h, "positions.next", 6)))),
     FormatError),
    ("decode-crc-inf", lambda: seqkv.decode(raw_header(json.dumps(dict(split(S.balanced)[0], sections=[
        dict(split(S.balanced)[0]["sections"][0], crc32c=float("inf"))])).encode())), FormatError),
    ("decode-crc-float", lambda: seqkv.decode(raw_header(json.dumps(dict(split(S.balanced)[0], sections=[
        dict(split(S.balanced)[0]["sections"][0], crc32c=1.0)])).encode())), FormatError),
    ("decode-crc-str", lambda: seqkv.decode(raw_header(json.dumps(dict(split(S.balanced)[0], sections=[
        dict(split(S.balanced)[0]["sections"][0], crc32c="0")])).encode())), FormatError),
    ("decode-rope-inv-freq-1e39", lambda: decode_edit("balanced", "model.rope_inv_freq.0", 1e39), FormatError),
    ("decode-rope-inv-freq-str", lambda: decode_edit("balanced", "model.rope_inv_freq.0", "0.5"), FormatError),
    ("decode-rope-inv-freq-dict", lambda: decode_edit("balanced", "model.rope_inv_freq", {"0": 1.0}), FormatError),
    ("decode-rope-scaling-1e39", lambda: decode_edit("balanced", "model.rope_attention_scaling", 1e39), FormatError),
    ("decode-rope-scaling-1e-50", lambda: decode_edit("balanced", "model.rope_attention_scaling", 1e-50), FormatError),
    ("decode-rope-scaling-zero", lambda: decode_edit("balanced", "model.rope_attention_scaling", 0), FormatError),
    ("decode-rope-scaling-bool", lambda: decode_edit("balanced", "model.rope_attention_scaling", True), FormatError),
    ("decode-rope-theta-str", lambda: decode_edit("balanced", "model.rope_theta", "10000"), FormatError),
    ("decode-model-layers-str", lambda: decode_edit("balanced", "model.layers", "2"), FormatError),
    ("decode-model-layers-float", lambda: decode_edit("balanced", "model.layers", 2.0), FormatError),
    ("decode-model-extra-list", lambda: decode_edit("balanced", "model.extra", [["a", 1]]), FormatError),
    ("decode-model-fingerprint-int", lambda: decode_edit("balanced", "model.fingerprint", 5), FormatError),
    ("decode-model-not-object", lambda: decode_edit("balanced", "model", [2, 2, 16]), FormatError),
    ("decode-tokens-float", lambda: decode_edit("balanced", "tokens", 12.0), FormatError),
    ("decode-tokens-bool", lambda: decode_edit("balanced", "tokens", True), FormatError),
    ("decode-tokens-negative", lambda: decode_edit("balanced", "tokens", -12), FormatError),
    ("decode-dtype-int8", lambda: decode_edit("balanced", "dtype", "int8"), FormatError),
    ("decode-batch-2", lambda: decode_edit("balanced", "batch", 2), FormatError),
    ("decode-positions-next-wrong", lambda: decode_edit("balanced", "positions.next", 13), FormatError),
    ("decode-positions-start-huge", lambda: decode_edit("balanced", "positions.start", 2**62), FormatError),
    ("decode-step-str", lambda: decode_edit("balanced", "pipeline.quantizer.step", "0.25"), FormatError),
    ("decode-step-bool", lambda: decode_edit("balanced", "pipeline.quantizer.step", True), FormatError),
    ("decode-step-null", lambda: decode_edit("balanced", "pipeline.quantizer.step", None), FormatError),
    ("decode-classes-float", lambda: decode_edit("balanced", "pipeline.coder.classes_per_octave", 4.0), FormatError),
    ("decode-classes-str", lambda: decode_edit("balanced", "pipeline.coder.classes_per_octave", "4"), FormatError),
    ("decode-bits-str", lambda: decode_edit("lloydmax", "pipeline.quantizer.bits", "3"), FormatError),
    ("decode-seed-str", lambda: decode_edit("lloydmax", "pipeline.transforms.1.seed", "0"), FormatError),
    ("decode-seed-bool", lambda: decode_edit("lloydmax", "pipeline.transforms.1.seed", False), FormatError),
    ("decode-seed-2-70", lambda: decode_edit("lloydmax", "pipeline.transforms.1.seed", 2**70), FormatError),
    ("decode-cross-layer-str-false", lambda: decode_edit("calibrated", "pipeline.quantizer.cross_layer", "false"), FormatError),
    ("decode-cross-layer-int", lambda: decode_edit("calibrated", "pipeline.quantizer.cross_layer", 1), FormatError),
    ("decode-dedup-str", lambda: decode_edit("lossless", "pipeline.coder.dedup", "false"), FormatError),
    ("decode-mantissa-bits-bool", lambda: decode_edit("lossless", "pipeline.coder.mantissa_bits", True), FormatError),
    ("decode-sink-tokens-float", lambda: decode_edit("balanced", "pipeline.sink_tokens", 4.0), FormatError),
    ("decode-unknown-stage", lambda: decode_edit("balanced", "pipeline.coder", {"id": "zstd"}), FormatError),
    ("decode-stage-wrong-place", lambda: decode_edit("balanced", "pipeline.quantizer", {"id": "prerope"}), FormatError),
    ("decode-hadamard-head-dim-12", lambda: seqkv.decode(edited_hadamard_dim12()), FormatError),
    ("decode-profile-ref-removed", lambda: seqkv.decode(edited("calibrated", lambda h: h.pop("profile")), profile=S.profile),
     FormatError),
    ("decode-calibrated-layers-edited", lambda: seqkv.decode(edited("calibrated", lambda h: (
        set_path(h, "layers", 1), set_path(h, "model.layers", 1))), profile=S.profile), FormatError),
    # decode: the other arguments
    ("decode-device-nonsense", lambda: seqkv.decode(S.balanced, device="toaster"), ConfigError),
    ("decode-device-int", lambda: seqkv.decode(S.balanced, device=-3), ConfigError),
    ("decode-device-list", lambda: seqkv.decode(S.balanced, device=["cpu"]), ConfigError),
    ("decode-dtype-str", lambda: seqkv.decode(S.balanced, dtype="float16"), ConfigError),
    ("decode-dtype-int32", lambda: seqkv.decode(S.balanced, dtype=torch.int32), ConfigError),
    ("decode-dtype-float64", lambda: seqkv.decode(S.balanced, dtype=torch.float64), ConfigError),
    ("decode-layers-int", lambda: seqkv.decode(S.balanced, layers=1), ConfigError),
    ("decode-layers-out-of-range", lambda: seqkv.decode(S.balanced, layers=[2]), ConfigError),
    ("decode-layers-negative", lambda: seqkv.decode(S.balanced, layers=[-1]), ConfigError),
    ("decode-layers-bool", lambda: seqkv.decode(S.balanced, layers=[True]), ConfigError),
    ("decode-layers-str", lambda: seqkv.decode(S.balanced, layers="01"), ConfigError),
    ("decode-layers-float", lambda: seqkv.decode(S.balanced, layers=[0.0]), ConfigError),
    ("decode-layers-object", lambda: seqkv.decode(S.balanced, layers=object()), ConfigError),
    ("decode-pruned-layers-out-of-range", lambda: seqkv.decode(S.pruned, layers=[5]), ConfigError),
    ("decode-max-bytes-str", lambda: seqkv.decode(S.balanced, max_decoded_bytes="1e9"), ConfigError),
    ("decode-max-bytes-bool", lambda: seqkv.decode(S.balanced, max_decoded_bytes=True), ConfigError),
    ("decode-max-bytes-negative", lambda: seqkv.decode(S.balanced, max_decoded_bytes=-1), ConfigError),
    ("decode-max-bytes-float", lambda: seqkv.decode(S.balanced, max_decoded_bytes=1e9), ConfigError),
    ("decode-max-bytes-too-small", lambda: seqkv.decode(S.balanced, max_decoded_bytes=10), FormatError),
    ("decode-model-str", lambda: seqkv.decode(S.balanced, model="llama"), ConfigError),
    ("decode-model-wrong", lambda: seqkv.decode(S.balanced, model=S.qwen), ModelMismatchError),
    ("decode-calibrated-no-profile", lambda: seqkv.decode(S.calibrated), ProfileMismatchError),
    ("decode-calibrated-profile-str", lambda: seqkv.decode(S.calibrated, profile="p.safetensors"), ConfigError),
    ("decode-calibrated-other-profile", lambda: seqkv.decode(S.calibrated, profile=S.other_profile), ProfileMismatchError),

    # inspect / token_positions
    ("inspect-none", lambda: seqkv.inspect(None), FormatError),
    ("inspect-int", lambda: seqkv.inspect(7), FormatError),
    ("inspect-str", lambda: seqkv.inspect("container"), FormatError),
    ("inspect-truncated", lambda: seqkv.inspect(S.balanced[:100]), FormatError),
    ("inspect-tokens-2-26", lambda: seqkv.inspect(edited("balanced", lambda h: (set_path(h, "tokens", 2**26),
                                                                                set_path(h, "positions.next", 2**26)))),
     FormatError),
    ("inspect-rope-1e39", lambda: seqkv.inspect(edited("balanced", lambda h: set_path(h, "model.rope_inv_freq.0", 1e39))),
     FormatError),
    ("inspect-store-chunk", lambda: seqkv.inspect(S.chunk), FormatError),
    ("token-positions-none", lambda: seqkv.token_positions(None), FormatError),
    ("token-positions-major-0", lambda: seqkv.token_positions(b"\x89SEQKV\r\n" + b"\x00" * 40), UnsupportedVersionError),
    ("token-positions-pruned", lambda: seqkv.token_positions(S.pruned), ConfigError),
    ("token-positions-tokens-2-26", lambda: seqkv.token_positions(edited("lossless", lambda h: (
        set_path(h, "tokens", 2**26), set_path(h, "positions.next", 2**26)))), FormatError),

    # open_container and its reader
    ("open-dialect-unknown", lambda: open_container(S.balanced, dialect="zip"), ConfigError),
    ("open-dialect-int", lambda: open_container(S.balanced, dialect=1), ConfigError),
    ("open-cache-as-chunk", lambda: open_container(S.balanced, dialect="store_chunk"), FormatError),
    ("open-chunk-as-cache", lambda: open_container(S.chunk), FormatError),
    ("open-max-bytes-str", lambda: open_container(S.balanced, max_decoded_bytes="big"), ConfigError),
    ("open-profile-str", lambda: open_container(S.calibrated, profile="p"), ConfigError),
    ("open-profile-other", lambda: open_container(S.calibrated, profile=S.other_profile), ProfileMismatchError),
    ("reader-layer-out-of-range", lambda: open_container(S.balanced).layer(9), ConfigError),
    ("reader-layer-str", lambda: open_container(S.balanced).layer("0"), ConfigError),
    ("reader-layer-of-pruned", lambda: open_container(S.pruned).layer(0), ConfigError),
    ("reader-pruned-layer-of-plain", lambda: open_container(S.balanced).pruned_layer(0), ConfigError),
    ("reader-symbols-of-lossless", lambda: open_container(S.lossless).section_symbols(0, "keys"), ConfigError),
    ("reader-section-missing", lambda: open_container(S.balanced).section("layer.7.keys"), FormatError),
    ("reader-chunk-layers-of-cache", lambda: open_container(S.balanced).chunk_layers(), ConfigError),
    ("reader-chunk-layer-of-chunk", lambda: open_container(S.chunk, dialect="store_chunk").layer(0), ConfigError),

    # analyze
    ("analyze-int", lambda: analyze_api(42), UnsupportedCacheError),
    ("analyze-garbage-bytes", lambda: analyze_api(b"not a container"), FormatError),
    ("analyze-lossless", lambda: analyze_api(S.lossless), ConfigError),
    ("analyze-pruned", lambda: analyze_api(S.pruned), ConfigError),
    ("analyze-calibrated-no-profile", lambda: analyze_api(S.calibrated), ProfileMismatchError),
    ("analyze-original-str", lambda: analyze_api(S.balanced, original="cache"), UnsupportedCacheError),
    ("analyze-original-wrong-shape", lambda: analyze_api(S.balanced, original=S.cache(tokens=5)), ConfigError),
    ("analyze-profile-str", lambda: analyze_api(S.balanced, profile="p"), ConfigError),
    ("analyze-bad-encode-option", lambda: analyze_api(S.cache(), model=S.model, preset="balanced", nope=1), ConfigError),

    # pruner
    ("pruner-unknown-name", lambda: seqkv.pruner("magic", ratio=0.5), ConfigError),
    ("pruner-name-int", lambda: seqkv.pruner(3, ratio=0.5), ConfigError),
    ("pruner-no-ratio-no-budget", lambda: seqkv.pruner("key_norm"), PruneError),
    ("pruner-ratio-and-budget", lambda: seqkv.pruner("key_norm", ratio=0.5, budget=4), PruneError),
    ("pruner-ratio-one", lambda: seqkv.pruner("key_norm", ratio=1.0), PruneError),
    ("pruner-ratio-negative", lambda: seqkv.pruner("key_norm", ratio=-0.1), PruneError),
    ("pruner-ratio-str", lambda: seqkv.pruner("key_norm", ratio="0.5"), PruneError),
    ("pruner-ratio-nan", lambda: seqkv.pruner("key_norm", ratio=float("nan")), PruneError),
    ("pruner-budget-zero", lambda: seqkv.pruner("key_norm", budget=0), PruneError),
    ("pruner-budget-float", lambda: seqkv.pruner("key_norm", budget=4.5), PruneError),
    ("pruner-level-unknown", lambda: seqkv.pruner("key_norm", ratio=0.5, level="head"), PruneError),
    ("pruner-head-budget-unknown", lambda: seqkv.pruner("key_norm", ratio=0.5, head_budget="greedy"), PruneError),
    ("pruner-chunk-size-zero", lambda: seqkv.pruner("key_norm", ratio=0.5, level="chunk", chunk_size=0), PruneError),
    ("pruner-chunk-size-str", lambda: seqkv.pruner("key_norm", ratio=0.5, level="chunk", chunk_size="8"), PruneError),
    ("pruner-unknown-option", lambda: seqkv.pruner("key_norm", ratio=0.5, window=3), ConfigError),
    ("pruner-snapkv-window-negative", lambda: seqkv.pruner("snapkv", ratio=0.5, window_size=-1), ConfigError),
    ("pruner-ensemble-scorers-str", lambda: seqkv.pruner("ensemble", scorers="snapkv", ratio=0.5), ConfigError),
    ("pruner-ensemble-unknown-scorer", lambda: seqkv.pruner("ensemble", scorers=("snapkv", "magic"), ratio=0.5),
     ConfigError),
    ("pruner-scorer-options-list", lambda: seqkv.pruner("ensemble", scorers=("snapkv",), scorer_options=[1], ratio=0.5),
     ConfigError),
    ("pruner-prune-not-a-cache", lambda: seqkv.pruner("key_norm", ratio=0.5).prune("cache"), UnsupportedCacheError),
    ("pruner-prune-budget-too-big", lambda: seqkv.pruner("key_norm", budget=1000).prune(S.cache(), model=S.model),
     PruneError),
    ("pruner-snapkv-without-queries", lambda: seqkv.pruner("snapkv", ratio=0.5).prune(S.cache(), model=S.model), PruneError),

    # calibrate: argument checks
    ("calibrate-model-str", lambda: seqkv.calibrate("llama", [list(range(300))]), ConfigError),
    ("calibrate-texts-none", lambda: seqkv.calibrate(S.model, None), ConfigError),
    ("calibrate-texts-int", lambda: seqkv.calibrate(S.model, 5), ConfigError),
    ("calibrate-texts-empty", lambda: seqkv.calibrate(S.model, []), ConfigError),
    ("calibrate-strings-without-tokenizer", lambda: seqkv.calibrate(S.model, ["some text"]), ConfigError),
    ("calibrate-too-few-tokens", lambda: seqkv.calibrate(S.model, [torch.arange(10)]), ConfigError),
    ("calibrate-token-ids-out-of-vocab", lambda: seqkv.calibrate(S.model, [torch.arange(300) + 1000]), ConfigError),
    ("calibrate-token-ids-float", lambda: seqkv.calibrate(S.model, [torch.rand(300)]), ConfigError),
    ("calibrate-sink-tokens-negative", lambda: seqkv.calibrate(S.model, [torch.arange(300) % 96], sink_tokens=-1), ConfigError),
    ("calibrate-prompt-len-zero", lambda: seqkv.calibrate(S.model, [torch.arange(300) % 96], prompt_len=0), ConfigError),
    ("calibrate-prompt-len-str", lambda: seqkv.calibrate(S.model, [torch.arange(300) % 96], prompt_len="200"), ConfigError),
    ("calibrate-continuation-negative", lambda: seqkv.calibrate(S.model, [torch.arange(300) % 96], continuation_len=-5),
     ConfigError),
]


def edited_hadamard_dim12() -> bytes:
    """A balanced container of a head_dim-12 model with the Hadamard rotation added to its pipeline."""
    blob = seqkv.encode(S.cache(head_dim=12), preset="balanced", model=S.model12)
    header, sections = split(blob)
    header["pipeline"]["transforms"].append({"id": "hadamard", "seed": 0})
    return reseal(header, sections, blob)


def test_the_table_is_large_and_its_ids_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 250


@pytest.mark.parametrize("call,expected", [pytest.param(fn, exc, id=name) for name, fn, exc in CASES])
def test_bad_input_raises_a_seqkv_error(call, expected):
    with pytest.raises(SeqKVError) as info:
        call()
    assert isinstance(info.value, expected), f"expected {expected.__name__}, got {type(info.value).__name__}: {info.value}"
    assert str(info.value), "the error must say what is wrong"
    if issubclass(expected, DecodeError):  # bytes problems are DecodeErrors, never API errors
        assert isinstance(info.value, DecodeError)


def test_compression_bound_refused_by_the_writer_and_the_reader(monkeypatch):
    """A container beyond the expansion bound is never written, and a reader refuses one (the bound lowered to
    what a tiny container exceeds, so the test stays small)."""
    from seqkv.format import header as header_module

    blob = seqkv.encode(S.cache(), preset="balanced", model=S.model)
    monkeypatch.setattr(header_module, "MAX_ELEMENTS_PER_BYTE", 0)
    with pytest.raises(CompressionBoundError, match="elements per byte"):
        seqkv.encode(S.cache(), preset="balanced", model=S.model)
    with pytest.raises(FormatError, match="elements per byte"):
        seqkv.decode(blob)
    with pytest.raises(FormatError, match="elements per byte"):
        seqkv.inspect(blob)


def test_zero_cache_within_the_bound_round_trips():
    """A constant cache codes to almost nothing; below the bound it still encodes and decodes exactly."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(2):
        cache.update(torch.zeros(1, 2, 4096, 16), torch.zeros(1, 2, 4096, 16), i)
    blob = seqkv.encode(cache, preset="balanced", model=S.model)
    out = seqkv.decode(blob)
    assert all(not layer.keys.any() and not layer.values.any() for layer in out.layers)
    assert out.layers[0].keys.shape[2] == 4096


# -- issue 16: what the lossy presets carry, and what decode gives back --------------------------------------------

@pytest.mark.parametrize("preset", ["near_lossless", "balanced", "small"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_largest_finite_value_never_comes_back_as_inf(preset, dtype):
    """Finding 3: fp16 65504 came back as inf through balanced (a reconstruction half a step above the largest
    finite value rounds to inf).  Decoding clamps to the dtype's range, which only lowers the error."""
    largest = torch.finfo(dtype).max if dtype == torch.float16 else 2.0 ** 49   # bf16: below MAX_LOSSY_MAGNITUDE
    cache = S.cache(dtype, tokens=24)
    for layer in cache.layers:
        layer.keys[0, 0, 10:14, 3] = largest
        layer.values[0, 1, 9, 0] = largest
        layer.values[0, 0, 17, 5] = -largest
    out = seqkv.decode(seqkv.encode(cache, preset=preset, model=S.model))
    for a, b in zip(cache.layers, out.layers):
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            assert torch.isfinite(y).all()
            assert float(y.float().abs().max()) <= float(torch.finfo(dtype).max)


def test_float32_values_up_to_the_stated_magnitude_round_trip():
    """Finding 3: fp32 values above ~1.9e19 encoded and then failed to decode (x**2 overflowed in the
    quantizer's steps).  Up to MAX_LOSSY_MAGNITUDE they encode and decode finite; above it encode refuses."""
    from seqkv.format.pipeline import MAX_LOSSY_MAGNITUDE

    cache = S.cache_with(MAX_LOSSY_MAGNITUDE, kind="values")
    out = seqkv.decode(seqkv.encode(cache, preset="balanced", model=S.model))
    assert all(torch.isfinite(layer.values).all() and torch.isfinite(layer.keys).all() for layer in out.layers)
    assert abs(float(out.layers[0].values[0, 0, 7, 3]) / MAX_LOSSY_MAGNITUDE - 1) < 0.25
    with pytest.raises(ValueRangeError, match="lossless"):
        seqkv.encode(S.cache_with(MAX_LOSSY_MAGNITUDE * 2, kind="values"), preset="balanced", model=S.model)
    lossless = seqkv.decode(seqkv.encode(S.cache_with(1e30), preset="lossless"))
    assert float(lossless.layers[0].keys[0, 0, 7, 3]) == pytest.approx(1e30)


def test_hadamard_signs_do_not_depend_on_the_default_dtype():
    """Finding 2c: the signs were drawn in torch's default dtype, so torch.set_default_dtype(torch.float64)
    changed them (and the rotation's dtype)."""
    from seqkv.stages.hadamard import rotation_matrix

    rotation_matrix.cache_clear()
    reference = rotation_matrix(64, 5).clone()
    blob = seqkv.encode(S.cache(), preset="balanced", model=S.model, rotation="hadamard", seed=5)
    before = seqkv.decode(blob)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        rotation_matrix.cache_clear()
        assert rotation_matrix(64, 5).dtype == torch.float32
        assert torch.equal(rotation_matrix(64, 5), reference)
        again = seqkv.encode(S.cache(), preset="balanced", model=S.model, rotation="hadamard", seed=5)
        after = seqkv.decode(blob)
    finally:
        torch.set_default_dtype(old)
        rotation_matrix.cache_clear()
    assert again == blob
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) for a, b in zip(before.layers, after.layers))


def test_stage_options_are_strict_but_every_golden_file_decodes():
    """Finding 2c: options were converted with typ(value), so "false" read as true.  Now JSON types are
    required; the golden files (canonical types) all decode (tests/test_golden.py decodes them fully)."""
    import glob
    import os

    from seqkv.stages import stage_from_config

    assert stage_from_config({"id": "uniform", "step": 1}).step == 1.0   # an integer is a number
    for bad in ({"id": "klt_uniform", "cross_layer": "false"}, {"id": "klt_uniform", "cross_layer": 0},
                {"id": "uniform", "step": "0.25"}, {"id": "context_ans", "classes_per_octave": 4.0},
                {"id": "lossless_float", "dedup": 1}, {"id": "hadamard", "seed": 2**64}):
        with pytest.raises(ConfigError):
            stage_from_config(bad)
    golden = os.path.join(os.path.dirname(__file__), "golden")
    for path in sorted(glob.glob(os.path.join(golden, "*.skv"))):
        with open(path, "rb") as f:
            blob = f.read()
        profile_path = path[:-len(".skv")] + ".profile.safetensors"
        profile = seqkv.Profile.load(profile_path) if os.path.exists(profile_path) else None
        open_container(blob, profile=profile)   # the pipeline and the layout parse strictly


def test_a_constant_cache_beyond_the_bound_is_refused_by_the_writer():
    """Near the bound for real: a zero cache of 100k tokens codes to about 3 KB (every class constant, 0 ANS
    words), over 4096 elements per byte, so encode refuses it instead of writing what decode would refuse."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(2):
        cache.update(torch.zeros(1, 2, 100_000, 16, dtype=torch.float16),
                     torch.zeros(1, 2, 100_000, 16, dtype=torch.float16), i)
    with pytest.raises(CompressionBoundError, match="4096 elements per byte"):
        seqkv.encode(cache, preset="balanced", model=S.model)
