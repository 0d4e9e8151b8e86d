"""Prompt caching on top of :class:`seqkv.store.PrefixStore`.

``cached_generate`` looks up the longest stored prefix of a prompt, prefills only the rest of it (with
``position_ids`` continuing at the prefix length), generates with ``model.generate`` and stores the
prompt's cache back so that the next prompt sharing this one hits.

With a lossless store the output is token for token what ``model.generate`` gives on the whole prompt
without any cache (greedy decoding, same dtype).  With a lossy preset the reused prefix is an
approximation, and so are the chunks written back after it (they were computed on top of it).
"""
from __future__ import annotations

import time

import torch

from .errors import ConfigError
from .model_calls import cache_of, with_cache, with_cache_for_generate


def _token_list(token_ids) -> list:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() == 2:
            if token_ids.shape[0] != 1:
                raise ConfigError(f"cached_generate takes one prompt (batch 1), got a batch of {token_ids.shape[0]}")
            token_ids = token_ids[0]
        elif token_ids.dim() != 1:
            raise ConfigError(f"token_ids must be 1-D or [1, n], got shape {tuple(token_ids.shape)}")
        if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise ConfigError(f"token_ids must be integers, got {token_ids.dtype}")
        return [int(x) for x in token_ids.tolist()]
    try:
        ids = [int(x) for x in token_ids]
    except (TypeError, ValueError):
        raise ConfigError("token_ids must be a sequence of integers or an integer tensor") from None
    if any(isinstance(x, bool) for x in token_ids):
        raise ConfigError("token_ids must be integers, not booleans")
    return ids


def _seq_len(cache) -> int:
    if cache is None or not cache.layers or getattr(cache.layers[0], "keys", None) is None:
        return 0
    return int(cache.layers[0].keys.shape[-2])


def _crop_to(cache, length: int) -> None:
    """Keep the first ``length`` tokens of every layer (DynamicCache.crop's argument changed meaning
    across transformers versions, so the layers are sliced directly)."""
    for layer in cache.layers:
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]


@torch.no_grad()
def cached_generate(model, token_ids, store, *, max_new_tokens: int, put: bool = True, **generate_kwargs):
    """Generate after ``token_ids`` reusing the longest prefix stored in ``store``.

    Returns ``(output_ids, info)``: ``output_ids`` is a LongTensor ``[1, n_prompt + n_new]`` (prompt
    included, like ``model.generate``); ``info`` holds ``prompt_tokens``, ``tokens_reused`` (from the
    store), ``tokens_prefilled`` (computed here, the last prompt token included), ``new_tokens``,
    ``load_seconds``, ``prefill_seconds``, ``generate_seconds`` (generation, which also feeds the last
    prompt token), ``put_seconds`` and ``put`` (the dict of ``store.put``, or None).

    Decoding is greedy unless ``generate_kwargs`` say otherwise.  At least one prompt token is always
    fed to the model: when the whole prompt is stored, the reused cache is cut by one token.
    """
    from transformers import DynamicCache

    from .hf_adapter import SUPPORTED_DTYPES
    from .quality import clone_cache

    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    for reserved in ("input_ids", "past_key_values", "cache", "position_ids", "inputs"):
        if reserved in generate_kwargs:
            raise ConfigError(f"cached_generate sets {reserved!r} itself")
    ids = _token_list(token_ids)
    total = len(ids)
    if total == 0:
        raise ConfigError("the prompt is empty")
    param = next(model.parameters())
    device, model_dtype = param.device, param.dtype

    # (a) the longest stored prefix
    t0 = time.perf_counter()
    n, cache = store.longest_prefix(ids, device=device)
    if cache is not None and any(layer.keys.dtype != model_dtype for layer in cache.layers):
        cache = clone_cache(cache, model_dtype)  # a prefix stored in another dtype (e.g. fp16): run it in the model's
    load_seconds = time.perf_counter() - t0
    reused_stored = n
    # always feed at least the last prompt token (generate needs logits of it)
    if n >= total:
        n = total - 1
        if n > 0:
            _crop_to(cache, n)
    if cache is None or n == 0:
        cache = DynamicCache()
        n = 0
    if _seq_len(cache) != n:
        raise ConfigError(f"the stored prefix decodes to {_seq_len(cache)} tokens, expected {n}")

    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    feed_until = total - 1 if max_new_tokens > 0 else total  # generate feeds the last token itself

    # (b) prefill the remainder with positions continuing at n
    t0 = time.perf_counter()
    if feed_until > n:
        position_ids = torch.arange(n, feed_until, device=device).unsqueeze(0)
        model(prompt[:, n:feed_until], **with_cache(model, cache), position_ids=position_ids, use_cache=True)
    prefill_seconds = time.perf_counter() - t0

    # (c) generate; transformers skips the tokens already in the cache
    t0 = time.perf_counter()
    if max_new_tokens > 0:
        kwargs = dict(generate_kwargs)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("attention_mask", torch.ones_like(prompt))
        if getattr(model.generation_config, "pad_token_id", None) is None:
            eos = getattr(model.generation_config, "eos_token_id", None)
            if eos is not None:
                kwargs.setdefault("pad_token_id", eos if isinstance(eos, int) else next(iter(eos)))
        kwargs["return_dict_in_generate"] = True
        out = model.generate(input_ids=prompt, **with_cache_for_generate(model, cache), max_new_tokens=max_new_tokens,
                             **kwargs)
        output_ids = out.sequences
        cache = cache_of(out)
    else:
        output_ids = prompt
    generate_seconds = time.perf_counter() - t0

    # (d) store the prompt's cache
    put_info = None
    put_seconds = 0.0
    if put:
        if _seq_len(cache) < total:
            raise ConfigError(f"the cache after generation holds {_seq_len(cache)} tokens, fewer than the "
                              f"{total}-token prompt")
        _crop_to(cache, total)
        stored = cache
        if SUPPORTED_DTYPES.get(model_dtype) is None:
            raise ConfigError(f"the store cannot keep {model_dtype} caches")
        t0 = time.perf_counter()
        put_info = store.put(ids, stored)
        put_seconds = time.perf_counter() - t0

    info = {"prompt_tokens": total, "tokens_stored": reused_stored, "tokens_reused": n,
            "tokens_prefilled": total - n, "new_tokens": int(output_ids.shape[1]) - total,
            "load_seconds": load_seconds, "prefill_seconds": prefill_seconds,
            "generate_seconds": generate_seconds, "put_seconds": put_seconds, "put": put_info}
    return output_ids, info
