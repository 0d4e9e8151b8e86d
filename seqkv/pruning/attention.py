"""Running a model on a pruned cache: true RoPE positions, and a per-head mask over padding slots.

A pruned cache feeds new tokens at ``state.next_position`` (the unpruned
length), not at its slot count: :func:`continuation_logits` and
:func:`greedy_continue` pass ``position_ids`` accordingly.

When heads keep different numbers of tokens (``AdaptiveHeads``, ``head_budget="adaptive"``), the
rectangular tensors hold zero padding slots.  :func:`pruned_attention` hooks
every attention module (a forward pre-hook, as kvpress does) and replaces the
layer's attention mask by a 4-D per-query-head mask ``[1, query_heads, q, kv]``
that hides that layer's padding slots and keeps the new tokens causal.  It is
a boolean mask for ``sdpa`` and an additive float mask for ``eager`` (the two
forms transformers 5 passes to those kernels).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import PruneError
from ..model_calls import with_cache, with_cache_for_generate
from .observe import attention_modules
from .state import pruned_state

SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")


def _layer_mask(state, layer: int, groups: int, q_len: int, past: int, incoming, dtype, eager: bool):
    kv = past + q_len
    allowed = torch.ones(len(state.kept[layer]), q_len, kv, dtype=torch.bool)
    allowed[:, :, :state.width] &= state.slot_valid(layer)[:, None, :]
    allowed[:, :, past:] &= torch.ones(q_len, q_len, dtype=torch.bool).tril()
    allowed = allowed.repeat_interleave(groups, dim=0).unsqueeze(0)           # [1, Hq, q, kv]
    if isinstance(incoming, torch.Tensor) and incoming.dim() == 4 and incoming.shape[-2:] == (q_len, kv):
        allowed = allowed & (incoming if incoming.dtype == torch.bool else incoming == 0)
    if not eager:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


@contextmanager
def pruned_attention(model, cache):
    """Inside this block, forward passes of ``model`` over ``cache`` ignore its padding slots."""
    state = pruned_state(cache) if cache is not None else None
    if state is None or not state.ragged:
        yield
        return
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if impl not in SUPPORTED_IMPLEMENTATIONS:
        raise PruneError(f"ragged pruned caches need attn_implementation 'sdpa' or 'eager', not {impl!r}")

    def hook(module, args, kwargs):
        hs = kwargs["hidden_states"]
        layer = module.layer_idx
        past = cache.layers[layer].get_seq_length() if layer < len(cache.layers) else 0
        if past < state.width:
            raise PruneError("the pruned cache is shorter than its pruning record")
        kwargs["attention_mask"] = _layer_mask(state, layer, module.num_key_value_groups, hs.shape[1], past,
                                               kwargs.get("attention_mask"), hs.dtype, impl == "eager")
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def next_position(cache, default: int | None = None) -> int:
    """The RoPE position of the next token after ``cache``: the unpruned length for pruned caches."""
    state = pruned_state(cache)
    if state is None:
        return cache.get_seq_length() if default is None else default
    return state.next_position + cache.layers[0].keys.shape[2] - state.width


@torch.no_grad()
def continuation_logits(model, cache, token_ids: torch.Tensor, position: int | None = None) -> torch.Tensor:
    """Logits [n, vocab] of ``token_ids`` fed after ``cache`` (which it extends), at the true positions."""
    ids = torch.as_tensor(token_ids).reshape(1, -1)
    start = next_position(cache) if position is None else position
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    with pruned_attention(model, cache):
        out = model(ids, position_ids=pos, use_cache=True, **with_cache(model, cache))
    return out.logits[0]


@torch.no_grad()
def greedy_continue(model, cache, last_token: int, new_tokens: int) -> list[int]:
    """Greedy-decode ``new_tokens`` after ``cache`` (pruned or not): ``last_token`` is the first token the
    cache does not hold; it goes in at the cache's true next position."""
    out, token = [], int(last_token)
    for _ in range(new_tokens):
        token = int(continuation_logits(model, cache, torch.tensor([token]))[-1].argmax())
        out.append(token)
    return out


@contextmanager
def true_positions(model, cache):
    """Inside this block, the model's forward passes over ``cache`` get RoPE positions offset from the
    cache's slot count to its true next position (a forward pre-hook on the base model), so code that
    derives positions from the cache length, like ``model.generate()``, stays right."""
    offset = next_position(cache) - cache.get_seq_length() if cache is not None else 0
    if not offset:
        yield
        return

    def hook(module, args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is None:
            x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
            given = kwargs.get("cache") if kwargs.get("cache") is not None else kwargs.get("past_key_values")
            past = given.get_seq_length() if given is not None else 0
            pos = torch.arange(past, past + x.shape[1], device=x.device).unsqueeze(0)
        kwargs["position_ids"] = pos + offset
        return args, kwargs

    base = getattr(model, "model", model)
    handle = base.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def generate(model, cache, input_ids, **generate_kwargs) -> torch.Tensor:
    """``model.generate()`` continuing from a pruned (or any) cache: feeds ``input_ids`` (the tokens after
    the cache) and returns the new tokens ``[1, n]``.  Every ``generate()`` option works (greedy, sampling,
    ``max_new_tokens``, ``eos_token_id``...).  ``cache`` is extended in place.

    ``generate()`` counts the cache's slots as tokens already seen, so the helper puts as many
    placeholder ids in front of ``input_ids`` (never fed: they are "in the cache"), shifts the
    positions to the true next position and masks padding slots of ragged caches."""
    ids = torch.as_tensor(input_ids).reshape(1, -1)
    width = cache.get_seq_length()
    full = torch.cat([torch.zeros(1, width, dtype=ids.dtype, device=ids.device), ids], dim=1)
    generate_kwargs.setdefault("pad_token_id", getattr(model.generation_config, "pad_token_id", None) or 0)
    with pruned_attention(model, cache), true_positions(model, cache):
        out = model.generate(full, attention_mask=torch.ones_like(full), **with_cache_for_generate(model, cache),
                             **generate_kwargs)
    return out[:, full.shape[1]:]
