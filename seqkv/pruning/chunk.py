"""Per-head ranks of any scorer's scores: what ``seqkv.pruner("chunk", scorer=...)`` selects spans with.

``HeadRanks(inner)`` replaces each head's scores by their ranks, scaled to [0, 1], so that heads
with large raw scores do not decide alone when a policy averages the heads (``Chunks``, ``PerLayer``).
It is registered as ``"chunk"``, the name of the chunk pruner it was part of:
``seqkv.pruner("chunk", scorer="key_norm", chunk_size=64, ratio=0.5)`` is
``Chunks(HeadRanks(KeyNorm()), chunk_size=64, ratio=0.5)``, while ``Chunks(KeyNorm(), ...)``
(``seqkv.pruner("key_norm", level="chunk")``) averages the raw scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import PruneError
from .key_norm import KeyNorm
from .scorer import ScoreContext, Scorer, check_scorer, nested_config, register


@register
@dataclass
class HeadRanks(Scorer):
    scorer: Scorer = field(default_factory=KeyNorm)

    id = "chunk"

    def __post_init__(self):
        self.scorer = check_scorer(self.scorer, "HeadRanks")
        if isinstance(self.scorer, HeadRanks):
            raise PruneError("the chunk pruner cannot use itself as its scorer")

    @property
    def query_aware(self) -> bool:  # noqa: D401  (delegates to the scorer)
        return self.scorer.query_aware

    def get_config(self) -> dict:
        inner = nested_config(self.scorer)
        return {"id": self.id, "scorer": inner.pop("id"), "scorer_options": inner}

    def prepare(self, cache, ctx: ScoreContext, model) -> None:
        self.scorer.prepare(cache, ctx, model)

    def score(self, keys: torch.Tensor, values: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        s = self.scorer.score(keys, values, ctx).float()
        return torch.argsort(torch.argsort(s, dim=-1), dim=-1).float() / max(1, s.shape[-1] - 1)
