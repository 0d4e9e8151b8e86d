"""Running a pruner over a whole cache: score each layer, select, gather the kept tokens."""
from __future__ import annotations

import torch

from ..errors import AlreadyPrunedError, PruneError
from ..hf_adapter import cache_layers
from ..positions import positions_of
from .base import ScoreContext
from .state import PruneState, build_pruned_cache, pruned_state


@torch.no_grad()
def prune_cache(pruner, cache, *, model=None, positions=None, token_ids=None, queries=None):
    if pruned_state(cache) is not None:
        raise AlreadyPrunedError("this cache was pruned already; prune the original cache instead")
    layers = cache_layers(cache)
    heads, tokens, _ = layers[0][0].shape
    pos = positions_of(positions, tokens)
    n_keep = pruner.kept_count(tokens)
    layout = None
    if model is not None:
        from ..layout import layout_from_model

        layout = layout_from_model(model)
    if queries is None:
        queries = getattr(pruner, "observer", None)
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
        scores = pruner.score(i, keys, values, ctx)
        if scores.shape != (heads, tokens):
            raise RuntimeError(f"{pruner.name}.score returned {tuple(scores.shape)}, expected {(heads, tokens)}")
        idx = pruner.select(scores, n_keep)
        kept.append([pos[ix] for ix in idx])
        per_layer.append([(keys[h, ix], values[h, ix]) for h, ix in enumerate(idx)])
    width = max(len(p) for layer in kept for p in layer)
    state = PruneState(kept=kept, next_position=int(pos[-1]) + 1, source_tokens=tokens, width=width,
                       level=pruner.level, pruner=pruner.get_config())
    return build_pruned_cache(per_layer, state, device=layers[0][0].device)
