"""seqkv.model_calls: the cache keyword of model calls, on the installed transformers and on older 5.x.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (forward and generate keyword, output field);
the old names warn there (a FutureWarning for the keyword, a logger warning for the output field).
seqkv's own model calls must not warn, and must keep passing ``past_key_values`` to models whose
forward only knows that name (transformers 5.0 to 5.23).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings

import pytest
import torch
from conftest import tiny_model

from seqkv import model_calls
from seqkv.generation import greedy_continue
from seqkv.model_calls import cache_keyword, cache_of, generate_cache_keyword, with_cache, with_cache_for_generate
from seqkv.prompt_cache import cached_generate
from seqkv.quality import QualityProbe, clone_cache, prefill
from seqkv.store import PrefixStore

OLD, NEW = "past_key_values", "cache"
RENAMED = model_calls._installed_keyword() == NEW  # the installed transformers has the new name


class _Collect(logging.Handler):
    def __init__(self, into: list):
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record):
        self.into.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def all_warnings():
    """Every warning raised inside: ``warnings.warn`` ones (always shown, even repeats) and transformers'
    logger warnings (its root logger does not propagate to pytest's caplog, and ``warning_once`` remembers
    what it already said in this process, so its memory is cleared first)."""
    from transformers.utils import logging as tf_logging

    messages: list[str] = []
    tf_logging.warning_once.cache_clear()
    root = logging.getLogger("transformers")
    handler = _Collect(messages)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        tf_logging.warning_once.cache_clear()
    messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)


def about_old_name(messages) -> list[str]:
    return [m for m in messages if OLD in m or "deprecated" in m.lower()]


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(seed))


# --- the installed transformers -------------------------------------------------------------------------

def test_installed_model_gets_its_own_keyword():
    model = tiny_model("llama")
    import inspect

    params = inspect.signature(type(model).forward).parameters
    assert cache_keyword(model) == (NEW if NEW in params else OLD)
    assert generate_cache_keyword(model) == model_calls._installed_keyword()
    assert cache_keyword(model) == generate_cache_keyword(model)  # renamed in one release for real models


@pytest.mark.skipif(not RENAMED, reason="the installed transformers knows only past_key_values")
def test_the_capture_sees_the_deprecation():
    """Guards the tests below against passing vacuously: the old names do warn, and are seen."""
    from transformers import DynamicCache

    model = tiny_model("llama")
    with all_warnings() as messages, torch.no_grad():
        out = model(_ids(4), past_key_values=DynamicCache(), use_cache=True)
    assert about_old_name(messages)
    with all_warnings() as messages:
        _ = out.past_key_values
    assert about_old_name(messages)


def test_forward_calls_do_not_warn():
    model = tiny_model("llama")
    ids = _ids(40)
    with all_warnings() as messages:
        cache = prefill(model, ids, 29)
        assert cache is not None and cache.get_seq_length() == 29
        tokens = greedy_continue(model, clone_cache(cache), int(ids[0, 29]), 29, 4)
        assert len(tokens) == 4
        probe = QualityProbe(model, ids, 24, 8, cache_dtype=torch.float32)
        report = probe.score(clone_cache(probe.cache))
    assert report.mean_kl < 1e-6
    assert about_old_name(messages) == [], messages


def test_generate_calls_do_not_warn(tmp_path):
    model = tiny_model("llama")
    with PrefixStore((tmp_path / "store").as_uri(), model=model, chunk_tokens=8) as store:
        with all_warnings() as messages:
            out1, info1 = cached_generate(model, _ids(21), store, max_new_tokens=3)
            out2, info2 = cached_generate(model, _ids(30), store, max_new_tokens=3)  # shares nothing: a miss
            out3, info3 = cached_generate(model, out1[0, :21], store, max_new_tokens=3)  # a hit
    assert info3["tokens_reused"] > 0 and torch.equal(out3, out1)
    assert about_old_name(messages) == [], messages


def test_cache_of_generate_output():
    """generate(..., return_dict_in_generate=True) hands back its cache, under the new or old field name."""
    model = tiny_model("llama")
    prompt = _ids(12)
    with all_warnings() as messages, torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                             do_sample=False, pad_token_id=2, return_dict_in_generate=True)
        cache = cache_of(out)
    assert out.sequences.shape == (1, 15)
    assert cache is not None and cache.get_seq_length() == 14  # the last new token is not fed back
    # and generate continues from a cache handed over with with_cache_for_generate
    with all_warnings() as more, torch.no_grad():
        full = out.sequences
        again = model.generate(input_ids=full, attention_mask=torch.ones_like(full), max_new_tokens=2,
                               do_sample=False, pad_token_id=2, return_dict_in_generate=True,
                               **with_cache_for_generate(model, cache))
    ref = model.generate(input_ids=full, attention_mask=torch.ones_like(full), max_new_tokens=2, do_sample=False,
                         pad_token_id=2)
    assert torch.equal(again.sequences, ref)
    assert cache_of(again).get_seq_length() == 16
    assert about_old_name(messages + more) == [], messages + more


def test_cache_of_an_output_without_cache_does_not_read_the_alias():
    """use_cache=False: the declared field is None; reading the deprecated alias instead would warn."""
    model = tiny_model("llama")
    with all_warnings() as messages, torch.no_grad():
        out = model(_ids(5), use_cache=False)
        assert cache_of(out) is None
    assert about_old_name(messages) == [], messages


def test_calibrate_does_not_warn():
    import seqkv

    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 96, (120,), generator=gen)]
    with all_warnings() as messages:
        profile = seqkv.calibrate(model, seqs, prompt_len=96, continuation_len=16, sink_tokens=4)
    assert profile.parts
    assert about_old_name(messages) == [], messages


# --- models that only know past_key_values (transformers 5.0 to 5.23) -------------------------------

@dataclasses.dataclass
class OldOutput:
    """What a 5.0-5.23 forward returns: the cache under ``past_key_values`` only."""
    logits: torch.Tensor
    past_key_values: object = None


class OldStyleModel(torch.nn.Module):
    """A model whose forward takes the cache as ``past_key_values`` only, like every model before 5.24.
    It runs the tiny model underneath (under whatever name that one takes) and records what it was given."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model("llama")
        self.config = self.inner.config
        self.seen: list = []

    def forward(self, input_ids, past_key_values=None, position_ids=None, use_cache=None):
        self.seen.append(past_key_values)
        out = self.inner(input_ids, position_ids=position_ids, use_cache=use_cache,
                         **with_cache(self.inner, past_key_values))
        return OldOutput(logits=out.logits, past_key_values=cache_of(out))

    def generate(self, input_ids=None, past_key_values=None, **kwargs):
        raise NotImplementedError


class NewStyleModel(torch.nn.Module):
    def forward(self, input_ids, cache=None, position_ids=None, use_cache=None):
        raise NotImplementedError


class BothNamesModel(torch.nn.Module):
    """A forward that lists the old name too, as a deprecated alias: the new one wins."""

    def forward(self, input_ids, past_key_values=None, cache=None):
        raise NotImplementedError


class KwargsOnlyModel(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise NotImplementedError


def test_old_style_forward_gets_past_key_values():
    model = OldStyleModel()
    assert cache_keyword(model) == OLD
    assert with_cache(model, "c") == {OLD: "c"}
    # not a transformers GenerationMixin: its generate is taken to follow its forward
    assert generate_cache_keyword(model) == OLD
    assert with_cache_for_generate(model, "c") == {OLD: "c"}


def test_new_style_and_both_names_get_cache():
    assert cache_keyword(NewStyleModel()) == NEW
    assert with_cache(NewStyleModel(), 1) == {NEW: 1}
    assert cache_keyword(BothNamesModel()) == NEW


def test_forward_without_either_name_follows_the_installed_transformers(monkeypatch):
    assert cache_keyword(KwargsOnlyModel()) == model_calls._installed_keyword()

    class OtherKwargsOnly(KwargsOnlyModel):   # a new class: the keyword is remembered per class
        pass

    monkeypatch.setattr(model_calls, "_installed_keyword", lambda: OLD)
    assert cache_keyword(OtherKwargsOnly()) == OLD


def test_generate_of_a_transformers_model_follows_the_installed_generate(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(model_calls, "_installed_keyword", lambda: OLD)
    assert with_cache_for_generate(model, 5) == {OLD: 5}
    monkeypatch.setattr(model_calls, "_installed_keyword", lambda: NEW)
    assert with_cache_for_generate(model, 5) == {NEW: 5}


def test_cache_of_old_and_new_outputs():
    assert cache_of(OldOutput(logits=None, past_key_values="old")) == "old"
    assert cache_of(OldOutput(logits=None)) is None

    @dataclasses.dataclass
    class NewOutput:
        logits: object = None
        cache: object = None

    assert cache_of(NewOutput(cache="new")) == "new"
    assert cache_of(NewOutput()) is None
    assert cache_of({OLD: "d"}) == "d" and cache_of({NEW: "e"}) == "e" and cache_of({}) is None

    class Plain:
        past_key_values = "plain"

    assert cache_of(Plain()) == "plain"


def test_seqkv_calls_work_on_an_old_style_model():
    """greedy_continue and the quality probe pass the cache as past_key_values and read it back from the
    old output field; results match the same calls on the real model."""
    model = OldStyleModel()
    ids = _ids(40, seed=5)
    cache = prefill(model, ids, 29)
    assert cache is not None and cache.get_seq_length() == 29
    got = greedy_continue(model, clone_cache(cache), int(ids[0, 29]), 29, 4)
    assert any(s is not None for s in model.seen)   # the cache did arrive under past_key_values
    ref = greedy_continue(model.inner, prefill(model.inner, ids, 29), int(ids[0, 29]), 29, 4)
    assert got == ref
    probe = QualityProbe(model, ids, 24, 8, cache_dtype=torch.float32)
    assert probe.score(clone_cache(probe.cache)).mean_kl < 1e-6
