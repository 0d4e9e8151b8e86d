"""Repeat prediction (issue 13, lever 3): what predicting a repeated token from its earlier occurrence saves.

    python bench/repeat_prediction_eval.py --out docs/repeat_prediction

Per text (SmolLM2-135M-Instruct, the design notes' protocol: 2048 tokens prefilled, fp16 cache, the shipped
profile) and scale (the scale the closed loop chose for target_kl=0.01 and 0.001 in docs/closed_loop_shipped.json):

1. **gain per layer against match length**: the tokens whose preceding run of tokens (the match, as the format's
   map finds it from layer 0's symbols) occurred earlier, binned by match length; per layer and kind, the bits
   per element the coder's input costs on those tokens today (the temporal predictor's residuals) and as repeat
   residuals ``q[t] - q[src[t]]``: plug-in entropy pooled over channel classes as context_ans pools them
   (an estimate of the coder, not its bytes);
2. **the container**: bytes with ``repeat=False`` and with the default (repeat on), the decoded caches compared
   (the predictor is lossless on the quantizer's symbols, so the cache and hence its KL are the same), and the
   encode and decode times of both in the same run.

Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import seqkv  # noqa: E402
from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.format.pipeline import KINDS, Pipeline  # noqa: E402
from seqkv.layout import layout_for_cache  # noqa: E402
from seqkv.presets import calibrated_pipeline_config  # noqa: E402
from seqkv.quality import clone_cache, prefill  # noqa: E402
from seqkv.stages.base import CodingState, TensorContext  # noqa: E402
from seqkv.stages.repeat_map import MAX_CANDIDATES, MAX_MATCH, token_ids_from_symbols  # noqa: E402
from seqkv_ext.repeat import longest_matches  # noqa: E402
from closed_loop_eval import TEXTS  # noqa: E402  (the held-out texts, the closed-loop bench's)

BINS = [(1, 1), (2, 3), (4, 7), (8, 15), (16, MAX_MATCH)]
FP16_BYTES = 2


def pooled_bits(rows: np.ndarray) -> float:
    """Plug-in entropy (bits) of int rows [channels, n], channels pooled into spread classes (6 per octave)."""
    rows = rows.astype(np.int64)
    if rows.size == 0:
        return 0.0
    rows = rows - np.round(rows.mean(1))[:, None]
    classes = np.clip(np.floor(6 * np.log2(1 + rows.std(1))), 0, 63)
    bits = 0.0
    for c in np.unique(classes):
        _, n = np.unique(rows[classes == c], return_counts=True)
        bits -= float((n * np.log2(n / n.sum())).sum())
    return bits


def closed_loop_scales() -> dict:
    with open(os.path.join(ROOT, "docs", "closed_loop_shipped.json")) as f:
        rows = json.load(f)["rows"]
    return {(r["text"], r["target_kl"]): r["scale"] for r in rows if r["loop"] == "closed"}


def gain_table(cache_layers, model, profile, scale: float) -> dict:
    pipe = Pipeline(calibrated_pipeline_config(profile.sink_tokens, repeat=False))
    sinks = pipe.sink_tokens
    layout = layout_for_cache(model, None, cache_layers, False)
    state = CodingState(profile=profile, chain={}, scale=scale)
    positions = torch.arange(cache_layers[0][0].shape[1])
    out, layer0, sections = {}, {}, []
    src = length = None
    for i, pair in enumerate(cache_layers):
        for kind, x in zip(KINDS, pair):
            ctx = TensorContext(layer=i, kind=kind, positions=positions, layout=layout, state=state)
            q, _side = pipe.quantizer.quantize(pipe.transform(x, ctx)[:, sinks:], ctx)
            res, _ = pipe.predictor.forward(q, ctx)
            cols = np.ascontiguousarray(np.asarray(q).transpose(0, 2, 1)).reshape(-1, q.shape[1])
            res_cols = np.ascontiguousarray(np.asarray(res).transpose(0, 2, 1)).reshape(-1, q.shape[1])
            if i == 0:
                layer0[kind] = np.asarray(q)
                if kind == "values":
                    ids = token_ids_from_symbols(layer0["keys"], layer0["values"])
                    src, length = longest_matches(ids, MAX_CANDIDATES, MAX_MATCH)
                    out["matched_tokens"] = {f"{a}-{b}": int(((length >= a) & (length <= b)).sum()) for a, b in BINS}
                    out["tokens"] = int(length.size)
                    out["distinct_layer0_rows"] = int(ids.max()) + 1
            sections.append((f"{i}.{kind}", cols, res_cols))
    for key, cols, res_cols in sections:   # the map needs both layer-0 sections: tabulated afterwards
        for a, b in BINS:
            sel = np.flatnonzero((length >= a) & (length <= b))
            if sel.size == 0:
                continue
            n = sel.size * cols.shape[0]
            out.setdefault("layers", {}).setdefault(key, {})[f"{a}-{b}"] = {
                "today": pooled_bits(res_cols[:, sel]) / n,
                "repeat": pooled_bits(cols[:, sel] - cols[:, src[sel]]) / n}
    return out


def container_row(cache, model, profile, scale: float) -> dict:
    row = {}
    decoded = {}
    for name, options in (("today", {"repeat": False}), ("repeat", {})):
        t0 = time.perf_counter()
        blob = seqkv.encode(cache, model=model, profile=profile, scale=scale, **options)
        t1 = time.perf_counter()
        decoded[name] = seqkv.decode(blob, profile=profile)
        t2 = time.perf_counter()
        raw = sum(FP16_BYTES * layer.keys.numel() * 2 for layer in cache.layers)
        row[name] = {"bytes": len(blob), "ratio": raw / len(blob), "encode_s": t1 - t0, "decode_s": t2 - t1,
                     "format_version": seqkv.inspect(blob)["format_version"]}
    row["same_cache"] = all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                            for a, b in zip(decoded["today"].layers, decoded["repeat"].layers))
    row["saving"] = 1 - row["repeat"]["bytes"] / row["today"]["bytes"]
    return row


def markdown(results: list) -> str:
    lines = ["# Repeat prediction: measured", "",
             "`python bench/repeat_prediction_eval.py --out docs/repeat_prediction` (SmolLM2-135M-Instruct, 2048 "
             "tokens, fp16 cache, shipped profile, at the scales the closed loop chose; one thread).", "",
             "## The container", "",
             "| text | target (scale) | bytes today | bytes with repeats | saving | ratio today → now | same cache | "
             "encode s today / now | decode s today / now |", "|---|---|---:|---:|---:|---|---|---|---|"]
    for r in results:
        for c in r["containers"]:
            t, n = c["today"], c["repeat"]
            lines.append(f"| {r['text']} | {c['target_kl']} ({c['scale']:.4f}) | {t['bytes']} | {n['bytes']} | "
                         f"{100 * c['saving']:.1f} % | {t['ratio']:.2f}x → {n['ratio']:.2f}x | {c['same_cache']} | "
                         f"{t['encode_s']:.2f} / {n['encode_s']:.2f} | {t['decode_s']:.2f} / {n['decode_s']:.2f} |")
    lines += ["", "## Gain per layer against match length (target_kl=0.01's scale)", "",
              "Bits per element of the coder's input on the tokens with a match of that length: today (temporal "
              "predictor residuals) → as repeat residuals.  Plug-in entropy pooled over channel classes, an "
              "estimate; the encoder picks per section and component whichever is cheaper.", ""]
    for r in results:
        g = r["gain"]
        bins = [f"{a}-{b}" for a, b in BINS]
        lines += [f"### {r['text']}", "",
                  f"{g['tokens']} coded tokens, {g['distinct_layer0_rows']} distinct layer-0 rows; tokens per match "
                  f"length: " + ", ".join(f"{k}: {v}" for k, v in g["matched_tokens"].items()), "",
                  "| layer.kind | " + " | ".join(f"len {b}" for b in bins) + " |", "|---|" + "---|" * len(bins)]
        for key, cells in g["layers"].items():
            lines.append(f"| {key} | " + " | ".join(
                f"{cells[b]['today']:.2f} → {cells[b]['repeat']:.2f}" if b in cells else "-" for b in bins) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", action="append", help="texts (default: the four held-out texts)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="OUT.json and OUT.md are written")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_embedded_model()
    profile = seqkv.shipped_profile(model)
    scales = closed_loop_scales()
    results = []
    for path in args.text or TEXTS:
        with open(os.path.join(ROOT, path)) as f:
            ids = tokenizer(f.read(), return_tensors="pt").input_ids
        cache = clone_cache(prefill(model, ids, 2048), dtype=torch.float16)
        layers = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        name = os.path.basename(path)
        result = {"text": name, "containers": [], "gain": gain_table(layers, model, profile, scales[(name, 0.01)])}
        for target in (0.01, 0.001):
            scale = scales[(name, target)]
            result["containers"].append({"target_kl": target, "scale": scale,
                                         **container_row(cache, model, profile, scale)})
            c = result["containers"][-1]
            print(name, target, f"{c['today']['ratio']:.2f}x -> {c['repeat']['ratio']:.2f}x", c["same_cache"], flush=True)
        results.append(result)
    with open(args.out + ".json", "w") as f:
        json.dump({"model": "SmolLM2-135M-Instruct (embedded GGUF)", "rows": results}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
