"""docs/pruning.md (+ pruning.png) from the json that bench/pruning_eval.py writes."""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from statistics import mean


def _fmt(v, f=".4f"):
    return "–" if v is None else format(v, f)


def write_report(json_path: str, out_dir: str) -> str:
    with open(json_path) as f:
        data = json.load(f)
    meta, rows = data["meta"], data["rows"]
    texts = meta["texts"]
    lines = [
        "# Token pruning on SmolLM2-135M",
        "",
        f"Protocol (design notes §5): prefill P={meta['prompt']} tokens of each bench text, prune and/or encode+decode "
        f"the fp16 cache, teacher-force the next C={meta['continuation']} tokens with `position_ids` continuing at P, "
        "and compare with the unpruned cache: mean KL(p_ref ‖ p_test), p99, top-1 agreement, perplexity ratio. "
        "Ratio = raw fp16 bytes of the *unpruned* cache / every container byte.",
        "",
        f"Model: {meta['model']}; cache dtype {meta['cache_dtype']}. TriAttention is calibrated on "
        f"`{meta['calibration_text']}` ({meta['calibration_tokens']} tokens), which is not an evaluation text. "
        "SnapKV (window 64, kernel 5) and expected attention (512 future positions, 4 sinks, covariance, value norms) "
        "are reimplementations of kvpress 0.5.5's scorers (kvpress needs transformers < 5.3, so it cannot sit beside "
        "transformers 5 here); every pruner keeps the same number of tokens per head (kvpress's default, `PerHead(scorer, "
        "ratio=r)`) unless marked *AdaKV heads* (the layer's budget shared across heads, kvpress's AdaKVPress with a 0.2 "
        "safeguard: `AdaptiveHeads(scorer, ratio=r)`, or `head_budget=\"adaptive\"` in `seqkv.pruner(...)`).",
        "",
        f"Reproduce: `{meta['command']}`" + "".join(f", then `{c}`" for c in meta.get("merged_commands", [])),
        "",
        "## 1. Pruning alone: mean KL at 2x (ratio 0.5) and 4x (ratio 0.75)",
        "",
    ]
    prune = [r for r in rows if r["kind"] == "prune"]
    methods = list(dict.fromkeys(r["method"] for r in prune))
    ratios = sorted({r["prune_ratio"] for r in prune})
    by = {(r["method"], r["prune_ratio"], r["text"]): r for r in prune}
    for ratio in ratios:
        lines += [f"**ratio {ratio} ({1 / (1 - ratio):.0f}x fewer tokens)**", "",
                  "| pruner | " + " | ".join(texts) + " | mean | p99 (mean) | top-1 (mean) | ppl ratio (mean) |",
                  "|---|" + "---|" * (len(texts) + 4)]
        for m in methods:
            rs = [by.get((m, ratio, t)) for t in texts]
            if any(r is None for r in rs):
                continue
            lines.append(f"| {m} | " + " | ".join(_fmt(r["mean_kl"]) for r in rs) +
                         f" | {_fmt(mean(r['mean_kl'] for r in rs))} | {_fmt(mean(r['p99_kl'] for r in rs), '.3f')} | "
                         f"{_fmt(mean(r['top1'] for r in rs), '.3f')} | {_fmt(mean(r['ppl_ratio'] for r in rs), '.3f')} |")
        lines.append("")
    summary = []
    for ratio in ratios:
        means = {m: mean(by[(m, ratio, t)]["mean_kl"] for t in texts) for m in methods
                 if all((m, ratio, t) in by for t in texts)}
        best = min(means, key=means.get)
        beats = sum(by[(best, ratio, t)]["mean_kl"] < by[("SnapKV", ratio, t)]["mean_kl"] for t in texts)
        summary.append(f"- ratio {ratio}: lowest mean KL over the texts: **{best}** ({means[best]:.4f}, SnapKV "
                       f"{means['SnapKV']:.4f}); it beats SnapKV on {beats}/{len(texts)} texts")
    lines += ["**Summary**", ""] + summary + [
        "", "Caveat: the ensemble rows (z-normalised log-scores of SnapKV and expected attention, optionally "
        "TriAttention; `seqkv/pruning/ensemble.py`) were added after a first run on these same three texts, so "
        "their win here is partly selected; the held-out text below is a first check (there SnapKV stays better), "
        "and §3 is the pre-registered test on four new texts.", ""]
    # target: best pruner vs SnapKV per text
    lines += ["**Against SnapKV, per text** (the target: beat SnapKV's mean KL at 2x and 4x on at least 3 texts)", ""]
    for ratio in ratios:
        snap = {t: by[("SnapKV", ratio, t)]["mean_kl"] for t in texts if ("SnapKV", ratio, t) in by}
        for m in methods:
            if m == "SnapKV":
                continue
            wins = [t for t in texts if (m, ratio, t) in by and t in snap and by[(m, ratio, t)]["mean_kl"] < snap[t]]
            lines.append(f"- ratio {ratio}: {m} beats SnapKV on {len(wins)}/{len(texts)} texts")
        lines.append("")
    held = os.path.join(os.path.dirname(json_path), "pruning_heldout.json")
    if os.path.exists(held):
        with open(held) as f:
            h = json.load(f)
        lines += ["**Held-out check** on a text not used to pick the pruners: "
                  f"`{', '.join(h['meta']['texts'])}` (the continuation repeats license text seen earlier, a hard case; "
                  "TriAttention is left out because it was calibrated on this text). "
                  f"Command: `{h['meta']['command']}`", "",
                  "| pruner | ratio | mean KL | p99 KL | top-1 | ppl ratio |", "|---|---|---|---|---|---|"]
        for r in h["rows"]:
            lines.append(f"| {r['method']} | {r['prune_ratio']} | {_fmt(r['mean_kl'])} | {_fmt(r['p99_kl'], '.3f')} | "
                         f"{_fmt(r['top1'], '.3f')} | {_fmt(r['ppl_ratio'], '.3f')} |")
        lines.append("")
    # matched bytes
    lines += ["## 2. Pruning vs quantization vs both, at matched bytes", "",
              "Quantization alone: the `balanced` pipeline with a `step=` sweep (uniform quantizer, pre-RoPE keys, "
              "context ANS). Pruning alone: the pruned cache in the `lossless` container. Combined: "
              f"{', '.join(meta.get('combine_with', []))} pruning, then the `balanced` pipeline at a step.", ""]
    for t in texts:
        lines += [f"**{t}**", "", "| kind | method | prune ratio | step | bytes | ratio vs fp16 | mean KL | p99 KL | top-1 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        pts = sorted([r for r in rows if r["text"] == t and "bytes" in r], key=lambda r: r["bytes"])
        for r in pts:
            lines.append(f"| {r['kind']} | {r['method']} | {r.get('prune_ratio', '–')} | {r.get('step', '–')} | {r['bytes']} | "
                         f"{r['ratio']:.2f}x | {_fmt(r['mean_kl'])} | {_fmt(r['p99_kl'], '.3f')} | {_fmt(r['top1'], '.3f')} |")
        lines.append("")
    lines += _frontier(rows, texts)
    png = _plot(rows, texts, out_dir)
    if png:
        lines += ["", f"![rate-distortion]({os.path.basename(png)})", ""]
    lines += _preregistered(out_dir)
    lines += _calibrated_section(out_dir, per_head=by)
    lines += _calibrated_section(out_dir, "pruning_calibrated_heldout.json", "## 5. The same on the held-out texts",
                                 HELDOUT_CALIBRATED_CAVEAT, HELDOUT_CALIBRATED_READING)
    md = os.path.join(out_dir, "pruning.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    return md


PREREGISTRATION = """## 3. Pre-registered held-out test (four new texts)

Written and committed before any run on these texts.  The texts (bench/texts_heldout/, provenance in
its PROVENANCE.md) were never used by this project before: GPL-3 (legal prose), CPython 3.11.7
subprocess.py (Python source), dpkg's triggers spec (technical prose), glibc's stdlib.h (C header).

- **Candidate:** "SnapKV+EA ensemble" with exactly its current settings, frozen: `seqkv.pruner("ensemble",
  scorers=("snapkv", "expected_attention"), weights=(1.0, 1.0))`, i.e. z-normalised log-scores of SnapKV
  (window 64, kernel 5) and expected attention (512 future positions, 4 sinks, covariance, value norms),
  the same number of tokens per head (`head_budget="uniform"`), chunk size 32.  Code as of commit
  0b24d60, this branch's fork point (seqkv/pruning/ensemble.py, snapkv.py, expected_attention.py last changed in ecaad65).
- **Baseline:** SnapKV (window 64, kernel 5, uniform head budget).
- **Ratios:** 0.5 (2x) and 0.75 (4x).
- **Protocol:** §5 of the design notes, P=2048, C=256, positions continuing at P, float16 cache,
  pruning alone (no quantization); metric mean KL(p_ref ‖ p_pruned) over the 256 positions.
- **Decision rule:** the ensemble wins a text at a ratio if its mean KL is strictly lower than
  SnapKV's.  The claim "the ensemble beats SnapKV" is confirmed if it wins on at least 3 of the 4
  texts at *both* ratios; otherwise it is not confirmed.  The result is reported as it comes out,
  with no retuning of the ensemble afterwards.  Expected attention and TriAttention (calibrated on
  psf_license.txt, as in §1) are run alongside for context only; they are not part of the test.
- **Command:** `PYTHONPATH=. python bench/pruning_eval.py --prune-only --texts-dir bench/texts_heldout
  --texts gpl3.txt subprocess_source.txt dpkg_triggers_spec.txt stdlib_h.txt --out /tmp/heldout4
  --methods SnapKV 'SnapKV+EA ensemble' 'expected attention' TriAttention`"""


def _preregistered(out_dir):
    """§3: the pre-registered held-out test, as written before the run, then its result (pruning_heldout4.json)."""
    lines = ["", *PREREGISTRATION.split("\n"), ""]
    path = os.path.join(out_dir, "pruning_heldout4.json")
    if not os.path.exists(path):
        return lines + ["(not run yet)", ""]
    with open(path) as f:
        data = json.load(f)
    rows, texts = data["rows"], data["meta"]["texts"]
    by = {(r["method"], r["prune_ratio"], r["text"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines += [f"**Result** (run after the commit above; `docs/pruning_heldout4.json`, command as registered). "
              "Mean KL per text; p99 / top-1 in the json.", ""]
    verdict = []
    for ratio in sorted({r["prune_ratio"] for r in rows}):
        lines += [f"ratio {ratio}:", "", "| pruner | " + " | ".join(texts) + " | mean |", "|---|" + "---|" * (len(texts) + 1)]
        for m in methods:
            kls = [by[(m, ratio, t)]["mean_kl"] for t in texts]
            lines.append(f"| {m} | " + " | ".join(_fmt(k) for k in kls) + f" | {_fmt(mean(kls))} |")
        diffs = [by[("SnapKV+EA ensemble", ratio, t)]["mean_kl"] / by[("SnapKV", ratio, t)]["mean_kl"] - 1 for t in texts]
        wins = sum(d < 0 for d in diffs)
        lines += ["", f"Ensemble vs SnapKV at {ratio}: " + ", ".join(f"{t.replace('.txt', '')} {d:+.0%}"
                                                                    for t, d in zip(texts, diffs)) +
                  f" (KL change): **wins {wins}/{len(texts)}**.", ""]
        verdict.append(wins >= 3)
    tri = os.path.join(out_dir, "pruning_tri_profile.json")
    if os.path.exists(tri):   # context: TriAttention with the calibration stored in the model profile
        with open(tri) as f:
            t = json.load(f)
        tby = {(r["prune_ratio"], r["text"]): r["mean_kl"] for r in t["rows"]}
        lines += [f"TriAttention with its calibration read from a version-2 model profile "
                  f"(`seqkv calibrate --add-triattention`, bench/calibration/ texts, {t['meta']['calibration_tokens']} "
                  f"tokens) instead of psf_license.txt, same texts: " + "; ".join(
                      f"ratio {ratio}: " + ", ".join(f"{x.replace('.txt', '')} {_fmt(tby[(ratio, x)])} (psf {_fmt(by[('TriAttention', ratio, x)]['mean_kl'])})"
                                                     for x in texts)
                      for ratio in sorted({r["prune_ratio"] for r in t["rows"]})) +
                  f".  Command: `{t['meta']['command']}` (`docs/pruning_tri_profile.json`).", ""]
    lines += [f"**Verdict by the registered rule: {'confirmed' if all(verdict) else 'not confirmed'}** "
              "(at least 3 of 4 texts at both ratios).", "",
              "Read with care: one model, one text per kind, 256 continuation positions per text, so a KL "
              "difference of a few percent (subprocess.py at 0.75) is within what another 256 tokens could "
              "reverse; counting the first held-out text too (psf_license.txt above, where SnapKV was better "
              "at both ratios), the ensemble beats SnapKV on 3 of 5 never-selected texts at ratio 0.5 and "
              "4 of 5 at ratio 0.75.  The ensemble costs about twice SnapKV's scoring time (it runs both "
              "scorers; `prune_s` in the json).", ""]
    return lines


def _interpolated_kl(points, n_bytes):
    """Mean KL at ``n_bytes`` from the two nearest of ``points`` (sorted by bytes), linear in log KL vs log
    bytes; None outside their range."""
    lo = [p for p in points if p["bytes"] <= n_bytes]
    hi = [p for p in points if p["bytes"] >= n_bytes]
    if not lo or not hi:
        return None
    a, b = lo[-1], hi[0]
    if a is b or a["bytes"] == b["bytes"]:
        return a["mean_kl"]
    w = (math.log(n_bytes) - math.log(a["bytes"])) / (math.log(b["bytes"]) - math.log(a["bytes"]))
    return math.exp((1 - w) * math.log(a["mean_kl"]) + w * math.log(b["mean_kl"]))


def _frontier(rows, texts, base="quant", combined=("prune+quant", "prune+lossless"), knob="step"):
    """For each text: does any combined point beat the ``base`` kind alone (lower KL at no more bytes)?"""
    name = {"quant": "quantization"}.get(base, base)
    out = [f"**Does combining win?** For each combined point, the {name}-alone KL at the same bytes "
           f"(log-linear interpolation between the two nearest `{knob}` points):", ""]

    n_wins = n_points = 0
    for t in texts:
        q = sorted([r for r in rows if r["text"] == t and r["kind"] == base], key=lambda r: r["bytes"])
        wins, losses = [], []
        for r in (r for r in rows if r["text"] == t and r["kind"] in combined):
            kl = _interpolated_kl(q, r["bytes"])
            if kl is None:
                continue
            point = (f"{r['method']} ratio {r['prune_ratio']} {knob} {r.get(knob, 'lossless')} "
                     f"({r['ratio']:.1f}x: KL {r['mean_kl']:.4f} vs {kl:.4f})")
            (wins if r["mean_kl"] < kl else losses).append(point)
            n_points += 1
            n_wins += r["mean_kl"] < kl
        line = f"- {t}: " + ("; ".join(wins) if wins else f"no combined point beats {base} alone inside the "
                                                            f"range the `{knob}` sweep covers")
        if base != "quant":   # the newer sections also list the points that lose
            line += (" | loses: " + "; ".join(losses)) if losses else ""
        out.append(line)
    if base != "quant":
        out += ["", f"In all, **{n_wins} of {n_points}** combined points inside the sweep's byte range have a lower "
                    f"mean KL than the {name} alone at the same bytes."]
    return out + [""]


CALIBRATED_CAVEAT = (
    "Caveats: these are the three development texts, on which the ensemble was picked (§1; §3 is its held-out "
    "check for pruning alone, §5 the held-out check of this section).")
HELDOUT_CALIBRATED_CAVEAT = (
    "The same measurement on the four held-out texts of §3 (bench/texts_heldout/), run once after §4 with "
    "nothing changed.")


HELDOUT_CALIBRATED_READING = (
    "Reading (written after the run): on held-out text the win is narrower than on the development texts.  "
    "From about 17x up every combined point wins (10 of 10: there the calibrated codec alone needs its coarse "
    "0.03–0.1 targets); at 16–17x 1 of 2; at 10–14x 5 of 8; at about 8x (ratio 0.25 with target 0.003) only 1 of "
    "4.  By setting: ratio 0.25 or 0.5 with target_kl 0.01 or 0.03 wins 15 of 16; either ratio with target_kl "
    "0.003 wins 2 of 8, because with fine quantization the pruning's own KL dominates.  So pruning + the "
    "calibrated codec is the better use of bytes from about 17x up; below about 12x the calibrated codec "
    "alone is as good or better on held-out text.  A rate controller should search both "
    "(`seqkv.pruning.smallest_within(..., profile=...)`).")


def _interpolation_caveat(rows, texts) -> str:
    """How far apart the calibrated-alone points are in bytes, against the combined points' margins at
    prune ratio 0.5 (the interpolated KL of the codec alone / the combined KL), from the data."""
    gaps, margins = [], []
    for t in texts:
        q = sorted([r for r in rows if r["text"] == t and r["kind"] == "calibrated"], key=lambda r: r["bytes"])
        gaps += [b["bytes"] / a["bytes"] for a, b in zip(q, q[1:])]
        for r in (r for r in rows if r["text"] == t and r["kind"] == "prune+calibrated" and r["prune_ratio"] == 0.5):
            kl = _interpolated_kl(q, r["bytes"])
            if kl is not None and r["mean_kl"] > 0:
                margins.append(kl / r["mean_kl"])
    if not gaps or not margins:
        return ""
    return (f"  The calibrated-alone points are {min(gaps):.1f}–{max(gaps):.1f}x apart in bytes, so the interpolated "
            f"KL is coarse; at prune ratio 0.5 the codec alone's interpolated KL is {min(margins):.1f}–"
            f"{max(margins):.1f}x the combined point's.")


def _layer_vs_per_head(layer_rows, per_head, texts, layer_method) -> str:
    """The sentence comparing layer-uniform pruning with the same pruner per head (§1), from the data."""
    head_method = layer_method.removesuffix(", layer")
    parts = []
    for ratio in sorted({r["prune_ratio"] for r in layer_rows if r["method"] == layer_method}):
        layer = [r["mean_kl"] for r in layer_rows if r["method"] == layer_method and r["prune_ratio"] == ratio]
        heads = [per_head.get((head_method, ratio, t)) for t in texts]
        if len(layer) == len(texts) and all(heads):
            parts.append(f"at {ratio}: {_fmt(mean(layer))} vs {_fmt(mean(h['mean_kl'] for h in heads))}")
    if not parts:
        return ""
    return (f"  At the same prune ratio, mean KL of {layer_method} vs {head_method} per head (§1): "
            + "; ".join(parts) + ".")


def _calibrated_section(out_dir, name="pruning_calibrated.json", title="## 4. Pruning + the calibrated codec, "
                        "at matched bytes", caveat=CALIBRATED_CAVEAT, reading=None, per_head=None):
    """§4 / §5: layer-uniform pruning + the calibrated codec vs the calibrated codec alone.  ``per_head``: §1's
    pruning-alone rows by (method, ratio, text), to compare the layer-uniform pruner with its per-head form."""
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    meta, rows = data["meta"], data["rows"]
    texts = meta["texts"]
    prof = meta["profile"]
    caveat += _interpolation_caveat(rows, texts)
    if per_head:
        caveat += _layer_vs_per_head([r for r in rows if r["kind"] == "prune"], per_head, texts,
                                     meta["calibrated_pruner"])
    lines = ["", title, "", caveat, "",
             f"Calibrated codec: `seqkv.encode(cache, profile=..., target_kl=t)` with the profile "
             f"`{prof['path']}` ({prof['bytes']} bytes, sha256 {prof['sha256'][:12]}…, shared by every cache of the "
             "model and not counted in the ratios).  Its KLT mixes the heads of a layer, so pruning must keep the same "
             "positions in every head of a layer (`PerLayer(scorer, ratio=r)`, or `level=\"layer\"` in `seqkv.pruner(...)`: "
             "scores averaged over the heads); per-head pruning "
             "with a profile is a ConfigError.  With pruning, `target_kl` is the predicted KL of the quantization "
             "only; the measured KL below is the total.  Combined: "
             f"**{meta['calibrated_pruner']}** (the §1/§3 best pruner, at layer level) then the calibrated codec.  "
             f"Command: `{meta['command']}`.", "",
             "**Layer-uniform pruning alone** (mean KL; compare the per-head rows of §1):", "",
             "| pruner | ratio | " + " | ".join(texts) + " | mean |", "|---|---|" + "---|" * (len(texts) + 1)]
    prune = [r for r in rows if r["kind"] == "prune"]
    by = {(r["method"], r["prune_ratio"], r["text"]): r for r in prune}
    for m in dict.fromkeys(r["method"] for r in prune):
        for ratio in sorted({r["prune_ratio"] for r in prune if r["method"] == m}):
            kls = [by[(m, ratio, t)]["mean_kl"] for t in texts]
            lines.append(f"| {m} | {ratio} | " + " | ".join(_fmt(k) for k in kls) + f" | {_fmt(mean(kls))} |")
    lines.append("")
    for t in texts:
        lines += [f"**{t}**", "", "| kind | prune ratio | target_kl | bytes | ratio vs fp16 | mean KL | p99 KL | top-1 |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted([r for r in rows if r["text"] == t and "bytes" in r], key=lambda r: r["bytes"]):
            lines.append(f"| {r['kind']} | {r.get('prune_ratio', '–')} | {r['target_kl']} | {r['bytes']} | "
                         f"{r['ratio']:.2f}x | {_fmt(r['mean_kl'])} | {_fmt(r['p99_kl'], '.3f')} | {_fmt(r['top1'], '.3f')} |")
        lines.append("")
    lines += _frontier(rows, texts, base="calibrated", combined=("prune+calibrated",), knob="target_kl")
    return lines + ([reading, ""] if reading else [])


def _plot(rows, texts, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(texts), figsize=(5 * len(texts), 4), squeeze=False)
    styles = {"quant": ("o-", "quantization alone"), "prune+quant": ("s", "pruning + quantization"),
              "prune+lossless": ("^-", "pruning alone (lossless)")}
    for ax, t in zip(axes[0], texts):
        series = sorted({(r["kind"], r["method"]) for r in rows if r["text"] == t and "bytes" in r})
        for kind, method in series:
            style, label = styles[kind]
            pts = sorted([r for r in rows if r["text"] == t and r["kind"] == kind and r["method"] == method],
                         key=lambda r: r["ratio"])
            name = label if kind == "quant" else f"{label}: {method}"
            ax.plot([p["ratio"] for p in pts], [p["mean_kl"] for p in pts], style, label=name, alpha=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([2, 3, 5, 7, 10, 15, 20, 30])
        ax.set_xlabel("ratio vs fp16 (all bytes)")
        ax.set_ylabel("mean KL")
        ax.set_title(t)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "pruning.png")
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    import sys

    print(write_report(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(sys.argv[1])))
