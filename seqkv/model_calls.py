"""Calling a transformers model with a cache, on every transformers 5.x seqkv accepts.

transformers 5.24 renamed the cache keyword of ``forward``/``generate`` and the output field from
``past_key_values`` to ``cache`` (the old names warn, and leave ``forward`` in 5.40); 5.0 to 5.23 know
only ``past_key_values`` (a ``cache=`` keyword there is swallowed by ``forward``'s ``**kwargs`` and
ignored).  seqkv passes the cache under whichever name the installed code declares, so no call of
seqkv's warns on new versions and older 5.x keep working:

* ``model(...)``: the name ``forward`` declares (a forward that declares neither name, e.g. a wrapper
  taking ``**kwargs``, gets the installed transformers' name);
* ``model.generate(...)``: the name the installed transformers' ``generate`` takes (for a model that is
  not a transformers ``GenerationMixin``, the ``forward`` rule);
* outputs: the field the output declares, never the deprecated alias (reading it warns).
"""
from __future__ import annotations

import inspect
from functools import lru_cache

NEW, OLD = "cache", "past_key_values"


def _parameters(function) -> frozenset:
    try:
        return frozenset(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # no readable signature
        return frozenset()


@lru_cache(maxsize=None)
def _installed_keyword() -> str:
    """The keyword the installed transformers' generation code uses (it was renamed in one release, 5.24,
    together with every model's forward and the output fields)."""
    try:
        from transformers import GenerationMixin
        from transformers.modeling_outputs import CausalLMOutputWithPast
    except ImportError:  # pragma: no cover - transformers is a dependency
        return OLD
    params = _parameters(GenerationMixin.prepare_inputs_for_generation)
    if NEW in params:
        return NEW
    if OLD in params:
        return OLD
    return NEW if NEW in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else OLD


@lru_cache(maxsize=None)
def _forward_keyword(model_class: type) -> str:
    params = _parameters(getattr(model_class, "forward", None))
    if NEW in params:  # checked first: a forward may also list the old name as a deprecated alias
        return NEW
    if OLD in params:
        return OLD
    return _installed_keyword()


def cache_keyword(model) -> str:
    """The name ``model(...)`` takes the cache under: ``"cache"`` or ``"past_key_values"``."""
    return _forward_keyword(type(model))


def generate_cache_keyword(model) -> str:
    """The name ``model.generate(...)`` takes the cache under: ``"cache"`` or ``"past_key_values"``."""
    try:
        from transformers import GenerationMixin
    except ImportError:  # pragma: no cover
        GenerationMixin = ()
    if GenerationMixin and isinstance(model, GenerationMixin):
        return _installed_keyword()
    return cache_keyword(model)


def with_cache(model, cache) -> dict:
    """Keyword arguments that hand ``cache`` to ``model(...)``: ``model(ids, **with_cache(model, cache))``."""
    return {cache_keyword(model): cache}


def with_cache_for_generate(model, cache) -> dict:
    """Keyword arguments that hand ``cache`` to ``model.generate(...)``."""
    return {generate_cache_keyword(model): cache}


def cache_of(output):
    """The cache a forward (or ``generate(..., return_dict_in_generate=True)``) returned, or None.

    Reads the field the output class declares; the deprecated alias (a property that logs a warning)
    is only read for outputs that are not dataclasses."""
    fields = getattr(output, "__dataclass_fields__", None)
    if fields is not None:
        for name in (NEW, OLD):
            if name in fields:
                return getattr(output, name)
        return None
    if isinstance(output, dict):
        for name in (NEW, OLD):
            if name in output:
                return output[name]
        return None
    cache = getattr(output, NEW, None)
    if cache is None:
        cache = getattr(output, OLD, None)
    return cache
