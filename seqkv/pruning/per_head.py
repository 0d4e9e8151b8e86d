"""Per-head selection, kvpress's default: every KV head keeps its own best tokens, as many in every head."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .policy import Pruner


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` best scores along the last axis, in increasing order."""
    return torch.sort(torch.topk(scores, k, dim=-1).indices, dim=-1).values


@dataclass
class PerHead(Pruner):
    """``PerHead(SnapKV(), ratio=0.5)``: per layer and KV head, the top ``n_keep`` tokens of that head."""

    level = "token"
    head_budget = "uniform"

    def select(self, scores: torch.Tensor, n_keep: int) -> list[torch.Tensor]:
        return list(top_k_sorted(scores.float(), n_keep))
