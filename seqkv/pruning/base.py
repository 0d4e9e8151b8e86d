"""The pruner protocol: ``score()`` per layer, then a selection by ratio or budget at a level.

A pruner scores every cached token of a layer per KV head (``[kv_heads, tokens]``,
higher = keep) and keeps either ``budget`` tokens or ``1 - ratio`` of them
(``ratio`` is the fraction *removed*, as in kvpress).  Levels:

- ``"token"``: per layer and per KV head.  ``head_budget="uniform"`` keeps the same
  number of tokens in every head (kvpress's default); ``"adaptive"`` (AdaKV) shares
  the layer's budget across heads by score, so heads keep different numbers of
  tokens and the cache becomes ragged;
- ``"layer"``: the same tokens for every head of a layer (scores averaged over heads);
- ``"chunk"``: contiguous spans of ``chunk_size`` tokens, shared by every head.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError, PruneError
from ..registry import Registry

LEVELS = ("token", "layer", "chunk")
HEAD_BUDGETS = ("uniform", "adaptive")
_PRUNERS = Registry("pruner", key="name")
register = _PRUNERS.register  # class decorator: make a pruner constructible by pruner(name)


def pruner(name: str, **kwargs) -> "Pruner":
    """Build a pruner by name: ``seqkv.pruner("snapkv", ratio=0.5)``."""
    cls = _PRUNERS.get(name)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(kwargs) - names
    if unknown:
        raise ConfigError(f"pruner {name!r}: unknown option(s) {sorted(unknown)}; known: {sorted(names)}")
    return cls(**kwargs)


def registered_pruners() -> list[str]:
    return _PRUNERS.names()


@dataclass
class ScoreContext:
    """What a scorer may use besides the layer's keys and values."""

    positions: torch.Tensor          # int64 [tokens]: RoPE position of every cached token
    layout: object = None            # seqkv.layout.ModelLayout, when a model was given
    queries: object = None           # seqkv.pruning.observe.QueryObserver, for query-aware pruners


@dataclass
class Pruner:
    ratio: float | None = None
    budget: int | None = None
    level: str = "token"
    head_budget: str = "uniform"
    chunk_size: int = 32

    name: ClassVar[str] = ""
    query_aware: ClassVar[bool] = False
    levels: ClassVar[tuple] = LEVELS

    def __post_init__(self):
        if (self.ratio is None) == (self.budget is None):
            raise PruneError("give exactly one of ratio= (fraction of tokens removed) or budget= (tokens kept)")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0:
                raise PruneError(f"ratio is the fraction of tokens removed and must be in [0, 1), got {self.ratio!r}")
            self.ratio = float(self.ratio)
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget <= 0):
            raise PruneError(f"budget is the number of tokens kept and must be an int >= 1, got {self.budget!r}")
        if self.level not in self.levels:
            raise PruneError(f"pruner {self.name!r} works at level(s) {list(self.levels)}, not {self.level!r}")
        if self.head_budget not in HEAD_BUDGETS:
            raise PruneError(f"head_budget must be one of {HEAD_BUDGETS}, got {self.head_budget!r}")
        if self.head_budget == "adaptive" and self.level != "token":
            raise PruneError("head_budget='adaptive' applies to level='token' only")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise PruneError(f"chunk_size must be an int >= 1, got {self.chunk_size!r}")

    # -- config ---------------------------------------------------------------------------
    def get_config(self) -> dict:
        """JSON-serialisable; recorded in the container."""
        return {"id": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}}

    # -- the protocol -----------------------------------------------------------------------
    def kept_count(self, tokens: int) -> int:
        if self.budget is not None:
            if self.budget > tokens:
                raise PruneError(f"budget={self.budget} is larger than the cache ({tokens} tokens)")
            return self.budget
        return max(1, int(tokens * (1.0 - self.ratio)))  # kvpress's compute_n_kept

    def prepare(self, cache, ctx: ScoreContext, model) -> None:
        """Check or compute what score() needs (query-aware pruners: the observed queries)."""
        if self.query_aware and (ctx.queries is None or not ctx.queries.queries):
            raise PruneError(
                f"pruner {self.name!r} is query-aware: it needs the model's queries. Prefill inside "
                f"`with pruner.observe(model):` or pass model= and token_ids= to prune()"
            )
        if self.query_aware and ctx.layout is None:
            raise PruneError(f"pruner {self.name!r} needs model= (for the RoPE of the observed queries)")

    def score(self, layer: int, keys: torch.Tensor, values: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        """Scores [kv_heads, tokens] for one layer's keys/values [kv_heads, tokens, head_dim]; higher = keep."""
        raise NotImplementedError

    def select(self, scores: torch.Tensor, n_keep: int) -> list[torch.Tensor]:
        """Per head, the sorted indices of the kept tokens."""
        return select(scores, n_keep, self.level, self.head_budget, self.chunk_size)

    # -- applying it ------------------------------------------------------------------------
    def observe(self, model, keep_last: int | None = None):
        """Context manager recording the prefill's queries for this pruner (kvpress style)."""
        from .observe import QueryObserver

        self.observer = QueryObserver(keep_last=keep_last)
        return self.observer.attach(model)

    def prune(self, cache, *, model=None, positions=None, token_ids=None, queries=None):
        """A pruned copy of ``cache`` (a DynamicCache carrying its kept positions)."""
        from .apply import prune_cache

        return prune_cache(self, cache, model=model, positions=positions, token_ids=token_ids, queries=queries)


def _topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k, dim=-1).indices, dim=-1).values


def select(scores: torch.Tensor, n_keep: int, level: str, head_budget: str = "uniform",
           chunk_size: int = 32) -> list[torch.Tensor]:
    heads, tokens = scores.shape
    scores = scores.float()
    if level == "token" and head_budget == "uniform":
        return list(_topk_sorted(scores, n_keep))
    if level == "token":
        return _adaptive(scores, n_keep)
    if level == "layer":
        keep = _topk_sorted(scores.mean(0), n_keep)
        return [keep.clone() for _ in range(heads)]
    if level == "chunk":
        from .chunk import select_chunks

        keep = select_chunks(scores.mean(0), n_keep, chunk_size)
        return [keep.clone() for _ in range(heads)]
    raise PruneError(f"unknown level {level!r}")


def _adaptive(scores: torch.Tensor, n_keep: int, safeguard: float = 0.2) -> list[torch.Tensor]:
    """AdaKV (as kvpress's AdaKVPress): every head keeps its top ``safeguard * n_keep`` tokens,
    the rest of the layer's ``heads * n_keep`` budget goes to the best scores of any head."""
    heads, tokens = scores.shape
    floor = int(math.ceil(safeguard * n_keep))
    boosted = scores.clone()
    top = torch.topk(scores, floor, dim=-1).indices
    boosted.scatter_(1, top, float("inf"))
    flat = torch.topk(boosted.flatten(), heads * n_keep).indices
    mask = torch.zeros(heads * tokens, dtype=torch.bool)
    mask[flat] = True
    mask = mask.view(heads, tokens)
    return [torch.nonzero(m).flatten() for m in mask]
