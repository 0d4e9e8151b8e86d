"""Does weighting the KL model's token errors by expected attention improve the open-loop prediction?

    python bench/weighted_prediction_eval.py

For four held-out texts (SmolLM2-135M-Instruct, P=2048, C=256, fp16 cache, shipped profile) and two fixed
scales of the calibrated codec with uniform token steps: the measured continuation KL, the profile's
prediction (every token's error weighs the same) and the prediction with each token's error weighted by its
expected attention (mean 1; seqkv.token_importance, from the queries the closed-loop probe observes), and
measured / predicted for both.  Prints one JSON line per text and scale.
"""
from __future__ import annotations

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import seqkv  # noqa: E402
from seqkv.calibrated_encoder import calibrated_setup  # noqa: E402
from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.format.pipeline import KINDS  # noqa: E402
from seqkv.hf_adapter import cache_layers  # noqa: E402
from seqkv.kl_probe import TailProbe  # noqa: E402
from seqkv.layout import layout_for_cache  # noqa: E402
from seqkv.quality import QualityProbe  # noqa: E402
from seqkv.rate_control import predicted_kl, stride_for, subsample  # noqa: E402
from seqkv.stages.base import CodingState, TensorContext  # noqa: E402
from seqkv.token_importance import attention_weights, expected_attention  # noqa: E402

TEXTS = ["seqkv/data/texts/psf_license.txt", "bench/texts_heldout/gpl3.txt",
         "bench/texts_heldout/stdlib_h.txt", "bench/texts_heldout/subprocess_source.txt"]


def main() -> int:
    torch.set_num_threads(1)
    model, tok = load_embedded_model()
    profile = seqkv.shipped_profile(model)
    for path in TEXTS:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            ids = tok(f.read(), return_tensors="pt").input_ids
        quality = QualityProbe(model, ids, 2048, 256)
        layers, pos = cache_layers(quality.cache), torch.arange(2048)
        layout = layout_for_cache(model, None, layers, False)
        probe = TailProbe(model, layers, pos, ids[0, :2048], 256)
        weights = attention_weights(expected_attention(probe.queries, layers, 2048, layout))
        pipeline, _ = calibrated_setup(profile, model, None, layers, 1.0, {})
        state, sinks = CodingState(profile=profile), pipeline.sink_tokens
        bodies = {(i, kind): pipeline.transform(x, TensorContext(layer=i, kind=kind, positions=pos, layout=layout,
                                                                 state=state))[:, sinks:]
                  for i, kv in enumerate(layers) for kind, x in zip(KINDS, kv)}
        sample = subsample(bodies)
        steps = {key: (torch.ones(z.shape[1])[::stride_for(z.shape[1])],
                       torch.from_numpy(weights[key][sinks:])[::stride_for(z.shape[1])]) for key, z in bodies.items()}
        for scale in (0.02, 0.03):
            blob = seqkv.encode(quality.cache, model=model, profile=profile, scale=scale)
            measured = quality.score(seqkv.decode(blob, profile=profile)).mean_kl
            plain = predicted_kl(profile, sample, scale, 0.5, True)
            weighted = predicted_kl(profile, sample, scale, 0.5, True, token_steps=steps)
            print(json.dumps({"text": os.path.basename(path), "scale": scale, "measured": measured, "predicted": plain,
                              "predicted_weighted": weighted, "measured_over_predicted": measured / plain,
                              "measured_over_weighted": measured / weighted}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
