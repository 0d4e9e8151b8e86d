"""Ensemble: several scorers' opinions, each z-normalised per head, summed with weights.

Scores that are attention probabilities (positive: SnapKV, expected attention) are
compared in the log domain; the others (key-norm, TriAttention) as they are.
Each scorer's always-keep tokens (scored max + 1) stay kept.  The motivating pair
is SnapKV (what the last queries attended to) with TriAttention (what queries at
future distances are expected to attend to, from calibrated query centres):
``PerHead(Ensemble([SnapKV(), TriAttention(calibration=cal)]), ratio=0.5)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PruneError
from .scorer import ScoreContext, Scorer, check_scorer, nested_config, register


def _z(s: torch.Tensor) -> torch.Tensor:
    s = s.float()
    if bool((s > 0).all()):
        s = s.log()
    return (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-12)


@register
@dataclass
class Ensemble(Scorer):
    scorers: tuple
    weights: tuple | None = None     # one per scorer; default 1.0 each

    id = "ensemble"

    def __post_init__(self):
        if isinstance(self.scorers, Scorer) or not isinstance(self.scorers, (list, tuple)) or not self.scorers:
            raise PruneError("an ensemble needs a non-empty list of scorers, e.g. Ensemble([SnapKV(), KeyNorm()])")
        self.scorers = tuple(check_scorer(s, "an ensemble") for s in self.scorers)
        if any(isinstance(s, Ensemble) for s in self.scorers):
            raise PruneError("an ensemble cannot contain an ensemble")
        weights = (1.0,) * len(self.scorers) if self.weights is None else self.weights
        try:
            self.weights = tuple(float(w) for w in weights)
        except (TypeError, ValueError):
            raise PruneError(f"ensemble weights must be numbers, got {weights!r}") from None
        if len(self.weights) != len(self.scorers):
            raise PruneError(f"an ensemble needs one weight per scorer: {len(self.scorers)} scorers, "
                             f"{len(self.weights)} weights")
        configs = {}
        for s in self.scorers:   # the header describes the scorers by id
            if configs.setdefault(s.id, s.get_config()) != s.get_config():
                raise PruneError(f"an ensemble's scorers of one kind ({s.id!r}) must have the same options")

    @property
    def query_aware(self) -> bool:
        return any(s.query_aware for s in self.scorers)

    def get_config(self) -> dict:
        return {"id": self.id, "scorers": [s.id for s in self.scorers], "weights": list(self.weights),
                "scorer_options": {s.id: nested_config(s) for s in self.scorers}}

    def prepare(self, cache, ctx: ScoreContext, model) -> None:
        for s in self.scorers:
            s.prepare(cache, ctx, model)

    def score(self, keys: torch.Tensor, values: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        total, protected = 0.0, torch.zeros(keys.shape[:2], dtype=torch.bool)
        for w, s in zip(self.weights, self.scorers):
            raw = s.score(keys, values, ctx).float()
            protected |= raw >= raw.amax(-1, keepdim=True)   # each scorer's max + 1 tokens
            total = total + w * _z(raw)
        return total.masked_fill(protected, float("inf")).clamp(max=1e30)
