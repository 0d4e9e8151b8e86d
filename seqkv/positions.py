"""Token positions as callers give them to ``encode``/``put``: a start, every position, or nothing."""
from __future__ import annotations

import torch

from .errors import ConfigError

MAX_POSITION = (1 << 62) - 1  # positions, starts and their sums stay far from int64 overflow


def positions_of(positions, tokens: int) -> torch.Tensor:
    """The RoPE position of each of ``tokens`` cached tokens (int64 [tokens]): ``None`` for 0, 1, 2, ...,
    an int for a start, or one integer position per token (in [0, MAX_POSITION), strictly increasing);
    ConfigError for anything else."""
    if positions is None:
        return torch.arange(tokens, dtype=torch.int64)
    if isinstance(positions, int) and not isinstance(positions, bool):
        if not 0 <= positions <= MAX_POSITION - tokens:
            raise ConfigError(f"start position must be in [0, {MAX_POSITION - tokens}] for {tokens} tokens, got {positions}")
        return torch.arange(positions, positions + tokens, dtype=torch.int64)
    if isinstance(positions, (bool, float, str, bytes, dict)):
        raise ConfigError(f"positions must be None, a start position (int) or one position per token, got {positions!r}")
    try:
        pos = torch.as_tensor(positions)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ConfigError(f"positions must be None, a start position (int) or one position per token: {exc}") from None
    if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
        raise ConfigError(f"positions must be integers, got {pos.dtype}")
    pos = pos.to(torch.int64).flatten()
    if pos.numel() != tokens:
        raise ConfigError(f"positions has {pos.numel()} entries for {tokens} cached tokens")
    if tokens and (pos.min() < 0 or pos.max() >= MAX_POSITION or bool((pos[1:] <= pos[:-1]).any())):
        raise ConfigError(f"positions must be in [0, {MAX_POSITION}) and strictly increasing")
    return pos
