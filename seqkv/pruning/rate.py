"""Pruning as a rate-control knob: the smallest container that meets a KL target, over pruning x quantization.

On SmolLM2 (docs/pruning.md) pruning half the tokens and quantizing the rest at a fine step beats
quantizing everything at a coarse step from about 6x on, so a rate controller should search both.
:func:`smallest_within` measures each candidate with a :class:`seqkv.QualityProbe` (the §5 protocol
on the caller's text) and keeps the smallest one within ``target_kl``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import codec
from ..errors import ConfigError


@dataclass
class OperatingPoint:
    prune_ratio: float
    step: float
    bytes: int
    mean_kl: float
    blob: bytes


def smallest_within(probe, model, target_kl: float, pruner_factory=None, prune_ratios=(0.0, 0.25, 0.5, 0.75),
                    steps=(0.1, 0.25, 0.4, 0.6, 0.9), preset: str = "balanced", queries=None):
    """``(best, tried)``: the smallest container of ``probe.cache`` whose mean KL is at most ``target_kl``
    (``None`` when no candidate meets it), and every measured :class:`OperatingPoint`.

    ``pruner_factory(ratio)`` builds the pruner for a prune ratio (default: ``snapkv`` when ``queries``
    are given, else ``sinks_window``); ``queries`` is the prefill's QueryObserver for query-aware pruners.
    """
    from .base import pruner

    if not target_kl > 0:
        raise ConfigError(f"target_kl must be > 0, got {target_kl!r}")
    if pruner_factory is None:
        name = "snapkv" if queries is not None else "sinks_window"
        pruner_factory = lambda r: pruner(name, ratio=r)  # noqa: E731
    tried = []
    for ratio in prune_ratios:
        cache = probe.cache if ratio == 0 else pruner_factory(ratio).prune(probe.cache, model=model, queries=queries)
        for step in steps:
            blob = codec.encode(cache, preset=preset, model=model, step=step)
            report = probe.score(codec.decode(blob), next_position=codec.inspect(blob)["positions"]["next"])
            tried.append(OperatingPoint(ratio, step, len(blob), report.mean_kl, blob))
    ok = [p for p in tried if p.mean_kl <= target_kl]
    return (min(ok, key=lambda p: p.bytes) if ok else None), tried
