"""A teacher-forced probe on a cache's own last tokens: what closed-loop rate control measures.

The probe holds out the cache's last ``W`` tokens.  The model re-reads them after the first ``T - W``
tokens of the original cache (the reference) and after the same tokens of a decoded cache, at their
recorded positions; the mean KL(reference || decoded) over those ``W`` positions is the measured KL of
design notes §5, taken on text the cache itself holds, so no other text is needed and none is assumed.

The token ids come from the caller (``token_ids=``) or are recovered from layer 0's keys: before any
attention, a token's layer-0 key depends on that token alone (``k_proj(norm(embedding))``, then RoPE),
so matching the cached keys against the vocabulary's finds the ids.  A recovery is accepted only if every
recovered token reproduces its cached key to within :data:`RECOVERY_TOLERANCE`; a cache from another
model, or an architecture that computes layer-0 keys differently, fails that check and gets no probe.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .hf_adapter import build_cache
from .model_calls import with_cache
from .stages.rope import keys_to_pre_rope

PROBE_TOKENS = 256          # the held-out tail; fewer for short caches (a quarter of them)
MIN_PROBE_TOKENS = 16       # below this the probe's KL is too noisy to steer by: no probe
RECOVERY_TOLERANCE = 0.02   # relative L2 error of a recovered token's layer-0 key (fp16/bf16 rounding: ~0.001-0.004)
VOCAB_CHUNK = 8192          # vocabulary rows per matmul while matching

_VOCAB_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> [V, kv_heads * head_dim]


def probe_length(tokens: int) -> int:
    """How many of a ``tokens``-token cache's last tokens the probe holds out (0: too short for a probe)."""
    length = min(PROBE_TOKENS, tokens // 4)
    return length if length >= MIN_PROBE_TOKENS else 0


def _layer0_parts(model):
    inner = getattr(model, "model", None)
    try:
        block = inner.layers[0]
        return inner.embed_tokens, block.input_layernorm, block.self_attn
    except (AttributeError, IndexError, TypeError):
        return None


@torch.no_grad()
def vocabulary_keys(model) -> torch.Tensor | None:
    """Layer 0's pre-RoPE key of every vocabulary token, [V, kv_heads * head_dim] float32 (computed once per
    model), or None where the model is not a decoder of the Llama family layout (``model.layers[0].self_attn``)."""
    if model in _VOCAB_KEYS:
        return _VOCAB_KEYS[model]
    parts = _layer0_parts(model)
    if parts is None:
        return None
    embed, norm, attn = parts
    k_proj, k_norm = getattr(attn, "k_proj", None), getattr(attn, "k_norm", None)
    weight = getattr(embed, "weight", None)
    if k_proj is None or not isinstance(weight, torch.Tensor):
        return None
    rows = []
    for start in range(0, weight.shape[0], VOCAB_CHUNK):
        keys = k_proj(norm(weight[start:start + VOCAB_CHUNK]))
        if k_norm is not None:   # per-head key norm (Qwen3-like)
            keys = k_norm(keys.view(keys.shape[0], -1, attn.head_dim)).flatten(1)
        rows.append(keys.float())
    out = torch.cat(rows)
    _VOCAB_KEYS[model] = out
    return out


@torch.no_grad()
def recover_token_ids(model, layer0_keys: torch.Tensor, positions: torch.Tensor, layout) -> torch.Tensor | None:
    """The token ids whose layer-0 keys are ``layer0_keys`` ([kv_heads, n, head_dim], post-RoPE, at
    ``positions``), or None when any of them is not reproduced within :data:`RECOVERY_TOLERANCE`."""
    vocab = vocabulary_keys(model)
    if vocab is None:
        return None
    cached = keys_to_pre_rope(layer0_keys, "keys", positions, layout).transpose(0, 1).flatten(1)   # [n, H*D]
    if cached.shape[1] != vocab.shape[1]:
        return None
    best = torch.full((cached.shape[0],), float("inf"))
    ids = torch.zeros(cached.shape[0], dtype=torch.long)
    for start in range(0, vocab.shape[0], VOCAB_CHUNK):
        chunk = vocab[start:start + VOCAB_CHUNK]
        dist = chunk.pow(2).sum(1)[None, :] - 2 * cached @ chunk.T          # ||a - b||^2 - ||a||^2
        value, index = dist.min(1)
        better = value < best
        best = torch.where(better, value, best)
        ids = torch.where(better, index + start, ids)
    error = (cached - vocab[ids]).norm(dim=1) / cached.norm(dim=1).clamp_min(1e-12)
    return ids if bool((error <= RECOVERY_TOLERANCE).all()) else None


@dataclass
class ProbeWindow:
    """``length`` cached tokens the model re-reads after the tokens before them: their ids, first index,
    and the reference log-probabilities (from the original cache)."""
    ids: torch.Tensor            # [1, length]
    start: int
    reference: torch.Tensor      # [length, vocab] log-softmax


class TailProbe:
    """The reference runs of a cache's last tokens, to measure decoded caches against.

    ``layers``: the cache's per-layer (keys, values) [kv_heads, T, head_dim]; ``positions``: [T];
    ``token_ids``: the T tokens' ids (or at least the last ``length`` of them).

    The probe re-reads the last ``length`` tokens (the tail) and, when their ids are given too, the ``length``
    tokens before them (after the tokens before *them*), and :meth:`mean_kl` is the larger of the two
    windows' mean KL: a cache's tail alone can be easier than what follows it (stdlib_h: the tail read 0.6-0.9x
    the target where the continuation read 1.1-1.7x, and the window before read 1.4-3.0x; docs/rate_control.md).
    With a Llama-style model, :attr:`queries` keeps the pre-RoPE queries of both runs (layer ->
    [query_heads, 2 * length, head_dim]): soft pruning's model of the queries to come
    (:mod:`seqkv.token_importance`)."""

    def __init__(self, model, layers, positions: torch.Tensor, token_ids: torch.Tensor, length: int):
        tokens = layers[0][0].shape[1]
        if not 0 < length < tokens:
            raise ConfigError(f"a probe of {length} tokens does not fit a {tokens}-token cache")
        all_ids = torch.as_tensor(token_ids).reshape(-1).to(torch.long)
        if all_ids[-length:].numel() != length:
            raise ConfigError(f"token_ids has {all_ids.numel()} ids; the probe needs the cache's last {length}")
        self.model, self.length, self.kept = model, length, tokens - length
        self.dtype = next(model.parameters()).dtype
        self.positions = positions.to(torch.long)
        starts = [tokens - length]
        if all_ids.numel() >= 2 * length and tokens - 2 * length > 0:
            starts.append(tokens - 2 * length)
        self.windows: list[ProbeWindow] = []
        observed = []
        for start in starts:
            ids = all_ids[all_ids.numel() - (tokens - start):][:length].unsqueeze(0)
            logits, queries = self._run(layers, ids, start, observe=True)
            self.windows.append(ProbeWindow(ids, start, torch.log_softmax(logits, dim=-1)))
            observed.append(queries)
        self.queries: dict = {}
        if len(observed) == 2 and all(observed):
            self.queries = {layer: torch.cat([observed[1][layer], observed[0][layer]], dim=1) for layer in observed[0]}

    @property
    def tokens(self) -> int:
        """How many tokens the probe measures on (all its windows)."""
        return self.length * len(self.windows)

    @torch.no_grad()
    def _run(self, layers, ids: torch.Tensor, start: int, observe: bool = False):
        """(logits [length, vocab], pre-RoPE queries or {}) of the model re-reading ``ids`` after ``layers``'
        first ``start`` tokens."""
        context = build_cache([(k[:, :start], v[:, :start]) for k, v in layers], dtype=self.dtype)
        kwargs = dict(**with_cache(self.model, context), use_cache=True,
                      position_ids=self.positions[start:start + ids.shape[1]].unsqueeze(0))
        if observe:
            from .pruning.observe import QueryObserver   # the pruning package loads only when a probe observes

            observer = QueryObserver()
            try:
                with observer.attach(self.model):
                    return self.model(ids, **kwargs).logits[0].float(), observer.queries
            except ConfigError:   # not a Llama-style model: nothing to observe (the probe itself still works)
                pass
        return self.model(ids, **kwargs).logits[0].float(), {}

    def window_kls(self, decoded_layers) -> list[float]:
        """Mean KL(reference || decoded) over each window's tokens (the tail first)."""
        out = []
        for window in self.windows:
            test = torch.log_softmax(self._run(decoded_layers, window.ids, window.start)[0], dim=-1)
            ref = window.reference
            out.append(float((ref.exp() * (ref - test)).sum(-1).clamp_min(0.0).mean()))
        return out

    def mean_kl(self, decoded_layers) -> float:
        """The larger of the windows' mean KL(reference || decoded), for the decoded per-layer tensors."""
        return max(self.window_kls(decoded_layers))


def tail_probe(model, layers, positions: torch.Tensor, layout, token_ids=None) -> tuple[TailProbe | None, str]:
    """``(probe, why)``: the probe for this cache, or None and the reason there is none."""
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "forward", None)):
        return None, "no model to run (model= is a config or layout)"
    length = probe_length(layers[0][0].shape[1])
    if length == 0:
        return None, f"the cache has fewer than {4 * MIN_PROBE_TOKENS} tokens"
    if token_ids is None:
        # the tail and the observation window before it (soft pruning), when the cache holds both
        tokens = layers[0][0].shape[1]
        tail = slice(tokens - (2 * length if tokens > 2 * length else length), None)
        token_ids = recover_token_ids(model, layers[0][0][:, tail], positions[tail], layout)
        if token_ids is None:
            return None, "token ids were not given and layer 0's keys do not identify them for this model"
    return TailProbe(model, layers, positions, token_ids, length), ""


class OpenLoopWarning(UserWarning):
    """A ``target_kl`` was given with a model, but is met as predicted by the profile, not as measured."""


def loop_probe(closed_loop, target, model, layers, positions: torch.Tensor, layout, token_ids=None):
    """The probe closed-loop rate control measures on, or None for the profile's prediction alone
    (``closed_loop``: None = when possible, True = required, False = never); see :func:`seqkv.encode`."""
    if closed_loop is not None and not isinstance(closed_loop, bool):
        raise ConfigError(f"closed_loop must be True, False or None, got {closed_loop!r}")
    if token_ids is not None:
        token_ids = checked_token_ids(token_ids, layers[0][0].shape[1])
    if closed_loop is False or target is None:
        return None
    if target.kind != "kl":
        if closed_loop:
            raise ConfigError(f"closed_loop=True measures a target_kl; this encode targets {target.kind}")
        return None
    probe, why = tail_probe(model, layers, positions, layout, token_ids)
    if probe is None and closed_loop:
        raise ConfigError(f"closed_loop=True, but no probe can be run: {why}")
    if probe is None and isinstance(model, torch.nn.Module):
        hint = "pass token_ids=, or closed_loop=False to silence this" if "token ids" in why else \
            "closed_loop=False silences this"
        warnings.warn(f"target_kl={target.value:g} is the profile's prediction, not measured: {why} ({hint})",
                      OpenLoopWarning, stacklevel=3)
    return probe


def checked_token_ids(token_ids, tokens: int) -> torch.Tensor:
    """``token_ids`` as int64 [tokens]; ConfigError unless it holds one non-negative integer per cached token."""
    try:
        ids = torch.as_tensor(token_ids)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"token_ids must be a sequence or tensor of integers: {exc}") from None
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ConfigError(f"token_ids must hold integers, got {ids.dtype}")
    ids = ids.reshape(-1) if ids.dim() == 2 and ids.shape[0] == 1 else ids
    if ids.dim() != 1 or ids.numel() != tokens:
        raise ConfigError(f"token_ids has shape {tuple(torch.as_tensor(token_ids).shape)}; the cache holds "
                          f"{tokens} tokens (one id each)")
    if bool((ids < 0).any()):
        raise ConfigError("token_ids holds negative ids")
    return ids.to(torch.long)
