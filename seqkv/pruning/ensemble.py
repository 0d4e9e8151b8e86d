"""Ensemble: several scorers' opinions, each z-normalised per head, summed with weights.

Scores that are attention probabilities (positive: SnapKV, expected attention) are
compared in the log domain; the others (key-norm, TriAttention) as they are.
Each scorer's always-keep tokens (scored max + 1) stay kept.  The motivating pair
is SnapKV (what the last queries attended to) with TriAttention (what queries at
future distances are expected to attend to, from calibrated query centres).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import PruneError
from .base import Pruner, ScoreContext, pruner, register


def _z(s: torch.Tensor) -> torch.Tensor:
    s = s.float()
    if bool((s > 0).all()):
        s = s.log()
    return (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-12)


@register
@dataclass
class EnsemblePruner(Pruner):
    scorers: tuple = ("snapkv", "triattention")
    weights: tuple = (1.0, 1.0)
    scorer_options: dict = field(default_factory=dict)   # name -> options of that scorer

    name = "ensemble"

    def __post_init__(self):
        super().__post_init__()
        self.scorers, self.weights = tuple(self.scorers), tuple(float(w) for w in self.weights)
        if not self.scorers or len(self.weights) != len(self.scorers) or "ensemble" in self.scorers:
            raise PruneError("ensemble needs one weight per scorer, and cannot contain itself")
        self.inner = [pruner(s, ratio=0.0, **self.scorer_options.get(s, {})) for s in self.scorers]

    @property
    def query_aware(self) -> bool:
        return any(p.query_aware for p in self.inner)

    def get_config(self) -> dict:
        cfg = super().get_config()
        cfg.update(scorers=list(self.scorers), weights=list(self.weights),
                   scorer_options={s: {k: v for k, v in p.get_config().items() if k not in ("ratio", "budget")}
                                   for s, p in zip(self.scorers, self.inner)})
        return cfg

    def prepare(self, cache, ctx: ScoreContext, model) -> None:
        for p in self.inner:
            p.prepare(cache, ctx, model)

    def score(self, layer: int, keys: torch.Tensor, values: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        total, protected = 0.0, torch.zeros(keys.shape[:2], dtype=torch.bool)
        for w, p in zip(self.weights, self.inner):
            s = p.score(layer, keys, values, ctx).float()
            protected |= s >= s.amax(-1, keepdim=True)   # each scorer's max + 1 tokens
            total = total + w * _z(s)
        return total.masked_fill(protected, float("inf")).clamp(max=1e30)
