"""Adaptive head budgets (AdaKV, as kvpress's ``AdaKVPress``): a layer's budget shared across its heads by score.

Every head keeps its top ``alpha_safeguard * n_keep`` tokens; the rest of the layer's
``heads * n_keep`` budget goes to the best scores of any head.  Heads keep different
numbers of tokens, so the pruned cache is ragged: the container stores it so, and
decoding masks each head's padding slots (:func:`seqkv.pruning.pruned_attention`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PruneError
from .policy import Pruner

DEFAULT_SAFEGUARD = 0.2   # kvpress's alpha_safeguard


def adaptive_selection(scores: torch.Tensor, n_keep: int, safeguard: float = DEFAULT_SAFEGUARD) -> list[torch.Tensor]:
    """Per head, the sorted indices kept when ``heads * n_keep`` tokens are shared across the heads."""
    heads, tokens = scores.shape
    scores = scores.float()
    floor = int(math.ceil(safeguard * n_keep))
    boosted = scores.clone()
    top = torch.topk(scores, floor, dim=-1).indices
    boosted.scatter_(1, top, float("inf"))
    flat = torch.topk(boosted.flatten(), heads * n_keep).indices
    mask = torch.zeros(heads * tokens, dtype=torch.bool)
    mask[flat] = True
    mask = mask.view(heads, tokens)
    return [torch.nonzero(m).flatten() for m in mask]


@dataclass
class AdaptiveHeads(Pruner):
    """``AdaptiveHeads(SnapKV(), ratio=0.5)``: AdaKV head budgets around any scorer."""

    alpha_safeguard: float = DEFAULT_SAFEGUARD   # the fraction of n_keep every head keeps whatever its scores

    level = "token"
    head_budget = "adaptive"

    def __post_init__(self):
        super().__post_init__()
        a = self.alpha_safeguard
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise PruneError(f"alpha_safeguard is a fraction of each head's budget and must be in [0, 1], got {a!r}")
        self.alpha_safeguard = float(a)

    def policy_config(self) -> dict:
        # recorded only when it is not the default, so headers stay as they were before it was an option
        return {} if self.alpha_safeguard == DEFAULT_SAFEGUARD else {"alpha_safeguard": self.alpha_safeguard}

    def select(self, scores: torch.Tensor, n_keep: int) -> list[torch.Tensor]:
        return adaptive_selection(scores, n_keep, self.alpha_safeguard)
