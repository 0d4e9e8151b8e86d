"""TriAttention (arXiv 2604.04921): key-only scoring from calibrated pre-RoPE query centres.

Calibrated once per model (:func:`calibrate`, or :meth:`TriAttention.calibrate`; the centres are a
:class:`seqkv.tri_calibration.TriCalibration`): for every
layer, query head and RoPE frequency band ``f`` (channel pair ``(f, f + D/2)``
read as the complex number ``q_f``), the centre ``E[q_f]`` and the mean
magnitude ``E|q_f|``.  A key ``k`` at position ``p`` (pre-RoPE ``k_f``) scores,
for a query head,

    S_trig = mean over δ in offsets of  Re Σ_f E[q_f]·conj(k_f)·exp(i·ω_f·(t0 + δ - p))
    S_norm = Σ_f (1 - R_f)·E|q_f|·|k_f|,     R_f = |E q_f| / E|q_f|  (mean resultant length)

with ``t0`` the last cached position: the expected logit of a future query at
distance ``δ`` (its mean part) plus the magnitude its spread can still reach.
For GQA, each query head's score is z-normalised over the tokens and the max
over the heads of a KV group is taken.  The first ``n_sink`` tokens are always kept.
No model is needed at pruning time: the calibration carries the RoPE frequencies.

The calibration is saved as safetensors (no pickle) with a versioned header, alone or in a model profile.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, PruneError
from ..layout import layout_from_model
from ..profile import Profile
from ..stages.rope import remove_rope
from ..tri_calibration import TriCalibration
from .observe import QueryObserver
from .scorer import ScoreContext, Scorer, check_int, register


def resolve_calibration(cal):
    """A TriCalibration from a TriCalibration, a model profile that carries one, or a path to either file."""
    if isinstance(cal, (str, os.PathLike)):
        path = os.fspath(cal)
        try:
            return TriCalibration.load(path)
        except ConfigError as exc:
            if "is not a TriAttention calibration file" not in str(exc):
                raise
        cal = Profile.load(path)   # a model profile (version 2) carries one
    if isinstance(cal, Profile):
        return TriCalibration.from_profile(cal)
    if cal is not None and not isinstance(cal, TriCalibration):
        raise PruneError(f"calibration must be a TriCalibration, a seqkv.Profile or a path, got {type(cal).__name__}")
    return cal


def _complex(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half].float(), x[..., half:].float())


@torch.no_grad()
def calibrate(model, token_ids_list, skip_first: int = 4) -> TriCalibration:
    """Query centres of ``model`` over the given texts (each a 1-D or [1, n] tensor of token ids)."""
    layout = layout_from_model(model)
    if not layout.has_rope:
        raise ConfigError("TriAttention needs a RoPE model")
    obs = QueryObserver()
    sums = None
    count = 0
    for ids in token_ids_list:
        ids = torch.as_tensor(ids).reshape(1, -1)
        with obs.attach(model):
            model(ids, use_cache=False)
        qs = torch.stack([_complex(obs.queries[i][:, skip_first:]) for i in range(layout.layers)])  # [L, Hq, n, F]
        s = (qs.sum(2), qs.abs().sum(2))
        sums = s if sums is None else (sums[0] + s[0], sums[1] + s[1])
        count += qs.shape[2]
    if not count:
        raise ConfigError("calibration needs at least one text longer than skip_first tokens")
    mean = sums[0] / count
    return TriCalibration(mean.real.contiguous(), mean.imag.contiguous(), (sums[1] / count).contiguous(),
                          torch.as_tensor(layout.inv_freq_array()), float(layout.rope_attention_scaling),
                          layout.fingerprint, count)


@register
@dataclass
class TriAttention(Scorer):
    offsets: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    n_sink: int = 4
    window: int = 0          # the last `window` tokens are always kept
    use_norm: bool = True
    calibration: object = field(default=None, repr=False)   # TriCalibration, a seqkv.Profile carrying one, or a path to either

    id = "triattention"

    def __post_init__(self):
        try:
            self.offsets = tuple(int(d) for d in self.offsets)
        except (TypeError, ValueError):
            self.offsets = ()
        if not self.offsets or min(self.offsets) < 0:
            raise PruneError("offsets must be a non-empty list of non-negative ints")
        check_int("triattention n_sink", self.n_sink, 0)
        check_int("triattention window", self.window, 0)
        self.calibration = resolve_calibration(self.calibration)

    def calibrate(self, model, token_ids_list) -> "TriAttention":
        self.calibration = calibrate(model, token_ids_list)
        return self

    def get_config(self) -> dict:
        cfg = super().get_config()
        cfg["offsets"] = list(self.offsets)
        cfg["calibration_sha256"] = self.calibration.digest() if self.calibration is not None else ""
        return cfg

    def prepare(self, cache, ctx: ScoreContext, model) -> None:
        cal = self.calibration
        if cal is None:
            raise PruneError("triattention is not calibrated: call .calibrate(model, token_ids_list) "
                             "or pass calibration= (a TriCalibration or a saved file)")
        layers = len(cache.layers)
        kv_heads, dim = cache.layers[0].keys.shape[1], cache.layers[0].keys.shape[3]
        if cal.mean_re.shape[0] != layers or cal.mean_re.shape[2] != dim // 2 or cal.mean_re.shape[1] % kv_heads:
            raise PruneError(f"the calibration {tuple(cal.mean_re.shape)} does not fit this cache "
                             f"({layers} layers, {kv_heads} KV heads, head_dim {dim})")
        if ctx.layout is not None and cal.fingerprint and ctx.layout.fingerprint and cal.fingerprint != ctx.layout.fingerprint:
            raise PruneError("the calibration was made for a different model")
        phases = torch.tensor(self.offsets, dtype=torch.float64)[:, None] * cal.inv_freq.double()[None, :]
        self._offset_phase = torch.complex(phases.cos().mean(0), phases.sin().mean(0)).to(torch.complex64)  # [F]

    def score(self, keys: torch.Tensor, values: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        cal, layer = self.calibration, ctx.layer
        kv_heads, tokens, _ = keys.shape
        pos = ctx.positions
        k = _complex(remove_rope(keys.float(), pos, cal.inv_freq, cal.attention_scaling))      # [H, T, F]
        dist = (pos[-1] - pos).double()[:, None] * cal.inv_freq.double()[None, :]             # [T, F]
        phase = torch.complex(dist.cos(), dist.sin()).to(torch.complex64) * self._offset_phase  # E_δ e^{iω(t0+δ-p)}
        m = torch.complex(cal.mean_re[layer], cal.mean_im[layer])                              # [Hq, F]
        groups = m.shape[0] // kv_heads
        kg = k.repeat_interleave(groups, dim=0)                                                # [Hq, T, F]
        s = (m[:, None, :] * kg.conj() * phase[None]).real.sum(-1)
        if self.use_norm:
            r = (m.abs() / cal.mean_abs[layer].clamp_min(1e-12)).clamp(max=1.0)
            s = s + ((1 - r) * cal.mean_abs[layer])[:, None, :].mul(kg.abs()).sum(-1)
        z = (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-12)
        out = z.view(kv_heads, groups, tokens).amax(1)
        if self.n_sink:
            out[:, :self.n_sink] = out.max() + 1
        if self.window:
            out[:, -self.window:] = out.max() + 1
        return out
