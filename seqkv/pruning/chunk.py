"""Chunk-level pruning: keep whole contiguous spans (long documents, long audio), scored by any pruner."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import PruneError
from .base import Pruner, ScoreContext, pruner, register


def select_chunks(token_scores: torch.Tensor, n_keep: int, chunk_size: int) -> torch.Tensor:
    """Sorted indices of the tokens of the best spans of ``chunk_size`` tokens (mean score),
    as many whole spans as fit in ``n_keep`` tokens (at least one)."""
    tokens = token_scores.shape[0]
    n_chunks = (tokens + chunk_size - 1) // chunk_size
    padded = torch.full((n_chunks * chunk_size,), float("nan"))
    padded[:tokens] = token_scores.float()
    chunk_scores = padded.view(n_chunks, chunk_size).nanmean(1)
    order = torch.argsort(chunk_scores, descending=True)
    keep, total = [], 0
    for c in order.tolist():
        size = min(chunk_size, tokens - c * chunk_size)
        if total + size > n_keep and keep:
            continue
        keep.append(c)
        total += size
        if total >= n_keep:
            break
    idx = torch.cat([torch.arange(c * chunk_size, min(tokens, (c + 1) * chunk_size)) for c in sorted(keep)])
    return idx


@register
@dataclass
class ChunkPruner(Pruner):
    """``seqkv.pruner("chunk", scorer="key_norm", chunk_size=64, ratio=0.5)``: spans scored by ``scorer``."""

    scorer: str = "key_norm"
    scorer_options: dict = field(default_factory=dict)
    level: str = "chunk"

    name = "chunk"
    levels = ("chunk",)

    def __post_init__(self):
        super().__post_init__()
        if self.scorer == "chunk":
            raise PruneError("chunk pruner cannot use itself as its scorer")
        self.inner = pruner(self.scorer, ratio=0.0, **self.scorer_options)

    @property
    def query_aware(self) -> bool:  # noqa: D401  (delegates to the scorer)
        return self.inner.query_aware

    def get_config(self) -> dict:
        cfg = super().get_config()
        cfg["scorer_options"] = {k: v for k, v in self.inner.get_config().items() if k not in ("id", "ratio", "budget")}
        return cfg

    def prepare(self, cache, ctx: ScoreContext, model) -> None:
        self.inner.prepare(cache, ctx, model)

    def score(self, layer: int, keys: torch.Tensor, values: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        s = self.inner.score(layer, keys, values, ctx).float()
        # rank-normalise per head so that heads with large raw scores do not decide alone
        return torch.argsort(torch.argsort(s, dim=-1), dim=-1).float() / max(1, s.shape[-1] - 1)
