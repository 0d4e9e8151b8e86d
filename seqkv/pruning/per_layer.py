"""Layer-level selection: the same tokens for every head of a layer (scores averaged over the heads).

The calibrated codec needs it: its KLT mixes the heads of a layer, so they must keep the same positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .per_head import top_k_sorted
from .policy import Pruner


@dataclass
class PerLayer(Pruner):
    """``PerLayer(SnapKV(), ratio=0.5)``: per layer, the top ``n_keep`` tokens of the head-averaged scores."""

    level = "layer"
    head_budget = "uniform"

    def select(self, scores: torch.Tensor, n_keep: int) -> list[torch.Tensor]:
        keep = top_k_sorted(scores.float().mean(0), n_keep)
        return [keep.clone() for _ in range(scores.shape[0])]
