"""seqkv.prompt_cache.cached_generate: reuse of stored prefixes, exact (lossless) generation."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_model

from seqkv.errors import ConfigError
from seqkv.prompt_cache import cached_generate
from seqkv.store import PrefixStore

CHUNK = 8
NEW = 10


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def uncached(model, prompt: torch.Tensor, new: int = NEW) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                          pad_token_id=2)


@pytest.fixture
def model():
    return tiny_model("llama")


@pytest.fixture
def store(tmp_path, model):
    with PrefixStore((tmp_path / "store").as_uri(), model=model, chunk_tokens=CHUNK) as s:
        yield s


def test_miss_then_hit_is_exact(model, store):
    prompt = _ids(21, 0)
    out1, info1 = cached_generate(model, prompt, store, max_new_tokens=NEW)
    assert info1["tokens_reused"] == 0 and info1["tokens_prefilled"] == 21
    assert info1["put"]["chunks_written"] == 3  # 8 + 8 + 5
    assert torch.equal(out1, uncached(model, prompt))
    assert out1.shape == (1, 21 + NEW) and out1.dtype == torch.long

    longer = torch.cat([prompt, _ids(11, 1)], dim=1)
    out2, info2 = cached_generate(model, longer, store, max_new_tokens=NEW)
    assert info2["tokens_reused"] == 16  # the two whole chunks the prompts share
    assert info2["tokens_prefilled"] == 32 - 16
    assert info2["put"]["chunks_reused"] == 2
    for key in ("load_seconds", "prefill_seconds", "generate_seconds", "put_seconds"):
        assert info2[key] >= 0.0
    assert torch.equal(out2, uncached(model, longer))

    # same prompt again: all 32 tokens are stored (4 whole chunks); the last one is fed again
    out3, info3 = cached_generate(model, longer, store, max_new_tokens=NEW, put=False)
    assert info3["tokens_stored"] == 32 and info3["tokens_reused"] == 31 and info3["put"] is None
    assert torch.equal(out3, out2)


def test_whole_prompt_stored_feeds_last_token(model, store):
    prompt = _ids(24, 2)  # three whole chunks
    cached_generate(model, prompt, store, max_new_tokens=NEW)
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    try:
        out, info = cached_generate(model, prompt.tolist()[0], store, max_new_tokens=NEW)
    finally:
        hook.remove()
    assert info["tokens_stored"] == 24 and info["tokens_reused"] == 23 and info["tokens_prefilled"] == 1
    # generate skipped the 23 cached tokens: it fed one token at a time
    assert seen and all(n == 1 for n in seen), seen
    assert torch.equal(out, uncached(model, prompt))


def test_generate_skips_cached_tokens(model, store):
    """model.generate(full prompt, cache of n tokens) only runs the remaining tokens."""
    prompt = _ids(30, 3)
    cached_generate(model, prompt[:, :16], store, max_new_tokens=1)
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    try:
        out, info = cached_generate(model, prompt, store, max_new_tokens=3, put=False)
    finally:
        hook.remove()
    assert info["tokens_reused"] == 16
    # our prefill of tokens 16..28, then generate's first step feeds only token 29, then one per new token after the first
    assert seen == [13, 1, 1, 1], seen
    assert torch.equal(out, uncached(model, prompt, 3))


def test_short_prompts_and_zero_new_tokens(model, store):
    one = _ids(1, 4)
    out, info = cached_generate(model, one, store, max_new_tokens=4)
    assert torch.equal(out, uncached(model, one, 4)) and info["tokens_reused"] == 0
    prompt = _ids(9, 5)
    out, info = cached_generate(model, prompt, store, max_new_tokens=0)
    assert torch.equal(out, prompt) and info["new_tokens"] == 0 and info["put"]["tokens"] == 9
    out, info = cached_generate(model, prompt, store, max_new_tokens=5)
    assert info["tokens_reused"] == 8
    assert torch.equal(out, uncached(model, prompt, 5))


def test_bad_arguments(model, store):
    with pytest.raises(ConfigError):
        cached_generate(model, [], store, max_new_tokens=3)
    with pytest.raises(ConfigError):
        cached_generate(model, torch.zeros(2, 5, dtype=torch.long), store, max_new_tokens=3)
    with pytest.raises(ConfigError):
        cached_generate(model, [1, 2, 3], store, max_new_tokens=-1)
    for reserved in ("past_key_values", "cache"):  # the cache keyword, old and new name: set by cached_generate
        with pytest.raises(ConfigError, match=reserved):
            cached_generate(model, [1, 2, 3], store, max_new_tokens=2, **{reserved: None})


def test_lossy_store_runs(tmp_path, model):
    with PrefixStore((tmp_path / "lossy").as_uri(), model=model, preset="balanced", chunk_tokens=CHUNK) as store:
        prompt = _ids(20, 6)
        out1, _ = cached_generate(model, prompt, store, max_new_tokens=NEW)
        longer = torch.cat([prompt, _ids(5, 7)], dim=1)
        out2, info2 = cached_generate(model, longer, store, max_new_tokens=NEW)
    assert out1.shape == (1, 20 + NEW) and out2.shape == (1, 25 + NEW)
    assert torch.equal(out2[:, :25], longer)
    assert info2["tokens_reused"] == 16
    # lossy: the continuation is not asserted equal; report agreement for the record
    ref = uncached(model, longer)
    print("balanced agreement:", int((out2[0, 25:] == ref[0, 25:]).sum()), "/", NEW)


@pytest.mark.slow
def test_embedded_model_lossless_exact(tmp_path):
    from seqkv.cli import DEFAULT_TEXT
    from seqkv.embedded_model import load_embedded_model

    model, tokenizer = load_embedded_model()
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        ids = tokenizer(f.read(), return_tensors="pt").input_ids[:, :300]
    assert ids.shape[1] == 300 and os.path.basename(DEFAULT_TEXT) == "psf_license.txt"
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    with PrefixStore((tmp_path / "store").as_uri(), model=model, chunk_tokens=128) as store:
        out1, info1 = cached_generate(model, ids[:, :260], store, max_new_tokens=16)
        out2, info2 = cached_generate(model, ids, store, max_new_tokens=16)
        out3, info3 = cached_generate(model, ids, store, max_new_tokens=16)
    assert info1["tokens_reused"] == 0
    assert info2["tokens_reused"] == 256 and info2["tokens_prefilled"] == 44
    # the same 300 tokens again: the partial chunk [256, 300) matches too; the last token is fed again
    assert info3["tokens_stored"] == 300 and info3["tokens_reused"] == 299
    assert torch.equal(out2, ref) and torch.equal(out3, ref)
    assert torch.equal(out1, model.generate(ids[:, :260], attention_mask=torch.ones_like(ids[:, :260]),
                                            max_new_tokens=16, do_sample=False))
