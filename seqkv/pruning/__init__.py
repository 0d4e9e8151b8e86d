"""Token pruning before encoding: pick which cached tokens to keep, per layer and head, or by spans.

    p = seqkv.pruner("snapkv", ratio=0.5)          # ratio = fraction removed (kvpress convention)
    with p.observe(model):                           # query-aware pruners watch the prefill
        cache = model(ids, use_cache=True).past_key_values
    blob = seqkv.encode(cache, preset="balanced", prune=p, model=model)
    pruned = seqkv.decode(blob)
    logits = seqkv.pruning.continuation_logits(model, pruned, next_ids)   # true positions + head masks
"""
from __future__ import annotations

from . import chunk, ensemble, expected_attention, key_norm, sinks_window, snapkv, triattention  # noqa: F401  (registration)
from .attention import continuation_logits, generate, greedy_continue, next_position, pruned_attention, true_positions
from .base import LEVELS, Pruner, ScoreContext, pruner, registered_pruners, select
from .observe import QueryObserver
from .rate import OperatingPoint, smallest_within
from .state import PruneState, pruned_state
from .streaming import StreamingEvictor
from .triattention import TriCalibration, calibrate

__all__ = [
    "pruner", "registered_pruners", "Pruner", "ScoreContext", "select", "LEVELS", "PruneState", "pruned_state",
    "QueryObserver", "StreamingEvictor", "TriCalibration", "calibrate", "pruned_attention", "continuation_logits",
    "greedy_continue", "generate", "next_position", "true_positions", "smallest_within", "OperatingPoint",
]
