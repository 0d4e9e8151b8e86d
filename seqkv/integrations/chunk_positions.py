"""Where a KV chunk starts: the RoPE position of its first token, recovered from its keys.

LMCache gives a serde no positions.  A chunk's keys carry RoPE at absolute positions ``p0 + i``; with RoPE
undone at chunk-local positions ``i`` instead, every (c, c + head_dim/2) channel pair of a key is still rotated
by the angle ``p0 * inv_freq[c]``.  A calibrated profile knows the model's mean pre-RoPE key (per layer, KV
head and channel), and a chunk's mean key is close to it once rotated back, so the start is the position that
rotates the chunk's mean onto the profile's best:

    p0 = argmax_p  sum over layers, heads, pairs c of  < R(-p * inv_freq[c]) m_c , mu_c >

with ``m`` the chunk's mean key at chunk-local positions and ``mu`` the profile's.  The sum over layers and heads
comes first, so trying every position below the model's context length costs one [positions, head_dim/2]
cos/sin table.  On SmolLM2-135M it finds every 256-token chunk's start of a 2048-token text exactly
(docs/lmcache.md).

An estimate, never trusted for correctness: the container records the positions it was coded at and decoding
redoes exactly those, so a wrong start costs bytes only (the calibrated codec's KLT was measured at true
positions), and the sink tokens kept exact on a chunk found to start at 0.
"""
from __future__ import annotations

import torch

from ..stages.rope import keys_to_pre_rope

MAX_CANDIDATES = 1 << 17      # positions tried at most (the context length, capped)
BLOCK = 1 << 14               # positions scored per cos/sin table


class StartFinder:
    """Finds chunk starts for the model of ``layout`` from ``profile``'s mean pre-RoPE keys."""

    def __init__(self, layout, profile, max_positions: int):
        self.layout = layout
        heads, dim = layout.kv_heads, layout.head_dim
        self.means = [profile.parts[(i, "keys")].mean.to(torch.float64).view(heads, dim) for i in range(layout.layers)]
        self.inv_freq = torch.as_tensor(layout.inv_freq_array(), dtype=torch.float64)
        self.max_positions = max(1, min(int(max_positions), MAX_CANDIDATES))

    def start(self, keys: list[torch.Tensor]) -> int:
        """The most likely first position of a chunk whose per-layer keys [kv_heads, tokens, head_dim] are given."""
        if not self.layout.has_rope:
            return 0
        tokens = keys[0].shape[1]
        local = torch.arange(tokens)
        half = self.layout.head_dim // 2
        dot_cos = torch.zeros(half, dtype=torch.float64)
        dot_sin = torch.zeros(half, dtype=torch.float64)
        for layer_keys, mu in zip(keys, self.means):
            m = keys_to_pre_rope(layer_keys, "keys", local, self.layout).mean(1).to(torch.float64)
            a, b, mu_a, mu_b = m[:, :half], m[:, half:], mu[:, :half], mu[:, half:]
            # rotating (a, b) by -angle gives (a cos + b sin, b cos - a sin); its dot with (mu_a, mu_b):
            dot_cos += (a * mu_a + b * mu_b).sum(0)
            dot_sin += (b * mu_a - a * mu_b).sum(0)
        best, best_score = 0, None
        last = max(1, self.max_positions - tokens + 1)   # the chunk must fit below the context length
        for lo in range(0, last, BLOCK):
            positions = torch.arange(lo, min(lo + BLOCK, last), dtype=torch.float64)
            angles = positions[:, None] * self.inv_freq[None, :]
            score = angles.cos() @ dot_cos + angles.sin() @ dot_sin
            i = int(score.argmax())
            if best_score is None or float(score[i]) > best_score:
                best, best_score = lo + i, float(score[i])
        return best
