"""Pruning as a rate-control knob: the smallest container that meets a KL target, over pruning x quantization.

On SmolLM2 (docs/pruning.md) pruning half the tokens and quantizing the rest at a fine step beats
quantizing everything at a coarse step from about 6x on, so a rate controller should search both.
:func:`smallest_within` measures each candidate with a :class:`seqkv.QualityProbe` (the §5 protocol
on the caller's text) and keeps the smallest one within ``target_kl``.  With a calibrated
``profile=`` the quantization knob is the calibrated codec's own ``target_kl`` (its predicted KL of
the quantization alone) or its ``scale``, instead of a preset's ``step``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import codec
from ..errors import ConfigError
from .per_head import PerHead
from .per_layer import PerLayer
from .sinks_window import SinksWindow
from .snapkv import SnapKV

CODEC_TARGET_KLS = (0.003, 0.01, 0.03, 0.1)   # the calibrated codec's quantization targets tried by default


@dataclass
class OperatingPoint:
    prune_ratio: float
    step: float | None          # the preset's step (None with a profile)
    bytes: int
    mean_kl: float               # measured by the probe: pruning and quantization together
    blob: bytes
    codec_target_kl: float | None = None   # with a profile: the codec's target_kl (predicted KL of the quantization)
    scale: float | None = None             # with a profile and scales=: the codec's scale


def smallest_within(probe, model, target_kl: float, pruner_factory=None, prune_ratios=(0.0, 0.25, 0.5, 0.75),
                    steps=(0.1, 0.25, 0.4, 0.6, 0.9), preset: str = "balanced", queries=None, profile=None,
                    codec_target_kls=CODEC_TARGET_KLS, scales=None):
    """``(best, tried)``: the smallest container of ``probe.cache`` whose mean KL is at most ``target_kl``
    (``None`` when no candidate meets it), and every measured :class:`OperatingPoint`.

    ``pruner_factory(ratio)`` builds the pruner for a prune ratio (default: ``PerHead(SnapKV(), ratio=ratio)``
    when ``queries`` are given, else ``PerHead(SinksWindow(), ...)``; with a profile ``PerLayer(...)``, since
    the calibrated codec needs every head of a layer to keep the same positions); ``queries`` is the prefill's
    QueryObserver for query-aware pruners.  Without a profile the quantization knob is ``preset`` at
    each of ``steps``; with ``profile=`` it is the calibrated codec at each of ``codec_target_kls``,
    or at each of ``scales`` when given.
    """
    if not target_kl > 0:
        raise ConfigError(f"target_kl must be > 0, got {target_kl!r}")
    if pruner_factory is None:
        scorer = SnapKV() if queries is not None else SinksWindow()
        policy = PerHead if profile is None else PerLayer
        pruner_factory = lambda r: policy(scorer, ratio=r)  # noqa: E731
    if profile is None:
        knobs = [({"preset": preset, "step": s}, {"step": s}) for s in steps]
    elif scales is not None:
        knobs = [({"profile": profile, "scale": s}, {"step": None, "scale": s}) for s in scales]
    else:
        knobs = [({"profile": profile, "target_kl": t}, {"step": None, "codec_target_kl": t}) for t in codec_target_kls]
    if not knobs:
        raise ConfigError("no quantization setting to try (steps / codec_target_kls / scales is empty)")
    tried = []
    for ratio in prune_ratios:
        cache = probe.cache if ratio == 0 else pruner_factory(ratio).prune(probe.cache, model=model, queries=queries)
        for encode_kw, point_kw in knobs:
            blob = codec.encode(cache, model=model, **encode_kw)
            decoded = codec.decode(blob, profile=profile)
            report = probe.score(decoded, next_position=codec.inspect(blob)["positions"]["next"])
            tried.append(OperatingPoint(prune_ratio=ratio, bytes=len(blob), mean_kl=report.mean_kl, blob=blob,
                                        **point_kw))
    ok = [p for p in tried if p.mean_kl <= target_kl]
    return (min(ok, key=lambda p: p.bytes) if ok else None), tried
