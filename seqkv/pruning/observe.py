"""Recording the pre-RoPE queries of a prefill, for the query-aware pruners (SnapKV, expected attention).

Like kvpress's context manager, :class:`QueryObserver` hooks every attention
module of the model; inside ``with observer.attach(model):`` a forward pass
records, per layer, the queries before RoPE as ``[query_heads, tokens, head_dim]``
float32 (Qwen3/Gemma-style ``q_norm`` applied).  Only the last ``keep_last``
tokens are kept when it is set.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import ConfigError


def attention_modules(model) -> list:
    """The self-attention module of every decoder layer, in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    if not mods:
        raise ConfigError(f"{type(model).__name__} has no Llama-style attention modules (q_proj + layer_idx)")
    return sorted(mods, key=lambda m: m.layer_idx)


def prerope_queries(module, hidden_states: torch.Tensor) -> torch.Tensor:
    """[batch, query_heads, tokens, head_dim] queries before RoPE, as the module computes them."""
    bsz, n, _ = hidden_states.shape
    q = module.q_proj(hidden_states).view(bsz, n, -1, module.head_dim).transpose(1, 2)
    norm = getattr(module, "q_norm", None)
    return norm(q) if norm is not None else q


class QueryObserver:
    """Holds the pre-RoPE queries of the last observed prefill, per layer."""

    def __init__(self, keep_last: int | None = None):
        self.keep_last = keep_last
        self.queries: dict[int, torch.Tensor] = {}

    @property
    def tokens(self) -> int:
        return next(iter(self.queries.values())).shape[1] if self.queries else 0

    @contextmanager
    def attach(self, model):
        self.queries = {}

        def hook(module, args, kwargs):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            if hs is None or hs.shape[0] != 1:
                return None
            if self.keep_last is not None:
                hs = hs[:, -self.keep_last:]
            with torch.no_grad():
                q = prerope_queries(module, hs)[0].float()
            prev = self.queries.get(module.layer_idx)
            self.queries[module.layer_idx] = q if prev is None else torch.cat([prev, q], dim=1)
            return None

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
