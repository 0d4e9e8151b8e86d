"""Probe for the rate-distortion engine (issue 3): calibrated per-layer KLT + per-layer sensitivities.

Not a feature: a reproducible measurement to decide the design.

    python bench/probes/klt_probe.py

1. Calibrate on psf_license.txt and email_message_source.txt (first 2048 tokens each): per layer and
   kind, the mean and the KLT basis of the concatenated KV heads (pre-RoPE keys), tokens 4.. only.
2. Sensitivity: add white noise of known power to one layer-kind's (pre-RoPE) tensor, measure the
   continuation KL on the calibration text, s = KL / noise power per element.
3. Held-out texts (python_reference, inspect_source): quantize the KLT coefficients with a uniform
   step per layer-kind, step = c / sqrt(s * N), entropy = per-component empirical entropy of the
   symbols (+ an estimate of table bytes); sweep c and report bits/element (with the 4 exact sinks)
   and the measured KL, next to the per-tensor-RMS `balanced` quantization of seqkv.
"""
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.layout import layout_from_model  # noqa: E402
from seqkv.quality import QualityProbe, clone_cache  # noqa: E402
from seqkv.stages.rope import apply_rope, remove_rope  # noqa: E402

SINKS = 4
TEXTS = os.path.join(ROOT, "bench", "texts")


def probe_for(model, tok, name, P=2048, C=256):
    with open(os.path.join(TEXTS, name), encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids
    return QualityProbe(model, ids, P, C)


def tensors(cache, inv, layer, kind):
    x = getattr(cache.layers[layer], kind)[0].float()  # [H, T, D]
    if kind == "keys":
        x = remove_rope(x, torch.arange(x.shape[1]), inv, 1.0)
    return x


def to_rows(x):  # [H, T, D] -> [T, H*D]
    return x.permute(1, 0, 2).reshape(x.shape[1], -1)


def from_rows(z, h, d):
    return z.reshape(z.shape[0], h, d).permute(1, 0, 2)


def calibrate(model, tok, inv, layers, names):
    stats = {}
    for name in names:
        p = probe_for(model, tok, name)
        for layer in range(layers):
            for kind in ("keys", "values"):
                rows = to_rows(tensors(p.cache, inv, layer, kind))[SINKS:].double()
                s = stats.setdefault((layer, kind), [0, 0, 0])
                s[0] += rows.shape[0]
                s[1] = s[1] + rows.sum(0)
                s[2] = s[2] + rows.T @ rows
    basis = {}
    for key, (n, sx, sxx) in stats.items():
        mean = sx / n
        cov = sxx / n - torch.outer(mean, mean)
        evals, evecs = torch.linalg.eigh(cov)
        basis[key] = (mean.float(), evecs.float().flip(1), evals.flip(0).float())
    return basis


def replace(cache, inv, layer, kind, x):
    if kind == "keys":
        x = apply_rope(x, torch.arange(x.shape[1]), inv, 1.0)
    setattr(cache.layers[layer], kind, x[None].to(getattr(cache.layers[layer], kind).dtype))


def sensitivities(p, inv, layers, noise_rel=0.05):
    sens = {}
    for layer in range(layers):
        for kind in ("keys", "values"):
            c = clone_cache(p.cache)
            x = tensors(c, inv, layer, kind)
            power = float((noise_rel * x[:, SINKS:].pow(2).mean().sqrt()) ** 2)
            g = torch.Generator().manual_seed(layer * 2 + (kind == "values"))
            y = x.clone()
            y[:, SINKS:] += torch.randn(y[:, SINKS:].shape, generator=g) * power ** 0.5
            replace(c, inv, layer, kind, y)
            sens[(layer, kind)] = max(p.score(c).mean_kl, 1e-9) / power
    return sens


def entropy_bits(q):  # per-component empirical entropy + ~1.5 bytes per distinct symbol for tables
    bits = 0.0
    for col in q.T:
        _, counts = np.unique(col, return_counts=True)
        pr = counts / counts.sum()
        bits += float(-(counts * np.log2(pr)).sum()) + 12 * len(counts)
    return bits


def code(p, inv, layers, step_of, basis=None):
    """Quantize every layer-kind; returns (bits/element incl. sinks at 16 bits, quality report)."""
    c = clone_cache(p.cache)
    bits = 0.0
    n = 0
    for layer in range(layers):
        for kind in ("keys", "values"):
            x = tensors(c, inv, layer, kind)
            h, t, d = x.shape
            rows = to_rows(x)
            body = rows[SINKS:]
            if basis is not None:
                mean, vecs, _ = basis[(layer, kind)]
                z = (body - mean) @ vecs
            else:
                z = body
            step = step_of(layer, kind, z)
            q = torch.round(z / step)
            bits += entropy_bits(q.numpy().astype(np.int64)) + SINKS * h * d * 16 + 32 * h * d
            zh = q * step
            bh = zh @ vecs.T + mean if basis is not None else zh
            rows_hat = torch.cat([rows[:SINKS], bh])
            replace(c, inv, layer, kind, from_rows(rows_hat, h, d))
            n += x.numel()
    return bits / n, p.score(c)


def main():
    model, tok = load_embedded_model()
    lay = layout_from_model(model)
    inv = torch.tensor(lay.inv_freq_array())
    layers = lay.layers
    calib = ["psf_license.txt", "email_message_source.txt"]
    basis = calibrate(model, tok, inv, layers, calib)
    sens = sensitivities(probe_for(model, tok, calib[0]), inv, layers)
    print("sensitivity (KL per unit noise power), top 8:",
          sorted(((round(v, 3), k) for k, v in sens.items()), reverse=True)[:8], flush=True)
    for name in ["python_reference.txt", "inspect_source.txt"]:
        p = probe_for(model, tok, name)
        print(f"\n{name} (held out)  | rows: scheme, c, bits/elem, ratio, mean KL, p99 KL, top-1", flush=True)
        for a in (0.25, 0.35):
            bpe, r = code(p, inv, layers, lambda _l, _k, z, a=a: a * z.pow(2).mean().sqrt())
            print(f"| per-tensor RMS step (no KLT) | {a} | {bpe:.3f} | {16 / bpe:.2f}x | {r.mean_kl:.5f} | {r.p99_kl:.4f} | {r.top1_agreement:.3f} |", flush=True)
        for cst in (0.02, 0.03, 0.045, 0.065):
            bpe, r = code(p, inv, layers, lambda l, k, z, cst=cst: torch.tensor(cst / sens[(l, k)] ** 0.5), basis)
            print(f"| KLT + sensitivity steps | {cst} | {bpe:.3f} | {16 / bpe:.2f}x | {r.mean_kl:.5f} | {r.p99_kl:.4f} | {r.top1_agreement:.3f} |", flush=True)


if __name__ == "__main__":
    main()
