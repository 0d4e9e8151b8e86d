"""The scorer protocol: rate every cached token of a layer per KV head (higher = keep).

A scorer knows nothing about how many tokens are kept, or at what granularity: a
selection policy (:mod:`seqkv.pruning.policy` and its subclasses) wraps a scorer
and owns the ratio or budget, as kvpress's ``AdaKVPress(press)`` wraps a scorer press.

    class MyScorer(Scorer):
        id = "my_scorer"                     # recorded in container headers
        def score(self, keys, values, ctx):  # keys/values [kv_heads, tokens, head_dim]
            return -keys.float().norm(dim=-1)   # [kv_heads, tokens]

Decorate with :func:`register` to make it buildable by name (``seqkv.pruner("my_scorer", ratio=0.5)``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import PruneError
from ..registry import Registry

_SCORERS = Registry("pruner", key="id")
register = _SCORERS.register   # class decorator: make a scorer buildable by seqkv.pruner(name, ...)
scorer_class = _SCORERS.get    # the scorer class registered under a name (ConfigError when unknown)
registered_scorers = _SCORERS.names


@dataclass
class ScoreContext:
    """What a scorer may use besides the layer's keys and values."""

    positions: torch.Tensor          # int64 [tokens]: RoPE position of every cached token
    layout: object = None            # seqkv.layout.ModelLayout, when a model was given
    queries: object = None           # seqkv.pruning.observe.QueryObserver, for query-aware scorers
    layer: int = 0                   # the index of the layer being scored


@dataclass
class Scorer:
    """Base class of the scorers: ``score(keys, values, ctx) -> [kv_heads, tokens]``, higher = keep."""

    id: ClassVar[str] = ""
    query_aware: ClassVar[bool] = False   # needs the prefill's queries (``pruner.observe(model)``)

    def prepare(self, cache, ctx: ScoreContext, model) -> None:
        """Check or compute what :meth:`score` needs, once per cache (query-aware scorers: the observed queries)."""
        if self.query_aware and (ctx.queries is None or not ctx.queries.queries):
            raise PruneError(
                f"pruner {self.id!r} is query-aware: it needs the model's queries. Prefill inside "
                f"`with pruner.observe(model):` or pass model= and token_ids= to prune()"
            )
        if self.query_aware and ctx.layout is None:
            raise PruneError(f"pruner {self.id!r} needs model= (for the RoPE of the observed queries)")

    def score(self, keys: torch.Tensor, values: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        """Scores [kv_heads, tokens] of layer ``ctx.layer``'s keys/values [kv_heads, tokens, head_dim]."""
        raise NotImplementedError

    def get_config(self) -> dict:
        """JSON-serialisable: ``{"id": ..., **options}``; part of the description containers record."""
        return {"id": self.id, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}}


# The selection options a scorer nested in another one (ensemble, chunk, streaming) is described with:
# before the policies were split from the scorers, nested scorers were built as whole pruners at their
# default level, and container headers recorded those options; they still do, so the same pruning gives
# the same header.
NESTED_SELECTION = {"level": "token", "head_budget": "uniform", "chunk_size": 32}


def nested_config(scorer: Scorer) -> dict:
    """The description of ``scorer`` inside another pruner's description (see ``NESTED_SELECTION``)."""
    cfg = scorer.get_config()
    level = "chunk" if cfg["id"] == "chunk" else NESTED_SELECTION["level"]   # "chunk" pruners were chunk-level only
    return {"id": cfg["id"], **NESTED_SELECTION, "level": level, **{k: v for k, v in cfg.items() if k != "id"}}


def check_scorer(scorer, what: str = "a pruning policy") -> Scorer:
    """``scorer`` if it is a Scorer, else a PruneError that says how to build one."""
    if isinstance(scorer, Scorer):
        return scorer
    if isinstance(scorer, str):
        raise PruneError(f"{what} takes a scorer object, not the name {scorer!r}: e.g. PerHead(SnapKV(), ratio=0.5), "
                         f"or seqkv.pruner({scorer!r}, ratio=...) to build one by name")
    raise PruneError(f"{what} takes a seqkv.pruning scorer (SnapKV(), KeyNorm(), ...), got {type(scorer).__name__}")


def check_int(what: str, value, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum``, else a PruneError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PruneError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value
