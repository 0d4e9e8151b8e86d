"""StreamingLLM: keep the first ``n_sink`` tokens (attention sinks) and the most recent ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .scorer import ScoreContext, Scorer, check_int, register


@register
@dataclass
class SinksWindow(Scorer):
    n_sink: int = 4

    id = "sinks_window"

    def __post_init__(self):
        check_int("sinks_window n_sink", self.n_sink, 0)

    def score(self, keys: torch.Tensor, values: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        heads, tokens, _ = keys.shape
        s = torch.arange(tokens, dtype=torch.float32)   # recency
        s[:self.n_sink] = tokens + 1.0                   # sinks above every recent token
        return s.expand(heads, tokens).clone()
