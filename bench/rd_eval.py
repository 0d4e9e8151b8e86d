"""Rate-distortion of the calibrated codec against the presets and the anchors (issue 3).

    python bench/rd_eval.py                                      # the shipped profile; ~45 min on 2 cores
    python bench/rd_eval.py --profile smollm2.profile --quick    # another profile; two texts, two targets
    python bench/rd_eval.py --redo-default                       # only the default encode's rows, ~15 min

Protocol of design notes §5 (SmolLM2-135M, P=2048, C=256, fp16 cache, KL against the
uncompressed run, every container byte counted).  The profile must be calibrated on text other
than the evaluation texts (`seqkv calibrate` uses bench/calibration/, these are bench/texts/).

Rows per text: zstd-3; the presets near_lossless / balanced / small; the TurboQuant-style anchor
(randomized Hadamard + Lloyd-Max at 3 and 4 bits, indices entropy-coded by seqkv's coder, which
favours the anchor over its fixed-rate original); HF QuantizedCache's quanto int4 (if
optimum-quanto is installed: axis 0, group 64, as HF quantizes a prefill; bytes = the packed int4
data + fp16 scale and shift per group of 64, i.e. 4.5 bits/element);
the calibrated codec at several target_kl values as ``encode`` makes it by default with the model at hand
(closed loop, soft pruning), and the same with every token at the same steps (``uniform:``, token_steps=False:
the default before soft pruning was; repeat prediction on in both; the codec as issue 13 found it, without
repeat prediction either, is the stop-20 run's ``before:`` rows: docs/repeat_prediction.md).  Every
target_kl row is a closed-loop encode (~15-50 s each).  Writes docs/rd.md, docs/rd.json, docs/rd_curve.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from seqkv import Profile, shipped_profile  # noqa: E402
from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.evaluate import EvalRow, evaluate_text, load_token_ids  # noqa: E402
from seqkv.quality import QualityProbe, clone_cache  # noqa: E402

TEXTS = ["python_reference.txt", "psf_license.txt", "inspect_source.txt", "email_message_source.txt"]
TARGETS = [0.001, 0.002, 0.005, 0.01, 0.02]
RATES = [2.0]  # bits/element: 8x, to read the KL off at the ratio target
ANCHORS = {"turboquant-4bit": {"preset": "balanced", "rotation": "hadamard", "quantizer": "lloydmax", "bits": 4},
           "turboquant-3bit": {"preset": "balanced", "rotation": "hadamard", "quantizer": "lloydmax", "bits": 3}}


def _stored_bytes(t) -> int:
    """Bytes a quanto tensor really holds: a PackedTensor reports the logical (unpacked) shape,
    its ``_data`` is the packed uint8 storage (two int4 values per byte)."""
    inner = getattr(t, "_data", None)
    if isinstance(inner, torch.Tensor) and type(t).__name__ == "PackedTensor":
        return inner.numel() * inner.element_size()
    return t.numel() * t.element_size()


def quanto_int4_row(probe: QualityProbe) -> EvalRow | None:
    """HF QuantizedCache (quanto backend) int4 on the stored cache, as it quantizes a prefill."""
    try:
        from transformers.cache_utils import QuantoQuantizedLayer
        layer_q = QuantoQuantizedLayer(nbits=4, axis_key=0, axis_value=0, q_group_size=64, residual_length=128)
    except ImportError:
        return None
    cache = clone_cache(probe.cache)
    nbytes = 0
    elements = 0
    t0 = time.perf_counter()
    for layer in cache.layers:
        for name, axis in (("keys", layer_q.axis_key), ("values", layer_q.axis_value)):
            x = getattr(layer, name)
            qt = layer_q._quantize(x.contiguous(), axis=axis)
            nbytes += sum(_stored_bytes(t) for t in (qt._data, qt._scale, qt._shift))
            elements += x.numel()
            setattr(layer, name, layer_q._dequantize(qt).to(x.dtype))
    seconds = time.perf_counter() - t0
    q = probe.score(cache)
    raw = 2 * elements
    return EvalRow("quanto-int4 (HF QuantizedCache)", nbytes, raw / nbytes, 8 * nbytes / elements, q.mean_kl, q.p99_kl,
                   q.top1_agreement, q.ppl_ratio, raw / 1e6 / seconds, float("nan"))


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), sharey=True)
    axes = [axes] if len(results) == 1 else axes
    for ax, (text, rows) in zip(axes, results.items()):
        def pts(pred):
            sel = [r for r in rows if pred(r["name"]) and r["mean_kl"]]
            return [r["mean_kl"] for r in sel], [r["ratio"] for r in sel]

        ax.plot(*pts(lambda n: n.startswith("target_kl")), "o-", label="seqkv target_kl (default: soft pruning)")
        ax.plot(*pts(lambda n: n.startswith("uniform: target_kl")), "o:", color="lightsteelblue",
                label="seqkv target_kl, uniform steps")
        ax.plot(*pts(lambda n: n.startswith("bits_per_element")), "D", label="seqkv calibrated, 2.0 bits/elem")
        ax.plot(*pts(lambda n: n in ("near_lossless", "balanced", "small")), "s--", label="seqkv presets (no profile)")
        ax.plot(*pts(lambda n: n.startswith("turboquant")), "^", label="TurboQuant-style 3/4-bit")
        ax.plot(*pts(lambda n: n.startswith("quanto")), "v", label="HF quanto int4")
        zstd = [r["ratio"] for r in rows if r["name"] == "zstd-3"]
        if zstd:
            ax.axhline(zstd[0], color="grey", lw=0.8, ls=":", label="zstd-3 (lossless)")
        ax.axvline(0.01, color="red", lw=0.5, ls=":")
        ax.set_xscale("log")
        ax.set_title(text.replace(".txt", ""), fontsize=9)
        ax.set_xlabel("mean KL (continuation, C=256)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("compression ratio vs fp16 (all bytes)")
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, P=2048: rate vs distortion", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="shipped", help="a profile file, or 'shipped' (default)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--redo-default", action="store_true",
                    help="re-measure only the default encode's rows (target_kl=...) of an existing rd.json, keeping "
                         "the others (their code paths unchanged), then re-render the outputs")
    ap.add_argument("--redo-quanto", action="store_true",
                    help="re-measure only the quanto rows of an existing rd.json (then re-render the outputs)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model, tok = load_embedded_model()
    profile = shipped_profile(model) if args.profile == "shipped" else Profile.load(args.profile)
    texts = TEXTS[:2] if args.quick else TEXTS
    if args.redo_quanto:
        with open(os.path.join(args.out, "rd.json")) as f:
            saved = json.load(f)
        for name, rows in saved["results"].items():
            with open(os.path.join(ROOT, "bench", "texts", name), encoding="utf-8") as f:
                probe = QualityProbe(model, load_token_ids(tok, f.read()), 2048, 256)
            row = quanto_int4_row(probe).as_dict()
            if any(r["name"] == row["name"] for r in rows):
                saved["results"][name] = [row if r["name"] == row["name"] else r for r in rows]
            else:   # a run without optimum-quanto installed has no such row yet: it goes where a full run puts it
                saved["results"][name] = rows[:1] + [row] + rows[1:]
            print(name, row["name"], f"{row['ratio']:.2f}x KL {row['mean_kl']:.5f}", flush=True)
        write_outputs(saved, args.out)
        return
    if args.redo_default:
        with open(os.path.join(args.out, "rd.json")) as f:
            saved = json.load(f)
        for name, rows in saved["results"].items():
            with open(os.path.join(ROOT, "bench", "texts", name), encoding="utf-8") as f:
                text = f.read()
            probe = QualityProbe(model, load_token_ids(tok, text), 2048, 256)
            fresh = {r.name: r.as_dict() for r in evaluate_text(
                model, tok, text, presets=(), profile=profile, probe=probe, progress=True,
                configs={r["name"]: {"target_kl": float(r["name"].split("=")[1])}
                         for r in rows if r["name"].startswith("target_kl=")})}
            saved["results"][name] = [fresh.get(r["name"], r) for r in rows]
            for r in rows:
                if r["name"] in fresh:
                    print(f"{name:28s} {r['name']:20s} {fresh[r['name']]['ratio']:6.2f}x "
                          f"KL {fresh[r['name']]['mean_kl']:.5f} (was {r['ratio']:.2f}x, {r['mean_kl']:.5f})", flush=True)
        saved["meta"]["default_rows_redone"] = True
        write_outputs(saved, args.out)
        return
    targets = [0.001, 0.01] if args.quick else TARGETS
    # "uniform": every token the same steps (the default encode before soft pruning was; repeat prediction on)
    configs = {**ANCHORS, **{f"target_kl={t}": {"target_kl": t} for t in targets},
               **{f"uniform: target_kl={t}": {"target_kl": t, "token_steps": False} for t in targets},
               **{f"bits_per_element={b}": {"bits_per_element": b} for b in RATES}}
    results = {}
    for name in texts:
        with open(os.path.join(ROOT, "bench", "texts", name), encoding="utf-8") as f:
            text = f.read()
        probe = QualityProbe(model, load_token_ids(tok, text), 2048, 256)
        rows = evaluate_text(model, tok, text, presets=("near_lossless", "balanced", "small"), configs=configs,
                             profile=profile, probe=probe, progress=True)
        row = quanto_int4_row(probe)
        if row is not None:
            rows.insert(1, row)
        results[name] = [r.as_dict() for r in rows]
        for r in rows:
            print(f"{name:28s} {r.name:34s} {r.ratio:6.2f}x KL {r.mean_kl if r.mean_kl is not None else 0:.5f} "
                  f"pred {r.predicted_kl if r.predicted_kl is not None else float('nan'):.5f} "
                  f"enc {r.encode_mb_s:.0f} dec {r.decode_mb_s:.0f} MB/s", flush=True)
    meta = {"profile": {"file": os.path.basename(args.profile), "sha256": profile.hash, "bytes": profile.nbytes,
                        "kl_gain": profile.kl_gain, "calibration": profile.info}, "texts": texts}
    os.makedirs(args.out, exist_ok=True)
    write_outputs({"meta": meta, "results": results}, args.out)


def write_outputs(saved: dict, out: str) -> None:
    """rd.json, rd.md and rd_curve.png in ``out`` from ``{"meta": ..., "results": ...}``."""
    with open(os.path.join(out, "rd.json"), "w") as f:
        json.dump(saved, f, indent=1)
    write_markdown(saved["results"], saved["meta"], os.path.join(out, "rd.md"))
    plot(saved["results"], os.path.join(out, "rd_curve.png"))


def ratio_at_kl(rows: list, prefix: str, kl: float) -> float | None:
    """The ratio of the curve of rows named ``prefix...`` at measured mean KL ``kl``, interpolated linearly
    in log ratio vs log KL between the two measured points around it (None outside the measured range)."""
    points = sorted((r["mean_kl"], r["ratio"]) for r in rows if r["name"].startswith(prefix) and r["mean_kl"])
    for (k0, r0), (k1, r1) in zip(points, points[1:]):
        if k0 <= kl <= k1 and k0 < k1:
            t = (math.log(kl) - math.log(k0)) / (math.log(k1) - math.log(k0))
            return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
    return None


MATCHED_KL = (0.001, 0.005, 0.01)
CURVES = {"default (soft pruning)": "target_kl=", "uniform steps": "uniform: target_kl="}


def matched_kl_table(results: dict) -> list[str]:
    """Soft pruning's gain at matched *measured* KL: each curve's ratio (and bits/element) read off at the
    same KL, per text."""
    head = "| text | " + " | ".join(f"{name} at KL {kl:g}" for kl in MATCHED_KL for name in CURVES) + " |"
    lines = [head, "|" + "---|" * (1 + len(MATCHED_KL) * len(CURVES))]
    for text, rows in results.items():
        cells = []
        for kl in MATCHED_KL:
            for prefix in CURVES.values():
                r = ratio_at_kl(rows, prefix, kl)
                cells.append("–" if r is None else f"{r:.2f}x ({16 / r:.3f} b/e)")
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(results: dict, meta: dict, path: str) -> None:
    p = meta["profile"]
    profile_arg = "" if p.get("file") == "shipped" else f" --profile {p.get('file', 'PROFILE')}"
    lines = ["# Rate-distortion: calibrated codec vs presets and anchors", "",
             f"Generated by `python bench/rd_eval.py{profile_arg}` (SmolLM2-135M-Instruct, P=2048, C=256, fp16 cache; "
             "ratio = raw fp16 bytes / all container bytes; KL = mean KL(p_ref || p_codec) over the continuation).", "",
             f"Profile: {p['bytes']} bytes (reported separately, shared by every cache of the model), sha256 {p['sha256'][:16]}…, "
             f"kl_gain {p['kl_gain']:.3f}, calibrated on {', '.join(p['calibration'].get('texts', []))} — none of them an evaluation text.",
             "", "`target_kl=` rows are `encode(cache, model=model, target_kl=...)` as it is by default: the KL measured "
             "on the cache's own last tokens (closed loop), soft pruning on.  `uniform:` rows are the same with every "
             "token at the same steps (`token_steps=False`, the default before soft pruning).  The enc MB/s column "
             "includes the closed loop's model runs.  The MB/s columns are one timed run each: compare speeds with "
             "bench/bench_codec.py.",
             *(["", "The `target_kl=` rows were re-measured by `python bench/rd_eval.py --redo-default` after the "
                 "default encode changed; every other row is the full run's (code paths unchanged)."]
               if meta.get("default_rows_redone") else []),
             "", "![RD curve](rd_curve.png)", "",
             "Ratio at matched measured KL (each curve interpolated in log-log between its two closest closed-loop "
             "points; – where the curve's points do not bracket that KL; b/e = bits per element = 16 / ratio):", "",
             *matched_kl_table(results), ""]
    for text, rows in results.items():
        lines += [f"## {text}", "", "| codec | ratio | bits/elem | mean KL | predicted KL | p99 KL | top-1 | ppl ratio | enc MB/s | dec MB/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            def f(v, fmt):
                return "–" if v is None or v != v else format(v, fmt)
            lines.append(f"| {r['name']} | {r['ratio']:.2f}x | {r['bits_per_element']:.3f} | {f(r['mean_kl'], '.5f')} | "
                         f"{f(r.get('predicted_kl'), '.5f')} | {f(r['p99_kl'], '.4f')} | {f(r['top1'], '.3f')} | "
                         f"{f(r['ppl_ratio'], '.4f')} | {f(r['encode_mb_s'], '.0f')} | {f(r['decode_mb_s'], '.0f')} |")
        lines.append("")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    main()
