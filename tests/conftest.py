"""Shared fixtures: tiny random-initialised models of the supported families (fast, no weights)."""
from __future__ import annotations

import functools

import pytest
import torch


@functools.lru_cache(maxsize=None)
def tiny_model(family: str = "llama", layers: int = 2, kv_heads: int = 2, heads: int = 4, head_dim: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    config_cls, model_cls = classes[family]
    extra = {"sliding_window": None} if family in ("mistral", "qwen2") else {}
    config = config_cls(vocab_size=96, hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                        max_position_embeddings=512, **extra)
    torch.manual_seed(1234)
    return model_cls(config).eval()


@torch.no_grad()
def tiny_cache(family: str = "llama", tokens: int = 24, dtype=torch.float32, seed: int = 0, **kw):
    from seqkv.model_calls import cache_of

    model = tiny_model(family, **kw)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (1, tokens), generator=gen)
    cache = cache_of(model(ids, use_cache=True))
    if dtype != torch.float32:
        for layer in cache.layers:
            layer.keys = layer.keys.to(dtype)
            layer.values = layer.values.to(dtype)
    return model, cache


@pytest.fixture
def llama_cache():
    return tiny_cache("llama")


@functools.lru_cache(maxsize=None)
def tiny_profile(family: str = "llama", sensitivity: float | None = 50.0, seed: int = 7):
    """A profile of tiny_model(family) calibrated on fixed random tokens.  ``sensitivity`` overrides
    the measured ones (a random tiny model barely reacts to noise, which would push rate control to
    the end of its range); None keeps them."""
    import seqkv

    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 96, (260,), generator=gen) for _ in range(2)]
    profile = seqkv.calibrate(tiny_model(family), seqs, prompt_len=200, continuation_len=32)
    if sensitivity is not None:
        for part in profile.parts.values():
            part.sensitivity = sensitivity
        profile.changed()
    return profile


def assert_layers_decode_alone(blob: bytes, profile) -> None:
    """A two-layer container decodes layer 1 alone, and both layers backwards, to what a full decode gives."""
    import seqkv

    full = seqkv.decode(blob, profile=profile)
    alone = seqkv.decode(blob, profile=profile, layers=[1])
    backwards = seqkv.decode(blob, profile=profile, layers=[1, 0])
    for kind in ("keys", "values"):
        assert torch.equal(getattr(alone.layers[0], kind), getattr(full.layers[1], kind))
        assert torch.equal(getattr(backwards.layers[0], kind), getattr(full.layers[1], kind))
        assert torch.equal(getattr(backwards.layers[1], kind), getattr(full.layers[0], kind))
