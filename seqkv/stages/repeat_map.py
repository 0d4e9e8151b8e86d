"""Which earlier token each token repeats, read off layer 0's symbols (temporal_ar's ``repeat`` mode).

Layer 0's keys and values depend on the token alone, so two tokens with the same symbols there are (on
SmolLM2, for every cache measured) the same token: the map needs no token ids and no side info, and the
decoder derives exactly the encoder's map from the layer-0 symbols it has just decoded.  For every token
the map holds the earlier position whose run of equal tokens ending there is longest (the "match length",
capped at MAX_MATCH): deeper layers agree more the longer the shared context (docs/repeat_prediction.md).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .base import TensorContext, body_positions

MAX_MATCH = 32          # match lengths are counted up to this (the encoder's thresholds stop at 32)
MAX_CANDIDATES = 64     # earlier occurrences of a token examined per token (bounds the work on repetitive text)


class RepeatMap(NamedTuple):
    positions: torch.Tensor | None   # the body tokens' positions (a section uses the map only at the same ones)
    src: np.ndarray                  # int32 [T]: the earlier body token each token repeats (-1: none)
    length: np.ndarray               # int32 [T]: the match length (0: none)


def token_ids_from_symbols(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """int32 [T]: equal ids for tokens whose layer-0 key and value symbols ([H, T, D] each) are all equal,
    numbered by first occurrence (deterministic)."""
    heads, tokens, dim = keys.shape
    rows = np.concatenate([np.asarray(keys).transpose(1, 0, 2).reshape(tokens, heads * dim),
                           np.asarray(values).transpose(1, 0, 2).reshape(tokens, heads * dim)], axis=1)
    rows = np.ascontiguousarray(rows, dtype=np.int32)
    _unique, first, inverse = np.unique(rows.view(np.dtype((np.void, rows.shape[1] * 4))).ravel(),
                                        return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")        # renumber by first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse.ravel()].astype(np.int32)


def note_layer0(ctx: TensorContext, q: np.ndarray) -> None:
    """Keep layer 0's symbols of ``ctx.kind``; once both kinds are in, derive the map (encoder and decoder
    alike call this with the same symbols)."""
    state = ctx.state
    if ctx.kind == "keys" or state.repeat_symbols is None:
        state.repeat_symbols, state.repeat_map = {}, None
    state.repeat_symbols[ctx.kind] = np.array(q, dtype=np.int32)
    if len(state.repeat_symbols) == 2 and state.repeat_symbols["keys"].shape == state.repeat_symbols["values"].shape:
        from seqkv_ext.repeat import longest_matches

        tokens = q.shape[1]
        ids = token_ids_from_symbols(state.repeat_symbols["keys"], state.repeat_symbols["values"])
        src, length = longest_matches(ids, MAX_CANDIDATES, MAX_MATCH)
        state.repeat_map = RepeatMap(body_positions(ctx.positions, tokens), src, length)
        state.repeat_symbols = None


def map_for(ctx: TensorContext, tokens: int) -> RepeatMap | None:
    """The map this section may use: layer 1 and up, the same body tokens as layer 0."""
    rmap = ctx.state.repeat_map
    if ctx.layer == 0 or rmap is None or rmap.src.size != tokens or tokens == 0:
        return None
    mine = body_positions(ctx.positions, tokens)
    if (mine is None) != (rmap.positions is None) or (mine is not None and not torch.equal(mine, rmap.positions)):
        return None
    return rmap
