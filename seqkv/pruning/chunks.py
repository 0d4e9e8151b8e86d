"""Chunk-level selection: whole contiguous spans of ``chunk_size`` tokens (long documents, long audio),
shared by every head of a layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PruneError
from .policy import DEFAULT_CHUNK_SIZE, Pruner


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
    return torch.cat([torch.arange(c * chunk_size, min(tokens, (c + 1) * chunk_size)) for c in sorted(keep)])


@dataclass
class Chunks(Pruner):
    """``Chunks(KeyNorm(), chunk_size=32, ratio=0.5)``: spans ranked by the mean of the head-averaged scores."""

    chunk_size: int = DEFAULT_CHUNK_SIZE

    level = "chunk"
    head_budget = "uniform"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise PruneError(f"chunk_size must be an int >= 1, got {self.chunk_size!r}")

    def policy_config(self) -> dict:
        return {"chunk_size": self.chunk_size}

    def select(self, scores: torch.Tensor, n_keep: int) -> list[torch.Tensor]:
        keep = select_chunks(scores.float().mean(0), n_keep, self.chunk_size)
        return [keep.clone() for _ in range(scores.shape[0])]
