"""``seqkv.analyze``: where the bits of a lossy container go, and how far they are from the bounds.

For every layer and kind, at the distortion the container achieved:

- ``coded``: container bits per element of the tensor (exact sinks, side info, tables, ANS words);
- ``h_iid``: the per-component (i.i.d.) empirical entropy of the quantized symbols;
- ``h_coded_symbols``: the empirical entropy of what the entropy coder was given (after
  temporal prediction), against which ``symbol_bits`` (the coder's own output) is compared;
- ``h_cond_prev_token``: the plug-in conditional entropy H(q_t | q_{t-1}) per component,
  an estimate of what an ideal lag-1 context model could reach;
- ``gauss_rd``: the Gaussian reverse water-filling rate ``sum_c max(0, 1/2 log2(var_c / D_c))``
  at the achieved distortion of each KLT component (variances measured in the profile's
  basis on this cache), and the same given the previous token or the previous layer
  (linear prediction fitted on one half of the tokens, measured on the other).

All figures are bits per element (elements = kv_heads * tokens * head_dim, sinks included).
Entropies are plug-in estimates, so they are slightly optimistic for large alphabets.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .codec import encode
from .format import open_container
from .format.pipeline import KINDS, section_name
from .hf_adapter import cache_layers
from .errors import ConfigError
from .profile import Profile
from .stages.base import CodingState, TensorContext
from .stages.klt import KLTransform, rows_of
from .stages.rope import PreRope

ESTIMATE_CLIP = 4096  # symbols beyond this are clipped for the entropy estimates only
JOINT_CLIP = 63  # symbols are clipped to +-63 for the joint histograms of H(q_t | q_{t-1})


@dataclass
class TensorAnalysis:
    layer: int
    kind: str
    coded: float
    sink: float
    symbol_bits: float
    h_iid: float
    h_coded_symbols: float
    h_cond_prev_token: float
    gauss_rd: float | None
    gauss_rd_prev_token: float | None
    gauss_rd_prev_layer: float | None
    mse: float


@dataclass
class Analysis:
    tensors: list
    ratio: float
    bits_per_element: float
    predicted_kl: float | None

    def totals(self) -> dict:
        keys = ("coded", "sink", "symbol_bits", "h_iid", "h_coded_symbols", "h_cond_prev_token",
                "gauss_rd", "gauss_rd_prev_token", "gauss_rd_prev_layer")
        out = {}
        for k in keys:
            vals = [getattr(t, k) for t in self.tensors]
            out[k] = None if any(v is None for v in vals) else float(np.mean(vals))
        out["coder_overhead_vs_entropy"] = out["symbol_bits"] / out["h_coded_symbols"] - 1 if out["h_coded_symbols"] else None
        return out

    def as_dict(self) -> dict:
        return {"ratio": self.ratio, "bits_per_element": self.bits_per_element, "predicted_kl": self.predicted_kl,
                "totals": self.totals(), "tensors": [asdict(t) for t in self.tensors]}

    def markdown(self) -> str:
        def f(v):
            return "–" if v is None else f"{v:.3f}"

        t = self.totals()
        lines = [
            f"ratio {self.ratio:.2f}x, {self.bits_per_element:.3f} bits/element"
            + (f", predicted KL {self.predicted_kl:.4f}" if self.predicted_kl is not None else ""),
            "",
            "| layer | kind | coded | sinks | coder output | H coded symbols | H iid | H(q_t given q_t-1) | Gauss R(D) | R(D) given prev token | R(D) given prev layer |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for a in self.tensors:
            lines.append(f"| {a.layer} | {a.kind} | {f(a.coded)} | {f(a.sink)} | {f(a.symbol_bits)} | {f(a.h_coded_symbols)} | "
                         f"{f(a.h_iid)} | {f(a.h_cond_prev_token)} | {f(a.gauss_rd)} | {f(a.gauss_rd_prev_token)} | "
                         f"{f(a.gauss_rd_prev_layer)} |")
        lines.append(f"| all | both | {f(t['coded'])} | {f(t['sink'])} | {f(t['symbol_bits'])} | {f(t['h_coded_symbols'])} | "
                     f"{f(t['h_iid'])} | {f(t['h_cond_prev_token'])} | {f(t['gauss_rd'])} | {f(t['gauss_rd_prev_token'])} | "
                     f"{f(t['gauss_rd_prev_layer'])} |")
        return "\n".join(lines)


def column_entropy_bits(columns: np.ndarray, clip: int = ESTIMATE_CLIP) -> np.ndarray:
    """Plug-in entropy (bits, total) of each row of an int array, vectorised with one bincount;
    values beyond +-``clip`` are clipped (an estimate; keeps the histogram small)."""
    rows, tokens = columns.shape
    if rows == 0 or tokens == 0:
        return np.zeros(rows)
    c = np.clip(columns, -clip, clip)
    lo = c.min()
    width = int(c.max() - lo) + 1
    counts = np.bincount((c - lo + width * np.arange(rows)[:, None]).ravel(), minlength=rows * width)
    counts = counts.reshape(rows, width).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(counts > 0, counts * np.log2(counts / tokens), 0.0)
    return -terms.sum(axis=1)


def conditional_entropy_bits(columns: np.ndarray) -> float:
    """sum over rows of the plug-in H(x_t | x_{t-1}) * (T - 1) + H(x_0) (bits), rows of an int array."""
    rows, tokens = columns.shape
    if tokens < 2:
        return float(column_entropy_bits(columns).sum())
    c = np.clip(columns, -JOINT_CLIP, JOINT_CLIP) + JOINT_CLIP
    width = 2 * JOINT_CLIP + 1
    pair = c[:, 1:] * width + c[:, :-1]
    joint = column_entropy_bits(pair, clip=width * width)  # H(x_t, x_{t-1}) * (T - 1)
    prev = column_entropy_bits(c[:, :-1])         # H(x_{t-1}) * (T - 1)
    return float((joint - prev).sum()) + float(column_entropy_bits(c[:, :1]).sum())


def gauss_rate(var: torch.Tensor, dist: torch.Tensor) -> float:
    """sum_c max(0, 1/2 log2(var_c / D_c)) (bits per vector)."""
    ratio = (var / dist.clamp_min(1e-30)).clamp_min(1.0)
    return float(0.5 * torch.log2(ratio).sum())


def _holdout_residual_var(target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Per-column variance of ``target`` after linear prediction from ``inputs`` (+ bias), fitted on
    the first half of the rows and measured on the second (so it is not in-sample optimistic)."""
    n = target.shape[0] // 2
    if n < inputs.shape[1] + 2:
        return target.var(0)
    x = torch.cat([inputs, torch.ones(len(inputs), 1)], 1).double()
    y = target.double()
    ridge = 1e-6 * float(x[:n].pow(2).mean()) * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(x[:n].T @ x[:n] + ridge, x[:n].T @ y[:n])
    res = y[n:] - x[n:] @ w
    return res.pow(2).mean(0).float()


def analyze(cache_or_data, *, profile=None, model=None, original=None, **encode_kwargs) -> Analysis:
    """Analyse a lossy container (bytes), or encode a cache first (``encode_kwargs`` as for encode).

    ``profile`` is needed for calibrated containers and for the Gaussian R(D) columns (its KLT
    basis).  The distortions are measured against ``original`` (the cache, when a cache is given);
    without it the Gaussian columns are left out.
    """
    if profile is not None and not isinstance(profile, Profile):
        raise ConfigError(f"profile must be a seqkv.Profile, got {type(profile).__name__}")
    if isinstance(cache_or_data, (bytes, bytearray, memoryview)):
        data = bytes(cache_or_data)
    else:
        original = cache_or_data
        data = encode(cache_or_data, profile=profile, model=model, **encode_kwargs)
    reader = open_container(data)
    h = reader.header
    if reader.pipeline.lossless:
        raise ConfigError("analyze() explains lossy containers; a lossless one has no quantized symbols")
    if reader.pruned:
        raise ConfigError("analyze() explains unpruned containers only; analyze the cache before pruning")
    reader.use_profile(profile)
    basis = reader.profile or profile  # the KLT the Gaussian columns are measured in
    if basis is not None:
        basis.check_model(h.layout)
    orig_layers = cache_layers(original) if original is not None else None
    if orig_layers is not None and (len(orig_layers), *orig_layers[0][0].shape) != (h.layers, h.kv_heads, h.tokens, h.head_dim):
        raise ConfigError(f"original has {len(orig_layers)} layers of {tuple(orig_layers[0][0].shape)}, the container "
                          f"{h.layers} of {(h.kv_heads, h.tokens, h.head_dim)}: it is not the cache it was made from")
    sizes = reader.section_sizes()
    elements = h.kv_heads * h.tokens * h.head_dim
    itemsize = torch.empty(0, dtype=getattr(torch, h.dtype)).element_size()
    out = []
    prev_rows = {}
    for i in range(h.layers):
        symbols = {}
        decoded = reader.layer(i, symbols_out=symbols)
        for kind, dec in zip(KINDS, decoded):
            ctx = TensorContext(layer=i, kind=kind, positions=reader.positions, layout=h.layout)
            parts = symbols[(i, kind)]
            sinks = parts.sinks.shape[1]
            sym_cols = np.ascontiguousarray(parts.symbols.transpose(0, 2, 1)).reshape(-1, parts.symbols.shape[1]).astype(np.int64)
            res_cols = np.ascontiguousarray(parts.residuals.transpose(0, 2, 1)).reshape(-1, parts.residuals.shape[1]).astype(np.int64)
            section_bits = 8 * sizes[section_name(i, kind)]
            sink_bits = 8 * parts.sinks.numel() * itemsize
            rd = rd_tok = rd_layer = None
            mse = float("nan")
            if orig_layers is not None:
                x = orig_layers[i][KINDS.index(kind)].float()
                err = (dec.float() - x)
                mse = float(err[:, sinks:].pow(2).mean())
                if basis is not None:
                    z = _klt_rows(x, ctx, basis)[sinks:]
                    zd = _klt_rows(dec.float(), ctx, basis)[sinks:]
                    dist = (z - zd).pow(2).mean(0)
                    var = z.var(0)
                    rd = gauss_rate(var, dist) * z.shape[0] / elements
                    # a predictor that does worse than none on held-out tokens would not be used: min()
                    rd_tok = gauss_rate(torch.minimum(var, _holdout_residual_var(z[1:], zd[:-1])), dist) * z.shape[0] / elements
                    rd_layer = rd
                    if kind in prev_rows:
                        rd_layer = gauss_rate(torch.minimum(var, _holdout_residual_var(z, prev_rows[kind])), dist) * z.shape[0] / elements
                    prev_rows[kind] = zd  # the codec predicts from the previous layer's KLT reconstruction
            out.append(TensorAnalysis(
                layer=i, kind=kind, coded=section_bits / elements, sink=sink_bits / elements,
                symbol_bits=8 * parts.coder_bytes / elements,
                h_iid=float(column_entropy_bits(sym_cols).sum()) / elements,
                h_coded_symbols=float(column_entropy_bits(res_cols).sum()) / elements,
                h_cond_prev_token=conditional_entropy_bits(sym_cols) / elements,
                gauss_rd=rd, gauss_rd_prev_token=rd_tok, gauss_rd_prev_layer=rd_layer, mse=mse))
    total = reader.total_bytes
    rc = h.rate_control or {}
    return Analysis(tensors=out, ratio=2 * 2 * h.layers * elements / total,
                    bits_per_element=8 * total / (2 * h.layers * elements),
                    predicted_kl=rc.get("predicted_kl") if isinstance(rc, dict) else None)


def _klt_rows(x: torch.Tensor, ctx: TensorContext, profile) -> torch.Tensor:
    """A cached tensor [H, T, D] -> its KLT coefficients [T, H*D] in ``profile``'s basis (the codec's own stages)."""
    klt_ctx = TensorContext(layer=ctx.layer, kind=ctx.kind, positions=ctx.positions, layout=ctx.layout,
                            state=CodingState(profile=profile))
    return rows_of(KLTransform().forward(PreRope().forward(x, klt_ctx), klt_ctx))
