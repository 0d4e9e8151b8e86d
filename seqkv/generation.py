"""Continuing generation from a (decoded) cache at the right RoPE position."""
from __future__ import annotations

import torch

from .model_calls import with_cache


@torch.no_grad()
def greedy_continue(model, cache, last_token: int, next_position: int, new_tokens: int) -> list[int]:
    """Greedy-decode ``new_tokens`` tokens.

    ``cache`` holds every token before ``last_token``; ``last_token`` is fed at
    ``next_position`` (the cache's recorded next position), and each new token
    at the following one, so RoPE positions stay true even for caches whose
    length differs from their last position.
    """
    from .pruning.attention import pruned_attention

    out = []
    token = torch.tensor([[int(last_token)]])
    for step in range(new_tokens):
        position_ids = torch.tensor([[next_position + step]])
        with pruned_attention(model, cache):   # per-head padding masks, for ragged pruned caches
            logits = model(token, **with_cache(model, cache), position_ids=position_ids, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(token))
    return out
