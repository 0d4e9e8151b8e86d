"""Soft pruning (per-token steps): which importance estimate lets the closed loop keep its promise?

    python bench/soft_pruning_eval.py --out docs/soft_pruning_sweep            # 4 held-out texts, 2 scales
    python bench/soft_pruning_eval.py --estimators none,expected --scales 0.015,0.02,0.025 --out /tmp/s

For each text (design notes §5: SmolLM2-135M-Instruct, P=2048, C=256, fp16 cache) and each fixed quantizer
scale, the calibrated codec (shipped profile) codes the cache with per-token step codes from one importance
estimate (``seqkv.token_importance.token_step_codes``: beta 0.35, reference quantile 0.99, codes up to
``--max-code``: 40 by default, as when docs/soft_pruning_sweep.* was made; the encoder's own cap is 8; every
recent token keeps the code its importance gives, where the encoder spares the last 64), and reports the
ratio (every container byte), the mean KL of the teacher-forced continuation (what the user gets) and the
mean KL on the closed-loop probe's tail (the cache's last 256 tokens; ``probe_kl_both_windows`` in the JSON
is what rate control steers by now, the larger of the tail's and the 256 tokens' before it), and the
quotient ``c/p`` of the continuation's and the tail's.  A closed loop lands the *probe* at the target, so ``c/p`` is how far the continuation
lands from it: an estimate is usable only if ``c/p`` stays near what it is without soft pruning.

Estimates (a_t per layer and token):
* ``none``: every token the same steps (today's codec);
* ``observed-tail``: mean attention the probe tail's own 256 queries pay each token;
* ``observed-window``: mean attention of the 256 queries *before* the tail (not the ones the probe measures);
* ``observed-both``: the elementwise larger of the two;
* ``expected``: kvpress's expected attention from the mean and covariance of both windows' queries (what
  ``seqkv.encode(..., token_steps=True)`` uses).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import seqkv  # noqa: E402
from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.format.reader import open_container  # noqa: E402
from seqkv.codec import encode_with_token_steps  # noqa: E402
from seqkv.hf_adapter import build_cache, cache_layers  # noqa: E402
from seqkv.kl_probe import TailProbe, probe_length  # noqa: E402
from seqkv.layout import layout_for_cache  # noqa: E402
from seqkv.quality import QualityProbe  # noqa: E402
from seqkv.stages.quantize_klt import MAX_TOKEN_CODE  # noqa: E402
from seqkv.stages.rope import apply_rope  # noqa: E402
from seqkv.token_importance import SoftSteps, attention_weights, expected_attention, token_step_codes  # noqa: E402

TEXTS = ["seqkv/data/texts/psf_license.txt", "bench/texts_heldout/gpl3.txt",
         "bench/texts_heldout/stdlib_h.txt", "bench/texts_heldout/subprocess_source.txt"]


@torch.no_grad()
def observed_attention(queries: torch.Tensor, start: int, keys: torch.Tensor, positions, layout) -> np.ndarray:
    """Mean attention [T] that queries [Hq, W, D] (pre-RoPE, tokens start..start+W-1) pay the tokens they see
    (causal; averaged over the queries that see each token); NaN after the window."""
    heads, window, dim = queries.shape
    end, tokens = start + window, keys.shape[1]
    q = apply_rope(queries.float(), positions[start:end], torch.as_tensor(layout.inv_freq_array()),
                   float(layout.rope_attention_scaling))
    k = keys[:, :end].float().repeat_interleave(heads // keys.shape[0], dim=0)
    causal = torch.triu(torch.full((window, end), float("-inf")), diagonal=start + 1)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim) + causal, dim=-1).sum(dim=(0, 1))
    seen_by = torch.full((end,), float(window))
    seen_by[start:] = torch.arange(window, 0, -1).float()
    out = np.full(tokens, np.nan)
    out[:end] = (weights / (seen_by * heads)).double().numpy()
    return out


def fill_unseen(a: np.ndarray) -> np.ndarray:
    """Tokens no query saw weigh as the most important seen token (so they keep full precision)."""
    return np.where(np.isnan(a), np.nanmax(a), a)


def estimates(probe: TailProbe, layers, positions, layout) -> dict:
    """{name: [a_t per layer]} of every estimate but ``none``."""
    w = probe.length
    tail_start, window_start = probe.kept, probe.kept - w
    out = {"observed-tail": [], "observed-window": [], "observed-both": []}
    for index, (keys, _values) in enumerate(layers):
        q = probe.queries[index]
        window = observed_attention(q[:, :w], window_start, keys, positions, layout)
        tail = observed_attention(q[:, w:], tail_start, keys, positions, layout)
        out["observed-window"].append(fill_unseen(window))
        out["observed-tail"].append(fill_unseen(tail))
        out["observed-both"].append(np.fmax(fill_unseen(window), fill_unseen(tail)))
    out["expected"] = expected_attention(probe.queries, layers, int(positions[-1]) + 1, layout)
    return out


def encode_at(profile, model, layers, scale: float, soft) -> bytes:
    return encode_with_token_steps(build_cache(layers), profile, soft, scale=scale, model=model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", action="append", help="text files (default: four held-out texts)")
    ap.add_argument("--scales", default="0.015,0.025")
    ap.add_argument("--estimators", default="none,observed-tail,observed-window,observed-both,expected")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-code", type=int, default=MAX_TOKEN_CODE, help="the largest step code (default 40)")
    ap.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_embedded_model()
    profile = seqkv.shipped_profile(model)
    rows = []
    for path in args.text or [os.path.join(ROOT, t) for t in TEXTS]:
        with open(path, encoding="utf-8") as f:
            ids = tok(f.read(), return_tensors="pt").input_ids
        quality = QualityProbe(model, ids, 2048, 256)
        layers = cache_layers(quality.cache)
        positions = torch.arange(2048)
        layout = layout_for_cache(model, None, layers, False)
        probe = TailProbe(model, layers, positions, ids[0, :2048], probe_length(2048))
        found = estimates(probe, layers, positions, layout)
        for name in args.estimators.split(","):
            codes = None if name == "none" else token_step_codes(found[name], profile.sink_tokens,
                                                                 max_code=args.max_code, recent_tokens=0)
            soft = None if codes is None else SoftSteps(codes, attention_weights(found[name]))
            for scale in (float(s) for s in args.scales.split(",")):
                blob = encode_at(profile, model, layers, scale, soft)
                reader = open_container(blob)
                reader.use_profile(profile)
                window_kls = probe.window_kls([reader.layer(i) for i in range(reader.header.layers)])
                probe_kl = window_kls[0]   # the tail (the probe before the second window was added)
                report = quality.score(seqkv.decode(blob, profile=profile))
                row = {"text": os.path.basename(path), "estimate": name, "scale": scale,
                       "ratio": seqkv.inspect(blob)["ratio_vs_fp16"], "continuation_kl": report.mean_kl,
                       "top1": report.top1_agreement, "probe_kl": probe_kl, "probe_kl_both_windows": max(window_kls),
                       "c_over_p": report.mean_kl / max(probe_kl, 1e-12)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    with open(args.out + ".json", "w") as f:
        json.dump({"rows": rows, "model": "SmolLM2-135M-Instruct", "prompt_len": 2048, "continuation_len": 256,
                   "profile": "shipped", "threads": args.threads, "seqkv": seqkv.__version__}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("| text | estimate | scale | ratio | continuation KL | probe KL | c/p | top-1 |\n|" + "---|" * 8 + "\n")
        for r in rows:
            f.write(f"| {r['text']} | {r['estimate']} | {r['scale']:g} | {r['ratio']:.2f}x | {r['continuation_kl']:.5f} | "
                    f"{r['probe_kl']:.5f} | {r['c_over_p']:.2f} | {r['top1']:.3f} |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
