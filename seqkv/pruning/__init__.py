"""Token pruning before encoding: pick which cached tokens to keep, per layer and head, or by spans.

A pruner is a selection policy wrapped around a scorer (kvpress style: ``AdaKVPress(SnapKVPress())``).
Scorers rate every token per KV head: SinksWindow, KeyNorm, SnapKV, ExpectedAttention, TriAttention,
HeadRanks, Ensemble.  Policies keep ``ratio`` (the fraction removed, kvpress convention) or ``budget``
of them: PerHead (the default), AdaptiveHeads (AdaKV), PerLayer, Chunks.

    from seqkv.model_calls import cache_of
    from seqkv.pruning import AdaptiveHeads, PerLayer, SnapKV

    p = PerLayer(SnapKV(), ratio=0.5)                # or the shortcut seqkv.pruner("snapkv", ratio=0.5, level="layer")
    with p.observe(model):                           # query-aware scorers watch the prefill
        cache = cache_of(model(ids, use_cache=True))
    blob = seqkv.encode(cache, preset="balanced", prune=p, model=model)
    pruned = seqkv.decode(blob)
    logits = seqkv.pruning.continuation_logits(model, pruned, next_ids)   # true positions + head masks
"""
from __future__ import annotations

from ..tri_calibration import TriCalibration
from .adaptive_heads import AdaptiveHeads
from .attention import continuation_logits, generate, greedy_continue, next_position, pruned_attention, true_positions
from .chunk import HeadRanks
from .chunks import Chunks
from .ensemble import Ensemble
from .expected_attention import ExpectedAttention
from .factory import LEVELS, pruner, registered_pruners, select
from .key_norm import KeyNorm
from .observe import QueryObserver
from .per_head import PerHead
from .per_layer import PerLayer
from .policy import Pruner
from .rate import OperatingPoint, smallest_within
from .scorer import ScoreContext, Scorer, register
from .sinks_window import SinksWindow
from .snapkv import SnapKV
from .state import PruneState, pruned_state
from .streaming import StreamingEvictor
from .triattention import TriAttention, calibrate

__all__ = [
    "pruner", "registered_pruners", "Pruner", "ScoreContext", "select", "LEVELS", "PruneState", "pruned_state",
    "QueryObserver", "StreamingEvictor", "TriCalibration", "calibrate", "pruned_attention", "continuation_logits",
    "greedy_continue", "generate", "next_position", "true_positions", "smallest_within", "OperatingPoint",
    # scorers
    "Scorer", "register", "SinksWindow", "KeyNorm", "SnapKV", "ExpectedAttention", "TriAttention", "HeadRanks",
    "Ensemble",
    # selection policies
    "PerHead", "AdaptiveHeads", "PerLayer", "Chunks",
]
