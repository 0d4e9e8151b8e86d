"""Soft pruning: per-token step codes from the attention the queries to come are expected to pay each token.

Hard pruning drops the tokens attention reads least, and fails where a later question reads one of them
(passkeys, copied passages).  Here every token stays, but the quantizer's steps of a token that attention
is expected to read little are multiplied by ``2 ** (code / 4)`` (``klt_uniform`` with ``token_steps``,
docs/format.md §6.2): coarser, not gone.  With the KL contribution of a token taken as proportional to the
attention it receives ``a_t`` times its squared error, the high-rate optimum at a fixed total rate is steps
proportional to ``a_t ** -0.5``; :data:`DEFAULT_BETA` (measured, docs/soft_pruning.md) is gentler than that
0.5, because ``a_t`` is only an estimate.

``a_t`` is kvpress's *expected attention* (Devoto et al.): the queries to come are modelled as a Gaussian
whose mean and covariance are those of the queries the closed-loop probe observed (the cache's last
``2 W`` tokens re-read by the model, :class:`seqkv.kl_probe.TailProbe`), rotated by the RoPE rotation
averaged over the next :data:`FUTURE_POSITIONS` positions; a token's score is ``mu·k/sqrt(d) + k'Σk/(2d)``,
softmaxed over the tokens and averaged over the query heads; taken for the continuation and for the probe's
window before the tail, the larger of the two (:func:`reader_attention`).  Codes stop at
:data:`MAX_SOFT_CODE`; the last :data:`RECENT_TOKENS` tokens, which the probe cannot measure, keep code 0.
It is on by default in the closed loop on caches of :data:`DEFAULT_MIN_TOKENS` tokens or more
(:func:`soft_steps`).  Measured on four held-out texts (docs/soft_pruning.md), the attention the observed queries
*themselves* paid made the codes fit those queries: the probe then read 0.3-0.9x the target where the
continuation read up to 6.9x; with the expected attention the continuation/probe ratio stays within 0.5-1.8x,
as without soft pruning (0.7-1.5x).  Every token at least as important as the layer's
:data:`REFERENCE_QUANTILE` keeps code 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError
from .kl_probe import PROBE_TOKENS
from .stages.quantize_klt import MAX_TOKEN_CODE, TOKEN_CODES_PER_OCTAVE, token_multipliers

DEFAULT_BETA = 0.35          # codes = 4 * beta * log2(reference / a_t); 0.5 would be the high-rate optimum
REFERENCE_QUANTILE = 0.99    # a layer's tokens at or above this quantile of a_t keep full precision
FUTURE_POSITIONS = 512       # the RoPE rotation of the queries to come is averaged over this many positions
# At most 4x a token's steps (the format allows 1024x): expected attention cannot see an induction head's later
# copy of an early passage; at 8 the copy probe read a third of the KL it read uncapped at the same median ratio
# (docs/soft_pruning.md)
MAX_SOFT_CODE = 8
# The last tokens keep full precision: the probe re-reads its tail after the tokens before it, so it never reads
# the tail's own decoded KV, while the continuation's first queries read the last few dozen tokens most (local
# heads, which the RoPE averaged over FUTURE_POSITIONS blurs away).  Coded up to 4x coarser, they let
# python_reference's continuation read 1.33x the target at 0.001 with the probe at 0.82x; at code 0, 0.72x at
# the same ratio (docs/soft_pruning.md)
RECENT_TOKENS = 64
# By default only where the probe's windows are full (PROBE_TOKENS each, a quarter of the cache at most): on
# 512-token caches (128-token windows) the probe's KL jumped by 2x between neighbouring scales and soft pruning
# cost 16-19 % against uniform steps on two of three texts; from 1024 tokens on it gained (docs/soft_pruning.md)
DEFAULT_MIN_TOKENS = 4 * PROBE_TOKENS


def average_rope_rotation(layout, start: int, count: int) -> torch.Tensor:
    """The RoPE rotation matrix [D, D] averaged over positions ``start .. start + count - 1``."""
    from .pruning.expected_attention import average_rope_matrix   # the pruning package loads only here

    return average_rope_matrix(layout, start, count)


@torch.no_grad()
def expected_attention(queries: dict, layers, next_position: int, layout,
                       horizon: int = FUTURE_POSITIONS) -> list[np.ndarray]:
    """Per layer, the expected attention weight of each of the T cached tokens (float64 [T], sums to 1).

    ``queries``: layer -> observed pre-RoPE queries [query_heads, n, head_dim]; ``layers``: the cache's
    (keys, values), keys post-RoPE [kv_heads, T, head_dim]; ``next_position``: the position after the cache;
    ``horizon``: over how many positions from there the queries' RoPE rotation is averaged."""
    rotation = average_rope_rotation(layout, next_position, horizon)
    out = []
    for index, (keys, _values) in enumerate(layers):
        q = queries.get(index)
        if q is None or q.dim() != 3 or q.shape[1] < 2:
            raise ConfigError(f"no observed queries for layer {index}")
        q = q.float()
        heads, _n, dim = q.shape
        mean = q.mean(dim=1) @ rotation.T                                         # [Hq, D]
        centred = q - q.mean(dim=1, keepdim=True)
        cov = rotation @ (torch.einsum("hsi,hsj->hij", centred, centred) / q.shape[1]) @ rotation.T
        k = keys.float().repeat_interleave(heads // keys.shape[0], dim=0)        # [Hq, T, D]
        scores = torch.einsum("hd,htd->ht", mean, k) / math.sqrt(dim) \
            + torch.einsum("hti,hij,htj->ht", k, cov, k) / dim / 2
        out.append(torch.softmax(scores, dim=-1).mean(dim=0).double().numpy())
    return out


@torch.no_grad()
def reader_attention(probe, layers, positions: torch.Tensor, layout,
                     near_positions: int = 0) -> list[np.ndarray]:
    """Per layer, the larger of two readers' expected attention to each cached token (float64 [T], renormalised
    to sum 1): the continuation's (after the last cached token) and that of the probe's window before the tail
    (at its own positions, reading only the tokens before it; zero for the tokens after them).

    The closed loop measures both windows and keeps the larger KL.  Codes fitted to the continuation alone coded
    the tokens just before that window (the distant past of the continuation) coarsely, so the window read
    several times the KL the continuation did, and the loop stopped at a fine scale: the continuation landed at
    0.26-0.51x of the target (docs/soft_pruning.md).  Serving both readers keeps those tokens' steps finer and
    lets what the loop measures be what the codes were made for (median 11.7x -> 13.5x at 0.01, measured).
    The tail's own reader sits within one window of the continuation's and is not modelled separately.
    ``near_positions`` (0: none, the default) adds a third reader, the continuation's with the RoPE averaged over
    only that many positions (its first queries); measured as an alternative to sparing the recent tokens
    (``bench/soft_pruning_readers.py`` variant ``both-near16-cap8``), it is not what the encoder uses."""
    tokens = layers[0][0].shape[1]
    attention = expected_attention(probe.queries, layers, int(positions[-1]) + 1, layout)
    if near_positions:
        attention = larger_reader(attention, expected_attention(probe.queries, layers, int(positions[-1]) + 1,
                                                                layout, near_positions))
    before = [w.start for w in probe.windows if w.start < probe.kept]
    if not before or before[0] < 1:
        return attention
    cut = before[0]
    earlier = expected_attention(probe.queries, [(k[:, :cut], v[:, :cut]) for k, v in layers], int(positions[cut]),
                                 layout)
    return larger_reader(attention, [np.concatenate([b, np.zeros(tokens - cut)]) for b in earlier])


def larger_reader(first: list[np.ndarray], second: list[np.ndarray]) -> list[np.ndarray]:
    """Per layer, the token-wise larger of two readers' attention, renormalised to sum 1."""
    out = []
    for a, b in zip(first, second):
        both = np.maximum(a, b)
        out.append(both / both.sum())
    return out


def token_step_codes(attention: list[np.ndarray], sink_tokens: int, beta: float = DEFAULT_BETA,
                     max_code: int = MAX_SOFT_CODE, recent_tokens: int = RECENT_TOKENS) -> dict:
    """(layer, kind) -> uint8 [T] step codes (the same for a layer's keys and values):
    ``round(4 * beta * log2(reference / a_t))`` clipped to [0, max_code], the reference being the
    layer's :data:`REFERENCE_QUANTILE` of its non-sink tokens' ``a_t``.  Sink tokens and the last
    ``recent_tokens`` (:data:`RECENT_TOKENS`) keep code 0, and so does
    every token of layer 0: repeat prediction finds which token repeats which from layer 0's symbols
    (docs/format.md §6.5), and equal tokens have equal symbols there only at equal steps (layer 0 is under
    1 % of a container's bits; sparing it raised the ratio at the measured target, docs/soft_pruning.md)."""
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 2.0):
        raise ConfigError(f"token step beta must be in [0, 2], got {beta!r}")
    if not (isinstance(max_code, int) and 0 <= max_code <= MAX_TOKEN_CODE):
        raise ConfigError(f"max_code must be an integer in [0, {MAX_TOKEN_CODE}], got {max_code!r}")
    if isinstance(recent_tokens, bool) or not (isinstance(recent_tokens, int) and recent_tokens >= 0):
        raise ConfigError(f"recent_tokens must be a non-negative integer, got {recent_tokens!r}")
    codes = {}
    for layer, a in enumerate(attention):
        c = np.zeros(a.size, dtype=np.uint8)
        body = a[sink_tokens:]
        if body.size and layer > 0:
            reference = float(np.quantile(body, REFERENCE_QUANTILE))
            raw = np.round(TOKEN_CODES_PER_OCTAVE * beta * np.log2(reference / np.maximum(body, 1e-30)))
            c[sink_tokens:] = np.clip(raw, 0, max_code).astype(np.uint8)
            c[max(sink_tokens, a.size - recent_tokens):] = 0
        codes[(layer, "keys")] = codes[(layer, "values")] = c
    return codes


@dataclass(frozen=True)
class SoftSteps:
    """What soft pruning hands the encoder: per (layer, kind), the tokens' step codes (uint8 [T]) and their
    expected attention normalised to mean 1 (float32 [T]: the KL model's token weights)."""
    codes: dict
    weights: dict

    def for_body(self, key, sink_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(multipliers, weights) of the quantized tokens (after the sinks) of one section, as tensors."""
        codes, weights = self.codes[key][sink_tokens:], self.weights[key][sink_tokens:]
        return torch.from_numpy(token_multipliers(codes)), torch.from_numpy(np.ascontiguousarray(weights))


def uniform_weights(codes: dict) -> SoftSteps:
    """Given step codes with every token weighing the same in the KL model (tests, golden files)."""
    return SoftSteps(codes, {key: np.ones(len(c), np.float32) for key, c in codes.items()})


def attention_weights(attention: list[np.ndarray]) -> dict:
    """(layer, kind) -> float32 [T]: each layer's attention divided by its mean."""
    out = {}
    for layer, a in enumerate(attention):
        w = (a / max(float(a.mean()), 1e-30)).astype(np.float32)
        out[(layer, "keys")] = out[(layer, "values")] = w
    return out


def soft_steps(token_steps, probe, layers, positions: torch.Tensor, layout, sink_tokens: int) -> SoftSteps | None:
    """What an encode uses (None: soft pruning off).  ``token_steps``: None (the default) = on wherever the
    closed-loop probe observed queries (a runnable Llama-style model, a ``target_kl``) and the cache has at least
    :data:`DEFAULT_MIN_TOKENS` tokens, else off; True = on (any cache the probe observes), or ConfigError where
    the probe observed no queries; False = off (every token the same steps: a later verbatim copy of an early
    passage reads less KL, docs/soft_pruning.md)."""
    if token_steps is not None and not isinstance(token_steps, bool):
        raise ConfigError(f"token_steps must be True, False or None, got {token_steps!r}")
    if token_steps is False:
        return None
    if token_steps is None and layers[0][0].shape[1] < DEFAULT_MIN_TOKENS:
        return None
    if probe is None or not getattr(probe, "queries", None):
        if token_steps is None:
            return None
        raise ConfigError("token_steps=True models the queries the closed-loop probe observes: it needs a "
                          "target_kl, model= a model that runs (Llama-style attention), closed_loop not False "
                          "and a cache of at least 4 x 16 tokens")
    attention = reader_attention(probe, layers, positions, layout)
    return SoftSteps(token_step_codes(attention, sink_tokens), attention_weights(attention))
