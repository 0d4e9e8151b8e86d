"""What a pruned cache remembers: the RoPE position of every kept token, per layer and KV head.

A pruned cache is still a plain ``DynamicCache`` holding rectangular tensors
``[1, kv_heads, W, head_dim]``.  Slot ``j`` of head ``h`` in layer ``l`` holds
the token at position ``kept[l][h][j]`` (keys keep the RoPE of that
position); heads that keep fewer than ``W`` tokens have zero-filled padding
slots, which :func:`seqkv.pruning.attention.pruned_attention` masks out.
The state rides on the cache object as ``cache.seqkv_pruned``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import EncodeError
from ..hf_adapter import build_cache, cache_layers

ATTR = "seqkv_pruned"


@dataclass
class PruneState:
    kept: list            # per layer: list of per-head int64 tensors of kept positions, strictly increasing
    next_position: int    # RoPE position of the next token to feed (the unpruned length)
    source_tokens: int    # tokens in the cache before pruning
    width: int            # W: slots per head in the rectangular tensors when the cache was pruned
    level: str = "token"
    pruner: dict = field(default_factory=dict)

    @property
    def ragged(self) -> bool:
        """True when some head keeps fewer than ``width`` tokens (padding slots need a mask)."""
        return any(len(p) != self.width for layer in self.kept for p in layer)

    def counts(self) -> list[list[int]]:
        return [[len(p) for p in layer] for layer in self.kept]

    def slot_valid(self, layer: int) -> torch.Tensor:
        """bool [kv_heads, width]: which of the pruned slots hold a token."""
        counts = torch.tensor([len(p) for p in self.kept[layer]])
        return torch.arange(self.width)[None, :] < counts[:, None]

    def kept_tokens(self) -> int:
        return sum(len(p) for layer in self.kept for p in layer)

    def copy(self) -> "PruneState":
        return PruneState([[p.clone() for p in layer] for layer in self.kept], self.next_position,
                          self.source_tokens, self.width, self.level, dict(self.pruner))


def pruned_state(cache) -> PruneState | None:
    return getattr(cache, ATTR, None)


def attach(cache, state: PruneState):
    setattr(cache, ATTR, state)
    return cache


def build_pruned_cache(per_layer, state: PruneState, device=None):
    """A DynamicCache from per layer, per head ``(keys [n, D], values [n, D])`` lists, zero-padded to the width."""
    layers = []
    for heads in per_layer:
        dim = heads[0][0].shape[-1]
        dtype = heads[0][0].dtype
        k = torch.zeros(len(heads), state.width, dim, dtype=dtype)
        v = torch.zeros(len(heads), state.width, dim, dtype=dtype)
        for h, (kh, vh) in enumerate(heads):
            k[h, :kh.shape[0]] = kh
            v[h, :vh.shape[0]] = vh
        layers.append((k, v))
    return attach(build_cache(layers, device=device), state)


def ragged_layers(cache):
    """Per layer, per head ``(keys [n, D], values [n, D], positions [n])`` of a pruned cache, plus its next position.

    Tokens appended after pruning (a continued generation) follow the pruned slots
    in every head, at positions ``next_position, next_position + 1, ...``.
    """
    state = pruned_state(cache)
    layers = cache_layers(cache)
    total = layers[0][0].shape[1]
    extra = total - state.width
    if extra < 0 or len(layers) != len(state.kept):
        raise EncodeError("the pruned cache no longer matches its pruning record (was it cropped or edited?)")
    appended = torch.arange(state.next_position, state.next_position + extra, dtype=torch.int64)
    out = []
    for (keys, values), kept in zip(layers, state.kept):
        heads = []
        for h, pos in enumerate(kept):
            n = len(pos)
            idx = torch.cat([torch.arange(n), torch.arange(state.width, total)])
            heads.append((keys[h, idx], values[h, idx], torch.cat([pos, appended])))
        out.append(heads)
    return out, state.next_position + extra
