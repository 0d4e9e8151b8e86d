"""Closed- vs open-loop rate control on real text: does ``target_kl`` hold as *measured*?

    python bench/closed_loop_eval.py --out docs/closed_loop                       # the shipped profile
    python bench/closed_loop_eval.py --profile P --out /tmp/single                # another profile file
    python bench/closed_loop_eval.py --loops closed,closed-uniform --out /tmp/soft  # soft pruning's gain
    python bench/closed_loop_eval.py --loops closed,closed@measured --out /tmp/start # the measured start
    python bench/closed_loop_eval.py --loops closed-no-cross --out /tmp/nocross      # the cross-layer predictor's gain

For each text and target: the design notes §5 protocol (SmolLM2-135M-Instruct, P=2048 tokens prefilled,
fp16 cache, the next C=256 tokens teacher-forced after the decoded cache): ratio vs fp16 (every container
byte), measured mean KL / p99 / top-1 on the continuation, the KL the encoder measured on its probe (the
cache's own last tokens) and the profile's prediction, and the encode time of both loops in the same run.
The continuation is never seen by the encoder.  Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import seqkv  # noqa: E402
from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.quality import QualityProbe  # noqa: E402

TEXTS = ["seqkv/data/texts/psf_license.txt", "bench/texts_heldout/gpl3.txt",
         "bench/texts_heldout/subprocess_source.txt", "bench/texts_heldout/stdlib_h.txt"]


LOOPS = {"open": dict(closed_loop=False),
         # the default encode with a model: measured, soft pruning on (the probe observes SmolLM2's queries)
         "closed": dict(closed_loop=True),
         "closed-uniform": dict(closed_loop=True, token_steps=False),
         # the closed loop started at the prediction with the cache's measured sensitivities (uniform steps)
         "closed@measured": dict(closed_loop=True, loop_start="measured"),
         "closed+soft": dict(closed_loop=True, token_steps=True),
         # the default without the profile's cross-layer predictor (issue 13's lever 4 as seqkv has it)
         "closed-no-cross": dict(closed_loop=True, cross_layer=False)}


def row(probe, model, profile, target, loop):
    t0 = time.perf_counter()
    closed = LOOPS[loop]["closed_loop"]
    blob = seqkv.encode(probe.cache, model=model, profile=profile, target_kl=target, **LOOPS[loop],
                        token_ids=probe.token_ids[0, :probe.prompt_len] if closed else None)
    seconds = time.perf_counter() - t0
    info = seqkv.inspect(blob)
    q = probe.score(seqkv.decode(blob, profile=profile))
    rc = info["rate_control"]
    return {"target_kl": target, "loop": loop, "bytes": len(blob),
            "ratio": info["ratio_vs_fp16"], "mean_kl": q.mean_kl, "p99_kl": q.p99_kl, "top1": q.top1_agreement,
            "probe_kl": rc.get("measured_kl"), "predicted_kl": rc["predicted_kl"], "scale": rc["scale"],
            "measurements": rc.get("measurements", 0), "encode_s": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="shipped", help="a profile file, or 'shipped' (default)")
    ap.add_argument("--text", action="append", help="text files (default: four texts no profile was calibrated on)")
    ap.add_argument("--targets", default="0.01,0.001")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loops", default="open,closed,closed-uniform",
                    help="which encodes, in one run: open (prediction only), closed (the default encode with a "
                         "model: measured, per-token steps from attention), closed-uniform (measured, every token "
                         "the same steps: the default before soft pruning was), closed@measured (uniform steps, the "
                         "search started at the prediction with the cache's measured sensitivities), closed+soft "
                         "(token_steps=True: the same containers as closed here)")
    ap.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_embedded_model()
    profile = seqkv.shipped_profile(model) if args.profile == "shipped" else seqkv.Profile.load(args.profile)
    rows = []
    for path in args.text or [os.path.join(ROOT, t) for t in TEXTS]:
        with open(path, encoding="utf-8") as f:
            probe = QualityProbe(model, tok(f.read(), return_tensors="pt").input_ids, 2048, 256)
        for target in (float(t) for t in args.targets.split(",")):
            for loop in args.loops.split(","):
                r = {"text": os.path.basename(path), **row(probe, model, profile, target, loop)}
                print(json.dumps(r), flush=True)
                rows.append(r)
    meta = {"profile": args.profile, "profile_sha256": profile.codec_hash, "model": "SmolLM2-135M-Instruct",
            "prompt_len": 2048, "continuation_len": 256, "cache_dtype": "float16", "threads": args.threads,
            "seqkv": seqkv.__version__,
            "command": "python bench/closed_loop_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(rows, meta))
    return 0


def markdown(rows, meta) -> str:
    lines = [f"Written by `{meta['command']}`.", "",
             f"Profile: {meta['profile']} (codec sha256 {meta['profile_sha256'][:16]}…); {meta['model']}, "
             f"P={meta['prompt_len']}, C={meta['continuation_len']}, {meta['cache_dtype']} cache, "
             f"{meta['threads']} torch threads.", "",
             "| text | target | loop | ratio | measured mean KL | / target | p99 KL | top-1 | probe KL | predicted KL "
             "| measurements | encode s |", "|" + "---|" * 12]
    for r in rows:
        probe = "–" if r["probe_kl"] is None else f"{r['probe_kl']:.5f}"
        lines.append(f"| {r['text']} | {r['target_kl']:g} | {r['loop']} | {r['ratio']:.2f}x | {r['mean_kl']:.5f} | "
                     f"{r['mean_kl'] / r['target_kl']:.2f} | {r['p99_kl']:.4f} | {r['top1']:.3f} | {probe} | "
                     f"{r['predicted_kl']:.5f} | {r['measurements']} | {r['encode_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
