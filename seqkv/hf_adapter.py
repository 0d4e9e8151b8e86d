"""Between transformers caches and plain per-layer tensors.

seqkv encodes batch-1, full-attention ``DynamicCache`` objects of transformers
5.x (``cache.layers[i].keys/values``, shaped [1, kv_heads, tokens, head_dim]).
Sliding-window, quantized, static and offloaded caches are refused, because
their tensors do not mean "every token so far".
"""
from __future__ import annotations

import torch

from .errors import ConfigError, EncodeError, UnsupportedCacheError

SUPPORTED_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DTYPES_BY_NAME = {v: k for k, v in SUPPORTED_DTYPES.items()}
SUPPORTED_LAYER_CLASSES = {"DynamicLayer"}


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validate ``cache`` and return its per-layer (keys, values), each [kv_heads, tokens, head_dim]."""
    try:
        from transformers import DynamicCache
    except ImportError as exc:  # pragma: no cover
        raise UnsupportedCacheError(f"transformers is required to encode caches: {exc}") from None
    if not isinstance(cache, DynamicCache):
        raise UnsupportedCacheError(
            f"expected a transformers DynamicCache, got {type(cache).__module__}.{type(cache).__name__}"
        )
    if type(cache).__name__ not in {"DynamicCache"}:
        raise UnsupportedCacheError(f"{type(cache).__name__} is not supported (only plain DynamicCache)")
    layers = getattr(cache, "layers", None)
    if not layers:
        raise EncodeError("the cache is empty (it has no layers)")
    out = []
    shape = None
    for i, layer in enumerate(layers):
        name = type(layer).__name__
        if name not in SUPPORTED_LAYER_CLASSES:
            raise UnsupportedCacheError(
                f"layer {i} is a {name}; seqkv encodes full-attention DynamicLayer caches only "
                "(sliding-window and quantized layers are not supported)"
            )
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise EncodeError(f"layer {i} holds no key/value tensors (was the cache filled by a forward pass?)")
        if keys.dim() != 4 or values.dim() != 4:
            raise EncodeError(f"layer {i}: expected 4-D [batch, kv_heads, tokens, head_dim] tensors, got {tuple(keys.shape)}")
        if keys.shape != values.shape:
            raise EncodeError(f"layer {i}: keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in shape")
        if keys.shape[0] != 1:
            raise UnsupportedCacheError(f"layer {i}: batch size {keys.shape[0]}; seqkv encodes batch-1 caches")
        if keys.dtype not in SUPPORTED_DTYPES or values.dtype != keys.dtype:
            raise EncodeError(f"layer {i}: dtype {keys.dtype}/{values.dtype}; supported: float32, float16, bfloat16")
        if keys.shape[2] == 0:
            raise EncodeError(f"layer {i} holds 0 tokens: the cache is empty")
        if keys.device.type == "meta" or values.device.type == "meta":
            raise EncodeError(f"layer {i} lives on the meta device: its tensors hold no data to encode")
        if shape is None:
            shape = keys.shape
        elif keys.shape != shape or keys.dtype != out[0][0].dtype:
            raise EncodeError(f"layer {i}: shape {tuple(keys.shape)} {keys.dtype} differs from layer 0's {tuple(shape)}")
        out.append((keys[0].detach(), values[0].detach()))
    return out


def checked_device(device) -> torch.device | None:
    """``device`` as a torch.device that tensors can be moved to (None stays None); ConfigError otherwise."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ConfigError(f"device must be a torch.device, a string or an index, got {type(device).__name__}")
    try:
        out = torch.device(device)
        torch.empty(0, device=out)   # an unavailable device (no CUDA, an ordinal past the last GPU) fails here
    except (RuntimeError, AssertionError, TypeError, ValueError) as exc:
        raise ConfigError(f"device {device!r} is not available: {exc}") from None
    return out


def build_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], device=None, dtype=None):
    """A DynamicCache from per-layer [kv_heads, tokens, head_dim] tensors."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (keys, values) in enumerate(layers):
        keys = keys.unsqueeze(0).to(device=device, dtype=dtype)
        values = values.unsqueeze(0).to(device=device, dtype=dtype)
        # update() with zero tokens creates and initialises the layer; then hand it the tensors
        # themselves, which saves update()'s concatenation copy of the whole cache
        cache.update(keys[:, :, :0], values[:, :, :0], i)
        cache.layers[i].keys, cache.layers[i].values = keys, values
    return cache
