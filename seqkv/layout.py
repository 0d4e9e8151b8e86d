"""Model layout: the facts about a model that a KV cache depends on.

The layout comes from the model config (layers, KV heads, head_dim, RoPE),
and its fingerprint is recorded in every container so that a cache is never
decoded or reused against a different model.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ConfigError, ModelMismatchError

# config fields that define what a KV cache means; anything else (paths, versions) is ignored
_ARCH_FIELDS = (
    "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "sliding_window", "use_sliding_window",
)


@dataclass(frozen=True)
class ModelLayout:
    layers: int
    kv_heads: int
    head_dim: int
    rope_type: str = "default"
    rope_theta: float = 10000.0
    rope_inv_freq: tuple[float, ...] = ()   # float32 values, head_dim // 2 of them
    rope_attention_scaling: float = 1.0
    fingerprint: str = ""                   # sha256 of the architecture fields
    weights_digest: str = ""                # optional: sha256 of a strided sample of the embeddings
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["rope_inv_freq"] = list(self.rope_inv_freq)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelLayout":
        """A layout from its JSON object, strictly typed (docs/format.md §4.1): integers are JSON integers,
        numbers JSON numbers (never booleans or strings), strings strings, ``extra`` an object; every RoPE
        number is finite as the float32 the codec computes with, and the attention scaling is > 0."""
        if not isinstance(d, dict):
            raise ConfigError(f"invalid model layout: expected an object, got {type(d).__name__}")
        try:
            inv_freq = d.get("rope_inv_freq", [])
            if not isinstance(inv_freq, list):
                raise TypeError("rope_inv_freq must be a list of numbers")
            extra = d.get("extra", {})
            if not isinstance(extra, dict):
                raise TypeError("extra must be an object")
            out = cls(
                layers=_json_int(d, "layers"), kv_heads=_json_int(d, "kv_heads"), head_dim=_json_int(d, "head_dim"),
                rope_type=_json_str(d, "rope_type", "default"), rope_theta=_json_number(d.get("rope_theta", 0.0), "rope_theta"),
                rope_inv_freq=tuple(_json_number(x, "rope_inv_freq") for x in inv_freq),
                rope_attention_scaling=_json_number(d.get("rope_attention_scaling", 1.0), "rope_attention_scaling"),
                fingerprint=_json_str(d, "fingerprint", ""), weights_digest=_json_str(d, "weights_digest", ""),
                extra=dict(extra),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"invalid model layout: {exc}") from None
        # the codec computes in float32: a value finite as a double may still overflow there (1e39)
        as_f32 = np.asarray(out.rope_inv_freq + (out.rope_attention_scaling,), dtype=np.float64)
        with np.errstate(over="ignore"):
            finite32 = np.isfinite(as_f32.astype(np.float32))
        if not (np.isfinite(as_f32).all() and finite32.all() and math.isfinite(out.rope_theta)
                and out.rope_attention_scaling > 0 and np.float32(out.rope_attention_scaling) > 0):
            raise ConfigError("invalid model layout: RoPE parameters must be finite as float32 (and the scaling > 0)")
        return out

    @property
    def has_rope(self) -> bool:
        return len(self.rope_inv_freq) == self.head_dim // 2 and self.head_dim % 2 == 0

    def inv_freq_array(self) -> np.ndarray:
        return np.asarray(self.rope_inv_freq, dtype=np.float32)

    def check_same_model(self, other: "ModelLayout", what: str = "container") -> None:
        """Raise ModelMismatchError unless ``other`` describes the same model."""
        if self.fingerprint and other.fingerprint and self.fingerprint != other.fingerprint:
            raise ModelMismatchError(
                f"the {what} was made for a different model (fingerprint {self.fingerprint[:16]}…, "
                f"given model {other.fingerprint[:16]}…: layers {self.layers} vs {other.layers}, "
                f"kv_heads {self.kv_heads} vs {other.kv_heads}, head_dim {self.head_dim} vs {other.head_dim})"
            )
        if (self.layers, self.kv_heads, self.head_dim) != (other.layers, other.kv_heads, other.head_dim):
            raise ModelMismatchError(
                f"the {what} has layout layers={self.layers} kv_heads={self.kv_heads} head_dim={self.head_dim}, "
                f"the model has layers={other.layers} kv_heads={other.kv_heads} head_dim={other.head_dim}"
            )
        if self.weights_digest and other.weights_digest and self.weights_digest != other.weights_digest:
            raise ModelMismatchError(
                f"the {what} was made with different model weights (same architecture, other checkpoint)"
            )


def _json_int(d: dict, key: str) -> int:
    value = d[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} must be an integer, got {value!r}")
    return value


def _json_number(value, key: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{key} values must be numbers, got {value!r}")
    return float(value)


def _json_str(d: dict, key: str, default: str) -> str:
    value = d.get(key, default)
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string, got {value!r}")
    return value


def _config_of(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def _rope_params(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if not params:
        theta = getattr(config, "rope_theta", None)
        scaling = getattr(config, "rope_scaling", None) or {}
        params = dict(scaling)
        if theta is not None:
            params.setdefault("rope_theta", theta)
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _inv_freq(config, head_dim: int, params: dict) -> tuple[tuple[float, ...], float]:
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = float(params.get("rope_theta", 10000.0))
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return tuple(float(x) for x in inv.tolist()), 1.0
    fn = ROPE_INIT_FUNCTIONS.get(rope_type)
    if fn is None:
        raise ConfigError(f"unsupported RoPE type {rope_type!r}")
    inv, scaling = fn(config, device="cpu")
    return tuple(float(x) for x in inv.tolist()), float(scaling)


def architecture_fingerprint(config) -> str:
    fields = {k: getattr(config, k, None) for k in _ARCH_FIELDS}
    fields["rope"] = {k: v for k, v in _rope_params(config).items() if isinstance(v, (int, float, str, bool, list))}
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def weights_digest(model) -> str:
    """sha256 of every 97th embedding row rounded to bf16 (so fp32/bf16 loads agree)."""
    import torch

    emb = model.get_input_embeddings().weight.detach()[::97].to("cpu", torch.bfloat16)
    return hashlib.sha256(emb.view(torch.int16).numpy().tobytes()).hexdigest()


def layout_from_model(model_or_config) -> ModelLayout:
    """Read the layout from a transformers model or config (Llama, Qwen2, Mistral families);
    a ModelLayout is returned as it is."""
    if isinstance(model_or_config, ModelLayout):
        return model_or_config
    config = _config_of(model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    try:
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(f"cannot read the model layout from {type(config).__name__}: {exc}") from None
    params = _rope_params(config)
    inv_freq, scaling = _inv_freq(config, head_dim, params)
    return ModelLayout(
        layers=layers, kv_heads=kv_heads, head_dim=head_dim,
        rope_type=str(params.get("rope_type", "default")), rope_theta=float(params.get("rope_theta", 0.0) or 0.0),
        rope_inv_freq=inv_freq, rope_attention_scaling=scaling,
        fingerprint=architecture_fingerprint(config),
        weights_digest=weights_digest(model_or_config) if hasattr(model_or_config, "get_input_embeddings") else "",
    )


def layout_for_cache(model, config, layers, lossless: bool) -> ModelLayout:
    """The layout of the model (or config) ``layers`` came from, checked against their shapes; a lossless
    encode may go without a model (its layout then carries no RoPE parameters)."""
    if model is not None or config is not None:
        layout = layout_from_model(model if model is not None else config)
    elif lossless:
        heads, _, dim = layers[0][0].shape
        layout = ModelLayout(layers=len(layers), kv_heads=heads, head_dim=dim, rope_type="unknown")
    else:
        raise ConfigError(
            "lossy presets move keys to pre-RoPE and need the model's RoPE parameters: "
            "pass model= (or config=) to encode, or use preset='lossless'"
        )
    ModelLayout.from_json(layout.to_json())   # what every reader will check (ConfigError: e.g. RoPE values beyond float32)
    heads, _, dim = layers[0][0].shape
    if (layout.layers, layout.kv_heads, layout.head_dim) != (len(layers), heads, dim):
        raise ModelMismatchError(
            f"the cache has {len(layers)} layers x {heads} KV heads x head_dim {dim}, but the model has "
            f"{layout.layers} x {layout.kv_heads} x {layout.head_dim}: it comes from a different model"
        )
    return layout
