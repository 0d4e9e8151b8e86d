"""seqkv.format.chunk_run: a run of store chunks decoded together gives what decoding them one by one gives,
and the CPU fast paths it relies on (numpy KLT steps, memoised quantizer steps) compute the same floats."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_profile

import seqkv
from seqkv.hf_adapter import cache_layers
from seqkv.layout import layout_from_model
from seqkv.model_calls import cache_of
from seqkv.presets import calibrated_pipeline_config, pipeline_config
from seqkv.store import PrefixStore
from seqkv.store.chunk_codec import ParsedChunk, encode_chunk
from seqkv.format.chunk_run import all_finite, assemble, join_tokens
from seqkv.stages.klt import add_rows, centred_columns, columns_of
from seqkv.stages.quantize_klt import component_steps

CODECS = ["lossless", "balanced", "calibrated"]


@torch.no_grad()
def _cache(tokens: int, seed: int):
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (1, tokens), generator=gen)
    return ids[0].tolist(), cache_layers(cache_of(model(ids, use_cache=True)))


def _config(codec: str, profile):
    if codec == "calibrated":
        return calibrated_pipeline_config(profile.sink_tokens), {"profile": profile, "scale": 0.05}
    return pipeline_config(codec), {}


def _chunks(codec: str, bounds, layers, base=None):
    """Payloads of the cache's chunks [s, e) as the store codes them (sink tokens only in the chunk at 0)."""
    profile = tiny_profile("llama")
    cfg, extra = _config(codec, profile)
    layout = layout_from_model(tiny_model("llama"))
    out = []
    for s, e in bounds:
        chunk_cfg = dict(cfg, sink_tokens=0) if (cfg["mode"] == "lossy" and s > 0) else cfg
        payload, _ = encode_chunk([(k[:, s:e], v[:, s:e]) for k, v in layers], torch.arange(s, e), chunk_cfg, layout,
                                  "float32", token_section=None if base else b"", token_code="base" if base else "zstd",
                                  base=base, **extra)
        out.append(payload)
    return out, profile if codec == "calibrated" else None


def _one_by_one(payloads, profile, base=None):
    """The reference: each chunk through the container reader's own chunk_layers, concatenated."""
    per_chunk = []
    for payload in payloads:
        reader = ParsedChunk(payload).reader
        if profile is not None:
            reader.use_profile(profile)
        per_chunk.append(reader.chunk_layers(base))
    return [tuple(torch.cat([c[i][j] for c in per_chunk], dim=1) for j in range(2)) for i in range(len(per_chunk[0]))]


def _assert_same(got, want, exact: bool):
    assert len(got) == len(want)
    for pair_g, pair_w in zip(got, want):
        for g, w in zip(pair_g, pair_w):
            assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
            if exact:
                assert torch.equal(g, w)
            else:  # another BLAS kernel for another matrix size may round a product's last bit differently
                assert torch.allclose(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


@pytest.mark.parametrize("codec", CODECS)
def test_one_chunk_decodes_exactly_as_the_container_reader(codec):
    _, layers = _cache(20, seed=1)
    payloads, profile = _chunks(codec, [(0, 20)], layers)
    got = ParsedChunk(payloads[0]).decode(None, profile)
    _assert_same(got, _one_by_one(payloads, profile), exact=True)


@pytest.mark.parametrize("codec", CODECS)
def test_a_run_of_chunks_decodes_as_the_chunks_one_by_one(codec):
    _, layers = _cache(30, seed=2)
    bounds = [(0, 8), (8, 16), (16, 24), (24, 30)]
    payloads, profile = _chunks(codec, bounds, layers)
    got = assemble([ParsedChunk(p).sections(None, profile) for p in payloads])
    _assert_same(got, _one_by_one(payloads, profile), exact=codec == "lossless")
    assert got[0][0].shape[1] == 30


@pytest.mark.parametrize("codec", ["balanced", "calibrated"])
def test_sink_tokens_after_the_first_chunk_start_a_new_run(codec):
    """A chunk with exact sink tokens (here every chunk keeps its first tokens exact) is restored on its own."""
    _, layers = _cache(24, seed=3)
    profile = tiny_profile("llama")
    cfg, extra = _config(codec, profile)
    cfg = dict(cfg, sink_tokens=2)
    layout = layout_from_model(tiny_model("llama"))
    payloads = [encode_chunk([(k[:, s:s + 8], v[:, s:s + 8]) for k, v in layers], torch.arange(s, s + 8), cfg,
                             layout, "float32", token_section=b"", token_code="zstd", **extra)[0]
                for s in (0, 8, 16)]
    prof = profile if codec == "calibrated" else None
    got = assemble([ParsedChunk(p).sections(None, prof) for p in payloads])
    want = _one_by_one(payloads, prof)
    _assert_same(got, want, exact=False)
    for s in (0, 8, 16):  # the sinks are the cache's own values
        assert torch.equal(got[1][0][:, s:s + 2], layers[1][0][:, s:s + 2])


@pytest.mark.parametrize("codec", CODECS)
def test_residual_chunks_in_a_run_decode_as_one_by_one(codec):
    """Chunks coded against a base (the same tokens at other positions) join a run like plain ones."""
    _, layers = _cache(24, seed=4)
    payload_base, profile = _chunks(codec, [(8, 16)], layers)
    base_layers = ParsedChunk(payload_base[0]).decode(None, profile)
    base = ("0" * 64, base_layers, torch.arange(8, 16))
    # the base's own tensors at positions 0..7: the values at least code as residuals
    residual, _ = _chunks(codec, [(0, 8)], [(k[:, 8:16], v[:, 8:16]) for k, v in layers], base=base)
    plain, _ = _chunks(codec, [(8, 16), (16, 24)], layers)
    parsed = [ParsedChunk(p) for p in residual + plain]
    assert "r" in parsed[0].modes
    base_arg = (base_layers, torch.arange(8, 16))
    sections = [parsed[0].sections(base_arg, profile)] + [p.sections(None, profile) for p in parsed[1:]]
    got = assemble(sections)
    want = [tuple(torch.cat(parts, dim=1) for parts in zip(*pairs))
            for pairs in zip(_one_by_one(residual, profile, base_arg), _one_by_one(plain, profile))]
    _assert_same(got, want, exact=codec == "lossless")


@pytest.mark.parametrize("codec", CODECS)
def test_store_hit_equals_its_entries_decoded_one_by_one(tmp_path, codec):
    model = tiny_model("llama")
    ids, layers = _cache(40, seed=5)
    kwargs = {"preset": codec} if codec != "calibrated" else {"profile": tiny_profile("llama"),
                                                              "codec_options": {"scale": 0.05}}
    from seqkv.hf_adapter import build_cache
    from seqkv.store.envelope import unpack_entry

    with PrefixStore(f"file://{tmp_path}", model=model, chunk_tokens=16, **kwargs) as store:
        store.put(ids, build_cache(layers))
        n, cache = store.longest_prefix(ids)
        assert n == 40
        payloads = [unpack_entry(store.backend.get(k), k)[1] for k in store.keys_for(ids)]
    want = _one_by_one(payloads, kwargs.get("profile"))
    _assert_same(cache_layers(cache), want, exact=codec == "lossless")


def test_join_tokens_keeps_values_and_layout():
    a = torch.randn(3, 5, 4).transpose(1, 2).contiguous().transpose(1, 2)  # channel-major, like the KLT's
    b = torch.randn(3, 2, 4).transpose(1, 2).contiguous().transpose(1, 2)
    joined = join_tokens([a, b])
    assert torch.equal(joined, torch.cat([a, b], dim=1)) and joined.stride(1) == 1
    c = torch.randn(3, 2, 4)  # token-major: the plain [H, T, D] layout
    assert torch.equal(join_tokens([a, c]), torch.cat([a, c], dim=1))
    half = [a.half(), b.half()]
    assert torch.equal(join_tokens(half), torch.cat(half, dim=1))


def test_all_finite():
    x = torch.randn(2, 3, 4)
    assert all_finite(x) and all_finite(x.half()) and all_finite(x[:, :0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 2, 3] = bad
        assert not all_finite(y) and not all_finite(y.transpose(1, 2)) and not all_finite(y.bfloat16())


def test_numpy_klt_steps_compute_torch_floats():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 8, generator=gen) * 10
    mean = torch.randn(24, generator=gen)
    assert torch.equal(centred_columns(x, mean), columns_of(x) - mean[:, None])
    assert torch.equal(centred_columns(x.transpose(1, 2).contiguous().transpose(1, 2), mean),
                       columns_of(x) - mean[:, None])
    rows = torch.randn(17, 24, generator=gen)
    assert torch.equal(add_rows(rows.clone(), mean), rows.clone().add_(mean))


def test_component_steps_are_kept_until_their_part_changes():
    profile = seqkv.Profile.from_bytes(tiny_profile("llama").to_bytes())  # a private copy to edit
    part = profile.parts[(1, "keys")]
    heads, dim = 2, 16
    first = component_steps(part, 0.05, heads, dim)
    assert torch.equal(first, part.steps(0.05).reshape(heads, dim))
    assert component_steps(part, 0.05, heads, dim) is first  # kept
    assert torch.equal(component_steps(part, 0.1, heads, dim), part.steps(0.1).reshape(heads, dim))
    part.weights.mul_(4)  # edited in place: recomputed
    assert torch.equal(component_steps(part, 0.05, heads, dim), first / 2)
    part.sensitivity *= 4
    assert torch.allclose(component_steps(part, 0.05, heads, dim), first / 4)
    part.weights = part.weights / 16  # replaced
    assert torch.allclose(component_steps(part, 0.05, heads, dim), first)
    for k in range(40):  # many scales (rate control's search): a bounded number kept
        component_steps(part, 0.01 + k / 100, heads, dim)
    assert len(part.derived) <= 16
