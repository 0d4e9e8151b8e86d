"""Soft pruning's codes under the real closed loop: for which reader, and how coarse at most?

    python bench/soft_pruning_readers.py --out docs/soft_pruning_readers           # 3 variants, 4 texts, ~20 min
    python bench/soft_pruning_readers.py --variants both-cap8 --targets 0.01,0.001 --out /tmp/r

Each variant replaces the encoder's choice of per-token step codes (``seqkv.codec.soft_steps``, the one
function ``seqkv.encode`` calls for them) for the whole run, then encodes with the defaults of
``seqkv.encode(cache, model=model, target_kl=t)`` (closed loop, shipped profile) on the design notes §5 protocol
(SmolLM2-135M-Instruct, P=2048, C=256, fp16 cache; every container byte counted; mean KL measured on the
teacher-forced continuation, which the encoder never sees).  It records the probe's window KLs of every
measurement the loop made (tail first), and once per variant the copy probe of docs/retrieval.md (P=2048 of
psf_license.txt, 32 fresh tokens, 256 tokens repeated from 25 % into the prefix) at ``target_kl=0.01``.

Variants (all: beta 0.35, reference quantile 0.99, sinks and layer 0 at code 0):
* ``default``: what ``seqkv.encode`` does (the library's own ``soft_steps``, so its rows are the library's
  containers): both readers, codes up to 8, the last 64 tokens at code 0, on caches of 1024 tokens or more
  (``--prompt-len``); uniform steps below that;
* ``continuation``: the continuation's expected attention only, codes up to 40 (``token_steps=True`` before
  this bench was written);
* ``both``: the larger of the continuation's and the window-before-the-tail reader's expected attention
  (``seqkv.token_importance.reader_attention``), codes up to 40;
* ``both-cap8``: the same, codes up to 8 (4x steps): the library's default from stop 22 until the recent tokens
  were spared;
* ``uniform``: every token the same steps (``token_steps=False``);
* ``both-capN`` / ``continuation-capN``: either reader model with codes up to N (0-40);
* ``both-recentR-capN``: ``both-capN`` with the last R tokens at code 0 (``default`` is ``both-recent64-cap8``
  from 1024 tokens on; this variant is on at any length);
* ``both-nearH-capN``: ``both-capN`` with a third reader, the continuation's expected attention with the RoPE
  averaged over the next H positions only (its first queries, which read the last tokens most).
Variants without ``recent`` keep every recent token's code as the readers give it (``recent_tokens=0``), as
they were run before the recent tokens were spared.
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
import seqkv.codec as codec  # noqa: E402
from seqkv import kl_probe, token_importance  # noqa: E402
from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.quality import QualityProbe  # noqa: E402
from seqkv.retrieval import PACKAGED_TEXT, copy_eval  # noqa: E402
from seqkv.stages.quantize_klt import MAX_TOKEN_CODE  # noqa: E402
from seqkv.token_importance import SoftSteps, attention_weights, expected_attention, reader_attention  # noqa: E402

TEXTS = ["seqkv/data/texts/psf_license.txt", "bench/texts_heldout/gpl3.txt",
         "bench/texts_heldout/subprocess_source.txt", "bench/texts_heldout/stdlib_h.txt"]
LIBRARY_SOFT_STEPS = codec.soft_steps


def variant_steps(name: str):
    """The ``soft_steps`` replacement of one variant (same signature as the library's)."""
    if name == "default":
        return LIBRARY_SOFT_STEPS
    if name == "uniform":
        return lambda *args: None

    readers, _, cap = name.partition("-cap")
    near = recent = 0
    if readers.startswith("both-near"):
        readers, near = "both", int(readers[len("both-near"):])
    elif readers.startswith("both-recent"):
        readers, recent = "both", int(readers[len("both-recent"):])
    if readers not in ("continuation", "both") or not (cap == "" or cap.isdigit()):
        raise SystemExit(f"unknown variant {name!r}")
    max_code = int(cap) if cap else MAX_TOKEN_CODE

    def soft_steps(token_steps, probe, layers, positions, layout, sink_tokens):
        if token_steps is False or probe is None or not probe.queries:
            return None
        if readers == "continuation":
            attention = expected_attention(probe.queries, layers, int(positions[-1]) + 1, layout)
        else:
            attention = reader_attention(probe, layers, positions, layout, near_positions=near)
        codes = token_importance.token_step_codes(attention, sink_tokens, max_code=max_code, recent_tokens=recent)
        return SoftSteps(codes, attention_weights(attention))
    return soft_steps


def encode_recording_soft(steps, *args, **kwargs):
    """``seqkv.encode(*args, **kwargs)`` with ``steps`` as the encoder's ``soft_steps``: (container, the
    SoftSteps it chose or None)."""
    chosen = {}

    def recording(*a):
        chosen["soft"] = steps(*a)
        return chosen["soft"]
    codec.soft_steps = recording
    try:
        blob = seqkv.encode(*args, **kwargs)
    finally:
        codec.soft_steps = LIBRARY_SOFT_STEPS
    return blob, chosen.get("soft")


class WindowLog:
    """Records every window KL list the closed loop's probe measures."""

    def __init__(self):
        self.seen: list[list[float]] = []
        self._mean_kl = kl_probe.TailProbe.mean_kl

    def __enter__(self):
        log = self

        def mean_kl(probe, layers):
            kls = probe.window_kls(layers)
            log.seen.append([float(k) for k in kls])
            return max(kls)
        kl_probe.TailProbe.mean_kl = mean_kl
        return self

    def __exit__(self, *exc):
        kl_probe.TailProbe.mean_kl = self._mean_kl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="continuation,both,both-cap8,default")
    ap.add_argument("--targets", default="0.01")
    ap.add_argument("--text", action="append", help="text files (default: the four texts of closed_loop_eval.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=2048, help="P (the cache's tokens); design notes §5: 2048")
    ap.add_argument("--continuation-len", type=int, default=256, help="C (the measured continuation); §5: 256")
    ap.add_argument("--no-copy", action="store_true", help="skip the copy probe")
    ap.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_embedded_model()
    profile = seqkv.shipped_profile(model)
    probes = {}
    for path in args.text or TEXTS:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            probes[os.path.basename(path)] = QualityProbe(model, tok(f.read(), return_tensors="pt").input_ids,
                                                          args.prompt_len, args.continuation_len)
    with open(PACKAGED_TEXT, encoding="utf-8") as f:
        copy_text = f.read()
    rows, copies = [], {}
    try:
        for variant in args.variants.split(","):
            codec.soft_steps = variant_steps(variant)
            for text, q in probes.items():
                for target in (float(t) for t in args.targets.split(",")):
                    t0 = time.perf_counter()
                    with WindowLog() as log:
                        blob = seqkv.encode(q.cache, model=model, profile=profile, target_kl=target,
                                            token_ids=q.token_ids[0, :args.prompt_len])
                    seconds = time.perf_counter() - t0
                    report = q.score(seqkv.decode(blob, profile=profile))
                    info = seqkv.inspect(blob)
                    probe_kl = info["rate_control"]["measured_kl"]
                    row = {"variant": variant, "text": text, "target_kl": target, "ratio": info["ratio_vs_fp16"],
                           "mean_kl": report.mean_kl, "top1": report.top1_agreement, "probe_kl": probe_kl,
                           "scale": info["rate_control"]["scale"], "windows": log.seen,
                           # the windows of the measurement the loop kept (the larger one is its probe KL)
                           "kept_windows": min(log.seen, key=lambda w: abs(max(w) - probe_kl)),
                           "encode_s": seconds}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            if not args.no_copy:
                result = copy_eval(model, tok, copy_text, {"x": {"target_kl": 0.01, "profile": profile}}, 2048)["x"]
                copies[variant] = result.as_dict()
                print(json.dumps({"variant": variant, "copy": copies[variant]}), flush=True)
    finally:
        codec.soft_steps = LIBRARY_SOFT_STEPS
    meta = {"model": "SmolLM2-135M-Instruct", "prompt_len": args.prompt_len, "continuation_len": args.continuation_len,
            "profile": "shipped",
            "threads": args.threads, "seqkv": seqkv.__version__}
    meta["command"] = "python bench/soft_pruning_readers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "copy": copies}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(f"Written by `{meta['command']}` (SmolLM2-135M-Instruct, P={args.prompt_len}, "
                f"C={args.continuation_len}, fp16 cache, shipped "
                f"profile, {args.threads} torch threads; docs/soft_pruning.md).\n\n" + markdown(rows, copies))
    return 0


def markdown(rows, copies) -> str:
    lines = ["| variant | text | target | ratio | measured KL / target | top-1 | probe windows kept (tail / before) "
             "/ target | measurements |", "|" + "---|" * 8]
    for r in rows:
        kept = " / ".join(f"{w / r['target_kl']:.2f}" for w in r["kept_windows"])
        lines.append(f"| {r['variant']} | {r['text']} | {r['target_kl']:g} | {r['ratio']:.2f}x | "
                     f"{r['mean_kl'] / r['target_kl']:.2f} | {r['top1']:.3f} | {kept} | {len(r['windows'])} |")
    if copies:
        lines += ["", "| variant | copy probe ratio | copy mean KL | copy p99 KL | copy top-1 |", "|---|---|---|---|---|"]
        lines += [f"| {v} | {c['ratio']:.2f}x | {c['mean_kl']:.5f} | {c['p99_kl']:.4f} | {c['top1']:.3f} |"
                  for v, c in copies.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
