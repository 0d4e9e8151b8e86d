"""Expected attention: a Gaussian model of future queries, scored in closed form.

A faithful reimplementation of kvpress 0.5.5's ``ExpectedAttentionPress``:
mean and covariance of the prefill's pre-RoPE queries (the first ``n_sink``
left out), rotated by the RoPE matrix averaged over the next
``n_future_positions`` positions; score = softmax over tokens of
``mu·k/sqrt(d) + k'Σk/(2d)``, averaged over the query heads of each KV head,
times ``||v||``; the ``n_sink`` first tokens score max + 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import PruneError
from .scorer import ScoreContext, Scorer, check_int, register


def average_rope_matrix(layout, start: int, count: int) -> torch.Tensor:
    """The RoPE rotation matrix [D, D] averaged over positions start .. start+count-1."""
    dim = layout.head_dim
    inv = torch.as_tensor(layout.inv_freq_array())
    ang = torch.arange(start, start + count, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos() * layout.rope_attention_scaling, emb.sin() * layout.rope_attention_scaling
    eye = torch.eye(dim)
    p = torch.zeros(dim, dim)
    p[dim // 2:, :dim // 2], p[:dim // 2, dim // 2:] = torch.eye(dim // 2), -torch.eye(dim // 2)
    return (cos.unsqueeze(1) * eye + sin.unsqueeze(1) * p).mean(0)


@register
@dataclass
class ExpectedAttention(Scorer):
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    id = "expected_attention"
    query_aware = True

    def __post_init__(self):
        check_int("expected_attention n_future_positions", self.n_future_positions, 1)
        check_int("expected_attention n_sink", self.n_sink, 0)

    def prepare(self, cache, ctx: ScoreContext, model) -> None:
        super().prepare(cache, ctx, model)
        if ctx.positions.numel() <= self.n_sink:
            raise PruneError(f"expected_attention: the cache must hold more than n_sink={self.n_sink} tokens")
        q_len = int(ctx.positions[-1]) + 1
        self._rot = average_rope_matrix(ctx.layout, q_len, self.n_future_positions)

    def score(self, keys: torch.Tensor, values: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        q = ctx.queries.queries[ctx.layer][:, self.n_sink:]          # [Hq, n, D] pre-RoPE
        mu = q.mean(dim=1)
        r = self._rot
        mu = mu @ r.T
        kv_heads, _, dim = keys.shape
        groups = q.shape[0] // kv_heads
        k = keys[:, self.n_sink:].float().repeat_interleave(groups, dim=0)    # [Hq, T', D]
        scores = torch.einsum("hd,htd->ht", mu, k) / math.sqrt(dim)
        if self.use_covariance:
            c = q - q.mean(dim=1, keepdim=True)
            cov = torch.einsum("hsi,hsj->hij", c, c) / q.shape[1]
            cov = r @ cov @ r.T
            scores = scores + torch.einsum("hti,hij,htj->ht", k, cov, k) / dim / 2
        scores = torch.softmax(scores, dim=-1).view(kv_heads, groups, -1).mean(1)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values[:, self.n_sink:].float().norm(dim=-1)
        return F.pad(scores, (self.n_sink, 0), value=scores.max().item() + 1)
