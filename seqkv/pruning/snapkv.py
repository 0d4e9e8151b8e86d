"""SnapKV: score keys by the attention the last ``window_size`` queries give them.

A faithful reimplementation of kvpress 0.5.5's ``SnapKVPress.score`` (kvpress
itself needs transformers < 5.3): softmax attention of the observation window
(causal inside the window), averaged over the window, ``avg_pool1d`` with
``kernel_size`` (zero padding counted), averaged over the query heads of each
KV head; the window itself scores max + 1 so it is always kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import PruneError
from ..stages.rope import apply_rope
from .scorer import ScoreContext, Scorer, check_int, register


def rope_queries(q_pre: torch.Tensor, positions: torch.Tensor, layout) -> torch.Tensor:
    """Post-RoPE queries [heads, n, D] from pre-RoPE ones at ``positions``."""
    inv = torch.as_tensor(layout.inv_freq_array())
    return apply_rope(q_pre.float(), positions, inv, float(layout.rope_attention_scaling))


@register
@dataclass
class SnapKV(Scorer):
    window_size: int = 64
    kernel_size: int = 5

    id = "snapkv"
    query_aware = True

    def __post_init__(self):
        check_int("snapkv window_size", self.window_size, 1)
        if check_int("snapkv kernel_size", self.kernel_size, 1) % 2 == 0:
            raise PruneError(f"snapkv kernel_size must be odd (a centred pooling window), got {self.kernel_size}")

    def prepare(self, cache, ctx: ScoreContext, model) -> None:
        super().prepare(cache, ctx, model)
        if ctx.positions.numel() <= self.window_size:
            raise PruneError(f"snapkv: the cache has {ctx.positions.numel()} tokens, not more than window_size={self.window_size}")

    def score(self, keys: torch.Tensor, values: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        kv_heads, k_len, dim = keys.shape
        w = self.window_size
        q = rope_queries(ctx.queries.queries[ctx.layer][:, -w:], ctx.positions[-w:], ctx.layout)
        groups = q.shape[0] // kv_heads
        k = keys.float().repeat_interleave(groups, dim=0)
        attn = q @ k.transpose(1, 2) / math.sqrt(dim)
        mask = torch.triu(torch.full_like(attn, float("-inf")), diagonal=k_len - w + 1)
        attn = torch.softmax(attn + mask, dim=-1)[..., :-w]
        scores = attn.mean(dim=-2)
        scores = F.avg_pool1d(scores, kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1)
        scores = scores.view(kv_heads, groups, k_len - w).mean(1)
        return F.pad(scores, (0, w), value=scores.max().item() + 1)
