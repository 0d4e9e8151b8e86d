"""Named presets: each is a pipeline config (JSON), recorded in every container.

``step`` is the one quality knob of the lossy presets: the uniform
quantizer's step relative to each tensor's RMS.  Smaller steps keep more
quality and cost more bytes.
"""
from __future__ import annotations

import copy

from .errors import ConfigError

DEFAULT_SINK_TOKENS = 4

PRESETS: dict[str, dict] = {
    "lossless": {"mode": "lossless", "coder": {"id": "lossless_float"}},
    "near_lossless": {
        "mode": "lossy", "sink_tokens": DEFAULT_SINK_TOKENS, "transforms": [{"id": "prerope"}],
        "quantizer": {"id": "uniform", "step": 0.08}, "coder": {"id": "context_ans"},
    },
    "balanced": {
        "mode": "lossy", "sink_tokens": DEFAULT_SINK_TOKENS, "transforms": [{"id": "prerope"}],
        "quantizer": {"id": "uniform", "step": 0.25}, "coder": {"id": "context_ans"},
    },
    "small": {
        "mode": "lossy", "sink_tokens": DEFAULT_SINK_TOKENS, "transforms": [{"id": "prerope"}],
        "quantizer": {"id": "uniform", "step": 0.4}, "coder": {"id": "context_ans"},
    },
}

# the options encode() accepts on top of a preset, and where each one goes
OPTION_NAMES = ("step", "sink_tokens", "rotation", "quantizer", "bits", "rounding", "key_channel_gamma", "seed")


def pipeline_config(preset: str, **options) -> dict:
    """The pipeline config for ``preset`` with ``options`` applied; ConfigError on anything unknown."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise ConfigError(f"unknown encode option(s) {sorted(unknown)}; known: {list(OPTION_NAMES)}")
    cfg = copy.deepcopy(PRESETS[preset])
    cfg["preset"] = preset
    if cfg["mode"] == "lossless":
        if options:
            raise ConfigError(f"preset 'lossless' takes no quantizer options, got {sorted(options)}")
        return cfg
    if "sink_tokens" in options:
        sinks = options.pop("sink_tokens")
        if not isinstance(sinks, int) or isinstance(sinks, bool) or not 0 <= sinks <= 1 << 20:
            raise ConfigError(f"sink_tokens must be an int >= 0, got {sinks!r}")
        cfg["sink_tokens"] = sinks
    rotation = options.pop("rotation", None)
    seed = options.pop("seed", 0)
    if rotation not in (None, "none", "hadamard"):
        raise ConfigError(f"rotation must be 'none' or 'hadamard', got {rotation!r}")
    if rotation == "hadamard":
        cfg["transforms"].append({"id": "hadamard", "seed": seed})
    quantizer = options.pop("quantizer", None)
    if quantizer == "lloydmax":
        cfg["quantizer"] = {"id": "lloydmax", "bits": options.pop("bits", 4)}
    elif quantizer not in (None, "uniform"):
        raise ConfigError(f"quantizer must be 'uniform' or 'lloydmax', got {quantizer!r}")
    if "bits" in options:
        raise ConfigError("bits= applies to quantizer='lloydmax' only")
    for name in ("step", "rounding", "key_channel_gamma"):
        if name in options:
            if cfg["quantizer"]["id"] != "uniform":
                raise ConfigError(f"{name}= applies to the uniform quantizer only")
            cfg["quantizer"][name] = options.pop(name)
    return cfg


CALIBRATED_PRESET = "calibrated"
CALIBRATED_OPTION_NAMES = ("rounding", "predict", "cross_layer", "token_steps", "repeat")


def calibrated_pipeline_config(sink_tokens: int, **options) -> dict:
    """The pipeline of the calibrated codec (used with a model profile): pre-RoPE keys, the
    profile's per-layer KLT, profile-scaled uniform steps with cross-layer prediction, temporal
    prediction with repeat prediction, context ANS.  ``predict`` / ``cross_layer`` switch the two
    predictors off, ``repeat`` the temporal predictor's repeat mode (format 1.4)."""
    unknown = set(options) - set(CALIBRATED_OPTION_NAMES)
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)} with a profile; known: "
                          f"{list(CALIBRATED_OPTION_NAMES)} and one of target_kl / bits_per_element / max_bytes / scale")
    predict = options.get("predict", True)
    cross_layer = options.get("cross_layer", True)
    token_steps = options.get("token_steps", False)
    repeat = options.get("repeat", predict)
    for name, value in (("predict", predict), ("cross_layer", cross_layer), ("token_steps", token_steps),
                        ("repeat", repeat)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}")
    cfg = {
        "mode": "lossy", "preset": CALIBRATED_PRESET, "sink_tokens": sink_tokens,
        "transforms": [{"id": "prerope"}, {"id": "klt"}],
        "quantizer": {"id": "klt_uniform", "rounding": options.get("rounding", 0.5), "cross_layer": cross_layer,
                      **({"token_steps": True} if token_steps else {})},
        # finer spread classes than the presets' 4 per octave: KLT components span a wide range of
        # spreads; 6 codes 0.23 % smaller at target_kl=0.01 on SmolLM2 (docs/rate_distortion.md)
        "coder": {"id": "context_ans", "classes_per_octave": 6},
    }
    if repeat and not predict:
        raise ConfigError("repeat=True is a mode of the temporal predictor: it needs predict=True")
    if predict:
        # repeat prediction: a token that repeats an earlier run of tokens is predicted from it (format 1.4)
        cfg["predictor"] = {"id": "temporal_ar", **({"repeat": True} if repeat else {})}
    return cfg
