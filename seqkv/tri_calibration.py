"""TriAttention's calibration: per layer and query head, the pre-RoPE query centres of a model.

Profile data, below both :mod:`seqkv.profile` (a version-2 model profile carries one) and the
TriAttention pruner (:mod:`seqkv.pruning.triattention`, which scores keys with it).  Per layer, query
head and RoPE frequency band ``f`` (channel pair ``(f, f + D/2)`` read as the complex number ``q_f``):
the centre ``E[q_f]`` (``mean_re`` + i ``mean_im``) and the mean magnitude ``E|q_f|`` (``mean_abs``),
with the model's RoPE frequencies.  Saved alone as safetensors (no pickle) with a versioned header.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ConfigError, PruneError

CALIBRATION_FORMAT = "seqkv.triattention.calibration"
CALIBRATION_VERSION = 1


@dataclass
class TriCalibration:
    mean_re: torch.Tensor      # [layers, query_heads, D/2]
    mean_im: torch.Tensor
    mean_abs: torch.Tensor
    inv_freq: torch.Tensor     # [D/2]
    attention_scaling: float = 1.0
    fingerprint: str = ""
    tokens: int = 0

    def digest(self) -> str:
        h = hashlib.sha256()
        for t in (self.mean_re, self.mean_im, self.mean_abs, self.inv_freq):
            h.update(t.float().contiguous().numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str) -> None:
        meta = {"format": CALIBRATION_FORMAT, "version": str(CALIBRATION_VERSION), "fingerprint": self.fingerprint,
                "tokens": str(self.tokens), "attention_scaling": json.dumps(self.attention_scaling)}
        save_file({"mean_re": self.mean_re.contiguous(), "mean_im": self.mean_im.contiguous(),
                   "mean_abs": self.mean_abs.contiguous(), "inv_freq": self.inv_freq.contiguous()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "TriCalibration":
        """A calibration saved by :meth:`save`; ConfigError for anything else (``is not a TriAttention
        calibration file`` when it is another file, such as a model profile)."""
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != CALIBRATION_FORMAT:
                    raise ConfigError(f"{path} is not a TriAttention calibration file")
                if meta.get("version") != str(CALIBRATION_VERSION):
                    raise ConfigError(f"{path}: calibration version {meta.get('version')!r} is not supported "
                                      f"(this seqkv reads version {CALIBRATION_VERSION})")
                t = {k: f.get_tensor(k) for k in ("mean_re", "mean_im", "mean_abs", "inv_freq")}
        except (OSError, KeyError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"cannot read the TriAttention calibration {path}: {exc}") from None
        out = cls(**t, attention_scaling=float(json.loads(meta.get("attention_scaling", "1.0"))),
                  fingerprint=meta.get("fingerprint", ""), tokens=int(meta.get("tokens", "0")))
        if not (out.mean_re.shape == out.mean_im.shape == out.mean_abs.shape and out.mean_re.dim() == 3
                and out.inv_freq.shape == (out.mean_re.shape[2],)):
            raise ConfigError(f"{path}: calibration tensors have inconsistent shapes")
        return out

    @classmethod
    def from_profile(cls, profile) -> "TriCalibration":
        """The calibration a model profile (``seqkv.Profile``, version 2) carries; PruneError when it has none."""
        cal = getattr(profile, "triattention", None)
        if cal is None:
            raise PruneError("this model profile has no TriAttention calibration: make one with "
                             "`seqkv calibrate --add-triattention PROFILE -o OUT` or Profile.with_triattention(...)")
        return cal
