"""Hypothesis strategies and assertions for your own seqkv round-trip tests.

    from hypothesis import given
    from seqkv.testing import assert_lossless_roundtrip, assert_within_bound, caches, configs

    @given(caches(special_values=True))            # NaN payloads, +-Inf, -0.0, subnormals
    def test_lossless_round_trip(cache):
        assert_lossless_roundtrip(cache)           # bit-exact, every dtype

    @given(caches(with_config=True), configs(lossless=False, lloydmax=False))
    def test_lossy_round_trip(cache_and_config, options):
        cache, config = cache_and_config
        assert_within_bound(cache, config=config, **options)

Strategies:

- :func:`caches`: a ``DynamicCache`` of a small Llama/Qwen2/Mistral-like layout (GQA, 1-3 layers, odd
  token counts, fp32/fp16/bf16, values from 1e-3 to 1e3, outlier tokens and channels, repeated and
  nearly repeated tokens); optionally with NaN payloads, +-Inf, -0.0 and subnormals (lossless only), and
  optionally with the transformers config of that layout (lossy encodes need its RoPE parameters);
- :func:`configs`: ``seqkv.encode`` keywords: a preset and valid options;
- :func:`containers`: container bytes made from both.

Assertions (each returns the container it checked):

- :func:`assert_lossless_roundtrip`: encode losslessly, decode, every bit equal (each layer alone too);
- :func:`assert_within_bound`: encode lossily, decode: the sink tokens bit-exact and every other element
  within the quantizer's bound, half a step (``(1 - rounding) * step``) in the domain the quantizer works in
  (pre-RoPE keys, after any rotation or the profile's KLT), plus the rounding of the decoded dtype.

This module needs ``hypothesis`` (``pip install seqkv[testing]``); ``import seqkv`` does not load it.
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from .codec import decode, encode, inspect, token_positions
from .format import Pipeline
from .hf_adapter import build_cache, cache_layers
from .layout import layout_from_model
from .presets import PRESETS
from .shipped_profiles import profile_for_ref
from .stages.base import CodingState, TensorContext

__all__ = ["caches", "configs", "containers", "assert_lossless_roundtrip", "assert_within_bound",
           "FAMILIES", "DTYPES", "SPECIAL_BITS"]

FAMILIES = ("llama", "qwen2", "mistral")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOSSY_PRESETS = tuple(name for name, cfg in PRESETS.items() if cfg["mode"] == "lossy")
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

# bit patterns a lossless codec must keep: quiet and signalling NaNs with payloads (both signs), +-Inf,
# -0.0, the smallest subnormal and the largest finite value
SPECIAL_BITS = {
    torch.float32: (0x7FC00000, 0x7F800001, 0xFFC00123, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001, 0x7F7FFFFF),
    torch.float16: (0x7E00, 0x7C01, 0xFE3F, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x7BFF),
    torch.bfloat16: (0x7FC0, 0x7F81, 0xFFC5, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x7F7F),
}


def _signed(bits: int, width: int) -> int:
    return bits - (1 << width) if bits >= 1 << (width - 1) else bits


def model_config(family: str, layers: int, kv_heads: int, heads: int, head_dim: int, rope_theta: float = 10000.0):
    """The transformers config of a small model of ``family`` ("llama", "qwen2" or "mistral") with this layout."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[family]
    extra = {"sliding_window": None} if family in ("qwen2", "mistral") else {}
    config = cls(vocab_size=64, hidden_size=heads * head_dim, intermediate_size=32, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                 max_position_embeddings=4096, **extra)
    if hasattr(config, "rope_parameters") and isinstance(config.rope_parameters, dict):
        config.rope_parameters["rope_theta"] = rope_theta
    else:
        config.rope_theta = rope_theta
    return config


@st.composite
def caches(draw, *, families=FAMILIES, dtypes=DTYPES, layers=(1, 3), kv_heads=(1, 3), gqa_groups=(1, 3),
           tokens=(1, 40), head_dims=(4, 8, 16, 32), special_values: bool = False, with_config: bool = False):
    """A ``DynamicCache`` (batch 1) of a small model layout, or ``(cache, config)`` with ``with_config``.

    ``layers``, ``kv_heads``, ``gqa_groups`` (query heads per KV head) and ``tokens`` are inclusive
    (min, max) ranges; ``head_dims`` and ``dtypes`` the choices (power-of-two head sizes: the Hadamard
    rotation needs them).  The tensors are drawn from a seed (so hypothesis shrinks the shape, scale and
    features, not millions of floats): Gaussian at a scale of 1e-3 to 1e3, optionally with large-norm
    outlier tokens and channels (as attention sinks and outlier channels are; float16 up to 1e2, so
    that they stay finite), exactly repeated tokens and
    nearly repeated ones.  ``special_values`` also writes NaN payloads, +-Inf, -0.0, subnormals and the
    largest finite value at drawn places: only the lossless preset keeps those (lossy presets refuse NaN
    and Inf with NonFiniteError).
    """
    family = draw(st.sampled_from(families))
    n_layers = draw(st.integers(*layers))
    n_kv = draw(st.integers(*kv_heads))
    group = draw(st.integers(*gqa_groups))
    n_tokens = draw(st.integers(*tokens))
    dim = draw(st.sampled_from(head_dims))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**32 - 1))
    exponent = draw(st.integers(-3, 2 if dtype == torch.float16 else 3))   # float16 overflows past 65504
    outliers = draw(st.booleans())
    repeats = draw(st.integers(0, min(4, n_tokens - 1)))
    near_repeats = draw(st.integers(0, min(4, n_tokens - 1)))
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for _ in range(n_layers):
        pair = []
        for _kind in range(2):
            x = torch.randn(n_kv, n_tokens, dim, generator=gen) * 10.0 ** exponent
            if outliers and n_tokens > 1:
                x[:, 0] *= 30                      # a sink-like token of large norm
                x[..., 0] += 5 * 10.0 ** exponent  # an outlier channel
            for _r in range(repeats):              # a token row stored again later (lossless references it)
                src, dst = torch.randint(0, n_tokens, (2,), generator=gen).tolist()
                x[:, dst] = x[:, src]
            for _r in range(near_repeats):         # a near-repeat (a residual for lossless)
                src, dst = torch.randint(0, n_tokens, (2,), generator=gen).tolist()
                x[:, dst] = x[:, src] + 1e-3 * 10.0 ** exponent * torch.randn(n_kv, dim, generator=gen)
            pair.append(x.to(dtype))
        tensors.append(tuple(pair))
    if special_values:
        width = torch.finfo(dtype).bits
        places = draw(st.lists(st.tuples(st.integers(0, n_layers - 1), st.integers(0, 1), st.integers(0, n_kv - 1),
                                         st.integers(0, n_tokens - 1), st.integers(0, dim - 1),
                                         st.sampled_from(SPECIAL_BITS[dtype])), max_size=8))
        for layer, kind, head, token, channel, bits in places:
            tensors[layer][kind].view(_INT_VIEW[dtype])[head, token, channel] = _signed(bits, width)
    cache = build_cache(tensors)
    if not with_config:
        return cache
    theta = draw(st.sampled_from([10000.0, 100000.0, 500000.0]))
    return cache, model_config(family, n_layers, n_kv, n_kv * group, dim, theta)


def configs(*, lossless: bool = True, lossy: bool = True, lloydmax: bool = True, hadamard: bool = True):
    """``seqkv.encode`` keyword dicts: ``{"preset": "lossless"}`` and lossy presets with valid options
    (``step``, ``sink_tokens``, ``rounding``, ``key_channel_gamma``, ``rotation="hadamard"`` with a
    ``seed``, ``quantizer="lloydmax"`` with ``bits``).  :func:`assert_within_bound` knows the bound of
    the uniform quantizer only: draw with ``lloydmax=False`` for it."""
    choices = []
    if lossless:
        choices.append(st.just({"preset": "lossless"}))
    if lossy:
        base = st.fixed_dictionaries(
            {"preset": st.sampled_from(LOSSY_PRESETS)},
            optional={"sink_tokens": st.integers(0, 6)})
        quantizers = [st.fixed_dictionaries({}, optional={"step": st.floats(0.02, 1.0), "rounding": st.floats(0.3, 0.5),
                                                          "key_channel_gamma": st.floats(0.0, 1.5)})]
        if lloydmax:
            quantizers.append(st.fixed_dictionaries({"quantizer": st.just("lloydmax"), "bits": st.integers(2, 6)}))
        rotations = [st.just({})]
        if hadamard:
            rotations.append(st.fixed_dictionaries({"rotation": st.just("hadamard"), "seed": st.integers(0, 2**31 - 1)}))
        choices.append(st.tuples(base, st.one_of(quantizers), st.one_of(rotations)).map(
            lambda parts: {k: v for part in parts for k, v in part.items()}))
    if not choices:
        raise ValueError("configs() needs lossless=True or lossy=True")
    return st.one_of(choices)


@st.composite
def containers(draw, *, configs_strategy=None, **cache_options):
    """Container bytes: a drawn cache (``cache_options`` as for :func:`caches`) encoded with drawn
    :func:`configs` (or ``configs_strategy``).  Lossless containers may hold NaN/Inf/-0.0; lossy ones
    are made with the cache's own model config."""
    kwargs = draw(configs_strategy if configs_strategy is not None else configs())
    lossless = kwargs.get("preset") == "lossless"
    options = {"special_values": lossless, **cache_options, "with_config": True}
    cache, config = draw(caches(**options))
    return encode(cache, config=None if lossless else config, **kwargs)


# -- assertions ------------------------------------------------------------------------------------------
def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(_INT_VIEW[x.dtype])


def _assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.dtype != b.dtype or a.shape != b.shape:
        raise AssertionError(f"{what}: decoded {b.dtype} {tuple(b.shape)}, the original is {a.dtype} {tuple(a.shape)}")
    diff = _bits(a) != _bits(b)
    if bool(diff.any()):
        idx = tuple(int(i) for i in diff.nonzero()[0])
        width = torch.finfo(a.dtype).bits // 4
        mask = (1 << (4 * width)) - 1
        raise AssertionError(
            f"{what}: {int(diff.sum())} of {diff.numel()} elements are not bit-exact; the first at {idx}: "
            f"0x{int(_bits(a)[idx]) & mask:0{width}x} ({float(a[idx])!r}) came back as "
            f"0x{int(_bits(b)[idx]) & mask:0{width}x} ({float(b[idx])!r})")


def _assert_caches_bit_exact(original, decoded, indices=None) -> None:
    src, out = cache_layers(original), cache_layers(decoded)
    indices = list(range(len(src))) if indices is None else list(indices)
    if len(out) != len(indices):
        raise AssertionError(f"decoded {len(out)} layers, expected {len(indices)}")
    for j, i in enumerate(indices):
        for kind, a, b in zip(("keys", "values"), src[i], out[j]):
            _assert_bits_equal(a, b, f"layer {i} {kind}")


def assert_lossless_roundtrip(cache, **encode_kwargs) -> bytes:
    """Encode ``cache`` with the lossless preset (``encode_kwargs`` as for ``seqkv.encode``; ``preset``
    defaults to "lossless" and must be it), decode it, and raise AssertionError unless every element comes
    back bit for bit (NaN payloads, +-Inf and -0.0 included), in the same dtype and shape, and unless the
    last layer decoded alone does too.  Returns the container."""
    kwargs = {"preset": "lossless", **encode_kwargs}
    if kwargs["preset"] != "lossless":
        raise ValueError(f"assert_lossless_roundtrip is for preset='lossless', got {kwargs['preset']!r}; "
                         "use assert_within_bound for lossy presets")
    data = encode(cache, **kwargs)
    _assert_caches_bit_exact(cache, decode(data))
    last = len(cache_layers(cache)) - 1
    _assert_caches_bit_exact(cache, decode(data, layers=[last]), [last])
    return data


def assert_within_bound(cache, *, model=None, config=None, profile=None, data: bytes | None = None,
                        **encode_kwargs) -> bytes:
    """Encode ``cache`` lossily (``seqkv.encode(cache, model=, config=, profile=, **encode_kwargs)``, or check
    the container ``data`` made from it), decode it, and raise AssertionError unless

    - the sink tokens (the pipeline's ``sink_tokens`` first ones) come back bit-exact, and
    - every other element, in the domain the quantizer works in (keys pre-RoPE, then any Hadamard rotation,
      or the profile's KLT for the calibrated codec), is within the quantizer's bound of the original:
      ``(1 - rounding) * step``, half a step when rounding to nearest, with the uniform quantizer's steps
      recomputed from the cache as the encoder does (per head and channel, relative to the RMS) or the
      profile's per-component steps at the container's scale (closed-loop prediction keeps the bound),
      plus what rounding the decoded values to the cache's dtype may add (its epsilon times the token's norm).

    Lloyd-Max containers have no such bound (the outer levels clip): a ValueError.  Returns the container."""
    if data is None:
        data = encode(cache, model=model, config=config, profile=profile, **encode_kwargs)
    info = inspect(data)
    if info["pruning"] is not None:
        raise ValueError("assert_within_bound checks unpruned containers; prune after checking the codec")
    pipeline = Pipeline(info["pipeline"])
    decoded = decode(data, profile=profile)
    if pipeline.lossless:
        _assert_caches_bit_exact(cache, decoded)
        return data
    quantizer = pipeline.quantizer
    if quantizer.id not in ("uniform", "klt_uniform"):
        raise ValueError(f"the {quantizer.id!r} quantizer has no max-error bound (its outer levels clip); "
                         "assert_within_bound knows the uniform quantizers")
    if info["profile"] is not None and profile is None:
        profile = profile_for_ref(info["profile"]["sha256"])   # the shipped profile decode() used
    source = model if model is not None else config
    layout = layout_from_model(source) if source is not None else profile.layout
    positions = token_positions(data)
    state = CodingState(profile=profile)
    sinks = min(pipeline.sink_tokens, info["tokens"])
    scale = None if info["rate_control"] is None else float(np.float32(info["rate_control"]["scale"]))
    for i, (orig, dec) in enumerate(zip(cache_layers(cache), cache_layers(decoded))):
        for kind, x, xh in zip(("keys", "values"), orig, dec):
            what = f"layer {i} {kind}"
            _assert_bits_equal(x[:, :sinks], xh[:, :sinks], f"{what} sink tokens")
            if x.shape[1] == sinks:
                continue
            ctx = TensorContext(layer=i, kind=kind, positions=positions, layout=layout, state=state)
            y = pipeline.transform(x.cpu(), ctx)[:, sinks:]
            yh = pipeline.transform(xh.cpu(), ctx)[:, sinks:]
            heads, _, dim = y.shape
            if quantizer.id == "uniform":
                bound = quantizer.max_abs_error(quantizer.channel_steps(y, kind))
            else:
                bound = profile.parts[(i, kind)].steps(scale).reshape(heads, dim) * (1.0 - quantizer.rounding)
            # the decoded dtype's rounding, moved by the (orthogonal) transforms: at most eps x the token's norm
            finfo = torch.finfo(x.dtype)
            norms = xh[:, sinks:].to(torch.float64).pow(2).sum((0, 2)).sqrt()
            slack = (finfo.eps + 1e-5) * norms + finfo.smallest_normal * finfo.eps * (heads * dim) ** 0.5
            err = (yh.double() - y.double()).abs()
            limit = bound.double()[:, None, :] * (1 + 1e-4) + slack[None, :, None]
            bad = err > limit
            if bool(bad.any()):
                h, t, d = (int(v) for v in bad.nonzero()[0])
                raise AssertionError(
                    f"{what}: {int(bad.sum())} of {bad.numel()} elements are outside the quantizer's bound; the "
                    f"first at head {h}, token {t + sinks}, channel {d}: error {float(err[h, t, d]):.6g} in the "
                    f"quantizer's domain, bound {float(bound[h, d]):.6g} (+ {float(slack[t]):.3g} for the "
                    f"{x.dtype} rounding)")
    return data
