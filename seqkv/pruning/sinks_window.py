"""StreamingLLM: keep the first ``n_sink`` tokens (attention sinks) and the most recent ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pruner, ScoreContext, register


@register
@dataclass
class SinksWindowPruner(Pruner):
    n_sink: int = 4

    name = "sinks_window"

    def score(self, layer: int, keys: torch.Tensor, values: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        heads, tokens, _ = keys.shape
        s = torch.arange(tokens, dtype=torch.float32)   # recency
        s[:self.n_sink] = tokens + 1.0                   # sinks above every recent token
        return s.expand(heads, tokens).clone()
