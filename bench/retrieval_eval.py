"""Retrieval-grade evaluation (issue 12, item 4): passkey retrieval and the copy probe for every codec row.

    PYTHONPATH=. python bench/retrieval_eval.py --markdown docs/retrieval_results.md --json docs/retrieval_results.json
    PYTHONPATH=. python bench/retrieval_eval.py --rows uncompressed t01 --config 't01={"target_kl": 0.01}' --markdown /tmp/r.md

Probes of seqkv/retrieval.py (docs/retrieval.md), on SmolLM2-135M-Instruct (the embedded GGUF, fp32 on
the CPU), fp16 stored cache:
* passkey: 5 depths x 2 passkeys in the first 1600 tokens of the haystack text (default: the packaged
  psf_license.txt), question teacher-forced after the decoded cache, 12 greedy answer tokens;
* copy probe: P tokens of the copy text (default P=2048 of the same text), 32 fresh tokens, then 256
  tokens repeated from depth 25 % of the prefix; KL and top-1 on the repeat against the uncompressed cache.

Rows: the uncompressed cache; the presets; the calibrated codec at target_kl 0.01 and 0.001 with the
shipped profile; pruners at 50 % kept, coded losslessly (so the row measures the pruning alone); the
TurboQuant-style anchors of bench/rd_eval.py (randomized Hadamard + Lloyd-Max 3/4 bits); HF quanto int4
(QuantizedCache's quantizer, as bench/rd_eval.py runs it) when optimum-quanto is installed.
Each row is measured once.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import seqkv  # noqa: E402
from rd_eval import ANCHORS  # noqa: E402
from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.quality import clone_cache  # noqa: E402
from seqkv.retrieval import (PACKAGED_TEXT, UNCOMPRESSED, copy_eval, passkey_eval,  # noqa: E402
                             query_aware_pruners)

PRESETS = ("lossless", "near_lossless", "balanced", "small")
TARGETS = (0.01, 0.001)
PRUNE_KEEP = 0.5
PRUNERS = {  # row name: (pruner name, options)
    "SnapKV": ("snapkv", {}),
    "expected attention": ("expected_attention", {}),
    "key-norm": ("key_norm", {}),
    "streaming (sinks+window)": ("sinks_window", {}),
}


def quanto_int4():
    """HF QuantizedCache's quanto int4 quantizer (axis 0, group 64) as a row: ``cache -> (dequantized cache,
    stored bytes)``, bytes = packed int4 data + scale and shift per group; None without optimum-quanto."""
    try:
        from transformers.cache_utils import QuantoQuantizedLayer
        layer_q = QuantoQuantizedLayer(nbits=4, axis_key=0, axis_value=0, q_group_size=64, residual_length=128)
    except ImportError:
        return None

    def stored(t) -> int:   # a PackedTensor reports its unpacked shape; its storage is ``_data``
        inner = getattr(t, "_data", None)
        if isinstance(inner, torch.Tensor) and type(t).__name__ == "PackedTensor":
            return inner.numel() * inner.element_size()
        return t.numel() * t.element_size()

    def run(cache):
        out, nbytes = clone_cache(cache), 0
        for layer in out.layers:
            for name in ("keys", "values"):
                x = getattr(layer, name)
                qt = layer_q._quantize(x.contiguous(), axis=0)
                nbytes += sum(stored(t) for t in (qt._data, qt._scale, qt._shift))
                setattr(layer, name, layer_q._dequantize(qt).to(x.dtype))
        return out, nbytes
    return run


def build_rows(model, names=None, extra=()) -> tuple[dict, list[str]]:
    """``({row name: spec}, notes)``; ``extra``: more rows as ``NAME=JSON`` encode() keywords (the shipped
    profile is added to those naming no preset); ``names`` keeps only those rows."""
    profile = seqkv.shipped_profile(model)
    rows = {UNCOMPRESSED: None, **{p: {"preset": p} for p in PRESETS}}
    rows.update({f"target_kl={t}": {"target_kl": t, "profile": profile} for t in TARGETS})
    for label, (name, opts) in PRUNERS.items():
        rows[f"{label}, keep {PRUNE_KEEP:.0%}"] = {"preset": "lossless",
                                                  "prune": seqkv.pruner(name, ratio=1 - PRUNE_KEEP, **opts)}
    rows.update({name.replace("turboquant", "TurboQuant-style"): dict(kw) for name, kw in ANCHORS.items()})
    notes = []
    quanto = quanto_int4()
    if quanto is None:
        notes.append("HF quanto int4: not measured, optimum-quanto is not installed.")
    else:
        rows["quanto-int4 (HF QuantizedCache)"] = quanto
    for item in extra:
        name, _, raw = item.partition("=")
        kwargs = json.loads(raw)
        rows[name] = kwargs if "preset" in kwargs else {**kwargs, "profile": profile}
    if names:
        unknown = set(names) - set(rows)
        if unknown:
            raise SystemExit(f"unknown rows {sorted(unknown)}; known: {list(rows)}")
        rows = {k: v for k, v in rows.items() if k in names}
    return rows, notes


def describe(spec) -> str:
    if spec is None:
        return "the stored fp16 cache"
    if callable(spec):
        return "HF QuantizedCache quanto, 4 bits, axis 0, group 64"
    shown = {k: (v.get_config() if hasattr(v, "get_config") else "shipped profile" if k == "profile" else v)
             for k, v in spec.items()}
    return json.dumps(shown, default=str)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=PACKAGED_TEXT, help="the passkey haystack text (default: packaged psf_license.txt)")
    ap.add_argument("--copy-text", help="the copy probe's text (default: --text)")
    ap.add_argument("--copy-prompt", type=int, default=2048, help="copy probe prefix length P")
    ap.add_argument("--rows", nargs="*", help="measure only these rows")
    ap.add_argument("--config", action="append", default=[], metavar="NAME=JSON",
                    help='an extra row of encode() keywords, e.g. \'t01-closed={"target_kl": 0.01, "closed_loop": true}\'')
    ap.add_argument("--markdown", required=True)
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_embedded_model()
    rows, notes = build_rows(model, args.rows, args.config)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    copy_path = args.copy_text or args.text
    with open(copy_path, encoding="utf-8") as f:
        copy_text = f.read()

    t0 = time.time()
    passkey = passkey_eval(model, tok, text, rows, progress=True)
    t_passkey = time.time() - t0
    t0 = time.time()
    copy = copy_eval(model, tok, copy_text, rows, args.copy_prompt, progress=True)
    t_copy = time.time() - t0
    results = []
    for name, spec in rows.items():
        p, c = passkey[name], copy[name]
        results.append({"name": name, "config": describe(spec), "passkey": p.score, "passkey_ratio": p.ratio,
                        "missed_depths": [a["depth"] for a in p.answers if not a["found"]],
                        "answers": p.answers, **{f"copy_{k}": v for k, v in c.as_dict().items()}})
    meta = {"command": "python " + " ".join(sys.argv), "haystack": os.path.basename(args.text),
            "copy_text": os.path.basename(copy_path), "copy_prompt": args.copy_prompt,
            "seconds": {"passkey": round(t_passkey), "copy": round(t_copy)}, "notes": notes,
            "query_aware": [p.name for p in query_aware_pruners(rows)],
            "machine": f"seqkv {seqkv.__version__}, torch {torch.__version__}, {args.threads} torch thread(s), "
                       f"{platform.machine()}, {os.cpu_count()} CPUs"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": results}, f, indent=1)
    with open(args.markdown, "w") as f:
        f.write(markdown(meta, results))
    print(markdown(meta, results))


def markdown(meta: dict, results: list[dict]) -> str:
    lines = ["# Retrieval-grade evaluation: passkey and copy probe", "",
             f"Written by `{meta['command']}` ({meta['machine']}; passkey {meta['seconds']['passkey']} s, "
             f"copy probe {meta['seconds']['copy']} s).", "",
             "SmolLM2-135M-Instruct (embedded GGUF, fp32, CPU), fp16 stored cache. Passkey: 5 depths x 2 passkeys in "
             f"the first 1600 tokens of {meta['haystack']}, the question teacher-forced after the decoded cache, greedy "
             f"answer (docs/retrieval.md). Copy probe: P={meta['copy_prompt']} tokens of {meta['copy_text']}, 32 fresh "
             "tokens, then 256 tokens repeated from 25 % into the prefix; KL(p_ref || p_codec) and top-1 agreement on the "
             "255 repeated positions against the uncompressed cache's run; 'ref copies' is how often the uncompressed "
             "run's top-1 is the repeated token. Ratio = raw fp16 bytes / stored bytes (copy-probe cache; pruned rows "
             "against the unpruned cache).", ""]
    lines += [f"- {n}" for n in meta["notes"]] + ([""] if meta["notes"] else [])
    lines += ["| row | ratio | passkey | missed at depth | copy mean KL | copy p99 KL | copy top-1 | ref copies |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        missed = ", ".join(f"{d:.2f}" for d in r["missed_depths"]) or "–"
        lines.append(f"| {r['name']} | {r['copy_ratio']:.2f}x | {r['passkey']} | {missed} | {r['copy_mean_kl']:.5f} | "
                     f"{r['copy_p99_kl']:.4f} | {r['copy_top1']:.3f} | {r['copy_ref_copy_top1']:.3f} |")
    lines += ["", "Rows:", ""] + [f"- {r['name']}: `{r['config']}`" for r in results]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
