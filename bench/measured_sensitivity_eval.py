"""The KL model with sensitivities measured on the cache itself, against the profile's (issue 12, item 3).

    python bench/measured_sensitivity_eval.py --out docs/measured_sensitivity                # held-out texts
    python bench/measured_sensitivity_eval.py --calibration --out /tmp/calib_texts           # FISHER_KL_GAIN

Per text (SmolLM2-135M-Instruct, the design notes' protocol: 2048 tokens prefilled, fp16 cache, the next 256
teacher-forced after the decoded cache; the shipped profile): the closed-loop probe of the cache (its last
256 tokens and the 256 before them), the sections' sensitivities measured through the model on it
(:func:`seqkv.measured_sensitivity.measured_sensitivities`, timed), then containers at five fixed scales
around the one the profile predicts for target_kl=0.01.  For each: ratio, the probe's KL (the larger window,
what the closed loop holds), the continuation's KL (never seen by the encoder), and both models' predictions
from the container's own per-section weighted MSE (:func:`seqkv.calibrate.container_weighted_mse`): the
profile's ``kl_gain * sum sensitivity * MSE`` and the measured ``FISHER_KL_GAIN * sum measured * MSE``.
``--calibration`` runs the profile's own calibration texts (what FISHER_KL_GAIN was fitted on).
Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import seqkv  # noqa: E402
from closed_loop_eval import TEXTS  # noqa: E402
from seqkv.calibrate import container_weighted_mse  # noqa: E402
from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.hf_adapter import cache_layers  # noqa: E402
from seqkv.kl_probe import TailProbe  # noqa: E402
from seqkv.layout import layout_for_cache  # noqa: E402
from seqkv.measured_sensitivity import FISHER_KL_GAIN, measured_sensitivities  # noqa: E402
from seqkv.quality import QualityProbe  # noqa: E402

CALIBRATION = ["bench/calibration/calib_argparse.txt", "bench/calibration/calib_topics.txt",
               "bench/calibration/calib_unittest.txt"]
FACTORS = (0.6, 0.8, 1.0, 1.25, 1.6)


def text_rows(path, model, tok, profile) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        probe = QualityProbe(model, tok(f.read(), return_tensors="pt").input_ids, 2048, 256)
    layers = cache_layers(probe.cache)
    ids = probe.token_ids[0, :probe.prompt_len]
    tail = TailProbe(model, layers, torch.arange(probe.prompt_len), ids, 256)
    t0 = time.perf_counter()
    measured = measured_sensitivities(tail, layers, layout_for_cache(model, None, layers, False), profile)
    seconds = time.perf_counter() - t0
    base = seqkv.inspect(seqkv.encode(probe.cache, model=model, profile=profile, target_kl=0.01,
                                      closed_loop=False))["rate_control"]["scale"]
    rows = []
    for factor in FACTORS:
        blob = seqkv.encode(probe.cache, model=model, profile=profile, scale=base * factor)
        decoded = seqkv.decode(blob, profile=profile)
        mse = container_weighted_mse(profile, probe.cache, decoded)
        windows = tail.window_kls(cache_layers(decoded))
        rows.append({"text": os.path.basename(path), "scale": base * factor, "bytes": len(blob),
                     "ratio": seqkv.inspect(blob)["ratio_vs_fp16"], "probe_kl": max(windows), "windows": windows,
                     "continuation_kl": probe.score(decoded).mean_kl,
                     "profile_prediction": profile.predicted_kl(mse),
                     "measured_prediction": FISHER_KL_GAIN * sum(measured[k] * v for k, v in mse.items()),
                     "measure_s": seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def spread(rows, model_key: str, against: str) -> tuple[float, float]:
    ratios = [r[against] / r[model_key] for r in rows]
    return min(ratios), max(ratios)


def markdown(rows, meta) -> str:
    lines = [f"{meta['model']}, P=2048, C=256, fp16 cache, shipped profile, {meta['threads']} torch threads; "
             f"FISHER_KL_GAIN = {meta['fisher_kl_gain']}.", "",
             "| text | scale | ratio | probe KL | continuation KL | profile predicts | measured predicts "
             "| probe / profile | probe / measured | continuation / profile | continuation / measured |",
             "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['text']} | {r['scale']:.4f} | {r['ratio']:.2f}x | {r['probe_kl']:.5f} | "
                     f"{r['continuation_kl']:.5f} | {r['profile_prediction']:.5f} | {r['measured_prediction']:.5f} | "
                     f"{r['probe_kl'] / r['profile_prediction']:.2f} | {r['probe_kl'] / r['measured_prediction']:.2f} | "
                     f"{r['continuation_kl'] / r['profile_prediction']:.2f} | "
                     f"{r['continuation_kl'] / r['measured_prediction']:.2f} |")
    lines += ["", "Measured / predicted, range over all rows (the spread a closed loop's start has to cover):", ""]
    for against in ("probe_kl", "continuation_kl"):
        for key in ("profile_prediction", "measured_prediction"):
            lo, hi = spread(rows, key, against)
            lines.append(f"- {against} / {key}: {lo:.2f} – {hi:.2f} ({hi / lo:.1f}x)")
    raw = [r["probe_kl"] / (r["measured_prediction"] / meta["fisher_kl_gain"]) for r in rows]
    lines.append(f"- probe KL / unscaled measured model: median {statistics.median(raw):.2f} "
                 f"(geometric mean {math.exp(statistics.fmean(math.log(x) for x in raw)):.2f})")
    times = sorted({r["text"]: r["measure_s"] for r in rows}.items())
    lines.append("- measuring the sensitivities: " + ", ".join(f"{t} {s:.1f} s" for t, s in times))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", action="store_true", help="the profile's calibration texts instead")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_embedded_model()
    profile = seqkv.shipped_profile(model)
    rows = []
    for text in CALIBRATION if args.calibration else TEXTS:
        rows += text_rows(os.path.join(ROOT, text), model, tok, profile)
    meta = {"model": "SmolLM2-135M-Instruct", "threads": args.threads, "fisher_kl_gain": FISHER_KL_GAIN,
            "texts": "calibration" if args.calibration else "held-out", "seqkv": seqkv.__version__}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
