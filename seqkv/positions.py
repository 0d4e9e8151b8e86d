"""Token positions as callers give them to ``encode``/``put``: a start, every position, or nothing."""
from __future__ import annotations

import torch

from .errors import ConfigError

MAX_POSITION = (1 << 62) - 1  # positions, starts and their sums stay far from int64 overflow


def positions_of(positions, tokens: int) -> torch.Tensor:
    """The RoPE position of each of ``tokens`` cached tokens (int64 [tokens]): ``None`` for 0, 1, 2, ...,
    an int for a start, or one position per token (non-negative, strictly increasing)."""
    if positions is None:
        return torch.arange(tokens, dtype=torch.int64)
    if isinstance(positions, int) and not isinstance(positions, bool):
        if positions < 0:
            raise ConfigError(f"start position must be >= 0, got {positions}")
        return torch.arange(positions, positions + tokens, dtype=torch.int64)
    pos = torch.as_tensor(positions).to(torch.int64).flatten()
    if pos.numel() != tokens:
        raise ConfigError(f"positions has {pos.numel()} entries for {tokens} cached tokens")
    if tokens and (pos.min() < 0 or bool((pos[1:] <= pos[:-1]).any())):
        raise ConfigError("positions must be non-negative and strictly increasing")
    return pos
