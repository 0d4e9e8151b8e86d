"""Pruners as selection policies wrapped around scorers: each policy, the equivalence with the
``seqkv.pruner(name, **options)`` shortcut (same kept tokens, same header description, same bytes),
and clear errors for bad arguments."""
import functools
import os
import types

import pytest
import torch

import seqkv
from seqkv.errors import ConfigError, PruneError
from seqkv.model_calls import cache_of
from seqkv.pruning import (AdaptiveHeads, Chunks, Ensemble, ExpectedAttention, HeadRanks, KeyNorm, PerHead, PerLayer,
                           Pruner, Scorer, SinksWindow, SnapKV, StreamingEvictor, TriAttention, pruned_state, register,
                           select)

from conftest import tiny_model

TOKENS = 40
GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def ids_for(n, seed=0):
    return torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def calibration():
    return seqkv.pruning.calibrate(tiny_model("llama"), [ids_for(64, seed=99)])


@torch.no_grad()
def prefill(tokens=TOKENS, dtype=torch.float32):
    model = tiny_model("llama")
    ids = ids_for(tokens)
    cache = cache_of(model(ids, use_cache=True))
    if dtype != torch.float32:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
    return model, ids, cache


# (scorer object, the same scorer as seqkv.pruner(name, **options))
SCORERS = {
    "sinks_window": (lambda: SinksWindow(n_sink=2), ("sinks_window", {"n_sink": 2})),
    "key_norm": (KeyNorm, ("key_norm", {})),
    "snapkv": (lambda: SnapKV(window_size=8), ("snapkv", {"window_size": 8})),
    "expected_attention": (lambda: ExpectedAttention(n_future_positions=64), ("expected_attention", {"n_future_positions": 64})),
    "triattention": (lambda: TriAttention(calibration=calibration()), ("triattention", {"calibration": calibration()})),
    "chunk": (lambda: HeadRanks(SnapKV(window_size=8)),
              ("chunk", {"scorer": "snapkv", "scorer_options": {"window_size": 8}})),
    "ensemble": (lambda: Ensemble([SnapKV(window_size=8), TriAttention(calibration=calibration())], weights=[1.0, 0.5]),
                 ("ensemble", {"scorers": ("snapkv", "triattention"), "weights": (1.0, 0.5),
                               "scorer_options": {"snapkv": {"window_size": 8}, "triattention": {"calibration": calibration()}}})),
}
# (policy from a scorer, the same policy as seqkv.pruner options)
POLICIES = {
    "per_head": (lambda s, **kw: PerHead(s, **kw), {"level": "token"}),
    "adaptive_heads": (lambda s, **kw: AdaptiveHeads(s, **kw), {"head_budget": "adaptive"}),
    "per_layer": (lambda s, **kw: PerLayer(s, **kw), {"level": "layer"}),
    "chunks": (lambda s, **kw: Chunks(s, chunk_size=8, **kw), {"level": "chunk", "chunk_size": 8}),
}


def same_pruning(a, b):
    sa, sb = pruned_state(a), pruned_state(b)
    assert sa.level == sb.level and sa.pruner == sb.pruner and sa.counts() == sb.counts()
    for la, lb in zip(sa.kept, sb.kept):
        assert all(torch.equal(x, y) for x, y in zip(la, lb))
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("scorer", list(SCORERS))
@pytest.mark.parametrize("size", [{"ratio": 0.5}, {"budget": 16}])
def test_wrapped_pruners_equal_the_name_and_options_form(policy, scorer, size):
    model, ids, cache = prefill()
    make_scorer, (name, options) = SCORERS[scorer]
    make_policy, selection = POLICIES[policy]
    if name == "chunk" and selection.get("level") != "chunk":
        wrapped = make_policy(make_scorer(), **size)   # the "chunk" shortcut is chunk-level only ...
        with pytest.raises(PruneError, match="level"):
            seqkv.pruner(name, **options, **selection, **size)
        assert wrapped.get_config()["id"] == "chunk"   # ... its scorer goes with any policy
        return
    wrapped = make_policy(make_scorer(), **size)
    by_name = seqkv.pruner(name, **options, **selection, **size)
    assert type(wrapped) is type(by_name) and isinstance(wrapped, Pruner)
    assert wrapped.get_config() == by_name.get_config()
    assert wrapped.level == by_name.level and wrapped.query_aware == by_name.query_aware
    same_pruning(wrapped.prune(cache, model=model, token_ids=ids), by_name.prune(cache, model=model, token_ids=ids))


def test_policies_select_as_their_levels():
    model, ids, cache = prefill()
    n_keep = TOKENS // 2
    per_head = pruned_state(PerHead(KeyNorm(), ratio=0.5).prune(cache))
    adaptive = pruned_state(AdaptiveHeads(KeyNorm(), ratio=0.5).prune(cache))
    per_layer = pruned_state(PerLayer(KeyNorm(), ratio=0.5).prune(cache))
    chunks = pruned_state(Chunks(KeyNorm(), chunk_size=10, ratio=0.5).prune(cache))
    assert all(c == [n_keep, n_keep] for c in per_head.counts()) and per_head.level == "token"
    assert all(sum(c) == 2 * n_keep for c in adaptive.counts()) and adaptive.ragged and adaptive.level == "token"
    for state, level in ((per_layer, "layer"), (chunks, "chunk")):
        assert state.level == level and all(torch.equal(layer[0], layer[1]) for layer in state.kept)
    spans = chunks.kept[0][0].tolist()
    assert len(spans) == 20 and all(spans[i] // 10 == spans[i + 9] // 10 for i in (0, 10))
    # the policies' selections are the level selections
    scores = torch.randn(2, 30, generator=torch.Generator().manual_seed(4))
    for p, args in ((PerHead(KeyNorm(), ratio=0.5), ("token", "uniform")),
                    (AdaptiveHeads(KeyNorm(), ratio=0.5), ("token", "adaptive")),
                    (PerLayer(KeyNorm(), ratio=0.5), ("layer",)), (Chunks(KeyNorm(), ratio=0.5, chunk_size=4), ("chunk", "uniform", 4))):
        assert all(torch.equal(a, b) for a, b in zip(p.select(scores, 11), select(scores, 11, *args)))


def test_adaptive_safeguard():
    model, ids, cache = prefill()
    default = AdaptiveHeads(KeyNorm(), ratio=0.5)
    assert "alpha_safeguard" not in default.get_config()   # the header stays as before the option
    full = AdaptiveHeads(KeyNorm(), ratio=0.5, alpha_safeguard=1.0)
    assert full.get_config()["alpha_safeguard"] == 1.0 and full.get_config()["head_budget"] == "adaptive"
    # a safeguard of the whole budget leaves nothing to share: every head keeps its own top tokens
    a, b = pruned_state(full.prune(cache)), pruned_state(PerHead(KeyNorm(), ratio=0.5).prune(cache))
    assert all(torch.equal(x, y) for la, lb in zip(a.kept, b.kept) for x, y in zip(la, lb))


def test_the_shortcut_records_what_it_recorded_before():
    """Containers' headers describe a pruning as seqkv always did (the golden files' descriptions)."""
    cases = {"v1_1_lossless_fp16_pruned_ragged": AdaptiveHeads(KeyNorm(), ratio=0.5),
             "v1_1_balanced_bf16_pruned_chunk": Chunks(KeyNorm(), ratio=0.5, chunk_size=3),
             "v1_2_calibrated_fp16_pruned_layer": PerLayer(KeyNorm(), ratio=0.5)}
    for name, p in cases.items():
        with open(os.path.join(GOLDEN, name + ".skv"), "rb") as f:
            assert seqkv.inspect(f.read())["pruning"]["pruner"] == p.get_config(), name
    # chunk_size given at another level is unused, but was recorded: the shortcut keeps recording it
    legacy = seqkv.pruner("key_norm", ratio=0.5, level="layer", chunk_size=8)
    assert legacy.get_config()["chunk_size"] == 8 and PerLayer(KeyNorm(), ratio=0.5).get_config()["chunk_size"] == 32
    assert legacy == PerLayer(KeyNorm(), ratio=0.5)   # the same pruning
    nested = seqkv.pruner("chunk", scorer="key_norm", ratio=0.5).get_config()
    assert nested == {"id": "chunk", "ratio": 0.5, "budget": None, "level": "chunk", "head_budget": "uniform",
                      "chunk_size": 32, "scorer": "key_norm",
                      "scorer_options": {"level": "token", "head_budget": "uniform", "chunk_size": 32}}


def test_wrapped_and_named_pruners_write_the_same_bytes():
    model, ids, cache = prefill(dtype=torch.float16)
    for wrapped, by_name in ((AdaptiveHeads(KeyNorm(), ratio=0.5), seqkv.pruner("key_norm", ratio=0.5, head_budget="adaptive")),
                             (PerLayer(SinksWindow(), budget=12), seqkv.pruner("sinks_window", budget=12, level="layer"))):
        a = seqkv.encode(cache, preset="lossless", model=model, prune=wrapped)
        assert a == seqkv.encode(cache, preset="lossless", model=model, prune=by_name)
        same_pruning(seqkv.decode(a), wrapped.prune(cache))


def test_a_wrapped_query_aware_scorer_observes_the_prefill():
    model = tiny_model("llama")
    ids = ids_for(TOKENS)
    p = PerLayer(Ensemble([SnapKV(window_size=8), KeyNorm()]), ratio=0.5)
    assert p.query_aware and p.name == "ensemble"
    with torch.no_grad(), p.observe(model):
        cache = cache_of(model(ids, use_cache=True))
    blob = seqkv.encode(cache, preset="lossless", prune=p, model=model)
    same_pruning(seqkv.decode(blob), p.prune(cache, model=model, token_ids=ids))


@register
class Recency(Scorer):   # a scorer of one's own: the base protocol is enough
    id = "test_recency"

    def score(self, keys, values, ctx):
        return ctx.positions.float().expand(keys.shape[0], -1).clone()


def test_a_custom_scorer_plugs_into_every_policy_and_the_shortcut():
    model, ids, cache = prefill()
    state = pruned_state(PerHead(Recency(), budget=5).prune(cache))
    assert state.kept[1][0].tolist() == list(range(TOKENS - 5, TOKENS))
    assert seqkv.pruner("test_recency", budget=5, level="layer").get_config()["id"] == "test_recency"

    class WrongShape(Scorer):
        id = "wrong_shape"

        def score(self, keys, values, ctx):
            return keys.float().norm(dim=-1)[:, :-1]

    with pytest.raises(PruneError, match="shape"):
        PerHead(WrongShape(), ratio=0.5).prune(cache)


def test_streaming_evictor_takes_a_scorer_object():
    model = tiny_model("llama")
    ids = ids_for(60, seed=7)
    a = StreamingEvictor(budget=16, scorer=TriAttention(calibration=calibration()), n_sink=2, window=4, slack=4)
    b = StreamingEvictor(budget=16, scorer="triattention", n_sink=2, window=4, slack=4, calibration=calibration())
    assert a.get_config() == b.get_config()
    for i in range(0, 60, 6):
        assert torch.equal(a.feed(model, ids[:, i:i + 6]), b.feed(model, ids[:, i:i + 6]))
    assert a.evictions >= 1 and pruned_state(a.cache).kept[0][0].tolist() == pruned_state(b.cache).kept[0][0].tolist()
    assert StreamingEvictor(budget=64).scorer == KeyNorm()


def test_tri_calibration_lives_below_the_profile_and_the_pruners():
    from seqkv import tri_calibration
    from seqkv.pruning import triattention

    assert seqkv.pruning.TriCalibration is tri_calibration.TriCalibration is triattention.TriCalibration
    assert tri_calibration.TriCalibration.from_profile(types.SimpleNamespace(triattention=calibration())) is calibration()
    with pytest.raises(PruneError, match="no TriAttention calibration"):
        tri_calibration.TriCalibration.from_profile(types.SimpleNamespace(triattention=None))


@pytest.mark.parametrize("make,message", [
    (lambda: PerHead("snapkv", ratio=0.5), "scorer object, not the name 'snapkv'"),
    (lambda: PerLayer(SnapKV, ratio=0.5), "takes a seqkv.pruning scorer"),
    (lambda: PerHead(seqkv.pruner("key_norm", ratio=0.5), ratio=0.5), "takes a seqkv.pruning scorer"),
    (lambda: PerHead(KeyNorm()), "exactly one of ratio"),
    (lambda: PerHead(KeyNorm(), ratio=0.5, budget=3), "exactly one of ratio"),
    (lambda: PerLayer(KeyNorm(), ratio=1.0), "ratio is the fraction"),
    (lambda: AdaptiveHeads(KeyNorm(), budget=0), "budget is the number"),
    (lambda: AdaptiveHeads(KeyNorm(), ratio=0.5, alpha_safeguard=1.5), "alpha_safeguard"),
    (lambda: Chunks(KeyNorm(), ratio=0.5, chunk_size=0), "chunk_size"),
    (lambda: Chunks(KeyNorm(), ratio=0.5, chunk_size=2.5), "chunk_size"),
    (lambda: SnapKV(kernel_size=4), "odd"),
    (lambda: SnapKV(window_size=0), "window_size"),
    (lambda: ExpectedAttention(n_sink=-1), "n_sink"),
    (lambda: SinksWindow(n_sink="4"), "n_sink"),
    (lambda: TriAttention(offsets=[]), "offsets"),
    (lambda: TriAttention(window=-2), "window"),
    (lambda: TriAttention(calibration=42), "must be a TriCalibration"),
    (lambda: HeadRanks(HeadRanks()), "itself"),
    (lambda: HeadRanks("key_norm"), "scorer object"),
    (lambda: Ensemble([]), "non-empty list"),
    (lambda: Ensemble(KeyNorm()), "non-empty list"),
    (lambda: Ensemble([KeyNorm(), Ensemble([KeyNorm()])]), "cannot contain an ensemble"),
    (lambda: Ensemble([KeyNorm(), SnapKV()], weights=[1.0]), "one weight per scorer"),
    (lambda: Ensemble([KeyNorm()], weights=["heavy"]), "weights must be numbers"),
    (lambda: Ensemble([SnapKV(window_size=8), SnapKV(window_size=16)]), "same options"),
    (lambda: StreamingEvictor(64, SnapKV()), "key-only"),
    (lambda: StreamingEvictor(64, KeyNorm(), n_sink=2, window=4, power=2), "scorer given by name"),
    (lambda: StreamingEvictor(64, "key_norm", window=4.5), "window must be an int"),
    (lambda: seqkv.pruner("ensemble", scorers="snapkv", ratio=0.5), "non-empty list of pruner names"),
    (lambda: seqkv.pruner("ensemble", scorers=("snapkv", "ensemble"), ratio=0.5), "itself"),
    (lambda: seqkv.pruner("ensemble", scorers=(SnapKV(),), ratio=0.5), "Ensemble"),
    (lambda: seqkv.pruner("chunk", scorer="chunk", ratio=0.5), "itself"),
    (lambda: seqkv.pruner("chunk", scorer="key_norm", scorer_options=[1], ratio=0.5), "must be a dict"),
    (lambda: seqkv.pruner("key_norm", ratio=0.5, level="layer", head_budget="adaptive"), "adaptive"),
    (lambda: seqkv.pruner("key_norm", ratio=0.5, head_budget="greedy"), "head_budget"),
])
def test_bad_arguments_are_clear_prune_errors(make, message):
    with pytest.raises(PruneError, match=message):
        make()


def test_unknown_names_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown pruner 'h2o'"):
        seqkv.pruner("h2o", ratio=0.5)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['windw'\].*window_size"):
        seqkv.pruner("snapkv", ratio=0.5, windw=3)
    with pytest.raises(ConfigError, match=r"ensemble: pruner 'snapkv': unknown option\(s\) \['level'\]"):
        seqkv.pruner("ensemble", scorers=("snapkv",), scorer_options={"snapkv": {"level": "layer"}}, ratio=0.5)
    with pytest.raises(ConfigError, match="unknown pruner"):
        StreamingEvictor(64, "h2o")
