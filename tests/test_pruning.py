"""Token pruning: every pruner at every level, ragged containers, true positions, masks, errors."""
import functools
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqkv
from seqkv.checksum import crc32c
from seqkv.format.container import MAGIC, PREAMBLE, Container
from seqkv.errors import AlreadyPrunedError, DecodeError, FormatError, PruneError
from seqkv.model_calls import cache_of, with_cache
from seqkv.pruning import (StreamingEvictor, TriCalibration, continuation_logits, generate, greedy_continue,
                           pruned_state, registered_pruners, select)
from seqkv.format.kept_positions import decode_kept, encode_kept
from seqkv.quality import QualityProbe, clone_cache

from conftest import tiny_model

TOKENS = 40
WINDOW = 8  # snapkv observation window for these short caches
PRUNERS = ["sinks_window", "key_norm", "snapkv", "expected_attention", "triattention", "chunk", "ensemble"]
LEVELS = [("token", "uniform"), ("token", "adaptive"), ("layer", "uniform"), ("chunk", "uniform")]


def ids_for(n, seed=0):
    return torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def calibration(family="llama"):
    model = tiny_model(family)
    return seqkv.pruning.calibrate(model, [ids_for(64, seed=99)])


@torch.no_grad()
def prefill(family="llama", tokens=TOKENS, dtype=torch.float32, seed=0, **kw):
    model = tiny_model(family, **kw)
    ids = ids_for(tokens + 16, seed)
    cache = cache_of(model(ids[:, :tokens], use_cache=True))
    if dtype != torch.float32:
        cache = clone_cache(cache, dtype)
    return model, ids, cache


def make(name, family="llama", **kw):
    extra = {"snapkv": {"window_size": WINDOW}, "triattention": {"calibration": calibration(family)},
             "ensemble": {"scorers": ("snapkv", "triattention"),
                          "scorer_options": {"snapkv": {"window_size": WINDOW},
                                             "triattention": {"calibration": calibration(family)}}}}.get(name, {})
    return seqkv.pruner(name, **{"chunk_size": 8, **extra, **kw})


def prune(name, model, ids, cache, **kw):
    p = make(name, **kw)
    return p.prune(cache, model=model, token_ids=ids[:, :cache.get_seq_length()])


def cases():
    for name in PRUNERS:
        for level, hb in LEVELS:
            if name == "chunk" and level != "chunk":
                continue
            yield name, level, hb


@pytest.mark.parametrize("name,level,head_budget", list(cases()))
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_every_pruner_at_every_level(name, level, head_budget, ratio):
    model, ids, cache = prefill()
    pruned = prune(name, model, ids, cache, ratio=ratio, level=level, head_budget=head_budget)
    state = pruned_state(pruned)
    n_keep = int(TOKENS * (1 - ratio))
    heads = cache.layers[0].keys.shape[1]
    for layer, (orig, new) in enumerate(zip(cache.layers, pruned.layers)):
        kept = state.kept[layer]
        counts = [len(p) for p in kept]
        if level == "token" and head_budget == "uniform":
            assert counts == [n_keep] * heads
        elif level == "token":
            assert sum(counts) == n_keep * heads and min(counts) >= 1
        elif level == "layer":
            assert counts == [n_keep] * heads and all(torch.equal(kept[0], p) for p in kept)
        else:  # chunk: whole spans of 8, as many as fit
            assert all(torch.equal(kept[0], p) for p in kept) and counts[0] <= n_keep and counts[0] % 8 == 0
        for h, pos in enumerate(kept):
            assert bool((pos[1:] > pos[:-1]).all())
            # every kept slot holds exactly the original token of that position
            assert torch.equal(new.keys[0, h, :len(pos)], orig.keys[0, h, pos])
            assert torch.equal(new.values[0, h, :len(pos)], orig.values[0, h, pos])
            assert not new.keys[0, h, len(pos):].any()
    assert state.next_position == TOKENS and state.source_tokens == TOKENS
    assert state.ragged == any(len(p) != state.width for layer in state.kept for p in layer)


def test_registry_names():
    assert set(PRUNERS) <= set(registered_pruners())


@pytest.mark.parametrize("name", ["sinks_window", "expected_attention", "triattention"])
def test_sinks_are_kept(name):
    model, ids, cache = prefill()
    state = pruned_state(prune(name, model, ids, cache, ratio=0.75))
    for layer in state.kept:
        for pos in layer:
            assert pos[:4].tolist() == [0, 1, 2, 3]


def test_sinks_window_keeps_sinks_and_recent():
    model, ids, cache = prefill()
    state = pruned_state(prune("sinks_window", model, ids, cache, budget=10, n_sink=2))
    assert state.kept[0][0].tolist() == [0, 1] + list(range(TOKENS - 8, TOKENS))


def test_snapkv_always_keeps_its_window():
    model, ids, cache = prefill()
    state = pruned_state(prune("snapkv", model, ids, cache, ratio=0.75))
    for layer in state.kept:
        for pos in layer:
            assert pos[-WINDOW:].tolist() == list(range(TOKENS - WINDOW, TOKENS))


def test_key_norm_keeps_the_smallest_norms():
    model, ids, cache = prefill()
    state = pruned_state(prune("key_norm", model, ids, cache, budget=5))
    norms = cache.layers[1].keys[0, 0].norm(dim=-1)
    assert set(state.kept[1][0].tolist()) == set(torch.topk(-norms, 5).indices.tolist())


# -- containers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family,dtype", [("llama", torch.float16), ("qwen2", torch.bfloat16), ("mistral", torch.float32)])
@pytest.mark.parametrize("level,head_budget", LEVELS)
def test_lossless_round_trip_is_bit_exact_on_kept_tokens(family, dtype, level, head_budget):
    model, ids, cache = prefill(family, dtype=dtype)
    p = seqkv.pruner("key_norm", ratio=0.5, level=level, head_budget=head_budget, chunk_size=8)
    blob = seqkv.encode(cache, preset="lossless", prune=p, model=model)
    pruned = p.prune(cache)
    decoded = seqkv.decode(blob)
    a, b = pruned_state(pruned), pruned_state(decoded)
    assert a.counts() == b.counts() and a.next_position == b.next_position == TOKENS
    for la, lb, ka, kb in zip(pruned.layers, decoded.layers, a.kept, b.kept):
        for h, (pa, pb) in enumerate(zip(ka, kb)):
            n = len(pa)
            assert torch.equal(pa, pb)
            assert torch.equal(la.keys[0, h, :n].view(torch.uint8), lb.keys[0, h, :n].view(torch.uint8))
            assert torch.equal(la.values[0, h, :n].view(torch.uint8), lb.values[0, h, :n].view(torch.uint8))
    info = seqkv.inspect(blob)
    assert info["format_version"] == "1.1" and info["pruning"]["source_tokens"] == TOKENS
    assert info["raw_fp16_bytes"] == len(cache.layers) * 2 * cache.layers[0].keys[0].numel() * 2


@pytest.mark.parametrize("preset", ["near_lossless", "balanced", "small"])
def test_lossy_presets_with_pruning(preset):
    model, ids, cache = prefill()
    p = make("triattention", ratio=0.5, head_budget="adaptive")
    blob = seqkv.encode(cache, preset=preset, prune=p, model=model)
    decoded = seqkv.decode(blob)
    pruned = p.prune(cache)
    err = max(float((a.keys - b.keys).abs().max()) for a, b in zip(pruned.layers, decoded.layers))
    scale = max(float(a.keys.abs().max()) for a in pruned.layers)
    assert err < 0.5 * scale
    assert pruned_state(decoded).counts() == pruned_state(pruned).counts()


def test_ragged_heads_shrink_the_bytes():
    """Per-head budgets are stored ragged: the bytes follow the kept tokens, not the padded width."""
    model, ids, cache = prefill(dtype=torch.float16)
    full = len(seqkv.encode(cache, preset="lossless", model=model))
    half = len(seqkv.encode(cache, preset="lossless", model=model, prune=seqkv.pruner("key_norm", ratio=0.5, head_budget="adaptive")))
    quarter = len(seqkv.encode(cache, preset="lossless", model=model, prune=seqkv.pruner("key_norm", ratio=0.75, head_budget="adaptive")))
    assert quarter < half < full
    pruned = seqkv.pruner("key_norm", ratio=0.5, head_budget="adaptive").prune(cache)
    state = pruned_state(pruned)
    blob = seqkv.encode(pruned, preset="lossless", model=model)
    c = Container(blob)
    # a per-head section holds one length-prefixed payload per head; the raw fallback is 2 bytes per value
    # + 1 mode byte, so a head with n tokens takes at most n*D*2 + 1 bytes (+ its length varint)
    for i, counts in enumerate(state.counts()):
        if len(set(counts)) > 1:
            assert c.sections[f"layer.{i}.keys"].length <= sum(n * 16 * 2 + 3 for n in counts)
            break
    else:
        pytest.fail("expected a ragged layer")


def test_unpruned_containers_stay_version_1_0():
    model, ids, cache = prefill()
    assert seqkv.inspect(seqkv.encode(cache, preset="lossless", model=model))["format_version"] == "1.0"


def test_reencoding_a_decoded_pruned_cache_keeps_positions():
    model, ids, cache = prefill(dtype=torch.float16)
    blob = seqkv.encode(cache, preset="lossless", model=model, prune=seqkv.pruner("key_norm", ratio=0.5, head_budget="adaptive"))
    again = seqkv.encode(seqkv.decode(blob), preset="lossless", model=model)
    assert again == blob


def test_layer_subset_decodes():
    model, ids, cache = prefill()
    blob = seqkv.encode(cache, preset="lossless", model=model, prune=seqkv.pruner("key_norm", ratio=0.5, head_budget="adaptive"))
    full, one = seqkv.decode(blob), seqkv.decode(blob, layers=[1])
    state1 = pruned_state(one)
    n = len(state1.kept[0][0])
    assert torch.equal(one.layers[0].keys[0, 0, :n], full.layers[1].keys[0, 0, :n])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_kept_positions_round_trip(data):
    span = data.draw(st.integers(1, 3000))
    heads = data.draw(st.integers(1, 4))
    start = data.draw(st.integers(0, 10**6))
    shared = data.draw(st.booleans())
    lists = []
    for _ in range(1 if shared else heads):
        s = sorted(data.draw(st.sets(st.integers(0, span - 1), min_size=1, max_size=min(span, 200))))
        lists.append(torch.tensor(s, dtype=torch.int64) + start)
    if shared:
        lists = lists * heads
    width = max(len(p) for p in lists)
    blob = encode_kept(lists, start, span)
    back, was_shared = decode_kept(blob, heads, width, start, span, "t")
    assert was_shared == (shared or all(torch.equal(lists[0], p) for p in lists))
    assert all(torch.equal(a, b) for a, b in zip(lists, back))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(2, 60), st.data())
def test_selection_invariants(heads, tokens, data):
    scores = torch.tensor(data.draw(st.lists(st.floats(-10, 10), min_size=heads * tokens, max_size=heads * tokens))).view(heads, tokens)
    n_keep = data.draw(st.integers(1, tokens))
    for level, hb in LEVELS:
        kept = select(scores, n_keep, level, hb, chunk_size=data.draw(st.integers(1, 9)))
        assert len(kept) == heads
        for k in kept:
            assert len(k) >= 1 and bool((k[1:] > k[:-1]).all()) and int(k.max()) < tokens
        if level == "token":
            assert sum(len(k) for k in kept) == heads * n_keep
        if level == "chunk":
            assert len(kept[0]) <= max(n_keep, 9)
    # uniform token level keeps each head's top scores
    kept = select(scores, n_keep, "token", "uniform")
    for h in range(heads):
        assert scores[h, kept[h]].min() >= torch.topk(scores[h], n_keep).values.min()


def _reseal(blob, header, sections):
    flags = struct.unpack_from("<H", blob, 10)[0]
    table, offset = [], 0
    for entry, payload in zip(header["sections"], sections):
        table.append(dict(entry, offset=offset, length=len(payload), crc32c=crc32c(payload)))
        offset += len(payload)
    hb = json.dumps(dict(header, sections=table)).encode()
    return PREAMBLE.pack(MAGIC, 1, 1, flags, len(hb), crc32c(hb)) + hb + b"".join(sections)


@functools.lru_cache(maxsize=None)
def pruned_blob(preset):
    model, ids, cache = prefill(tokens=24, dtype=torch.float16)
    return seqkv.encode(cache, preset=preset, model=model, prune=seqkv.pruner("key_norm", ratio=0.5, head_budget="adaptive"))


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["lossless", "balanced"]), st.data())
def test_fuzz_pruned_containers_raise_only_decode_errors(preset, data):
    blob = pruned_blob(preset)
    c = Container(blob)
    header = c.header
    sections = [bytes(c.section(e["name"])) for e in header["sections"]]
    what = data.draw(st.sampled_from(["section", "header", "truncate"]))
    if what == "truncate":
        mutated = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif what == "section":
        i = data.draw(st.integers(0, len(sections) - 1))
        payload = bytearray(sections[i])
        if payload:
            j = data.draw(st.integers(0, len(payload) - 1))
            chunk = data.draw(st.binary(min_size=1, max_size=8))
            payload[j:j + len(chunk)] = chunk
        sections[i] = bytes(payload)
        mutated = _reseal(blob, header, sections)
    else:
        header = json.loads(json.dumps(header))
        key = data.draw(st.sampled_from(["level", "source_tokens", "version", "pruner", None]))
        value = data.draw(st.one_of(st.none(), st.integers(-5, 2**40), st.text(max_size=4), st.booleans()))
        if key is None:
            header["positions"]["next"] = value
        else:
            header["pruning"][key] = value
        mutated = _reseal(blob, header, sections)
    try:
        cache = seqkv.decode(mutated, max_decoded_bytes=1 << 26)
    except DecodeError:
        return
    assert pruned_state(cache) is not None


def test_old_readers_refuse_pruned_containers():
    """A 1.0 reader sees the PRUNED flag as a reserved bit and refuses (FormatError), never misreads."""
    blob = bytearray(pruned_blob("lossless"))
    assert blob[9] == 1 and struct.unpack_from("<H", blob, 10)[0] == 1
    blob[10] = 0x02  # an undefined flag
    with pytest.raises(FormatError):
        seqkv.decode(bytes(blob))


# -- continuing generation ----------------------------------------------------------------------

@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize("head_budget", ["uniform", "adaptive"])
def test_keeping_everything_changes_nothing(name, head_budget):
    model, ids, cache = prefill()
    level = "chunk" if name == "chunk" else "token"
    hb = head_budget if level == "token" else "uniform"
    pruned = prune(name, model, ids, cache, ratio=0.0, level=level, head_budget=hb)
    ref = model(ids[:, TOKENS:], use_cache=True, **with_cache(model, clone_cache(cache))).logits[0]
    got = continuation_logits(model, clone_cache(pruned), ids[:, TOKENS:])
    assert torch.allclose(ref, got, atol=1e-5)


def _reference_one_layer_logits(model, cache, kept, next_ids, start_pos):
    """Independent reference: a 1-layer Llama computed by hand, each head attending only to its kept
    keys (gathered from the unpruned cache) plus the new tokens, causally."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = model.model
    layer = inner.layers[0]
    attn = layer.self_attn
    x = inner.embed_tokens(next_ids)
    n = next_ids.shape[1]
    pos = torch.arange(start_pos, start_pos + n)[None]
    cos, sin = inner.rotary_emb(x, pos)
    h = layer.input_layernorm(x)
    d = attn.head_dim
    q = attn.q_proj(h).view(1, n, -1, d).transpose(1, 2)
    k = attn.k_proj(h).view(1, n, -1, d).transpose(1, 2)
    v = attn.v_proj(h).view(1, n, -1, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    groups = attn.num_key_value_groups
    outs = []
    for qh in range(q.shape[1]):
        kvh = qh // groups
        idx = kept[kvh]
        keys = torch.cat([cache.layers[0].keys[0, kvh, idx], k[0, kvh]])
        vals = torch.cat([cache.layers[0].values[0, kvh, idx], v[0, kvh]])
        logits = q[0, qh] @ keys.T * attn.scaling
        m = len(idx)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        mask = torch.cat([torch.ones(n, m, dtype=torch.bool), causal], dim=1)
        outs.append(torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ vals)
    o = attn.o_proj(torch.stack(outs, 1).reshape(1, n, -1))
    x = x + o
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(inner.norm(x))[0]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("new_tokens", [1, 5])
def test_ragged_cache_equals_attention_over_kept_keys_only(impl, new_tokens):
    model = tiny_model("llama", layers=1)
    ids = ids_for(TOKENS + 8, seed=3)
    with torch.no_grad():
        cache = cache_of(model(ids[:, :TOKENS], use_cache=True))
    pruned = seqkv.pruner("key_norm", ratio=0.6, head_budget="adaptive").prune(cache)
    state = pruned_state(pruned)
    assert state.ragged
    old = model.config._attn_implementation
    model.config._attn_implementation = impl
    try:
        with torch.no_grad():
            got = continuation_logits(model, clone_cache(pruned), ids[:, TOKENS:TOKENS + new_tokens])
            ref = _reference_one_layer_logits(model, cache, state.kept[0], ids[:, TOKENS:TOKENS + new_tokens], TOKENS)
    finally:
        model.config._attn_implementation = old
    assert torch.allclose(got, ref, atol=1e-4), float((got - ref).abs().max())


@pytest.mark.parametrize("head_budget", ["uniform", "adaptive"])
def test_decode_step_by_step_matches_one_pass(head_budget):
    """Teacher forcing C tokens in one pass (the quality protocol) sees the same causal mask as decoding."""
    model, ids, cache = prefill(layers=2)
    pruned = seqkv.pruner("key_norm", ratio=0.5, head_budget=head_budget).prune(cache)
    one = continuation_logits(model, clone_cache(pruned), ids[:, TOKENS:TOKENS + 6])
    c = clone_cache(pruned)
    steps = torch.cat([continuation_logits(model, c, ids[:, TOKENS + i:TOKENS + i + 1]) for i in range(6)])
    assert torch.allclose(one, steps, atol=1e-5)


def test_generation_continues_at_the_true_position():
    model, ids, cache = prefill()
    blob = seqkv.encode(cache, preset="lossless", model=model, prune=seqkv.pruner("sinks_window", ratio=0.5))
    decoded = seqkv.decode(blob)
    assert seqkv.inspect(blob)["positions"]["next"] == TOKENS
    in_memory = seqkv.pruner("sinks_window", ratio=0.5).prune(cache)
    a = greedy_continue(model, clone_cache(decoded), int(ids[0, TOKENS]), 8)
    b = greedy_continue(model, clone_cache(in_memory), int(ids[0, TOKENS]), 8)
    assert a == b
    # the generic helper in seqkv.generation (explicit next position) agrees too
    from seqkv.generation import greedy_continue as plain

    assert plain(model, clone_cache(decoded), int(ids[0, TOKENS]), TOKENS, 8) == a
    # generate(): transformers' generate() over the pruned cache, same tokens
    out = generate(model, clone_cache(decoded), ids[:, TOKENS:TOKENS + 1], max_new_tokens=8, do_sample=False)
    assert out[0].tolist() == upto_eos(model, a)
    # and the position matters: feeding at the slot count gives other logits
    right = continuation_logits(model, clone_cache(decoded), ids[:, TOKENS:TOKENS + 4])
    wrong = continuation_logits(model, clone_cache(decoded), ids[:, TOKENS:TOKENS + 4], position=TOKENS // 2)
    assert not torch.allclose(right, wrong, atol=1e-3)


def test_quality_probe_scores_pruned_caches():
    model = tiny_model("llama")
    ids = ids_for(80, seed=5)
    probe = QualityProbe(model, ids, prompt_len=48, continuation_len=16)
    nothing = seqkv.pruner("key_norm", ratio=0.0, head_budget="adaptive").prune(probe.cache)
    assert probe.score(nothing, next_position=48).mean_kl < 1e-6
    blob = seqkv.encode(probe.cache, preset="balanced", model=model, prune=seqkv.pruner("key_norm", ratio=0.5, head_budget="adaptive"))
    report = probe.score(seqkv.decode(blob), next_position=seqkv.inspect(blob)["positions"]["next"])
    assert 0 < report.mean_kl < 5 and 0 <= report.top1_agreement <= 1


def test_streaming_evictor_bounds_the_cache_and_keeps_positions():
    model = tiny_model("llama")
    ids = ids_for(120, seed=7)
    ev = StreamingEvictor(budget=24, scorer="key_norm", n_sink=2, window=6, slack=8)
    for i in range(0, 120, 5):
        ev.feed(model, ids[:, i:i + 5])
        assert ev.cache.layers[0].keys.shape[2] <= 24 + 8
    assert ev.evictions >= 5 and ev.next_position == 120
    state = pruned_state(ev.cache)
    for layer in state.kept:
        assert layer[0][:2].tolist() == [0, 1]
    # the evicted cache encodes and decodes with its positions
    blob = seqkv.encode(ev.cache, preset="lossless", model=model)
    assert seqkv.inspect(blob)["positions"]["next"] == 120


def test_streaming_evictor_without_eviction_is_exact():
    model = tiny_model("llama")
    ids = ids_for(30, seed=8)
    ev = StreamingEvictor(budget=100, scorer="key_norm")
    got = torch.cat([ev.feed(model, ids[:, i:i + 10]) for i in range(0, 30, 10)])
    with torch.no_grad():
        ref = model(ids).logits[0]
    assert ev.evictions == 0 and torch.allclose(got, ref, atol=1e-5)


def test_chunk_pruner_keeps_whole_spans():
    model, ids, cache = prefill()
    state = pruned_state(seqkv.pruner("chunk", scorer="key_norm", chunk_size=10, ratio=0.5).prune(cache))
    kept = state.kept[0][0].tolist()
    assert len(kept) == 20 and all(kept[i] // 10 == kept[i + 9] // 10 for i in range(0, 20, 10))


# -- calibration --------------------------------------------------------------------------------

def test_triattention_calibration_save_load(tmp_path):
    cal = calibration()
    path = str(tmp_path / "cal.safetensors")
    cal.save(path)
    back = TriCalibration.load(path)
    assert back.digest() == cal.digest() and back.fingerprint == cal.fingerprint
    model, ids, cache = prefill()
    a = seqkv.pruner("triattention", ratio=0.5, calibration=path).prune(cache)
    b = seqkv.pruner("triattention", ratio=0.5, calibration=cal).prune(cache)
    assert pruned_state(a).counts() == pruned_state(b).counts()
    assert all(torch.equal(x, y) for la, lb in zip(pruned_state(a).kept, pruned_state(b).kept) for x, y in zip(la, lb))
    from safetensors.torch import load_file, save_file

    t = load_file(path)
    save_file(t, path, metadata={"format": "seqkv.triattention.calibration", "version": "99"})
    with pytest.raises(seqkv.ConfigError, match="version"):
        TriCalibration.load(path)


def test_triattention_is_key_only_with_encode():
    model, ids, cache = prefill()
    p = make("triattention", ratio=0.5)
    blob = seqkv.encode(cache, preset="lossless", prune=p)    # no model: the calibration carries RoPE
    assert seqkv.inspect(blob)["pruning"]["pruner"]["calibration_sha256"] == calibration().digest()


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{"budget": 0}, {"budget": -3}, {"budget": 2.5}, {"ratio": 1.0}, {"ratio": -0.1},
                                {"ratio": 1.5}, {}, {"ratio": 0.5, "budget": 4}, {"ratio": 0.5, "level": "head"},
                                {"ratio": 0.5, "level": "layer", "head_budget": "adaptive"}])
def test_bad_pruner_options(kw):
    with pytest.raises(PruneError):
        seqkv.pruner("key_norm", **kw)


def test_budget_larger_than_the_cache():
    model, ids, cache = prefill()
    with pytest.raises(PruneError, match="larger than the cache"):
        seqkv.pruner("key_norm", budget=TOKENS + 1).prune(cache)
    with pytest.raises(PruneError, match="larger than the cache"):
        seqkv.encode(cache, preset="lossless", prune=seqkv.pruner("key_norm", budget=TOKENS + 1))


def test_unknown_pruner_and_option():
    with pytest.raises(seqkv.ConfigError, match="unknown pruner"):
        seqkv.pruner("h2o", ratio=0.5)
    with pytest.raises(seqkv.ConfigError, match="unknown option"):
        seqkv.pruner("key_norm", ratio=0.5, windw=3)
    with pytest.raises(PruneError):
        seqkv.pruner("chunk", ratio=0.5, level="token")


def test_pruning_twice_is_refused():
    model, ids, cache = prefill()
    p = seqkv.pruner("key_norm", ratio=0.5)
    pruned = p.prune(cache)
    with pytest.raises(AlreadyPrunedError):
        p.prune(pruned)
    with pytest.raises(AlreadyPrunedError):
        seqkv.encode(pruned, preset="lossless", prune=p)
    decoded = seqkv.decode(seqkv.encode(pruned, preset="lossless"))
    with pytest.raises(AlreadyPrunedError):
        p.prune(decoded)
    with pytest.raises(AlreadyPrunedError):
        p.prune(clone_cache(decoded))   # the record survives copies


@pytest.mark.parametrize("name", ["snapkv", "expected_attention"])
def test_query_aware_pruners_need_the_model(name):
    model, ids, cache = prefill()
    p = make(name, ratio=0.5)
    with pytest.raises(PruneError, match="query-aware"):
        p.prune(cache)
    with pytest.raises(PruneError, match="query-aware"):
        seqkv.encode(cache, preset="lossless", prune=p)
    with pytest.raises(PruneError, match="model"):
        p.prune(cache, token_ids=ids)


def test_query_aware_pruner_observes_prefill():
    model = tiny_model("llama")
    ids = ids_for(TOKENS)
    p = seqkv.pruner("snapkv", ratio=0.5, window_size=WINDOW)
    with torch.no_grad(), p.observe(model):
        cache = cache_of(model(ids, use_cache=True))
    blob = seqkv.encode(cache, preset="lossless", prune=p, model=model)
    recomputed = make("snapkv", ratio=0.5).prune(cache, model=model, token_ids=ids)
    assert [p.tolist() for p in pruned_state(seqkv.decode(blob)).kept[1]] == [p.tolist() for p in pruned_state(recomputed).kept[1]]
    other = tiny_model("llama")
    with pytest.raises(PruneError, match="observed prefill has"):
        with torch.no_grad(), p.observe(other):
            other(ids[:, :10])
        p.prune(cache, model=model)


def test_uncalibrated_triattention():
    model, ids, cache = prefill()
    with pytest.raises(PruneError, match="not calibrated"):
        seqkv.pruner("triattention", ratio=0.5).prune(cache)


def test_positions_with_a_pruned_cache_are_refused():
    model, ids, cache = prefill()
    pruned = seqkv.pruner("key_norm", ratio=0.5).prune(cache)
    with pytest.raises(seqkv.EncodeError):
        seqkv.encode(pruned, preset="lossless", positions=5)


def test_evaluate_text_with_pruning_configs():
    from seqkv.evaluate import evaluate_text

    class Tok:
        def __call__(self, text, return_tensors="pt"):
            class R:
                input_ids = torch.tensor([[ord(c) % 96 for c in text]])
            return R()

    model = tiny_model("llama")
    text = "".join(chr(32 + (i * 7) % 90) for i in range(90))
    rows = evaluate_text(model, Tok(), text, presets=(), prompt_len=64, continuation_len=16,
                         configs={"snapkv 2x": {"preset": "lossless", "prune": make("snapkv", ratio=0.5)},
                                  "key-norm 2x": {"preset": "balanced", "prune": seqkv.pruner("key_norm", ratio=0.5)}})
    by = {r.name: r for r in rows}
    assert by["snapkv 2x"].ratio > 1.5 and by["snapkv 2x"].mean_kl is not None and by["snapkv 2x"].mean_kl > 0
    assert by["key-norm 2x"].ratio > by["snapkv 2x"].ratio


def test_streaming_evictor_with_triattention_and_chunk_configs_are_json():
    model = tiny_model("llama")
    ev = StreamingEvictor(budget=16, scorer="triattention", n_sink=2, window=4, slack=4, calibration=calibration())
    ids = ids_for(40, seed=9)
    for i in range(0, 40, 8):
        ev.feed(model, ids[:, i:i + 8])
    assert ev.evictions >= 1
    blob = seqkv.encode(ev.cache, preset="lossless", model=model)
    assert seqkv.inspect(blob)["pruning"]["pruner"]["scorer"]["id"] == "triattention"
    _, _, cache = prefill()
    p = seqkv.pruner("chunk", scorer="triattention", scorer_options={"calibration": calibration()}, ratio=0.5, chunk_size=8)
    info = seqkv.inspect(seqkv.encode(cache, preset="lossless", prune=p))
    assert info["pruning"]["pruner"]["scorer_options"]["calibration_sha256"] == calibration().digest()


def upto_eos(model, tokens):
    """generate() stops at the model's EOS (the random tiny model emits it now and then); our loop does not."""
    eos = model.generation_config.eos_token_id
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("head_budget", ["uniform", "adaptive"])
def test_hf_generate_from_pruned_caches(head_budget):
    """model.generate() through the helper equals our own greedy loop, ragged caches included,
    and sampling options pass through."""
    model, ids, cache = prefill(seed=2)   # a prompt whose greedy continuation has no EOS in 6 tokens
    pruned = seqkv.pruner("key_norm", ratio=0.5, head_budget=head_budget).prune(cache)
    prompt = ids[:, TOKENS:TOKENS + 3]
    c = clone_cache(pruned)
    continuation_logits(model, c, prompt[:, :2])
    ref = greedy_continue(model, c, int(prompt[0, 2]), 6)
    got = generate(model, clone_cache(pruned), prompt, max_new_tokens=6, do_sample=False)
    assert got[0].tolist() == upto_eos(model, ref) and len(ref) == 6 == got.shape[1]
    torch.manual_seed(0)
    sampled = generate(model, clone_cache(pruned), prompt, max_new_tokens=5, do_sample=True, top_k=5)
    assert sampled.shape == (1, 5)
    # keeping everything: generate() over the pruned cache equals generate() over the original
    everything = seqkv.pruner("key_norm", ratio=0.0, head_budget=head_budget).prune(cache)
    full = model.generate(ids[:, :TOKENS + 3], max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = generate(model, clone_cache(everything), prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, full[:, TOKENS + 3:])


def test_rate_control_picks_the_smallest_container_within_the_target():
    from seqkv.pruning import smallest_within

    model = tiny_model("llama")
    probe = QualityProbe(model, ids_for(80, seed=11), prompt_len=48, continuation_len=16)
    best, tried = smallest_within(probe, model, target_kl=0.05, prune_ratios=(0.0, 0.5), steps=(0.1, 0.6))
    assert len(tried) == 4 and {(p.prune_ratio, p.step) for p in tried} == {(0.0, 0.1), (0.0, 0.6), (0.5, 0.1), (0.5, 0.6)}
    ok = [p for p in tried if p.mean_kl <= 0.05]
    assert best is not None and best.bytes == min(p.bytes for p in ok) and len(best.blob) == best.bytes
    assert best.mean_kl == pytest.approx(probe.score(seqkv.decode(best.blob), 48).mean_kl, abs=1e-6)
    none, _ = smallest_within(probe, model, target_kl=1e-12, prune_ratios=(0.5,), steps=(0.9,))
    assert none is None
    with pytest.raises(seqkv.ConfigError):
        smallest_within(probe, model, target_kl=0)
