"""Pruning on the embedded SmolLM2-135M (slow: loads the model; under a minute on one core)."""
import os

import pytest
import torch

import seqkv
from seqkv.pruning import greedy_continue, pruned_state
from seqkv.quality import QualityProbe, clone_cache

pytestmark = pytest.mark.slow
TEXTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "texts")


def test_pruned_cache_continues_at_the_true_position_on_the_real_model():
    from seqkv.embedded_model import load_embedded_model

    model, tok = load_embedded_model()
    with open(os.path.join(TEXTS, "inspect_source.txt"), encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids
    P, C = 384, 48
    p = seqkv.pruner("snapkv", ratio=0.5, head_budget="adaptive")
    with p.observe(model):
        probe = QualityProbe(model, ids, P, C)
    p.observer.queries = {k: v[:, :P] for k, v in p.observer.queries.items()}
    blob = seqkv.encode(probe.cache, preset="lossless", prune=p, model=model)
    decoded = seqkv.decode(blob, model=model)
    state = pruned_state(decoded)
    assert state.ragged and state.next_position == P
    assert seqkv.inspect(blob)["ratio_vs_fp16"] > 2.0
    # the decoded container continues exactly like the in-memory pruned cache
    in_memory = p.prune(probe.cache, model=model)
    last = int(ids[0, P])
    assert greedy_continue(model, clone_cache(decoded, torch.float32), last, 4) == \
        greedy_continue(model, clone_cache(in_memory, torch.float32), last, 4)
    # quality: 2x pruning is mild at the true position, and the position trap is real
    good = probe.score(decoded, next_position=P)
    wrong = probe.score(decoded, next_position=state.width)
    assert good.mean_kl < 0.1 and good.top1_agreement > 0.8
    assert wrong.mean_kl > 2 * good.mean_kl
