"""Running a pruner over a whole cache: score each layer, select, gather the kept tokens."""
from __future__ import annotations

import dataclasses

import torch

from ..errors import AlreadyPrunedError, PruneError
from ..hf_adapter import cache_layers
from ..layout import layout_from_model
from ..positions import positions_of
from .scorer import ScoreContext
from .state import PruneState, build_pruned_cache, pruned_state


@torch.no_grad()
def prune_cache(pruner, cache, *, model=None, positions=None, token_ids=None, queries=None):
    """``pruner`` (a policy around a scorer, seqkv.pruning.policy.Pruner) applied to ``cache``."""
    if pruned_state(cache) is not None:
        raise AlreadyPrunedError("this cache was pruned already; prune the original cache instead")
    layers = cache_layers(cache)
    heads, tokens, _ = layers[0][0].shape
    pos = positions_of(positions, tokens)
    n_keep = pruner.kept_count(tokens)
    layout = layout_from_model(model) if model is not None else None
    if queries is None:
        queries = pruner.observer
    if pruner.query_aware and (queries is None or not queries.queries) and token_ids is not None:
        if model is None:
            raise PruneError(f"pruner {pruner.name!r} needs model= to recompute the queries from token_ids")
        ids = torch.as_tensor(token_ids).reshape(1, -1)[:, :tokens]
        with pruner.observe(model):
            model(ids, position_ids=pos.unsqueeze(0), use_cache=False)
        queries = pruner.observer
    if pruner.query_aware and queries is not None and queries.queries and queries.tokens != tokens:
        raise PruneError(
            f"the observed prefill has {queries.tokens} tokens but the cache has {tokens}: "
            "observe the prefill that produced this cache"
        )
    ctx = ScoreContext(positions=pos, layout=layout, queries=queries)
    pruner.prepare(cache, ctx, model)
    kept, per_layer = [], []
    for i, (keys, values) in enumerate(layers):
        scores = pruner.scorer.score(keys, values, dataclasses.replace(ctx, layer=i))
        if tuple(scores.shape) != (heads, tokens):
            raise PruneError(f"scorer {pruner.name!r} returned scores of shape {tuple(scores.shape)}, "
                             f"expected [kv_heads, tokens] = {[heads, tokens]}")
        idx = pruner.select(scores, n_keep)
        kept.append([pos[ix] for ix in idx])
        per_layer.append([(keys[h, ix], values[h, ix]) for h, ix in enumerate(idx)])
    width = max(len(p) for layer in kept for p in layer)
    state = PruneState(kept=kept, next_position=int(pos[-1]) + 1, source_tokens=tokens, width=width,
                       level=pruner.level, pruner=pruner.get_config())
    return build_pruned_cache(per_layer, state, device=layers[0][0].device)
