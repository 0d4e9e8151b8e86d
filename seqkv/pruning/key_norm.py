"""Key-norm (kvpress's KnormPress): keys with a small L2 norm draw the most attention; keep those."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .scorer import ScoreContext, Scorer, register


@register
@dataclass
class KeyNorm(Scorer):
    id = "key_norm"

    def score(self, keys: torch.Tensor, values: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        return -keys.float().norm(dim=-1)
