"""A streaming evictor: feed tokens as they come; the cache never holds more than ``budget + slack`` tokens.

Every time the cache grows past ``budget + slack`` tokens, the evictor keeps the
first ``n_sink`` tokens, the last ``window`` ones and the best-scored of the rest
(by any key-only scorer, ``scorer``: ``KeyNorm()`` by default), ``budget`` tokens in all, at layer level
(the same tokens for every head of a layer, so the cache stays rectangular).
Positions stay true: every fed token gets the next RoPE position, whatever was evicted.

    ev = StreamingEvictor(budget=512, scorer=KeyNorm(), n_sink=4, window=32)
    for chunk in chunks:
        logits = ev.feed(model, chunk)
"""
from __future__ import annotations

import torch

from ..errors import PruneError
from ..model_calls import cache_of, with_cache
from .attention import pruned_attention
from .factory import scorer_from_name
from .key_norm import KeyNorm
from .scorer import ScoreContext, Scorer, check_scorer, nested_config
from .state import PruneState, attach, build_pruned_cache, pruned_state, ragged_layers


class StreamingEvictor:
    def __init__(self, budget: int, scorer: Scorer | str | None = None, n_sink: int = 4, window: int = 32,
                 slack: int = 64, **scorer_options):
        """``scorer``: a scorer object (``KeyNorm()`` when None), or a registered name whose options are
        ``scorer_options`` (the older form: ``StreamingEvictor(256, "triattention", calibration=cal)``)."""
        for what, value in (("n_sink", n_sink), ("window", window), ("slack", slack)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise PruneError(f"{what} must be an int, got {value!r}")
        if slack < 1 or n_sink < 0 or window < 0:
            raise PruneError("slack must be >= 1, n_sink and window >= 0")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget <= n_sink + window:
            raise PruneError(f"budget must be an int larger than n_sink + window = {n_sink + window}, got {budget!r}")
        self.budget, self.n_sink, self.window, self.slack = budget, n_sink, window, slack
        if isinstance(scorer, str):
            scorer = scorer_from_name(scorer, **scorer_options)
        elif scorer_options:
            raise PruneError(f"options {sorted(scorer_options)} are for a scorer given by name; "
                             "a scorer object carries its own options")
        self.scorer = KeyNorm() if scorer is None else check_scorer(scorer, "StreamingEvictor")
        if self.scorer.query_aware:
            raise PruneError(f"the streaming evictor needs a key-only scorer; {self.scorer.id!r} is query-aware")
        self.cache = None
        self.next_position = 0
        self.evictions = 0

    def get_config(self) -> dict:
        nested = nested_config(self.scorer)   # described as the whole pruner it used to be built as
        scorer = {"id": nested.pop("id"), "ratio": 0.0, "budget": None, **nested}
        return {"id": "streaming", "budget": self.budget, "n_sink": self.n_sink, "window": self.window,
                "slack": self.slack, "scorer": scorer}

    @torch.no_grad()
    def feed(self, model, token_ids) -> torch.Tensor:
        """Run ``model`` on the new tokens after the cache; returns their logits [n, vocab]."""
        ids = torch.as_tensor(token_ids).reshape(1, -1)
        pos = torch.arange(self.next_position, self.next_position + ids.shape[1]).unsqueeze(0)
        with pruned_attention(model, self.cache):
            out = model(ids, position_ids=pos, use_cache=True, **with_cache(model, self.cache))
        self.cache = cache_of(out)
        self.next_position += ids.shape[1]
        if self.cache.layers[0].keys.shape[2] > self.budget + self.slack:
            self.evict()
        return out.logits[0]

    def evict(self) -> None:
        """Shrink the cache to ``budget`` tokens now."""
        cache = self.cache
        if pruned_state(cache) is None:
            n = cache.layers[0].keys.shape[2]
            pos = torch.arange(self.next_position - n, self.next_position)
            heads = cache.layers[0].keys.shape[1]
            attach(cache, PruneState([[pos] * heads for _ in cache.layers], self.next_position, n, n, "layer", {}))
        per_layer, next_position = ragged_layers(cache)
        self.scorer.prepare(cache, ScoreContext(positions=per_layer[0][0][2]), None)
        kept, tensors = [], []
        for i, heads in enumerate(per_layer):
            keys = torch.stack([k for k, _, _ in heads])
            values = torch.stack([v for _, v, _ in heads])
            pos = heads[0][2]
            n = pos.numel()
            s = self.scorer.score(keys, values, ScoreContext(positions=pos, layer=i)).float().mean(0)
            s[:self.n_sink] = float("inf")
            if self.window:
                s[n - self.window:] = float("inf")
            idx = torch.sort(torch.topk(s, self.budget).indices).values
            kept.append([pos[idx]] * len(heads))
            tensors.append([(keys[h, idx], values[h, idx]) for h in range(len(heads))])
        state = PruneState(kept, next_position, next_position, self.budget, "layer", self.get_config())
        self.cache = build_pruned_cache(tensors, state, device=cache.layers[0].keys.device)
        self.evictions += 1
