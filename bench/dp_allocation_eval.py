"""Issue 13, lever 2: allocation by the quantizer's measured rate-distortion curves (with 0-bit components)
against the profile's equal-slope steps (reverse water-filling at high rate).

    python bench/dp_allocation_eval.py --out /tmp/dp            # ~10 min: fit on the calibration texts, write
                                                                #   /tmp/dp.profile.safetensors and /tmp/dp.json
    python bench/closed_loop_eval.py --profile /tmp/dp.profile.safetensors --loops closed-uniform --out /tmp/dpcl

Today each component ``c`` of a tensor gets the step ``scale / sqrt(sensitivity * weight_c)``: equal slope of
weighted distortion per bit *at high rate*.  At the rates seqkv runs (1-2 bits/element, many components below
their step) an entropy-coded uniform quantizer's slope depends on ``sigma_c / step_c``, so equal steps are not
equal slopes.  This bench:

1. encodes each calibration text of the shipped profile (bench/calibration, the texts it was made from) at
   ``--target-kl`` with uniform token steps and takes the KLT coefficients rate control sees (after the sinks;
   a component is coded as its cross-layer residual where the residual has the smaller variance, as the
   quantizer's stand-in does, with the previous layer's *unquantized* coefficients as the prediction);
2. per component, for step multipliers ``2 ** (k / 4)``, k = -8 .. 24, and "0 bits" (every symbol zero),
   measures the rate (the symbols' empirical entropy, Miller-Madow corrected, bits) and the distortion (the profile's KL model:
   ``kl_gain * sensitivity * weight_c * mse_c / n``);
3. chooses one k per component by a Lagrangian (the dynamic-programming allocation of KVTC reduces to this
   for a separable rate and distortion): minimise distortion + lambda * rate summed over the calibration
   texts, lambda bisected so the total predicted distortion equals the equal-step allocation's;
4. reports the rate at matched predicted KL on the calibration texts (in sample) and on held-out texts (the
   chosen multipliers applied there, one global shift re-matched to the equal-step distortion);
5. writes a profile whose weights give those steps (``weight_c / m_c**2``; "0 bits" = m 2**10), so the real
   encoder, closed loop and measured KL, can be run with ``--profile`` (the KL model's start is then off; the
   loop measures).

The rates here are iid entropies of the symbols (the coder's adaptive contexts and the repeat predictor are not
modelled); the closed-loop run of step 5 is what counts.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import seqkv  # noqa: E402
import seqkv.calibrated_encoder as calibrated_encoder  # noqa: E402
from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.quality import prefill  # noqa: E402
from seqkv.stages.klt import columns_of, from_columns, matmul  # noqa: E402
from seqkv.stages.quantize_klt import component_steps  # noqa: E402
from seqkv.stages.quantize_uniform import quantize_symbols  # noqa: E402

GRID = list(range(-8, 25))          # step multipliers 2 ** (k / 4)
ZERO_BITS = len(GRID)               # index of the "every symbol zero" choice
ZERO_BITS_MULTIPLIER = 2.0 ** 10    # what the written profile uses for it (any value far above sigma / step)
CALIBRATION = ["bench/calibration/calib_argparse.txt", "bench/calibration/calib_topics.txt",
               "bench/calibration/calib_unittest.txt"]
HELD_OUT = ["seqkv/data/texts/psf_license.txt", "bench/texts_heldout/gpl3.txt",
            "bench/texts_heldout/subprocess_source.txt", "bench/texts_heldout/stdlib_h.txt",
            "bench/texts/python_reference.txt"]


def coefficients(model, tok, profile, path: str, target: float, prompt_len: int):
    """(bodies {(layer, kind): [H, T, D]}, rounding, scale) of one text, as rate control sees them."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids[:, :prompt_len]
    cache = prefill(model, ids, prompt_len)
    seen = {}
    real = calibrated_encoder.scale_for_kl

    def spy(profile_, bodies, target_, rounding, *args, **kwargs):
        seen.update(bodies=bodies, rounding=rounding)
        return real(profile_, bodies, target_, rounding, *args, **kwargs)
    calibrated_encoder.scale_for_kl = spy
    try:
        blob = seqkv.encode(cache, model=model, profile=profile, target_kl=target, token_ids=ids[0],
                            token_steps=False)
    finally:
        calibrated_encoder.scale_for_kl = real
    return seen["bodies"], seen["rounding"], seqkv.inspect(blob)["rate_control"]["scale"]


def coded_input(bodies: dict, profile) -> dict:
    """Per (layer, kind): the coefficients the quantizer codes, [H, T, D] (cross-layer residual per component
    where it has the smaller variance, predicted from the previous layer's unquantized coefficients)."""
    out = {}
    for (layer, kind), z in bodies.items():
        part = profile.parts[(layer, kind)]
        prev = bodies.get((layer - 1, kind))
        if part.cross is not None and prev is not None:
            p = from_columns(matmul(part.cross, columns_of(prev).contiguous()), z.shape[0], z.shape[2])
            use = ((z - p).pow(2).mean(1) < z.pow(2).mean(1))[:, None, :]
            z = torch.where(use, z - p, z)
        out[(layer, kind)] = z.contiguous()
    return out


def entropy_bits(q: torch.Tensor) -> torch.Tensor:
    """Per component, the empirical entropy of its symbols times their count, plus Miller-Madow's correction
    ((bins used - 1) / (2 ln 2) bits: a plug-in entropy of T samples under-counts, most at fine steps, and an
    adaptive coder pays about that much to learn the distribution): [H, T, D] -> [H*D] bits."""
    cols = columns_of(q).to(torch.int64)
    shifted = cols - cols.min(dim=1, keepdim=True).values
    bins = int(shifted.max()) + 1
    counts = torch.zeros(cols.shape[0], bins, dtype=torch.float64).scatter_add_(
        1, shifted, torch.ones_like(shifted, dtype=torch.float64))
    p = counts / cols.shape[1]
    plug_in = -(counts * torch.where(p > 0, torch.log2(p), torch.zeros_like(p))).sum(1)
    return plug_in + ((counts > 0).sum(1) - 1).double() / (2 * math.log(2))


def curves(coded: dict, profile, scale: float, rounding: float) -> tuple[np.ndarray, np.ndarray]:
    """rate [N, K+1] (bits) and distortion [N, K+1] (predicted KL) of every component (all tensors, in key
    order) at every grid multiplier and at 0 bits."""
    rates, dists = [], []
    for key, z in coded.items():
        part = profile.parts[key]
        heads, _tokens, dim = z.shape
        base = component_steps(part, scale, heads, dim)
        weight = part.weights.reshape(heads * dim).double()
        factor = profile.kl_gain * part.sensitivity * weight / (heads * dim)
        r = torch.zeros(heads * dim, len(GRID) + 1, dtype=torch.float64)
        d = torch.zeros_like(r)
        for j, k in enumerate(GRID):
            steps = base * 2.0 ** (k / 4)
            q = quantize_symbols(z, steps, rounding)
            r[:, j] = entropy_bits(q)
            d[:, j] = columns_of((z - q * steps[:, None, :]).pow(2)).double().mean(1) * factor
        r[:, ZERO_BITS] = 0.0
        d[:, ZERO_BITS] = columns_of(z.pow(2)).double().mean(1) * factor
        rates.append(r.numpy())
        dists.append(d.numpy())
    return np.concatenate(rates), np.concatenate(dists)


def lagrangian_choice(rate: np.ndarray, dist: np.ndarray, goal: float) -> np.ndarray:
    """Per component the grid index minimising dist + lam * rate, lam bisected (log) so sum(dist) ~ goal."""
    lo, hi = 1e-14, 1e2
    for _ in range(80):
        lam = math.sqrt(lo * hi)
        choice = np.argmin(dist + lam * rate, axis=1)
        total = dist[np.arange(len(choice)), choice].sum()
        lo, hi = (lam, hi) if total < goal else (lo, lam)
    return np.argmin(dist + math.sqrt(lo * hi) * rate, axis=1)


def totals(rate, dist, choice):
    rows = np.arange(len(choice))
    return float(rate[rows, choice].sum()), float(dist[rows, choice].sum())


def matched_rate(rate: np.ndarray, dist: np.ndarray, choice: np.ndarray, goal: float) -> tuple[float, float, int]:
    """The rate of ``choice`` shifted by one global g (quarter octaves), interpolated (log-log) between the two
    shifts whose distortion brackets ``goal``; (rate, distortion, g below)."""
    points = []
    for g in range(-12, 13):
        shifted = np.where(choice == ZERO_BITS, ZERO_BITS, np.clip(choice + g, 0, len(GRID) - 1))
        points.append((g, *totals(rate, dist, shifted)))
    for (g0, r0, d0), (_g1, r1, d1) in zip(points, points[1:]):
        if d0 <= goal <= d1:
            t = (math.log(goal) - math.log(d0)) / (math.log(d1) - math.log(d0)) if d1 > d0 else 0.0
            return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0))), goal, g0
    raise RuntimeError("no global shift brackets the goal")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-kl", type=float, default=0.01)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--calibration", action="append", help="fit texts (default: the shipped profile's)")
    ap.add_argument("--held-out", action="append", help="evaluation texts (default: five held-out texts)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="writes OUT.json, OUT.md and OUT.profile.safetensors")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_embedded_model()
    profile = seqkv.shipped_profile(model)
    t0 = time.perf_counter()

    def text_curves(path):
        bodies, rounding, scale = coefficients(model, tok, profile, path, args.target_kl, args.prompt_len)
        keys = list(bodies)
        rate, dist = curves(coded_input(bodies, profile), profile, scale, rounding)
        elements = sum(z.numel() for z in bodies.values())
        print(f"{path}: scale {scale:.5f}, {time.perf_counter() - t0:.0f} s", flush=True)
        return keys, rate, dist, elements
    base = GRID.index(0)
    fit = [text_curves(p) for p in args.calibration or CALIBRATION]
    keys = fit[0][0]
    rate_fit = sum(f[1] for f in fit)
    dist_fit = sum(f[2] for f in fit)
    goal = float(dist_fit[:, base].sum())
    choice = lagrangian_choice(rate_fit, dist_fit, goal)
    r_dp, d_dp = totals(rate_fit, dist_fit, choice)
    r_eq = float(rate_fit[:, base].sum())
    elements_fit = sum(f[3] for f in fit)
    summary = {"fit": {"texts": args.calibration or CALIBRATION, "equal_step_bpe": r_eq / elements_fit,
                       "dp_bpe": r_dp / elements_fit, "predicted_kl_equal": goal / len(fit),
                       "predicted_kl_dp": d_dp / len(fit), "rate_saving": 1 - r_dp / r_eq,
                       "zero_bit_components": int((choice == ZERO_BITS).sum()),
                       "components": int(choice.size),
                       "multiplier_histogram": {("0 bits" if c == ZERO_BITS else f"2^({GRID[c]}/4)"): int(n)
                                                for c, n in zip(*np.unique(choice, return_counts=True))}},
               "held_out": []}
    print(json.dumps(summary["fit"]), flush=True)
    for path in args.held_out or HELD_OUT:
        _keys, rate, dist, elements = text_curves(path)
        goal_h = float(dist[:, base].sum())
        r_eq_h = float(rate[:, base].sum())
        r_dp_h, _d, shift = matched_rate(rate, dist, choice, goal_h)
        own = lagrangian_choice(rate, dist, goal_h)        # the allocation fitted on this text itself (a bound)
        r_own, _ = totals(rate, dist, own)
        row = {"text": path, "predicted_kl": goal_h, "equal_step_bpe": r_eq_h / elements,
               "dp_bpe": r_dp_h / elements, "rate_saving": 1 - r_dp_h / r_eq_h, "global_shift_q": shift,
               "in_sample_bound_saving": 1 - r_own / r_eq_h}
        summary["held_out"].append(row)
        print(json.dumps(row), flush=True)

    # the profile whose equal-slope steps are the chosen ones: step ~ 1 / sqrt(weight), so weight / m^2
    dp_profile = copy.deepcopy(profile)
    offset = 0
    for key in keys:
        part = dp_profile.parts[key]
        n = part.weights.numel()
        idx = choice[offset:offset + n]
        offset += n
        mult = np.where(idx == ZERO_BITS, ZERO_BITS_MULTIPLIER, 2.0 ** (np.array(GRID)[np.minimum(idx, len(GRID) - 1)] / 4))
        part.weights = (part.weights.double() / torch.from_numpy(mult) ** 2).float()
        part.derived.clear()
    dp_profile.info = {**dp_profile.info, "dp_allocation": {"bench": "bench/dp_allocation_eval.py",
                                                            "target_kl": args.target_kl}}
    dp_profile.changed()
    dp_profile.save(args.out + ".profile.safetensors")
    summary["meta"] = {"model": "SmolLM2-135M-Instruct", "prompt_len": args.prompt_len, "target_kl": args.target_kl,
                       "profile": "shipped", "seqkv": seqkv.__version__, "seconds": time.perf_counter() - t0,
                       "command": "python bench/dp_allocation_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    with open(args.out + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(summary))
    return 0


def markdown(summary: dict) -> str:
    """OUT.md: the fit and the held-out rows (also: ``python -c`` on a saved OUT.json)."""
    fit, meta = summary["fit"], summary["meta"]
    lines = [f"Written by `{meta['command']}` (SmolLM2-135M-Instruct, P={meta['prompt_len']}, shipped profile, "
             f"uniform token steps, at the scale the closed loop chose for target_kl={meta['target_kl']:g} on each "
             "text; rates are Miller-Madow-corrected iid entropies of the symbols, distortions the profile's KL "
             "model: see the script's docstring).", "",
             f"Fitted on {', '.join(os.path.basename(t) for t in fit['texts'])} (in sample): equal steps "
             f"{fit['equal_step_bpe']:.4f} bits/element, allocation {fit['dp_bpe']:.4f} at the same predicted KL "
             f"({fit['rate_saving']:+.1%} rate saved); {fit['zero_bit_components']} of {fit['components']} "
             "components chose 0 bits.", "",
             "| held-out text | equal steps, bits/element | fitted allocation, bits/element (matched predicted KL) "
             "| rate saved | the text's own allocation (in-sample bound) |", "|---|---:|---:|---:|---:|"]
    for r in summary["held_out"]:
        lines.append(f"| {os.path.basename(r['text'])} | {r['equal_step_bpe']:.4f} | {r['dp_bpe']:.4f} | "
                     f"{r['rate_saving']:+.1%} | {r['in_sample_bound_saving']:+.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
