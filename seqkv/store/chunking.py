"""Where a stored cache is cut into chunks.

``fixed``: every ``chunk_tokens`` tokens from position 0 (the last chunk may be partial).

``content``: content-defined boundaries (as in rsync / FastCDC), so that the same text gets the same
chunks wherever it appears: a chunk ends after token ``t`` when it holds at least ``chunk_tokens // 4``
tokens and the hash of the ``WINDOW`` tokens ending at ``t`` is 0 modulo ``chunk_tokens - chunk_tokens // 4``
(the mean chunk is then about ``chunk_tokens`` tokens), or when it reaches ``2 * chunk_tokens`` tokens.
A document placed after different preceding turns is cut at the same places from its first boundary on,
which is what lets the store find it again (near-duplicate reuse).  The boundaries of a prefix depend only
on that prefix, so exact-prefix sharing works as with fixed chunks.

The hash is a fixed polynomial over the token ids followed by the splitmix64 finaliser, in wrapping
uint64 arithmetic: deterministic across processes and machines.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError

CHUNKINGS = ("fixed", "content")
WINDOW = 4
_MULT = np.uint64(0x9E3779B97F4A7C15)


def _window_hashes(ids: np.ndarray) -> np.ndarray:
    """h[t] = mix(sum_j ids[t - j] * MULT^(j+1)) over the WINDOW tokens ending at t (fewer at the start)."""
    x = ids.astype(np.uint64) + np.uint64(1)
    h = np.zeros(len(x), dtype=np.uint64)
    with np.errstate(over="ignore"):
        m = np.uint64(1)
        for j in range(WINDOW):
            m = m * _MULT
            h[j:] += x[:len(x) - j] * m
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def chunk_bounds(ids: np.ndarray, chunk_tokens: int, chunking: str = "fixed",
                 boundary_tokens=()) -> list[tuple[int, int]]:
    """[start, end) of every chunk of the token ids, the last partial one included.

    ``boundary_tokens`` (content chunking only): a chunk also ends before every occurrence of one of these
    ids, whatever its size (e.g. the chat template's message-start token, so that a message starts a chunk
    and the same message after other turns is cut the same way from its first token)."""
    n = len(ids)
    if chunking == "fixed":
        if len(boundary_tokens):
            raise ConfigError("boundary_tokens need chunking='content'")
        return [(s, min(s + chunk_tokens, n)) for s in range(0, n, chunk_tokens)]
    if chunking != "content":
        raise ConfigError(f"chunking must be one of {CHUNKINGS}, got {chunking!r}")
    ids = np.asarray(ids)
    lo, hi = max(1, chunk_tokens // 4), max(1, 2 * chunk_tokens)
    modulus = np.uint64(max(1, chunk_tokens - chunk_tokens // 4))
    cut = (_window_hashes(ids) % modulus) == 0 if n else np.zeros(0, bool)
    forced = np.flatnonzero(np.isin(ids, np.asarray(list(boundary_tokens), dtype=np.int64))) if len(boundary_tokens) else []
    out, s, f = [], 0, 0
    while s < n:
        e = min(s + hi, n)
        hits = np.flatnonzero(cut[s + lo - 1:e - 1]) if s + lo - 1 < e - 1 else []
        if len(hits):
            e = s + lo + int(hits[0])
        while f < len(forced) and forced[f] <= s:
            f += 1
        if f < len(forced) and forced[f] < e:
            e = int(forced[f])  # a chunk ends right before a boundary token
        out.append((s, e))
        s = e
    return out
