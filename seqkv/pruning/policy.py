"""Selection policies: a pruner is a policy wrapped around a scorer.

The scorer rates every cached token per layer and KV head; the policy keeps either
``budget`` tokens or ``1 - ratio`` of them (``ratio`` is the fraction *removed*, as in
kvpress) at its granularity.  The policies, one per module:

- :class:`~seqkv.pruning.per_head.PerHead`: per layer and KV head, the same number in every head (the default);
- :class:`~seqkv.pruning.adaptive_heads.AdaptiveHeads`: AdaKV, the layer's budget shared across heads by score
  (heads keep different numbers of tokens: the cache becomes ragged);
- :class:`~seqkv.pruning.per_layer.PerLayer`: the same tokens for every head of a layer (scores averaged over heads);
- :class:`~seqkv.pruning.chunks.Chunks`: contiguous spans of ``chunk_size`` tokens, shared by every head.

    p = PerLayer(SnapKV(), ratio=0.5)
    with p.observe(model):          # query-aware scorers watch the prefill
        cache = model(ids, use_cache=True).past_key_values
    blob = seqkv.encode(cache, prune=p, model=model)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import PruneError
from .apply import prune_cache
from .observe import QueryObserver
from .scorer import ScoreContext, Scorer, check_scorer

DEFAULT_CHUNK_SIZE = 32


@dataclass
class Pruner:
    """Base class of the selection policies; ``Pruner`` objects are what ``prune=`` takes."""

    scorer: Scorer
    ratio: float | None = None     # fraction of the tokens removed, in [0, 1)
    budget: int | None = None      # or: tokens kept (per head; per layer for PerLayer / Chunks)
    # Options older container headers recorded that this policy does not use (the compatibility factory
    # seqkv.pruner(...) keeps them, so the same call writes the same header); merged into get_config().
    legacy_config: dict = field(default_factory=dict, repr=False, compare=False, kw_only=True)
    observer: QueryObserver | None = field(default=None, init=False, repr=False, compare=False)

    level: ClassVar[str] = "token"          # recorded in the pruned container (PruneState.level)
    head_budget: ClassVar[str] = "uniform"

    def __post_init__(self):
        self.scorer = check_scorer(self.scorer, type(self).__name__)
        if (self.ratio is None) == (self.budget is None):
            raise PruneError("give exactly one of ratio= (fraction of tokens removed) or budget= (tokens kept)")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0:
                raise PruneError(f"ratio is the fraction of tokens removed and must be in [0, 1), got {self.ratio!r}")
            self.ratio = float(self.ratio)
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget <= 0):
            raise PruneError(f"budget is the number of tokens kept and must be an int >= 1, got {self.budget!r}")

    # -- what it is -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The scorer's id (the name ``seqkv.pruner`` knows it by)."""
        return self.scorer.id

    @property
    def query_aware(self) -> bool:
        return self.scorer.query_aware

    def policy_config(self) -> dict:
        """The policy's own options beyond ratio / budget / level / head_budget (subclasses)."""
        return {}

    def get_config(self) -> dict:
        """JSON-serialisable; recorded in the container (``PruneState.pruner``): the scorer's id and options
        with the policy's ratio, budget, level, head_budget and chunk_size."""
        scorer = self.scorer.get_config()
        return {"id": scorer["id"], "ratio": self.ratio, "budget": self.budget, "level": self.level,
                "head_budget": self.head_budget, "chunk_size": DEFAULT_CHUNK_SIZE, **self.policy_config(),
                **self.legacy_config, **{k: v for k, v in scorer.items() if k != "id"}}

    # -- the protocol -----------------------------------------------------------------------
    def kept_count(self, tokens: int) -> int:
        if self.budget is not None:
            if self.budget > tokens:
                raise PruneError(f"budget={self.budget} is larger than the cache ({tokens} tokens)")
            return self.budget
        return max(1, int(tokens * (1.0 - self.ratio)))  # kvpress's compute_n_kept

    def prepare(self, cache, ctx: ScoreContext, model) -> None:
        self.scorer.prepare(cache, ctx, model)

    def select(self, scores: torch.Tensor, n_keep: int) -> list[torch.Tensor]:
        """Per KV head, the sorted indices of the kept tokens, from scores [kv_heads, tokens]."""
        raise NotImplementedError

    # -- applying it ------------------------------------------------------------------------
    def observe(self, model, keep_last: int | None = None):
        """Context manager recording the prefill's queries for this pruner (kvpress style)."""
        self.observer = QueryObserver(keep_last=keep_last)
        return self.observer.attach(model)

    def prune(self, cache, *, model=None, positions=None, token_ids=None, queries=None):
        """A pruned copy of ``cache`` (a DynamicCache carrying its kept positions)."""
        return prune_cache(self, cache, model=model, positions=positions, token_ids=token_ids, queries=queries)
