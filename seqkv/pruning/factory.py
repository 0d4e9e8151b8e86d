"""Pruners by name, the shortcut for the wrapper form (and what the CLI's ``--prune NAME`` uses).

The name is a registered scorer's id; ``ratio`` / ``budget`` / ``level`` / ``head_budget`` /
``chunk_size`` pick and configure the policy, every other option goes to the scorer:

    seqkv.pruner("snapkv", ratio=0.5)                           # PerHead(SnapKV(), ratio=0.5)
    seqkv.pruner("snapkv", ratio=0.5, head_budget="adaptive")   # AdaptiveHeads(SnapKV(), ratio=0.5)
    seqkv.pruner("snapkv", ratio=0.5, level="layer")            # PerLayer(SnapKV(), ratio=0.5)
    seqkv.pruner("key_norm", ratio=0.5, level="chunk", chunk_size=8)
                                                                # Chunks(KeyNorm(), chunk_size=8, ratio=0.5)
    seqkv.pruner("chunk", scorer="key_norm", ratio=0.5)         # Chunks(HeadRanks(KeyNorm()), ratio=0.5)
    seqkv.pruner("ensemble", scorers=("snapkv", "key_norm"), scorer_options={"snapkv": {"window_size": 8}}, ratio=0.5)
                                                # PerHead(Ensemble([SnapKV(window_size=8), KeyNorm()]), ratio=0.5)

The built object records the same description in containers as the pruners of earlier versions did.
"""
from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError, PruneError
from .adaptive_heads import AdaptiveHeads, adaptive_selection
from .chunk import HeadRanks
from .chunks import Chunks, select_chunks
from .ensemble import Ensemble
from .per_head import PerHead, top_k_sorted
from .per_layer import PerLayer
from .policy import DEFAULT_CHUNK_SIZE, Pruner
from .scorer import Scorer, registered_scorers, scorer_class

LEVELS = ("token", "layer", "chunk")
HEAD_BUDGETS = ("uniform", "adaptive")
POLICY_OPTIONS = ("ratio", "budget", "level", "head_budget", "chunk_size")
DEFAULT_LEVEL = {"chunk": "chunk"}           # the "chunk" pruner selects whole spans ...
ONLY_LEVELS = {"chunk": ("chunk",)}          # ... and nothing else


def pruner(name: str, **options) -> Pruner:
    """Build a pruner by name: ``seqkv.pruner("snapkv", ratio=0.5)`` (see the module docstring)."""
    scorer_class(name)   # ConfigError for an unknown name, before anything else
    selection = {k: options.pop(k) for k in POLICY_OPTIONS if k in options}
    level = selection.pop("level", DEFAULT_LEVEL.get(name, "token"))
    levels = ONLY_LEVELS.get(name, LEVELS)
    if level not in levels:
        raise PruneError(f"pruner {name!r} works at level(s) {list(levels)}, not {level!r}")
    scorer = scorer_from_name(name, also_known=POLICY_OPTIONS, **options)
    return policy_for(scorer, level=level, **selection)


def policy_for(scorer: Scorer, *, ratio=None, budget=None, level: str = "token", head_budget: str = "uniform",
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> Pruner:
    """The policy object for the old selection options (``level`` / ``head_budget`` / ``chunk_size``)."""
    if level not in LEVELS:
        raise PruneError(f"level must be one of {LEVELS}, not {level!r}")
    if head_budget not in HEAD_BUDGETS:
        raise PruneError(f"head_budget must be one of {HEAD_BUDGETS}, got {head_budget!r}")
    if head_budget == "adaptive" and level != "token":
        raise PruneError("head_budget='adaptive' applies to level='token' only")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise PruneError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if level == "chunk":
        return Chunks(scorer, ratio=ratio, budget=budget, chunk_size=chunk_size)
    # the old pruners recorded chunk_size at every level: keep it in the header when it was given
    legacy = {} if chunk_size == DEFAULT_CHUNK_SIZE else {"chunk_size": chunk_size}
    cls = PerLayer if level == "layer" else AdaptiveHeads if head_budget == "adaptive" else PerHead
    return cls(scorer, ratio=ratio, budget=budget, legacy_config=legacy)


def scorer_from_name(name: str, also_known=(), **options) -> Scorer:
    """A scorer by its registered name; ``"ensemble"`` and ``"chunk"`` take the names of their scorers
    (``scorers=`` / ``scorer=``) and those scorers' options (``scorer_options=``)."""
    cls = scorer_class(name)
    if cls is Ensemble:
        _check_options(name, options, ("scorers", "weights", "scorer_options"), also_known)
        return _ensemble(**options)
    if cls is HeadRanks:
        _check_options(name, options, ("scorer", "scorer_options"), also_known)
        return _head_ranks(**options)
    _check_options(name, options, [f.name for f in dataclasses.fields(cls) if f.init], also_known)
    return cls(**options)


def registered_pruners() -> list[str]:
    """The names :func:`pruner` knows (the registered scorers)."""
    return registered_scorers()


def select(scores: torch.Tensor, n_keep: int, level: str, head_budget: str = "uniform",
           chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[torch.Tensor]:
    """Per head, the sorted kept indices of scores [kv_heads, tokens] at a level (the policies' selections)."""
    scores = scores.float()
    if level == "token" and head_budget == "uniform":
        return list(top_k_sorted(scores, n_keep))
    if level == "token" and head_budget == "adaptive":
        return adaptive_selection(scores, n_keep)
    if level == "layer":
        keep = top_k_sorted(scores.mean(0), n_keep)
    elif level == "chunk":
        keep = select_chunks(scores.mean(0), n_keep, chunk_size)
    else:
        raise PruneError(f"unknown level {level!r} / head_budget {head_budget!r}")
    return [keep.clone() for _ in range(scores.shape[0])]


# -- nested scorers by name -----------------------------------------------------------------------

def _check_options(name: str, options: dict, known, also_known=()) -> None:
    unknown = set(options) - set(known)
    if unknown:
        raise ConfigError(f"pruner {name!r}: unknown option(s) {sorted(unknown)}; "
                          f"known: {sorted(set(known) | set(also_known))}")


def _options_of(scorer_options, name: str, owner: str) -> dict:
    if scorer_options is None:
        return {}
    if not isinstance(scorer_options, dict):
        raise PruneError(f"{owner}: scorer_options must be a dict, got {type(scorer_options).__name__}")
    opts = scorer_options.get(name, {}) if owner == "ensemble" else scorer_options
    if not isinstance(opts, dict):
        raise PruneError(f"{owner}: the options of scorer {name!r} must be a dict, got {type(opts).__name__}")
    return opts


def _nested(name, scorer_options, owner: str) -> Scorer:
    if not isinstance(name, str):
        raise PruneError(f"{owner}: scorers are given by name here (seqkv.pruner), got {name!r}; "
                         f"pass scorer objects to {'Ensemble' if owner == 'ensemble' else 'HeadRanks'}(...) instead")
    if name == owner:
        raise PruneError(f"the {owner} pruner cannot use itself as its scorer")
    options = _options_of(scorer_options, name, owner)
    try:
        return scorer_from_name(name, **options)
    except ConfigError as exc:
        if isinstance(exc, PruneError):
            raise
        raise ConfigError(f"{owner}: {exc}") from None


def _ensemble(scorers=("snapkv", "triattention"), weights=None, scorer_options=None) -> Ensemble:
    if isinstance(scorers, str) or not isinstance(scorers, (list, tuple)) or not scorers:
        raise PruneError(f"ensemble: scorers must be a non-empty list of pruner names, got {scorers!r}")
    return Ensemble([_nested(s, scorer_options, "ensemble") for s in scorers], weights)


def _head_ranks(scorer="key_norm", scorer_options=None) -> HeadRanks:
    return HeadRanks(_nested(scorer, scorer_options, "chunk"))
